"""Accuracy of every family on the shared CUB subset (50 species), and the frozen floor.

The recipe (the same for every family; docs/design.md#training-recipe explains why):

1. Backbone features of the training images, and of their horizontal flips, are computed
   once (MobileNetV2, shared weights, BatchNormalization in inference mode, the whole
   227-px image resized to `--image-size`).
2. Phase one: the family's head — every layer after the backbone — is trained on those
   cached features with the family's own joint loss (`keras_fg.models.train_head`):
   AdamW, learning rate 1e-3 with cosine decay to 0, weight decay 1e-4, batch 64,
   `--head-epochs` epochs. MA-CNN's channel grouping is first initialised by clustering
   channel peaks (MA-CNN §3.2) on 512 cached feature maps, with soft (0.1 / 0.9) targets.
3. Phase two (`--fine-tune-epochs N`, 8 by default): every layer trains, BatchNormalization
   frozen, on augmented images (resize to 256, random 224 crop, flip), AdamW with weight
   decay 1e-4 and learning rate `--fine-tune-lr` (1e-4) decaying to 0 by cosine over
   the N epochs, for the backbone and the head alike, starting from phase one's head.
   With `--part-crop-size S` (full MA-CNN), phase two trains the model with part crops:
   phase one's weights are copied into it, the part backbone starts from the same
   pretrained weights, and the fused classifier's rows for the crops' features start at
   zero, so phase two starts from phase one's predictions (`with_part_crops`).

The floor is a logistic regression on the globally pooled frozen features (Keras,
full-batch Adam on the softmax cross-entropy + L2 with scikit-learn's default C = 1).
Evaluation: test images resized whole, top-1 and mean per-class accuracy; `*_flip_tta`
averages the logits of each test image and its flip.

    python bench/accuracy.py                               # all families, both phases
    python bench/accuracy.py --families gap --fine-tune-epochs 0    # phase one only
    python bench/accuracy.py --quick                       # GAP + full B-CNN, 5 head epochs
    python bench/accuracy.py --families macnn --fine-tune-epochs 0 --options '{"dropout": 0.5}' \
        --output accuracy_224_macnn_variants                # a variant, kept apart
    python bench/accuracy.py --families macnn --part-crop-size 112 --output accuracy_224_part_crops

Writes bench/results/accuracy_<size>.json (accuracy_quick.json with --quick).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    CUB_ROOT,
    FAMILIES,
    MOBILENET_WEIGHTS,
    RESULTS,
    peak_rss_mb,
    require_shared,
    write_json,
)

# Family name in the results -> (create_model name, options). Each one-backbone form.


def load_features(image_size, cache_dir, limit=None, family="gap"):
    """Cached backbone features: train, train flipped, test, test flipped, and labels.

    `family="dasrbn"` caches its two-depth backbone's output (the last map and block 13's,
    pooled to the same grid); every other family reads the last map.
    """
    import keras

    from keras_fg.data import load_dataset, make_pipeline
    from keras_fg.models import create_model, extract_features

    depths = "_two_depths" if family == "dasrbn" else ""
    tag = f"cub_mobilenetv2{depths}_{image_size}" + (f"_limit{limit}" if limit else "")
    path = cache_dir / f"{tag}.npz"
    if path.exists():
        with np.load(path) as cached:
            arrays = {k: cached[k] for k in cached.files if not k.startswith("seconds_")}
            seconds = {k[8:]: float(cached[k]) for k in cached.files if k.startswith("seconds_")}
        return arrays, {"extraction_seconds": seconds, "from_cache": path.name}  # In --cache-dir.
    model = create_model(family, 50, weights=str(MOBILENET_WEIGHTS), image_size=image_size)
    dtype = "float16" if image_size > 300 else "float32"
    arrays, seconds = {}, {}
    for split in ("train", "test"):
        records = load_dataset("cub", CUB_ROOT, split)
        if limit:
            records = records.subset(np.arange(0, len(records), max(1, len(records) // limit)))
        data = make_pipeline(records, image_size, 32, training=False)
        for flip in (False, True):
            name = split + ("_flip" if flip else "")
            start = time.perf_counter()
            arrays[name], arrays[f"{split}_labels"] = extract_features(
                model, data, flip=flip, dtype=dtype
            )
            seconds[name] = time.perf_counter() - start
            print(f"features {name}: {arrays[name].shape} in {seconds[name]:.0f} s", flush=True)
    del model
    keras.backend.clear_session()
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays, **{f"seconds_{k}": v for k, v in seconds.items()})
    return arrays, {"extraction_seconds": seconds}


def logistic_regression(train_x, train_y, test_x, num_classes, c=1.0, steps=500, seed=0):
    """Softmax regression minimising C·Σ CE + ½‖W‖² (scikit-learn's objective); full batch."""
    import keras

    keras.utils.set_random_seed(seed)
    l2 = 1.0 / (2.0 * c * len(train_x))  # The objective above divided by C·N.
    model = keras.Sequential(
        [
            keras.Input(train_x.shape[1:]),
            keras.layers.Dense(num_classes, kernel_regularizer=keras.regularizers.L2(l2)),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(train_x, train_y, batch_size=len(train_x), epochs=steps, verbose=0)
    return model.predict(test_x, batch_size=512, verbose=0)


def report(labels, logits):
    from keras_fg.metrics import classification_report

    result = classification_report(labels, logits)
    return {k: result[k] for k in ("top1", "top5", "mean_per_class_accuracy")}


def with_part_crops(model, options, crop_size, image_size):
    """Full MA-CNN: `model` (one backbone, head trained) rebuilt with part crops of side
    `crop_size`, starting from `model`'s predictions (`transfer_weights`)."""
    from keras_fg.models import create_model, transfer_weights

    full = create_model(
        "macnn",
        model.num_classes,
        weights=str(MOBILENET_WEIGHTS),
        image_size=image_size,
        part_crop_size=crop_size,
        **options,
    )
    transfer_weights(model, full)
    return full


def fine_tune(model, image_size, epochs, learning_rate, grouping_weight=None, seed=0):
    """Phase two: all layers (BatchNormalization frozen) on augmented images, cosine rate."""
    import keras

    from keras_fg.data import load_dataset, make_pipeline

    train = load_dataset("cub", CUB_ROOT, "train")
    model.set_backbone_trainable(True)
    if grouping_weight is not None and hasattr(model, "channel_grouping_weight"):
        model.channel_grouping_weight = grouping_weight  # Read when compile traces the step.
    data = make_pipeline(train, image_size, 32, training=True, seed=seed)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * (len(train) // 32))
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4))
    start = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=2)
    return time.perf_counter() - start


def evaluate_images(model, image_size):
    from keras_fg.data import load_dataset, make_pipeline

    test = load_dataset("cub", CUB_ROOT, "test")
    data = make_pipeline(test, image_size, 32, training=False)
    outputs = model.predict(data, verbose=0)
    flipped = data.map(lambda images, labels: (images[:, :, ::-1], labels))
    outputs_flip = model.predict(flipped, verbose=0)
    logits, logits_flip = outputs["logits"], outputs_flip["logits"]
    results = {
        "fine_tuned": report(test.labels, logits),
        "fine_tuned_flip_tta": report(test.labels, (logits + logits_flip) / 2),
    }
    results.update(auxiliary_reports("fine_tuned", test.labels, outputs))
    return results


# MA-CNN's parts and crops, DASRBN's branches.
AUXILIARY_LOGITS = ("part_logits", "crop_logits", "branch_logits")


def auxiliary_reports(phase, labels, outputs):
    """Diagnostics: each auxiliary classifier alone, and the fused score: the main
    classifier's logits plus the mean of the auxiliary classifiers' (what DASRBN serves)."""
    results = {}
    for key in AUXILIARY_LOGITS:
        if key in outputs:
            fused = outputs.get("classifier_logits", outputs["logits"]) + outputs[key].mean(axis=1)
            results[f"{phase}_with_{key}"] = report(labels, fused)
            results[f"{phase}_{key}_top1"] = [
                report(labels, outputs[key][:, i])["top1"] for i in range(outputs[key].shape[1])
            ]
    return results


def run_family(family, features, args, extraction_seconds):
    import keras

    from keras_fg.models import create_model, split_at_backbone, train_head

    keras.utils.set_random_seed(args.seed)
    model_name, options = FAMILIES[family]
    options = {**options, **args.options}
    model = create_model(
        model_name,
        50,
        weights=str(MOBILENET_WEIGHTS),
        image_size=args.image_size,
        **options,
    )
    head = split_at_backbone(model)[1]
    if head.input_shape[-1] != features["train"].shape[-1]:  # DASRBN's two depths.
        features, info = load_features(args.image_size, Path(args.cache_dir), family=model_name)
        seconds = info.get("extraction_seconds", {})
        extraction_seconds = seconds.get("train", 0.0) + seconds.get("train_flip", 0.0)
    x = np.concatenate([features["train"], features["train_flip"]])
    y = np.concatenate([features["train_labels"]] * 2)
    start = time.perf_counter()
    extra = {}
    if model_name == "macnn":
        rng = np.random.default_rng(args.seed)
        sample = features["train"][rng.permutation(len(features["train"]))[:512]]
        extra["channel_group_sizes"] = model.initialize_channel_grouping_from_features(
            sample, seed=args.seed
        )["group_sizes"]
    history = train_head(
        model, x, y, epochs=args.head_epochs, batch_size=64, seed=args.seed, verbose=0
    )
    head_seconds = time.perf_counter() - start
    outputs = head.predict(features["test"], batch_size=64, verbose=0)
    logits = outputs["logits"]
    logits_flip = head.predict(features["test_flip"], batch_size=64, verbose=0)["logits"]
    labels = features["test_labels"]
    extra.update(auxiliary_reports("head_phase", labels, outputs))
    result = {
        "model": model_name,
        "options": options,
        "head_parameters": int(sum(np.prod(w.shape) for w in head.trainable_weights)),
        "head_phase": report(labels, logits),
        "head_phase_flip_tta": report(labels, (logits + logits_flip) / 2),
        "head_train_loss_last": float(history.history["loss"][-1]),
        "head_train_accuracy_last": float(history.history["accuracy"][-1]),
        "head_seconds": head_seconds,
        # Training wall time: the training features (with flips) + head training.
        "train_seconds": head_seconds + extraction_seconds,
        **extra,
    }
    print(f"{family}: head {result['head_phase']} in {head_seconds:.0f} s", flush=True)
    if args.part_crop_size and model_name == "macnn":
        model = with_part_crops(model, options, args.part_crop_size, args.image_size)
        result["options"] = {**options, "crop_classifiers": model.crop_classifiers}
    if args.fine_tune_epochs:
        seconds = fine_tune(
            model,
            args.image_size,
            args.fine_tune_epochs,
            args.fine_tune_lr,
            args.fine_tune_grouping_weight,
        )
        result.update(evaluate_images(model, args.image_size))
        result["fine_tune_seconds"] = seconds
        result["train_seconds"] += seconds
        print(f"{family}: fine-tuned {result['fine_tuned']} in {seconds:.0f} s", flush=True)
    result["peak_rss_mb"] = peak_rss_mb()
    if args.save_models:
        Path(args.save_models).mkdir(parents=True, exist_ok=True)
        model.save(Path(args.save_models) / f"{family}.keras")
    del model, head
    keras.backend.clear_session()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--head-epochs", type=int, default=30)
    parser.add_argument("--fine-tune-epochs", type=int, default=8)
    parser.add_argument("--fine-tune-lr", type=float, default=1e-4)
    parser.add_argument(
        "--fine-tune-grouping-weight",
        type=float,
        default=None,
        help="MA-CNN's L_cng weight in phase two (default: the model's own)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--part-crop-size",
        type=int,
        default=None,
        help="full MA-CNN: phase two trains with part crops of this side (MA-CNN only)",
    )
    parser.add_argument(
        "--options",
        type=json.loads,
        default={},
        help="model options over the family's, as JSON: e.g. '{\"margin\": 0.5}'",
    )
    parser.add_argument(
        "--cache-dir",
        default=str(Path(tempfile.gettempdir()) / "keras_fg_bench_cache"),
        help="where the backbone features are cached (default: the system's temporary folder)",
    )
    parser.add_argument("--quick", action="store_true", help="GAP + full B-CNN, 5 epochs")
    parser.add_argument("--output", default=None, help="results name (default from the size)")
    parser.add_argument(
        "--save-models",
        default=None,
        help="a folder where each family's trained model is saved, as FAMILY.keras",
    )
    args = parser.parse_args()
    if args.quick:
        args.families = ["gap", "bcnn"]
        args.head_epochs = min(args.head_epochs, 5)
        args.fine_tune_epochs = 0
    require_shared(CUB_ROOT, MOBILENET_WEIGHTS)

    command = "python bench/accuracy.py " + " ".join(sys.argv[1:])
    features, feature_info = load_features(args.image_size, Path(args.cache_dir))
    seconds = feature_info.get("extraction_seconds", {})
    train_extraction = seconds.get("train", 0.0) + seconds.get("train_flip", 0.0)
    pooled = {k: features[k].astype("float32").mean(axis=(1, 2)) for k in ("train", "test")}
    start = time.perf_counter()
    labels = features["train_labels"]
    floor_logits = logistic_regression(pooled["train"], labels, pooled["test"], 50)
    floor = {
        **report(features["test_labels"], floor_logits),
        "seconds": time.perf_counter() - start,
        "method": "softmax regression on frozen GAP features, C=1, no flips",
    }
    print(f"floor: {floor}", flush=True)
    name = args.output or ("accuracy_quick" if args.quick else f"accuracy_{args.image_size}")
    previous = RESULTS / f"{name}.json"
    # Families run one by one (and may be rerun alone); each result is written as it comes.
    results = json.loads(previous.read_text())["families"] if previous.exists() else {}
    for family in args.families:
        results[family] = run_family(family, features, args, train_extraction)
        results[family].update(command=command, recipe=recipe(args))
        write_json(name, payload(args, command, feature_info, floor, results))


def recipe(args):
    return {
        "features": "train images + horizontal flips, whole image resized, computed once",
        "head_phase": f"train_head: AdamW 1e-3 cosine to 0, wd 1e-4, batch 64, "
        f"{args.head_epochs} epochs",
        "fine_tune_phase": (
            f"{args.fine_tune_epochs} epochs, all layers (BN frozen), AdamW "
            f"{args.fine_tune_lr:g} cosine to 0, wd 1e-4, batch 32, random crop + flip"
            + (
                f", L_cng weight {args.fine_tune_grouping_weight:g}"
                if args.fine_tune_grouping_weight is not None
                else ""
            )
            if args.fine_tune_epochs
            else "none"
        ),
        "seed": args.seed,
        **({"model_options": args.options} if args.options else {}),
        **({"part_crop_size": args.part_crop_size} if args.part_crop_size else {}),
    }


def payload(args, command, feature_info, floor, results):
    return {
        "benchmark": "accuracy",
        "command": command,
        "dataset": "CUB-200-2011 subset, 50 classes, 1,500 train / 1,449 test",
        "backbone": "mobilenetv2 (shared weights), BatchNormalization frozen",
        "image_size": args.image_size,
        "feature_extraction": feature_info,
        "floor_logistic_regression": floor,
        "families": results,  # Each with its own command and recipe.
    }


if __name__ == "__main__":
    main()

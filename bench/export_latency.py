"""Exports of trained CUB models: one-image latency, size and top-1 agreement with Keras.

Each family is MobileNetV2 (shared weights, 224 px) trained on the shared CUB subset (50
species) with the accuracy table's recipe (bench/accuracy.py): the head alone, 30 epochs on
backbone features computed once (`keras_fg.models.train_head`), then every layer for 8 epochs
on augmented images. These are the models a user ships: a head trained alone decides more
images by a narrow margin, and its int8 file agrees less with it (README). The trained
models are cached in bench/cache/ (git-ignored) and reused; a cached model that no longer
loads (a layer changed) is trained again.

Every model is exported with `keras_fg.export.export_model`, which times each file on one
image (median) and checks it against Keras on all 1,449 test images; int8 and 16x8 are
calibrated on 300 training images, 6 of each class. Beside the default int8 file (the
logits' layer, the stem and the head in float, the head's dense and convolution layers on
int8 weights), int8 is also exported with the head's weights in float, with the head in
int8, and with neither stem nor head in float but N of the layers whose int8 weights move
the logits most (`--int8-float-layers`), to show what each choice costs and buys. The
`.tflite` files are then timed again in turns (`interleaved_latency`), so that their speed
ratios do not read the machine's load.

    python bench/export_latency.py                      # gap, bcnn, macnn
    python bench/export_latency.py --families macnn     # one family; the others are kept
    python bench/export_latency.py --quick              # gap, 200 test images

Writes bench/results/export_latency.json (export_latency_quick.json with --quick) after
each family, so an interrupted run resumes where it stopped.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CUB_ROOT, FAMILIES, MOBILENET_WEIGHTS, RESULTS, ROOT, require_shared, write_json

CACHE = ROOT / "bench" / "cache"
CALIBRATION_IMAGES = 300
FORMATS = ("saved_model", "tflite_fp32", "tflite_fp16", "tflite_dynamic", "tflite_int8",
           "tflite_int16x8")  # fmt: skip
HEAD_EPOCHS = 30
FINE_TUNE_EPOCHS, FINE_TUNE_LR = 8, 1e-4  # bench/accuracy.py's phase two.
RECIPE = f"head {HEAD_EPOCHS} epochs on cached features, then every layer {FINE_TUNE_EPOCHS} epochs"


def trained_model(family):
    """The family's model trained on CUB (head, then every layer), from bench/cache/ or now."""
    import keras

    import keras_fg.models  # noqa: F401  (registers the classes for loading)

    path = CACHE / f"{family}_fine_tuned.keras"
    if path.exists():
        try:
            model = keras.saving.load_model(path)
            return model, {"recipe": RECIPE, "from_cache": str(path.relative_to(ROOT))}
        except Exception as error:  # A layer changed since it was saved: train it again.
            print(f"{path} does not load ({type(error).__name__}); training again", flush=True)
    from accuracy import fine_tune, load_features

    from keras_fg.data import load_dataset
    from keras_fg.models import create_model, train_head

    features, _ = load_features(224, CACHE)
    keras.utils.set_random_seed(0)
    model_name, options = FAMILIES[family]
    model = create_model(
        model_name, 50, weights=str(MOBILENET_WEIGHTS), image_size=224,
        class_names=load_dataset("cub", CUB_ROOT, "train").class_names, **options,
    )  # fmt: skip
    if model_name == "macnn":
        sample = features["train"][np.random.default_rng(0).permutation(1500)[:512]]
        model.initialize_channel_grouping_from_features(sample, seed=0)
    start = time.perf_counter()
    train_head(
        model,
        np.concatenate([features["train"], features["train_flip"]]),
        np.concatenate([features["train_labels"]] * 2),
        epochs=HEAD_EPOCHS,
        batch_size=64,
        seed=0,
    )
    head_seconds = time.perf_counter() - start
    fine_tune_seconds = fine_tune(model, 224, FINE_TUNE_EPOCHS, FINE_TUNE_LR)
    CACHE.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return model, {
        "recipe": RECIPE,
        "head_epochs": HEAD_EPOCHS,
        "head_seconds": head_seconds,
        "fine_tune_epochs": FINE_TUNE_EPOCHS,
        "fine_tune_seconds": fine_tune_seconds,
    }


def keras_latency_ms(model, runs=30):
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (1, 224, 224, 3)).astype("float32")
    tensor = keras.ops.convert_to_tensor(x)

    def median_ms(function, count):
        function()
        times = []
        for _ in range(count):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    call = lambda: keras.ops.convert_to_numpy(model(tensor, training=False)["logits"])  # noqa: E731
    return {
        "call_ms": median_ms(call, runs),
        "predict_ms": median_ms(lambda: model.predict(x, verbose=0), max(5, runs // 3)),
    }


def interleaved_latency(directory, exports, rounds=7, calls=15):
    """Times the `.tflite` files of `exports` in turns, so that they share the machine's load.

    The export report times each file once, minutes apart from the others, so a speed ratio
    between two files reads the load as much as the files. Here each of `rounds` rounds
    times every file (`calls` one-image calls, after one warm-up call) with the
    interpreter's default threads and with one thread; a file's latency is the median of its
    round medians. Sets `latency_ms` (default threads), `latency_ms_1_thread` and keeps the
    report's own figure as `report_latency_ms`.
    """
    from ai_edge_litert.interpreter import Interpreter

    image = np.full((1, 224, 224, 3), 127.5, "float32")
    runners = {}
    for entry in exports:
        if not str(entry.get("file") or "").endswith(".tflite") or entry.get("latency_ms") is None:
            continue
        path = next(Path(directory).rglob(Path(entry["file"]).name))
        for threads in (None, 1):
            runner = Interpreter(model_path=str(path), num_threads=threads)
            runners[entry["format"], threads] = (entry, runner.get_signature_runner())
    medians = {key: [] for key in runners}
    for _ in range(rounds):
        for key, (_, runner) in runners.items():
            runner(images=image)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                runner(images=image)
                times.append(time.perf_counter() - start)
            medians[key].append(1000 * statistics.median(times))
    for (_, threads), (entry, _) in runners.items():
        value = round(statistics.median(medians[entry["format"], threads]), 3)
        if threads is None:
            entry["report_latency_ms"], entry["latency_ms"] = entry["latency_ms"], value
        else:
            entry["latency_ms_1_thread"] = value


KEYS = ("format", "file", "size_bytes", "latency_ms", "max_abs_diff", "top1_agreement",
        "images", "skipped", "error", "float_op_types", "float_layers")  # fmt: skip


def run_family(family, workdir, args):
    from keras_fg.data import load_dataset
    from keras_fg.export import check_parity, export_model, export_tflite
    from keras_fg.export.parity import model_outputs
    from keras_fg.export.preprocess import load_images
    from keras_fg.export.run_directory import stratified_indices

    model, training = trained_model(family)
    train = load_dataset("cub", CUB_ROOT, "train")
    test = load_dataset("cub", CUB_ROOT, "test")
    calibration = [train.paths[i] for i in stratified_indices(train.labels, CALIBRATION_IMAGES)]
    evaluation = test.paths
    if args.test_images:
        evaluation = [test.paths[i] for i in stratified_indices(
            test.labels, args.test_images, at_most=True)]  # fmt: skip
    result = {
        "model": FAMILIES[family][0],
        "options": FAMILIES[family][1],
        "training": training,
        "keras": keras_latency_ms(model),
    }
    start = time.perf_counter()
    report = export_model(
        model, f"{workdir}/{family}", formats=args.formats,
        calibration_data=calibration, evaluation_data=evaluation,
    )  # fmt: skip
    result["export_seconds"] = time.perf_counter() - start
    result["exports"] = [{k: e.get(k) for k in KEYS if k in e} for e in report["exports"]]
    # The other int8 choices: the head in int8, then neither stem nor head in float but
    # this many of the most sensitive layers.
    variants = []
    if "tflite_int8" in args.formats:
        variants.append(("tflite_int8 (head in float, float weights)", "int8_head_float_weights",
                         {"int8_head_weights": False}))  # fmt: skip
        variants.append(("tflite_int8 (head in int8)", "int8_head", {"int8_float_head": False}))
    for count in args.int8_float_layers:
        variants.append((f"tflite_int8 (no stem, no head, {count} ranked layers)",
                         f"int8_float{count}", {"int8_float_layers": count, "int8_float_stem": 0,
                                                "int8_float_head": False}))  # fmt: skip
    images = None
    for name, stem, options in variants:
        if images is None:
            pixels = load_images(calibration, 224)["images"]
            images = load_images(evaluation, 224)["images"]
            reference = model_outputs(model, images)
        path = Path(workdir) / family / f"{stem}.tflite"
        details = export_tflite(
            model, path, "int8", representative_images=pixels, return_details=True, **options
        )
        parity = check_parity(model, path, images, variant="tflite_int8", reference=reference)
        entry = {"format": name, "file": path.name, **parity, **details}
        result["exports"].append({k: entry.get(k) for k in KEYS if k in entry})
    interleaved_latency(Path(workdir) / family, result["exports"])
    fp32 = next(e for e in result["exports"] if e["format"] == "tflite_fp32")
    for entry in result["exports"]:
        if entry.get("latency_ms"):
            entry["speed_vs_tflite_fp32"] = fp32["latency_ms"] / entry["latency_ms"]
            print(
                f"  {entry['format']}: {entry['latency_ms']:.2f} ms "
                f"({entry['speed_vs_tflite_fp32']:.2f}x fp32), "
                f"{entry['size_bytes'] / 2**20:.1f} MiB, top-1 agreement "
                f"{entry['top1_agreement']:.2%}",
                flush=True,
            )
    return result


def with_earlier_formats(result, earlier):
    """`result`, plus the formats that only an earlier run of the same model measured.

    Those rows keep their own figures (their speed ratio against that run's fp32) and name
    the command that measured them (`measured_by`), so a run of a few formats updates them
    without dropping the others. Rows of a model trained by another recipe are dropped.
    """
    if not earlier or earlier["training"].get("recipe") != result["training"]["recipe"]:
        return result
    formats = {entry["format"] for entry in result["exports"]}
    # A run that exports int8 measures its other int8 choices again, perhaps other ones.
    int8_again = "tflite_int8" in formats
    kept = [
        {**entry, "measured_by": entry.get("measured_by", earlier.get("command"))}
        for entry in earlier["exports"]
        if entry["format"] not in formats
        and not (int8_again and entry["format"].startswith("tflite_int8"))
    ]
    return {**result, "exports": result["exports"] + kept}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["gap", "bcnn", "macnn"],
                        choices=list(FAMILIES))  # fmt: skip
    parser.add_argument("--int8-float-layers", type=int, nargs="*", default=[0, 6],
                        help="other int8 choices to measure: no stem and N ranked layers in "
                        "float (default: 0 and 6)")  # fmt: skip
    parser.add_argument("--test-images", type=int, default=None,
                        help="parity on this many test images (default: all 1,449)")  # fmt: skip
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                        help="the files to export (default: all)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="gap, 200 test images")
    args = parser.parse_args()
    require_shared(CUB_ROOT, MOBILENET_WEIGHTS)
    if args.quick:
        args.families, args.test_images = ["gap"], args.test_images or 200
    name = "export_latency_quick" if args.quick else "export_latency"
    command = "python bench/export_latency.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="keras_fg_export_") as workdir:
        for family in args.families:
            print(f"{family} ...", flush=True)
            result = {**run_family(family, workdir, args), "command": command}
            CACHE.mkdir(parents=True, exist_ok=True)
            (CACHE / f"{name}_{family}.json").write_text(json.dumps(result, indent=1))
            # Read again just before writing: another run may have written other families.
            previous = RESULTS / f"{name}.json"
            results = json.loads(previous.read_text())["families"] if previous.exists() else {}
            results = {k: v for k, v in results.items() if "training" in v}  # Trained only.
            results[family] = with_earlier_formats(result, results.get(family))
            write_json(name, {
                "benchmark": "export_latency",
                "settings": "MobileNetV2 models trained on the CUB subset (50 species; the head, "
                "then every layer), 224 px; "
                "latency: median of one-image calls; agreement: top-1 of each file against "
                "Keras on the CUB test images; int8 and 16x8 calibrated on 300 training "
                "images, 6 per class",
                "families": results,  # Each with the command that measured it.
            })  # fmt: skip


if __name__ == "__main__":
    main()

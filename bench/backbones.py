"""Today's backbones on this CPU: speed, memory, head sizes and the export matrix.

Five sections, each figure written to bench/results/backbones.json as soon as it is measured:

- `speed`: GAP and MA-CNN on MobileNetV2, ConvNeXt-Tiny and a ViT-S-sized keras-hub model
  (DINOv2-S/14's config: 12 blocks, 384 wide, 6 heads, patch 14, random weights, saved as a
  preset folder and loaded through "hub:<folder>"), at 224 px and batch 32: training and
  inference images/s (medians over `--steps` batches after a warm-up; every layer trainable,
  BatchNormalization frozen, AdamW), and the peak resident memory of each configuration,
  each in its own subprocess so that the memory is its own.
- `latency`: the ViT-S-sized model's TFLite fp32 file (GAP head), one image, median of runs
  through LiteRT, next to the Keras model's own one-image call.
- `heads`: the parameters of each family's head (everything but the backbones) at 200
  classes on MobileNetV2 (1280 channels, 7×7), ConvNeXt-Tiny (768, 7×7), ViT-S/14 (384,
  16×16) and ViT-B/14 (768, 16×16) at 224 px, with the backbones' own sizes.
- `exports`: every family on a small random DINOv2 (with registers), a small random keras-hub
  ResNet and ConvNeXt-Tiny (weights=None): one training step, `.keras` save and reload
  (largest output difference, expected 0), then `export_model` to SavedModel and TFLite
  fp32 / fp16 / dynamic / int8 with its parity checks, on 8 random images.
- `int8_transformer` (not in the default run): full-integer int8 on the small DINOv2 with
  keras_fg's refusal switched off, beside fp16: what the refusal rests on.

No accuracy is measured here: the weights are random.

    python bench/backbones.py                       # all four sections
    python bench/backbones.py --sections heads      # one section (merged into the JSON)
    python bench/backbones.py --sections int8_transformer --output backbones_int8_transformer
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from common import RESULTS, ROOT, peak_rss_mb, write_json

NAME = "backbones"
SPEED = [(f, b) for b in ("mobilenetv2", "convnexttiny", "vit_s") for f in ("gap", "macnn")]
# ViT-S/14 and ViT-B/14: DINOv2's small and base configurations (Oquab et al. 2024, Table 17).
VITS = {
    "vit_s": {"num_layers": 12, "hidden_dim": 384, "num_heads": 6, "intermediate_dim": 1536},
    "vit_b": {"num_layers": 12, "hidden_dim": 768, "num_heads": 12, "intermediate_dim": 3072},
}
HEAD_FAMILIES = {
    "gap": ("gap", {}),
    "bcnn": ("bcnn", {}),  # The default: a 1x1 convolution to 256 channels, then 256² terms.
    "bcnn_no_reduction": ("bcnn", {"reduction_dim": None}),
    "bcnn_compact": ("bcnn", {"projection_dim": 8192}),
    "macnn": ("macnn", {"num_parts": 4}),
    "dasrbn": ("dasrbn", {}),
    "pcb": ("pcb", {}),
}
EXPORT_FAMILIES = {
    "gap": ("gap", {}),
    "bcnn": ("bcnn", {"reduction_dim": 8}),
    "bcnn_compact": ("bcnn", {"reduction_dim": 8, "projection_dim": 32}),
    "macnn": ("macnn", {"num_parts": 2}),
    "macnn_crops": ("macnn", {"num_parts": 2, "part_crop_size": 32}),
    "dasrbn": ("dasrbn", {"stream_dim": 4, "lstm_units": 8, "attention_units": 8}),
    "pcb": ("pcb", {"num_stripes": 2}),
}
EXPORT_BACKBONES = {"hub_dinov2_tiny": 32, "hub_resnet_tiny": 64, "convnexttiny": 64}
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def write_vit_preset(kind, folder, image_size=224):
    """A ViT-S- or ViT-B-sized DINOv2 with random weights, saved as a preset folder."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    shape = (image_size, image_size, 3)
    network = keras_hub.models.DINOV2Backbone(
        patch_size=14, image_shape=shape, position_embedding_shape=shape, **VITS[kind]
    )
    network.save_to_preset(folder)
    keras_hub.layers.DINOV2ImageConverter(
        image_size=shape[:2],
        scale=[1 / (255 * s) for s in IMAGENET["std"]],
        offset=[-m / s for m, s in zip(IMAGENET["mean"], IMAGENET["std"])],
    ).save_to_preset(folder)
    return folder


def backbone_name(backbone, presets):
    return f"hub:{presets[backbone]}" if backbone in presets else backbone


# ------------------------------------------------------------------------------ workers


def speed_worker(family, backbone, presets, steps):
    import keras
    import numpy as np

    from keras_fg.models import create_model

    keras.utils.set_random_seed(0)
    options = {"num_parts": 4} if family == "macnn" else {}
    model = create_model(
        family, 200, backbone=backbone_name(backbone, presets), image_size=224, **options
    )
    model.set_backbone_trainable(True)
    model.compile(optimizer=keras.optimizers.AdamW(1e-5))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, 224, 224, 3)).astype("float32")
    y = rng.integers(0, 200, 32).astype("int32")
    rss_after_build = peak_rss_mb()

    def timed(function):
        function()  # Warm-up: tracing and the first allocation.
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return times

    train = timed(lambda: model.train_on_batch(x, y))
    rss_after_training = peak_rss_mb()
    predict = timed(lambda: model.predict_on_batch(x))
    backbone_parameters = sum(b.count_params() for b in model.backbones())
    return {
        "family": family,
        "backbone": backbone,
        "image_size": 224,
        "batch_size": 32,
        "parameters": int(model.count_params()),
        "backbone_parameters": int(backbone_parameters),
        "feature_map": list(model.backbone.output_shape[1:]),
        "train_images_per_s": 32 / statistics.median(train),
        "inference_images_per_s": 32 / statistics.median(predict),
        "train_step_s": train,
        "predict_batch_s": predict,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_after_build_mb": rss_after_build,
        "peak_rss_after_training_mb": rss_after_training,
        "load_average_1min": os.getloadavg()[0],
    }


def latency_worker(presets, runs):
    import keras
    import numpy as np

    from keras_fg.export import check_parity, export_tflite
    from keras_fg.models import create_model

    keras.utils.set_random_seed(0)
    model = create_model("gap", 200, backbone=f"hub:{presets['vit_s']}", image_size=224)
    images = np.random.default_rng(0).uniform(0, 255, (8, 224, 224, 3)).astype("float32")
    one = keras.ops.convert_to_tensor(images[:1])
    call = lambda: keras.ops.convert_to_numpy(model(one, training=False)["logits"])  # noqa: E731
    call()
    keras_times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        keras_times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "gap_vit_s_fp32.tflite")
        start = time.perf_counter()
        export_tflite(model, path, "fp32")
        convert_s = time.perf_counter() - start
        parity = check_parity(model, path, images, latency_runs=runs)
    return {
        "model": "gap on the ViT-S-sized DINOv2 (random weights), 224 px",
        "tflite_fp32_latency_ms": parity["latency_ms"],
        "tflite_fp32_size_mb": parity["size_bytes"] / 2**20,
        "tflite_max_abs_diff": parity["max_abs_diff"],
        "tflite_passed": parity["check"]["passed"],
        "keras_one_image_ms": 1000 * statistics.median(keras_times),
        "conversion_s": convert_s,
        "runs": runs,
        "peak_rss_mb": peak_rss_mb(),
        "load_average_1min": os.getloadavg()[0],
    }


def heads_worker(presets):
    import keras

    from keras_fg.models import create_backbone
    from keras_fg.models.factory import MODELS

    rows = []
    for backbone in ("mobilenetv2", "convnexttiny", "vit_s", "vit_b"):
        name = backbone_name(backbone, presets)
        one = create_backbone(name, image_size=224)
        two = create_backbone(name, image_size=224, earlier_feature_layer="default")
        for family, (model_name, options) in HEAD_FAMILIES.items():
            keras.utils.set_random_seed(0)
            features = two if model_name == "dasrbn" else one
            model = MODELS[model_name](features, 200, **options)
            head = model.count_params() - features.count_params()
            rows.append(
                {
                    "backbone": backbone,
                    "feature_map": list(features.output_shape[1:]),
                    "family": family,
                    "options": {k: v for k, v in options.items()},
                    "head_parameters": int(head),
                    "backbone_parameters": int(features.count_params()),
                    "features_dim": int(model.output["features"].shape[-1]),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows, "num_classes": 200, "image_size": 224}


def int8_transformer_worker(family, presets):
    """Full-integer int8 on the small random DINOv2 with `int8_refusal` switched off: what
    the refusal in keras_fg.export.tflite rests on."""
    import keras
    import numpy as np

    from keras_fg.export import check_parity, export_tflite, tflite
    from keras_fg.models import create_model

    tflite.int8_refusal = lambda model: None  # This measurement only.
    model_name, options = EXPORT_FAMILIES[family]
    keras.utils.set_random_seed(0)
    model = create_model(model_name, 3, backbone=f"hub:{presets['hub_dinov2_tiny']}",
                         image_size=32, **options)  # fmt: skip
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.fit(images[:4], np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
    row = {"family": family, "backbone": "hub_dinov2_tiny"}
    with tempfile.TemporaryDirectory() as folder:
        for quantization in ("fp16", "int8"):
            path = os.path.join(folder, f"m_{quantization}.tflite")
            try:
                export_tflite(model, path, quantization, representative_images=images)
            except Exception as error:
                message = str(error).replace(path, os.path.basename(path))
                row[quantization] = {"error": " ".join(message.split())[:300]}
                continue
            parity = check_parity(model, path, images, latency_runs=3)
            row[quantization] = {
                k: parity[k] for k in ("max_abs_diff", "top1_agreement") if k in parity
            }
    return row


def export_worker(family, backbone, presets):
    import keras
    import numpy as np
    from PIL import Image

    from keras_fg.export import export_model
    from keras_fg.models import create_model

    model_name, options = EXPORT_FAMILIES[family]
    size = EXPORT_BACKBONES[backbone]
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    model = create_model(
        model_name, 3, backbone=backbone_name(backbone, presets), image_size=size, **options
    )
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, size, size, 3)).astype("float32")
    model.fit(images[:4], np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
    with tempfile.TemporaryDirectory() as folder:
        model.save(os.path.join(folder, "model.keras"))
        reloaded = keras.saving.load_model(os.path.join(folder, "model.keras"))
        ours, theirs = model.predict(images, verbose=0), reloaded.predict(images, verbose=0)
        reload_diff = max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours)
        files = []
        for index, image in enumerate(images.astype("uint8")):
            files.append(os.path.join(folder, f"{index}.png"))
            Image.fromarray(image).save(files[-1])
        built = time.perf_counter() - start
        try:
            report = export_model(model, os.path.join(folder, "export"), evaluation_data=files)
        except Exception as error:  # Recorded, not hidden: the matrix says what failed.
            message = str(error).replace(folder + os.sep, "")
            return {"family": family, "backbone": backbone, "error": message[:1000]}
    keep = ("skipped", "max_abs_diff", "top1_agreement", "size_bytes", "latency_ms", "error")
    return {
        "family": family,
        "backbone": backbone,
        "image_size": size,
        "reload_max_abs_diff": reload_diff,
        "passed": report["passed"],
        "exports": {
            e["format"]: {
                "passed": e.get("check", {}).get("passed"),
                **{k: e[k] for k in keep if e.get(k) is not None},
            }
            for e in report["exports"]
        },
        "build_train_save_s": built,
        "export_s": time.perf_counter() - start - built,
    }


# ------------------------------------------------------------------------------ driver


def row_key(row):
    """`(family, backbone)` of a result row, measured or failed."""
    return (row["family"], row["backbone"]) if "family" in row else tuple(row["args"][1:3])


def in_subprocess(*worker_args):
    command = [sys.executable, __file__, "--worker", json.dumps(worker_args)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        # TensorFlow's start-up log lines are not the error.
        log = re.compile(r"^([IWE]\d{4} |WARNING: All log messages)")
        lines = [line for line in done.stderr.strip().splitlines() if not log.match(line)]
        tail = lines[-5:]
        reason = "killed (SIGKILL: out of memory?)" if done.returncode == -9 else "failed"
        print(f"  {reason}: {worker_args[:3]}: {' | '.join(tail)}", flush=True)
        return {
            "error": "\n".join(tail) or reason,
            "returncode": done.returncode,
            "args": worker_args[:3],
        }
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["subprocess_seconds"] = time.perf_counter() - start
    return result


def run_worker(arguments):
    kind, *rest = json.loads(arguments)
    workers = {
        "speed": speed_worker,
        "latency": latency_worker,
        "heads": heads_worker,
        "export": export_worker,
        "int8_transformer": int8_transformer_worker,
    }
    print(json.dumps(workers[kind](*rest)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="speed,latency,heads,exports")
    parser.add_argument("--steps", type=int, default=3, help="timed batches per figure")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument(
        "--speed-configs",
        nargs="*",
        help="FAMILY:BACKBONE rows of the speed section to measure again, in place",
    )
    parser.add_argument(
        "--export-configs",
        nargs="*",
        help="FAMILY:BACKBONE rows of the export matrix to measure (again), in place",
    )
    parser.add_argument("--output", default=NAME, help="the result's name in bench/results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    path = RESULTS / f"{args.output}.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload.pop("machine", None)
    payload["command"] = "python bench/backbones.py --sections " + ",".join(sections)
    payload["note"] = (
        "Random weights throughout: speed, memory and sizes only, no accuracy. The ViT-S- "
        "and ViT-B-sized models are DINOv2-S/14 and -B/14 configurations built by keras-hub."
    )

    def save():
        write_json(args.output, payload)

    with tempfile.TemporaryDirectory() as folder:
        sys.path.insert(0, str(ROOT / "tests"))  # The small presets the tests use.
        from hub_presets import write_preset

        presets = {
            "hub_dinov2_tiny": write_preset("dinov2", os.path.join(folder, "dinov2_tiny")),
            "hub_resnet_tiny": write_preset("resnet", os.path.join(folder, "resnet_tiny")),
        }
        needs = {"speed": ["vit_s"], "latency": ["vit_s"], "heads": ["vit_s", "vit_b"]}
        for kind in sorted({k for s in sections for k in needs.get(s, [])}):
            presets[kind] = write_vit_preset(kind, os.path.join(folder, kind))
        if "speed" in sections:
            configs = [tuple(c.split(":")) for c in args.speed_configs or []] or SPEED
            if not args.speed_configs:
                payload["speed"] = {"steps": args.steps, "rows": []}
            rows = payload["speed"]["rows"]
            for family, backbone in configs:
                print(f"speed: {family} on {backbone}", flush=True)
                row = in_subprocess("speed", family, backbone, presets, args.steps)
                where = [i for i, r in enumerate(rows) if row_key(r) == (family, backbone)]
                if where:
                    rows[where[0]] = {**row, "measured_again": True}
                else:
                    rows.append(row)
                save()
        if "latency" in sections:
            print("latency: TFLite fp32, ViT-S-sized", flush=True)
            payload["latency"] = in_subprocess("latency", presets, args.latency_runs)
            save()
        if "heads" in sections:
            print("heads: parameter counts", flush=True)
            payload["heads"] = in_subprocess("heads", presets)
            save()
        if "exports" in sections:
            if not args.export_configs:
                payload["exports"] = {"rows": []}
            rows = payload["exports"]["rows"]
            configs = [tuple(c.split(":")) for c in args.export_configs or []] or [
                (f, b) for b in EXPORT_BACKBONES for f in EXPORT_FAMILIES
            ]
            for family, backbone in configs:
                print(f"exports: {family} on {backbone}", flush=True)
                row = in_subprocess("export", family, backbone, presets)
                where = [i for i, r in enumerate(rows) if row_key(r) == (family, backbone)]
                if where:
                    rows[where[0]] = row
                else:
                    rows.append(row)
                save()
        if "int8_transformer" in sections:
            payload["int8_transformer"] = {
                "what": "full-integer int8 (calibrated on the 8 evaluation images) against "
                "fp16, on the small random DINOv2 at 32 px, keras_fg's int8 refusal off",
                "rows": [],
            }
            for family in ("gap", "bcnn", "macnn", "dasrbn", "pcb"):
                print(f"int8_transformer: {family}", flush=True)
                row = in_subprocess("int8_transformer", family, presets)
                payload["int8_transformer"]["rows"].append(row)
                save()


if __name__ == "__main__":
    main()

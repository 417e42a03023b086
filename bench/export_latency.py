"""One-image latency and file size: Keras, the SavedModel, and TFLite fp32 / fp16 / int8.

Each family is built on MobileNetV2 (shared weights, 224 px, 50 classes, head untrained:
latency and size do not depend on the head's values) and exported with
`keras_fg.export.export_model`, which times every exported file on one image (median) and
checks its outputs against Keras on 32 CUB images; int8 is calibrated on CUB images too.
The Keras figures are the median of `model(x, training=False)` and of `model.predict(x)`
on one image, in the same process.

    python bench/export_latency.py                  # gap and macnn
    python bench/export_latency.py --quick          # gap only

Writes bench/results/export_latency.json (export_latency_quick.json with --quick).
"""

import argparse
import statistics
import tempfile
import time

from common import CUB_ROOT, FAMILIES, MOBILENET_WEIGHTS, require_shared, write_json


def keras_latency_ms(model, runs=30):
    import keras
    import numpy as np

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


def run_family(family, workdir):
    from keras_fg.export import export_model
    from keras_fg.models import create_model

    model_name, options = FAMILIES[family]
    model = create_model(model_name, 50, weights=str(MOBILENET_WEIGHTS), image_size=224, **options)
    result = {"model": model_name, "options": options, "keras": keras_latency_ms(model)}
    images = str(CUB_ROOT / "images")
    start = time.perf_counter()
    report = export_model(
        model, f"{workdir}/{family}", calibration_data=images, evaluation_data=images,
        max_images=32,
    )  # fmt: skip
    result["export_seconds"] = time.perf_counter() - start
    result["exports"] = [
        {k: e.get(k) for k in ("format", "file", "size_bytes", "latency_ms", "max_abs_diff",
                               "top1_agreement", "skipped", "error")}  # fmt: skip
        for e in report["exports"]
    ]
    for e in result["exports"]:
        if e.get("latency_ms") is not None:
            print(f"  {e['format']}: {e['latency_ms']:.1f} ms, {e['size_bytes'] / 2**20:.1f} MiB")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["gap", "macnn"], choices=list(FAMILIES))
    parser.add_argument("--quick", action="store_true", help="gap only, export_latency_quick")
    args = parser.parse_args()
    require_shared(CUB_ROOT, MOBILENET_WEIGHTS)
    if args.quick:
        args.families = ["gap"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="keras_fg_export_") as workdir:
        for family in args.families:
            print(f"{family} ...", flush=True)
            results[family] = run_family(family, workdir)
            print(f"  keras: {results[family]['keras']}", flush=True)
    write_json(
        "export_latency_quick" if args.quick else "export_latency",
        {
            "benchmark": "export_latency",
            "command": "python bench/export_latency.py --families " + " ".join(args.families),
            "settings": "224 px, batch 1, median latency; parity on 32 CUB images; "
            "int8 calibrated on CUB images",
            "families": results,
        },
    )


if __name__ == "__main__":
    main()

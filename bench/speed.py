"""Training and inference speed, one-image latency and peak memory of every family.

Each configuration (family, image size, batch size) runs in its own subprocess, so that its
peak resident memory (`ru_maxrss`) is its own. In it: a MobileNetV2 model (shared weights,
BatchNormalization frozen, every other layer trainable, AdamW), random [0, 255] images,
one warm-up step, then `--steps` timed training steps (`train_on_batch`) and inference
batches (`predict_on_batch`); the figures are medians over the steps. One-image latency is
the median of `model(x, training=False)` calls on a batch of one. The tf.data pipeline is
timed on the shared CUB JPEGs (decode, resize, random crop, flip, batch 32) over one
epoch, in its own subprocess too.

    python bench/speed.py            # the 5 families at 224 px / batch 32, and the scaling grid
    python bench/speed.py --quick    # GAP and compact B-CNN at 224 / 32, fewer steps

    python bench/speed.py --configs gap:224:32 bcnn:224:32 macnn:224:32 dasrbn:224:32 \
        --skip-pipeline --output speed_families     # the families side by side, kept apart

Writes bench/results/speed.json (speed_quick.json with --quick, NAME.json with --output NAME).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import (
    CUB_ROOT,
    FAMILIES,
    MOBILENET_WEIGHTS,
    RESULTS,
    ROOT,
    peak_rss_mb,
    require_shared,
    write_json,
)

# (family, image size, batch size): every family at the reference setting, then the growth.
FULL_GRID = [(f, 224, 32) for f in FAMILIES if f != "dasrbn_dropout"] + [
    ("gap", 448, 32),
    ("bcnn", 448, 32),
    ("gap", 224, 8),
    ("gap", 224, 64),
    ("bcnn", 224, 8),
    ("bcnn", 224, 64),
]
QUICK_GRID = [("gap", 224, 32), ("bcnn_compact", 224, 32)]


def run_model_worker(family, image_size, batch_size, steps, latency_runs):
    import keras
    import numpy as np

    from keras_fg.models import create_model

    model_name, options = FAMILIES[family]
    keras.utils.set_random_seed(0)
    model = create_model(
        model_name, 50, weights=str(MOBILENET_WEIGHTS), image_size=image_size, **options
    )
    model.set_backbone_trainable(True)
    model.compile(optimizer=keras.optimizers.AdamW(1e-5))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
    y = rng.integers(0, 50, batch_size).astype("int32")
    rss_after_build = peak_rss_mb()

    def timed(function, runs):
        function()  # Warm-up: tracing and the first allocation.
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return times

    train_times = timed(lambda: model.train_on_batch(x, y), steps)
    rss_after_training = peak_rss_mb()
    predict_times = timed(lambda: model.predict_on_batch(x), steps)
    one = keras.ops.convert_to_tensor(x[:1])
    call = lambda: keras.ops.convert_to_numpy(model(one, training=False)["logits"])  # noqa: E731
    latency_times = timed(call, latency_runs)
    predict_one_times = timed(lambda: model.predict(x[:1], verbose=0), max(3, latency_runs // 4))
    return {
        "family": family,
        "model": model_name,
        "options": options,
        "image_size": image_size,
        "batch_size": batch_size,
        "parameters": int(model.count_params()),
        "train_images_per_s": batch_size / statistics.median(train_times),
        "inference_images_per_s": batch_size / statistics.median(predict_times),
        "latency_one_image_ms": 1000 * statistics.median(latency_times),
        "latency_one_image_predict_ms": 1000 * statistics.median(predict_one_times),
        "train_step_s": train_times,
        "predict_batch_s": predict_times,
        "peak_rss_mb": peak_rss_mb(),
        "load_average_1min": os.getloadavg()[0],  # Rows run at different times.
        "peak_rss_after_build_mb": rss_after_build,
        "peak_rss_after_training_mb": rss_after_training,
    }


def run_pipeline_worker(image_size, batch_size, epochs):
    from keras_fg.data import load_dataset, make_pipeline

    records = load_dataset("cub", CUB_ROOT, "train")
    rates = []
    for epoch in range(epochs + 1):
        data = make_pipeline(records, image_size, batch_size, training=True, seed=epoch)
        start, count = time.perf_counter(), 0
        for images, _ in data:
            count += int(images.shape[0])
        if epoch:  # The first epoch warms up (file cache, tracing).
            rates.append(count / (time.perf_counter() - start))
    return {
        "image_size": image_size,
        "batch_size": batch_size,
        "images_per_epoch": count,
        "images_per_s": statistics.median(rates),
        "images_per_s_runs": rates,
        "peak_rss_mb": peak_rss_mb(),
        "what": "make_pipeline(CUB train, training=True): decode JPEG, resize, random crop, "
        "flip, batch; AUTOTUNE parallelism",
    }


def median_of_runs(runs):
    """One result whose figures are the medians over several processes' results."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    result = dict(good[0])
    for key in ("train_images_per_s", "inference_images_per_s", "latency_one_image_ms",
                "latency_one_image_predict_ms", "peak_rss_mb"):  # fmt: skip
        values = [r[key] for r in good]
        result[key] = statistics.median(values)
        result[f"{key}_runs"] = values
    return result


def in_subprocess(*worker_args):
    command = [sys.executable, __file__, "--worker", json.dumps(worker_args)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-5:]
        print(f"  failed: {worker_args}: {' | '.join(tail)}", flush=True)
        return {"error": "\n".join(tail), "args": worker_args}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["subprocess_seconds"] = time.perf_counter() - start
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per figure")
    parser.add_argument(
        "--configs", nargs="+", help="family:size:batch triples to (re)run, merged into the JSON"
    )
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="processes per figure")
    parser.add_argument(
        "--output", default=None, help="results name (default: speed, or speed_quick)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = json.loads(args.worker)
        worker = run_model_worker if kind == "model" else run_pipeline_worker
        print(json.dumps(worker(*rest)))
        return
    require_shared(CUB_ROOT, MOBILENET_WEIGHTS)
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.configs:
        grid = [(f, int(s), int(b)) for f, s, b in (c.split(":") for c in args.configs)]
    steps = args.steps or (3 if args.quick else 5)
    args.repeats = args.repeats or (1 if args.quick else 3)
    latency_runs = 10 if args.quick else 30
    name = args.output or ("speed_quick" if args.quick else "speed")
    previous = RESULTS / f"{name}.json"
    previous = json.loads(previous.read_text()) if previous.exists() else {}
    key = lambda r: (r.get("family"), r.get("image_size"), r.get("batch_size"))  # noqa: E731
    models = [r for r in previous.get("models", []) if "family" in r and key(r) not in grid]
    for family, size, batch in grid:
        print(f"{family} {size} px batch {batch} ...", flush=True)
        runs = [
            in_subprocess("model", family, size, batch, steps, latency_runs)
            for _ in range(args.repeats)
        ]
        result = median_of_runs(runs)
        if "error" in result:
            continue  # Reported above; this configuration's figures are left out.
        models.append(result)
        print(
            f"  train {result['train_images_per_s']:.1f} img/s, "
            f"inference {result['inference_images_per_s']:.1f} img/s, "
            f"latency {result['latency_one_image_ms']:.1f} ms, "
            f"peak RSS {result['peak_rss_mb']:.0f} MiB",
            flush=True,
        )
        models.sort(key=lambda r: (key(r)[1:], list(FAMILIES).index(r["family"])))
        write_json(name, payload(args, steps, latency_runs, models, previous.get("pipeline")))
    if not args.skip_pipeline:
        print("pipeline ...", flush=True)
        pipeline = in_subprocess("pipeline", 224, 32, 1 if args.quick else 3)
        if "error" not in pipeline:
            print(f"  {pipeline['images_per_s']:.0f} img/s", flush=True)
        write_json(name, payload(args, steps, latency_runs, models, pipeline))


def payload(args, steps, latency_runs, models, pipeline):
    return {
        "benchmark": "speed",
        "command": " ".join(["python bench/speed.py", *sys.argv[1:]]),
        "settings": {
            "backbone": "mobilenetv2, shared weights, BatchNormalization frozen",
            "training": "all other layers trainable, AdamW, train_on_batch on random images",
            "timed_steps": steps,
            "latency_runs": latency_runs,
            "statistic": "median over steps within a process, then median over processes",
            "processes_per_figure": args.repeats,
            "jit_compile": "Keras default (auto: off on this CPU)",
        },
        "models": models,
        "pipeline": pipeline,
    }


if __name__ == "__main__":
    main()

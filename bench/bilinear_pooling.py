"""Benchmark BilinearPooling against a naive per-location outer product.

Each variant runs in its own subprocess, so that its peak resident memory
(`resource.getrusage(...).ru_maxrss`) is its own; TensorFlow allocates
outside Python's heap, where tracemalloc cannot see. Times are medians of
several runs after one warm-up call. The script also measures how closely
the compact (Random Maclaurin) inner products follow the full bilinear
ones, on real MobileNetV2 features of CUB images when ../shared exists and
on Gaussian features always.

    python bench/bilinear_pooling.py            # (8, 28, 28, 512) inputs
    python bench/bilinear_pooling.py --quick    # (2, 14, 14, 256) inputs

Writes bench/results/bilinear_pooling.json.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KERAS_FG_SHARED", ROOT.parent / "shared"))
VARIANTS = ("bilinear_matmul", "naive_outer_product", "compact_8192")


def naive_bilinear(a, b, epsilon=1e-8):
    """The same output as BilinearPooling, through a (B, H, W, Ca, Cb) tensor."""
    from keras import ops

    outer = a[..., :, None] * b[..., None, :]
    z = ops.reshape(ops.mean(outer, axis=(1, 2)), (ops.shape(a)[0], -1))
    y = z / ops.sqrt(ops.maximum(ops.abs(z), epsilon))
    return y * ops.rsqrt(ops.maximum(ops.sum(y * y, axis=-1, keepdims=True), epsilon**2))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_worker(args):
    """Times one variant in this process and prints a JSON line."""
    import keras
    import numpy as np

    from keras_fg.layers import BilinearPooling

    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size, args.channels)
    a = keras.ops.convert_to_tensor(rng.random(shape, dtype="float32"))
    b = keras.ops.convert_to_tensor(rng.random(shape, dtype="float32"))
    if args.worker == "bilinear_matmul":
        function = BilinearPooling()
    elif args.worker == "compact_8192":
        function = BilinearPooling(projection_dim=8192, seed=0)
    else:
        function = naive_bilinear
    baseline_rss = peak_rss_mb()
    keras.ops.convert_to_numpy(
        function([a, b]) if function is not naive_bilinear else function(a, b)
    )
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        output = function([a, b]) if function is not naive_bilinear else function(a, b)
        keras.ops.convert_to_numpy(output)
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "median_s": statistics.median(times),
                "times_s": times,
                "peak_rss_mb": peak_rss_mb(),
                "rss_before_first_call_mb": baseline_rss,
                # What the call itself added on top of TensorFlow and the inputs.
                "call_peak_rss_mb": peak_rss_mb() - baseline_rss,
                "output_shape": list(output.shape),
            }
        )
    )


def inner_product_accuracy(features, dims, seeds=(0, 1, 2)):
    """Errors and correlation of <φ(x), φ(y)> against <z(x), z(y)>, over distinct pairs.

    Each statistic is taken over the pairs of distinct samples for one draw
    of the projection, then averaged over the draws (`seeds`).
    """
    import numpy as np

    from keras_fg.layers import BilinearPooling

    def gram(projection_dim, seed=None):
        layer = BilinearPooling(
            signed_sqrt=False, l2_normalize=False, projection_dim=projection_dim, seed=seed
        )
        pooled = np.asarray(layer(features), dtype="float64")
        return pooled @ pooled.T

    full = gram(None)
    pairs = np.triu_indices(len(features), k=1)
    exact = full[pairs]
    mean_squared_norm = np.mean(np.diag(full))
    results = {}
    for dim in dims:
        draws = []
        for seed in seeds:
            approx = gram(dim, seed)[pairs]
            error = np.abs(approx - exact)
            draws.append(
                (
                    np.median(error / np.abs(exact)),
                    # In units of the mean ‖z‖²: meaningful also where <z(x), z(y)> is near 0.
                    np.median(error) / mean_squared_norm,
                    np.corrcoef(exact, approx)[0, 1],
                )
            )
        relative, over_norm, correlation = np.mean(draws, axis=0)
        results[str(dim)] = {
            "median_relative_error": float(relative),
            "median_error_over_mean_squared_norm": float(over_norm),
            "correlation": float(correlation),
        }
    return {
        "samples": len(features),
        "pairs": int(len(exact)),
        "seeds": list(seeds),
        "spread_of_exact_inner_products": float(np.std(exact) / np.mean(np.abs(exact))),
        "by_projection_dim": results,
    }


def projection_accuracy(dims):
    import keras
    import numpy as np

    report = {}
    gaussian = np.random.default_rng(0).normal(size=(16, 8, 8, 64)).astype("float32")
    report["gaussian_16x8x8x64"] = inner_product_accuracy(gaussian, dims)
    weights = SHARED / "weights/mobilenet_v2_1.0.weights.h5"
    images = sorted((SHARED / "data/cub200_subset/CUB_200_2011/images").glob("*/*.jpg"))
    if weights.exists() and images:
        # Three images from each of eight species.
        by_species = {}
        for path in images:
            by_species.setdefault(path.parent.name, []).append(path)
        chosen = [p for species in sorted(by_species)[:8] for p in by_species[species][:3]]
        pixels = np.stack(
            [
                keras.utils.img_to_array(keras.utils.load_img(p, target_size=(224, 224)))
                for p in chosen
            ]
        )
        backbone = keras.applications.MobileNetV2(
            input_shape=(224, 224, 3), include_top=False, weights=None
        )
        backbone.load_weights(weights)
        inputs = keras.applications.mobilenet_v2.preprocess_input(pixels)
        features = backbone.predict(inputs, verbose=0)  # out_relu, (24, 7, 7, 1280)
        report["mobilenet_v2_out_relu_cub_24x7x7x1280"] = inner_product_accuracy(features, dims)
    else:
        report["mobilenet_v2_out_relu_cub"] = f"skipped: {SHARED} has no weights or images"
    return report


def machine_info():
    import keras
    import tensorflow as tf

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs (2, 14, 14, 256)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="height and width")
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--projection-dims", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/bilinear_pooling.json")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = (2, 14, 256) if args.quick else (8, 28, 512)
    args.batch = args.batch or defaults[0]
    args.size = args.size or defaults[1]
    args.channels = args.channels or defaults[2]
    if args.worker:
        return run_worker(args)

    settings = {
        "input_shape": [args.batch, args.size, args.size, args.channels],
        "runs": args.runs,
        "quick": args.quick,
        "timing": "median wall time of one forward call (eager), after one warm-up call",
        "memory": "ru_maxrss of a subprocess per variant",
    }
    results = {"machine": machine_info(), "settings": settings, "variants": {}}
    for variant in args.variants:
        command = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--runs",
            str(args.runs),
            "--batch",
            str(args.batch),
            "--size",
            str(args.size),
            "--channels",
            str(args.channels),
        ]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            results["variants"][variant] = {"error": done.stderr.strip().splitlines()[-1:]}
        else:
            results["variants"][variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(variant, json.dumps(results["variants"][variant]), flush=True)
    fast, naive = (results["variants"].get(k, {}) for k in VARIANTS[:2])
    if "median_s" in fast and "median_s" in naive:
        results["naive_over_matmul"] = {
            "time": naive["median_s"] / fast["median_s"],
            "peak_rss": naive["peak_rss_mb"] / fast["peak_rss_mb"],
            "call_peak_rss": naive["call_peak_rss_mb"] / fast["call_peak_rss_mb"],
        }
        print("naive / matmul:", json.dumps(results["naive_over_matmul"]))
    if not args.skip_accuracy:
        results["projection_accuracy"] = projection_accuracy(args.projection_dims)
        print(json.dumps(results["projection_accuracy"], indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", args.output)


if __name__ == "__main__":
    main()

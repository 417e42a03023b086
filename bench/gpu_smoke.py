"""The body of bench/gpu_smoke.sh: every family through train.py under `--strategy mirrored`,
with and without mixed precision; training images/s and peak GPU memory, as one table.

Settings (environment, for a quicker run): KERAS_FG_SMOKE_IMAGES (training images; default
2,048 on GPUs, 128 on a CPU), KERAS_FG_SMOKE_SIZE (pixels, default 224),
KERAS_FG_SMOKE_BACKBONE (default mobilenetv2, random weights).
"""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FAMILIES = {
    "gap": [],
    "bcnn": [],
    "bcnn_compact": ["--reduction-dim", "128", "--projection-dim", "4096"],
    "macnn": ["--num-parts", "4", "--macnn-init", "none"],
    "dasrbn": [],
    "pcb": [],
}


def main():
    import keras
    import tensorflow as tf

    from keras_fg.cli.train import run
    from keras_fg.cli.train_config import parse_args

    gpus = tf.config.list_physical_devices("GPU")
    print("Devices:", ", ".join(d.name for d in tf.config.list_physical_devices()) or "none")
    if gpus:
        print(f"{len(gpus)} GPU(s): mirrored over all of them")
    else:
        print("no GPU found: measuring a smaller run on the CPU (mixed precision: bfloat16)")
    images = int(os.environ.get("KERAS_FG_SMOKE_IMAGES", 2048 if gpus else 128))
    size = int(os.environ.get("KERAS_FG_SMOKE_SIZE", 224))
    backbone = os.environ.get("KERAS_FG_SMOKE_BACKBONE", "mobilenetv2")
    batch = 32 * max(1, len(gpus))
    rows = []
    with tempfile.TemporaryDirectory(prefix="keras_fg_smoke_") as workdir:
        for family, options in FAMILIES.items():
            model = "bcnn" if family.startswith("bcnn") else family
            for precision in ("off", "auto"):
                argv = [
                    "--model", model, *options, "--backbone", backbone, "--weights", "none",
                    "--image-size", str(size), "--synthetic-train", str(images),
                    "--synthetic-test", str(batch), "--synthetic-classes", "10",
                    "--epochs", "2", "--batch-size", str(batch), "--strategy", "mirrored",
                    "--mixed-precision", precision, "--verbose", "0", "--no-determinism",
                    "--output", str(Path(workdir) / f"{family}_{precision}"),
                ]  # fmt: skip
                if gpus:
                    tf.config.experimental.reset_memory_stats("GPU:0")
                started = time.perf_counter()
                evaluation = run(parse_args(argv))
                keras.mixed_precision.set_global_policy("float32")
                seconds = evaluation["epoch_seconds"][-1]
                steps = images // batch
                peak = (
                    tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
                    if gpus
                    else None
                )
                rows.append(
                    {
                        "family": family,
                        "mixed_precision": precision,
                        "train_images_per_second": round(steps * batch / seconds, 1),
                        "peak_gpu_memory_mib": None if peak is None else round(peak),
                        "wall_seconds": round(time.perf_counter() - started, 1),
                    }
                )
                keras.backend.clear_session()
    print()
    print(f"{'family':<14} {'precision':<10} {'train img/s':>12} {'peak GPU MiB':>13}")
    for r in rows:
        peak = "n/a (CPU)" if r["peak_gpu_memory_mib"] is None else r["peak_gpu_memory_mib"]
        precision = "mixed" if r["mixed_precision"] == "auto" else "float32"
        print(f"{r['family']:<14} {precision:<10} {r['train_images_per_second']:>12} {peak:>13}")
    if os.environ.get("KERAS_FG_SMOKE_WRITE", "1") == "1":
        from common import write_json

        write_json(
            "gpu_smoke",
            {
                "benchmark": "gpu_smoke",
                "command": "bash bench/gpu_smoke.sh",
                "devices": [d.name for d in tf.config.list_physical_devices()],
                "settings": {"images": images, "image_size": size, "backbone": backbone},
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()

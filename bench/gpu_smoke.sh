#!/usr/bin/env bash
# The GPU smoke test: no arguments. Prints the devices, then trains every family for two epochs
# of the synthetic set at 224 px through train.py with --strategy mirrored over all GPUs, with
# and without --mixed-precision, and prints one table: training images/s (the second epoch)
# and peak GPU memory per family. About 5 minutes on one modern GPU. Without a GPU it says so
# and measures a smaller run on the CPU. Writes bench/results/gpu_smoke.json.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/gpu_smoke.py

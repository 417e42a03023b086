"""Runs every benchmark, then regenerates the results table.

    python bench/run_all.py           # the full set (about 9 hours on 2 cores)
    python bench/run_all.py --quick   # a smaller set, under 10 minutes

Each benchmark writes its JSON under bench/results/; `make_table.py` then writes
docs/results.md and the README's results section. A benchmark that fails is
reported and the others still run.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

FULL = [
    ["bilinear_pooling.py"],
    # Every CUB recipe in configs/ through train.py, seeds 0-2 (about 6 hours on 2 cores).
    ["accuracy.py"],
    ["reid_ablation.py"],
    ["speed.py"],
    ["attention.py"],
    ["export_latency.py"],
    ["int8_calibration.py"],
    ["int8_stages.py"],
    ["input_path.py"],
]
QUICK = [
    ["bilinear_pooling.py", "--quick", "--output", "results/bilinear_pooling_quick.json"],
    ["speed.py", "--quick"],
    ["attention.py", "--quick"],
    ["export_latency.py", "--quick"],
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    failed = []
    for command in QUICK if args.quick else FULL:
        print(f"== {' '.join(command)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(BENCH / command[0]), *command[1:]], cwd=BENCH)
        print(f"== {command[0]}: exit {done.returncode} in {time.perf_counter() - start:.0f} s")
        if done.returncode:
            failed.append(" ".join(command))
    subprocess.run([sys.executable, str(BENCH / "make_table.py")], cwd=BENCH, check=True)
    if failed:
        sys.exit(f"failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()

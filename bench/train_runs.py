"""Figures that come from whole `train.py` runs: re-ID on mini-MARS (attention: bench/attention.py).

Re-identification: `train.py --task reid` on the shared mini-MARS (16 training identities,
1,719 images; 32 queries against 529 gallery images of 16 other identities), MobileNetV2
(shared weights), 256×128 px, P×K = 8×4, cross-entropy with label smoothing 0.1 on a BNNeck
+ batch-hard triplet loss, one epoch of head alone then all layers (BatchNormalization
frozen), AdamW 3e-4 cosine; rank-1 and mAP with flip-averaged embeddings.

    python bench/train_runs.py                     # re-ID (gap, macnn, dasrbn)
    python bench/train_runs.py --quick             # re-ID gap only, 2 epochs

Writes bench/results/reid.json (``reid_quick.json`` with --quick).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MARS_ROOT, MOBILENET_WEIGHTS, RESULTS, ROOT, SHARED, require_shared, write_json


def train(arguments, output):
    command = [sys.executable, str(ROOT / "train.py"), *arguments, "--output", str(output)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    # Recorded with paths relative to the shared folder's parent, as a user would type them.
    shown = "python train.py " + " ".join(arguments).replace(str(SHARED), "../shared")
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-5:]
        print(f"  failed: {shown}: {' | '.join(tail)}", flush=True)
        return {"command": shown, "error": "\n".join(tail)}
    evaluation = json.loads((output / "evaluation.json").read_text())
    return {"command": shown, "wall_seconds": seconds, "evaluation": evaluation}


def reid(families, epochs, workdir):
    results = {}
    for family in families:
        print(f"re-ID {family} ...", flush=True)
        arguments = [
            "--task", "reid", "--data", str(MARS_ROOT), "--model", family,
            "--backbone", "mobilenetv2", "--weights", str(MOBILENET_WEIGHTS),
            "--image-size", "256", "128", "--epochs", str(epochs), "--head-epochs", "1",
            "--learning-rate", "3e-4", "--label-smoothing", "0.1", "--flip-test",
            "--num-identities", "8", "--num-instances", "4", "--batch-size", "32",
            "--verbose", "0",
        ]  # fmt: skip
        result = train(arguments, workdir / f"reid_{family}")
        if "evaluation" in result:
            e = result["evaluation"]
            result.update(rank1=e.get("rank1"), mAP=e.get("mAP"), mINP=e.get("mINP"))
            print(f"  rank-1 {e.get('rank1'):.3f}  mAP {e.get('mAP'):.3f}", flush=True)
        results[family] = result
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reid-families", nargs="*", default=None)
    parser.add_argument("--reid-epochs", type=int, default=None)
    args = parser.parse_args()
    quick = "_quick" if args.quick else ""
    reid_families = args.reid_families
    if reid_families is None:
        reid_families = ["gap"] if args.quick else ["gap", "macnn", "dasrbn"]
    reid_epochs = args.reid_epochs or (2 if args.quick else 4)
    failed = []
    with tempfile.TemporaryDirectory(prefix="keras_fg_bench_") as workdir:
        workdir = Path(workdir)
        if reid_families:
            require_shared(MARS_ROOT, MOBILENET_WEIGHTS)
            write_json(
                f"reid{quick}",
                {
                    "benchmark": "reid",
                    "dataset": "mini-MARS (shared): 16 train identities, 32 query, 529 gallery",
                    "epochs": reid_epochs,
                    "families": reid(reid_families, reid_epochs, workdir),
                },
            )
    for name in (f"reid{quick}",):
        path = RESULTS / f"{name}.json"
        if path.exists():
            families = json.loads(path.read_text())["families"]
            failed += [r["command"] for r in families.values() if "error" in r]
    if failed:
        sys.exit(f"failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()

"""Accuracy of every family on the shared CUB subset (50 species): `train.py` runs of the
recipes in configs/, one per published row, and the frozen floor.

Each run is exactly what a user types:

    python train.py --config configs/<recipe>.yaml --seed S \
        --data ../shared/data/cub200_subset/CUB_200_2011 \
        --weights ../shared/weights/mobilenet_v2_1.0.weights.h5

and its figures are the run's own evaluation.json (top-1 on the 1,449 test images, the whole
image resized to 224 px) and wall time. Each run's JSON is written to bench/results/cub/ as
soon as it ends, and a run whose JSON exists is not run again: a table of 3 seeds can be
built across sessions.

The floor is a logistic regression on the globally pooled frozen features (Keras, full-batch
Adam on the softmax cross-entropy + L2 with scikit-learn's default C = 1): the bar every
family must clear.

    python bench/accuracy.py                                  # every recipe, seeds 0-2
    python bench/accuracy.py --recipes cub_gap cub_macnn --seeds 0
    python bench/accuracy.py --floor                          # the floor only
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    CUB_ROOT,
    MOBILENET_WEIGHTS,
    RESULTS,
    ROOT,
    SHARED,
    require_shared,
    write_json,
)

RECIPES = (
    "cub_gap",
    "cub_macnn",
    "cub_bcnn",
    "cub_bcnn_compact",
    "cub_dasrbn",
    "cub_macnn_part_crops",
)
OUTPUT = RESULTS / "cub"


def run_recipe(recipe, seed, workdir):
    """One `train.py` run; returns what bench/results/cub/<recipe>_seed<S>.json holds."""
    arguments = [
        "--config", f"configs/{recipe}.yaml", "--seed", str(seed),
        "--data", str(CUB_ROOT), "--weights", str(MOBILENET_WEIGHTS),
        "--output", str(workdir / f"{recipe}_seed{seed}"), "--verbose", "2",
    ]  # fmt: skip
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *arguments],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - started
    # Recorded as a user would type it, with paths relative to the project.
    shown = "python train.py " + " ".join(
        a.replace(str(SHARED), "../shared") for a in arguments[:8]
    )
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"{shown} failed:\n{tail}")
    evaluation = json.loads((workdir / f"{recipe}_seed{seed}" / "evaluation.json").read_text())
    log = done.stdout + done.stderr
    return {
        "recipe": recipe,
        "config": f"configs/{recipe}.yaml",
        "seed": seed,
        "command": shown,
        "wall_seconds": round(seconds, 1),
        "evaluation": evaluation,
        "ran_out_of_data_warnings": log.count("ran out of data"),
        # Wall times on 2 cores depend on what else ran: the 1-minute load before and after.
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def floor():
    """Softmax regression on globally pooled frozen MobileNetV2 features (C = 1)."""
    import keras

    from keras_fg.data import load_dataset, make_pipeline
    from keras_fg.metrics import classification_report
    from keras_fg.models import create_model, extract_features

    model = create_model("gap", 50, weights=str(MOBILENET_WEIGHTS), image_size=224)
    pooled = {}
    for split in ("train", "test"):
        data = make_pipeline(load_dataset("cub", CUB_ROOT, split), 224, 32, training=False)
        features, labels = extract_features(model, data)
        pooled[split] = (features.mean(axis=(1, 2)), labels)
    (x, y), (test_x, test_y) = pooled["train"], pooled["test"]
    keras.utils.set_random_seed(0)
    l2 = 1.0 / (2.0 * len(x))  # C·Σ CE + ½‖W‖², divided by C·N.
    regression = keras.Sequential(
        [
            keras.Input(x.shape[1:]),
            keras.layers.Dense(50, kernel_regularizer=keras.regularizers.L2(l2)),
        ]
    )
    regression.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    regression.fit(x, y, batch_size=len(x), epochs=500, verbose=0)
    report = classification_report(test_y, regression.predict(test_x, verbose=0))
    return {
        "top1": report["top1"],
        "mean_per_class_accuracy": report["mean_per_class_accuracy"],
        "method": "softmax regression on frozen GAP features, C=1, no flips",
        "command": "python bench/accuracy.py --floor",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--floor", action="store_true", help="measure the floor only")
    args = parser.parse_args()
    require_shared(CUB_ROOT, MOBILENET_WEIGHTS)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    if args.floor or not (OUTPUT / "floor.json").exists():
        write_json("cub/floor", floor())
        if args.floor:
            return
    # Seed by seed, so that an interrupted session leaves whole seeds of every recipe.
    for seed in args.seeds:
        for recipe in args.recipes:
            if (OUTPUT / f"{recipe}_seed{seed}.json").exists():
                continue
            with tempfile.TemporaryDirectory(prefix="keras_fg_bench_") as workdir:
                print(f"{recipe} seed {seed} ...", flush=True)
                result = run_recipe(recipe, seed, Path(workdir))
            write_json(f"cub/{recipe}_seed{seed}", result)
            e = result["evaluation"]
            print(f"  top-1 {e['top1']:.4f} in {result['wall_seconds'] / 60:.1f} min", flush=True)


def summary(results):
    """Per recipe: the seeds, their top-1, mean and sample sd, and mean wall time."""
    rows = {}
    for result in results:
        rows.setdefault(result["recipe"], []).append(result)
    table = {}
    for recipe, runs in rows.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        top1 = np.array([r["evaluation"]["top1"] for r in runs])
        table[recipe] = {
            "seeds": [r["seed"] for r in runs],
            "top1": top1.tolist(),
            "mean": float(top1.mean()),
            "sd": float(top1.std(ddof=1)) if len(top1) > 1 else None,
            "wall_minutes": float(np.mean([r["wall_seconds"] for r in runs]) / 60),
            "command": runs[0]["command"],
        }
    return table


if __name__ == "__main__":
    main()

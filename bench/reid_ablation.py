"""Re-ID ablation on mini-MARS: the "bag of tricks" added one at a time, families, the floor.

Every row is `train.py --task reid` on the shared mini-MARS (16 training identities, 1,719
images; 32 query images, of which 23 have a true match under the same-person-same-camera rule,
against 529 gallery images of 16 other identities), MobileNetV2 with the shared weights,
256×128, P×K = 8×4, the given number of epochs, for each seed. Rows, as in Luo et al.'s
ablation (CVPR-W 2019, Table 1), each adding one trick to the row above:

    baseline          cross-entropy + batch-hard triplet, no trick
    +warmup           linear warm-up over the first epoch
    +random_erasing
    +label_smoothing  0.1
    +last_stride_1    16×8 feature grid instead of 8×4
    +bnneck
    +center_loss      weight 5e-4 — the full recipe, train.py's --task reid default

then the full recipe on the other families (`--families`: macnn, dasrbn and pcb by default),
each also with last stride 2 (rows `full_last_stride_2`, `full_<family>_last_stride_2`), with
the backbone learning at a tenth of the rate (`full_<family>_backbone_lr_0.1`) and with the
circle loss in place of the triplet loss (`full_<family>_circle`), with the backbone's
BatchNormalization learning (`full_train_batchnorm`, `full_<family>_train_batchnorm`); PCB
with 4 stripes instead of 6 (`full_pcb_4_stripes`), its stripes weighed equally
(`full_pcb_equal_weights`), serving the fused vector (`full_pcb_fused`,
`full_pcb_4_stripes_fused`), also with the cross-entropies alone
(`full_pcb_4_stripes_cross_entropy_only_fused`); and the frozen floor: the
pretrained backbone's global-average-pooled features, no training.

Each run writes bench/results/reid_ablation/<row>_seed<k>.json as soon as it finishes; a run
whose file exists is not redone (delete the file to redo it). The summary
bench/results/reid_ablation.json holds, for each row and each evaluation variant (plain,
flip, re-ranking, both), the mean and standard deviation over the seeds done, and the number
of valid queries.

    python bench/reid_ablation.py                              # every row, seeds 0 1 2
    python bench/reid_ablation.py --rows floor full baseline --seeds 0
    python bench/reid_ablation.py --rows full_macnn --epochs 12   # row full_macnn_12ep
    python bench/reid_ablation.py --summary                    # only rebuild the summary
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
from common import MARS_ROOT, MOBILENET_WEIGHTS, RESULTS, ROOT, machine_info, require_shared

RUNS = RESULTS / "reid_ablation"
EPOCHS = 6  # Every row of the ablation; a longer run is a row of its own.
VARIANTS = ("plain", "flip", "plain_re_ranking", "flip_re_ranking")
# Each row switches one more trick on; the last is train.py's --task reid default.
TRICKS = [
    ("baseline", ["--warmup-epochs", "0", "--no-random-erasing", "--label-smoothing", "0",
                  "--last-stride", "2", "--no-bnneck", "--center-loss-weight", "0"]),
    ("+warmup", ["--no-random-erasing", "--label-smoothing", "0", "--last-stride", "2",
                 "--no-bnneck", "--center-loss-weight", "0"]),
    ("+random_erasing", ["--label-smoothing", "0", "--last-stride", "2", "--no-bnneck",
                         "--center-loss-weight", "0"]),
    ("+label_smoothing", ["--last-stride", "2", "--no-bnneck", "--center-loss-weight", "0"]),
    ("+last_stride_1", ["--no-bnneck", "--center-loss-weight", "0"]),
    ("+bnneck", ["--center-loss-weight", "0"]),
    ("full", []),
]  # fmt: skip


def relative(path):
    return os.path.relpath(path, ROOT)


def common_flags(epochs):
    """configs/reid_mini_mars.yaml, the recipe of every row, on the shared data and weights."""
    return [
        "--config", "configs/reid_mini_mars.yaml", "--data", relative(MARS_ROOT),
        "--weights", relative(MOBILENET_WEIGHTS), "--epochs", str(epochs), "--verbose", "0",
    ]  # fmt: skip


def rows(families):
    table = {name: ["--model", "gap", *flags] for name, flags in TRICKS}
    # The full recipe without its one trick that costs on mini-MARS (see +last_stride_1).
    table["full_last_stride_2"] = ["--model", "gap", "--last-stride", "2"]
    table["full_train_batchnorm"] = ["--model", "gap", "--train-batchnorm"]
    for family in families:
        table[f"full_{family}"] = ["--model", family]
        table[f"full_{family}_last_stride_2"] = ["--model", family, "--last-stride", "2"]
        table[f"full_{family}_circle"] = ["--model", family, "--metric-loss", "circle"]
        # BoT trains BatchNormalization; keras_fg freezes it by default (docs/design.md#why-batchnormalization-stays-frozen).
        table[f"full_{family}_train_batchnorm"] = ["--model", family, "--train-batchnorm"]
        # 16 training identities: does a backbone that moves less generalise better?
        table[f"full_{family}_backbone_lr_0.1"] = [
            "--model", family, "--backbone-lr-multiplier", "0.1",
        ]  # fmt: skip
    if "pcb" in families:
        # Four stripes instead of the paper's six, and trained as the paper trains PCB: with
        # the cross-entropies alone, no metric loss. The descriptor: the stripes weighed
        # equally (the paper's), or the fused vector (PCB's default before the weighing).
        table["full_pcb_4_stripes"] = ["--model", "pcb", "--num-stripes", "4"]
        table["full_pcb_equal_weights"] = ["--model", "pcb", "--part-weights", "equal"]
        table["full_pcb_fused"] = ["--model", "pcb", "--descriptor", "fused"]
        table["full_pcb_4_stripes_fused"] = [
            "--model", "pcb", "--num-stripes", "4", "--descriptor", "fused",
        ]  # fmt: skip
        table["full_pcb_4_stripes_cross_entropy_only_fused"] = [
            "--model", "pcb", "--num-stripes", "4", "--triplet-weight", "0",
            "--center-loss-weight", "0", "--descriptor", "fused",
        ]  # fmt: skip
    return table


def run_training(name, flags, seed, epochs):
    arguments = [*common_flags(epochs), *flags, "--seed", str(seed)]
    shown = "python train.py " + " ".join(arguments)
    with tempfile.TemporaryDirectory(prefix="keras_fg_reid_") as workdir:
        output = Path(workdir) / "run"
        command = [sys.executable, str(ROOT / "train.py"), *arguments, "--output", str(output)]
        start = time.perf_counter()
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        seconds = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{name} seed {seed} failed: {shown}\n{done.stderr[-3000:]}")
        evaluation = json.loads((output / "evaluation.json").read_text())
    return {"command": shown, "wall_seconds": round(seconds, 1), "evaluation": evaluation}


def frozen_floor():
    """The pretrained backbone's GAP features, cosine distance, no training."""
    import keras

    from keras_fg.cli.train_config import parse_args
    from keras_fg.cli.train_data import DataSettings, ReidData
    from keras_fg.models import create_backbone

    args = parse_args(common_flags(1)[:-2] + ["--last-stride", "2"])
    backbone = create_backbone("mobilenetv2", weights=MOBILENET_WEIGHTS, image_size=(256, 128))
    pooled = keras.layers.GlobalAveragePooling2D()(backbone.output)
    model = keras.Model(backbone.input, {"features": pooled})
    start = time.perf_counter()
    evaluation = ReidData(DataSettings.from_args(args)).evaluate(model)
    return {
        "command": "python bench/reid_ablation.py --rows floor "
        "(MobileNetV2 with the shared weights, global average pooling of out_relu, 256x128)",
        "wall_seconds": round(time.perf_counter() - start, 1),
        "evaluation": evaluation,
    }


def write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    temporary.replace(path)


def summarise():
    summary = {}
    for path in sorted(RUNS.glob("*_seed*.json")):
        run = json.loads(path.read_text())
        summary.setdefault(run["row"], []).append(run)
    order = ["floor", *(name for name, _ in TRICKS)]
    table = {}
    for row in sorted(summary, key=lambda r: (order.index(r) if r in order else len(order), r)):
        runs = summary[row]
        entry = {
            "seeds": sorted(r["seed"] for r in runs),
            "num_valid_queries": runs[0]["evaluation"]["num_valid_queries"],
            "wall_seconds_mean": round(float(np.mean([r["wall_seconds"] for r in runs])), 1),
            "command": runs[0]["command"],
        }
        for variant in VARIANTS:
            for metric in ("rank1", "mAP", "mINP"):
                values = [r["evaluation"]["variants"][variant][metric] for r in runs]
                entry[f"{variant}_{metric}_mean"] = float(np.mean(values))
                spread = float(np.std(values, ddof=1)) if len(values) > 1 else None
                entry[f"{variant}_{metric}_std"] = spread
        table[row] = entry
    payload = {
        "machine": machine_info(),
        "benchmark": "reid_ablation",
        "dataset": "mini-MARS (shared): 16 train identities (1,719 images); 32 query, 529 gallery "
        "images of 16 other identities",
        "note": "mean and sample standard deviation over the seeds listed; rank-1 moves in "
        "steps of 1/num_valid_queries",
        "rows": table,
    }
    write(RESULTS / "reid_ablation.json", payload)
    print(markdown(table))


def markdown(table):
    """Rows as `rank-1 / mAP` (mean ± standard deviation over seeds) for each variant."""
    names = {
        "plain": "plain",
        "flip": "flip",
        "plain_re_ranking": "re-ranked",
        "flip_re_ranking": "flip + re-ranked",
    }
    lines = [
        "| row | seeds | "
        + " | ".join(f"{names[v]}: rank-1 / mAP" for v in VARIANTS)
        + " | minutes per run |",
        "| --- " * (len(VARIANTS) + 3) + "|",
    ]

    def cell(entry, variant, metric):
        mean, std = entry[f"{variant}_{metric}_mean"], entry[f"{variant}_{metric}_std"]
        return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")

    for row, entry in table.items():
        cells = [f"{cell(entry, v, 'rank1')} / {cell(entry, v, 'mAP')}" for v in VARIANTS]
        lines.append(
            f"| {row} | {len(entry['seeds'])} | "
            + " | ".join(cells)
            + f" | {entry['wall_seconds_mean'] / 60:.0f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows",
        nargs="*",
        default=None,
        help="rows to run (default: floor, the tricks, the families)",
    )
    parser.add_argument("--families", nargs="*", default=["macnn", "dasrbn", "pcb"])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument(
        "--epochs",
        type=int,
        default=EPOCHS,
        help=f"training epochs (rows run with other than {EPOCHS} are kept apart: ROW_<N>ep)",
    )
    parser.add_argument("--summary", action="store_true", help="only rebuild the summary")
    args = parser.parse_args()
    if not args.summary:
        require_shared(MARS_ROOT, MOBILENET_WEIGHTS)
        table = rows(args.families)
        names = args.rows if args.rows is not None else ["floor", *table]
        for name in names:
            if name != "floor" and name not in table:
                raise SystemExit(f"unknown row {name!r}; rows: floor, {', '.join(table)}")
            row = name if name == "floor" or args.epochs == EPOCHS else f"{name}_{args.epochs}ep"
            for seed in [0] if name == "floor" else args.seeds:  # The floor has no randomness.
                path = RUNS / f"{row}_seed{seed}.json"
                if path.exists():
                    continue
                print(f"{row} seed {seed} ...", flush=True)
                if name == "floor":
                    result = frozen_floor()
                else:
                    result = run_training(name, table[name], seed, args.epochs)
                plain = result["evaluation"]["variants"]["plain"]
                print(
                    f"  rank-1 {plain['rank1']:.3f}  mAP {plain['mAP']:.3f}  "
                    f"({result['wall_seconds'] / 60:.1f} min)",
                    flush=True,
                )
                write(
                    path,
                    {
                        "machine": machine_info(),
                        "row": row,
                        "seed": seed,
                        "epochs": None if name == "floor" else args.epochs,
                        **result,
                    },
                )
    summarise()


if __name__ == "__main__":
    main()

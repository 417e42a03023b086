"""Does the attention look at the part that decides the class? train.py on synthetic settings.

Each run is `python train.py` on its built-in synthetic fine-grained set (tiny backbone, the
family's defaults), whose evaluation.json holds top-1 and the attention measures of
`keras_fg.metrics.attention_report`: the pointing game (the best map's peak cell inside the
true part box dilated by one grid cell), the attention mass inside that box, each map's peak
mass, and the chance level. Settings other than the default guard against tuning to one
configuration: another image size (so another grid), another number of classes, other seeds.

    python bench/attention.py                              # macnn and dasrbn, 3 settings, 3 seeds
    python bench/attention.py --families macnn --seeds 0   # a subset
    python bench/attention.py --quick                      # default setting, 10 epochs, seed 0
    python bench/attention.py --sweep 8 --sweep-seed 0     # 8 settings drawn at random

Every run's JSON is written as soon as it finishes, to bench/results/attention/
FAMILY-SETTING-seedN.json; runs already there are not redone, so an interrupted benchmark
resumes. bench/results/attention.json then summarises every run found (mean and range over
seeds); `--quick` writes attention_quick.json and keeps its runs apart.

`--sweep N --sweep-seed S` draws N settings from a generator seeded by S over every knob of
the synthetic set that train.py exposes -- image size 48-128 px, 4-24 classes, 0-12 clutter
shapes, pixel noise 0-16 -- and a training seed for each, so that no one picks them by hand.
Each family trains on each with train.py's defaults; runs go to bench/results/attention_sweep/
and attention_sweep.json lists every run, worst pointing game first.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, machine_info, write_json

SETTINGS = {
    "default": [],
    "96px-16classes": ["--image-size", "96", "--synthetic-classes", "16"],
    "48px-6classes": ["--image-size", "48", "--synthetic-classes", "6"],
}
SWEEP_RANGES = {"image_size": (48, 128), "classes": (4, 24), "clutter": (0, 12), "noise": (0, 16)}
MEASURES = ("top1", "pointing_game", "mass_in_box", "chance", "peak_mass", "uniform_peak_mass")


def sweep_settings(count, sweep_seed):
    """`count` settings drawn from `sweep_seed` alone: {name: (flags, training seed)}.

    Setting i of a sweep does not depend on `count`, so a longer sweep extends a shorter one.
    """
    settings = {}
    for index in range(count):
        rng = np.random.default_rng([46, sweep_seed, index])
        size, classes, clutter = (
            int(rng.integers(lo, hi + 1))
            for lo, hi in [SWEEP_RANGES[k] for k in ("image_size", "classes", "clutter")]
        )
        noise = round(float(rng.uniform(*SWEEP_RANGES["noise"])), 1)
        flags = [
            "--image-size", str(size), "--synthetic-classes", str(classes),
            "--synthetic-clutter", str(clutter), "--synthetic-noise", str(noise),
        ]  # fmt: skip
        name = f"s{sweep_seed}n{index}_{size}px_{classes}classes_clutter{clutter}_noise{noise}"
        settings[name] = (flags, int(rng.integers(0, 1000)))
    return settings


def run_one(family, setting, seed, epochs, folder, flags=None):
    path = folder / f"{family}-{setting}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    flags = SETTINGS[setting] if flags is None else flags
    arguments = ["--model", family, "--seed", str(seed), *flags, "--verbose", "0"]
    if epochs:
        arguments += ["--epochs", str(epochs)]
    shown = "python train.py " + " ".join(arguments)
    print(f"{shown} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="keras_fg_attention_") as output:
        command = [sys.executable, str(ROOT / "train.py"), *arguments, "--output", output]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        if done.returncode:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            print(f"  failed: {tail}", flush=True)
            return {"command": shown, "error": tail}
        evaluation = json.loads((Path(output) / "evaluation.json").read_text())
    attention = evaluation.get("attention", {})
    result = {
        "command": shown,
        "machine": machine_info(),
        "wall_seconds": round(seconds, 1),
        "training_seconds": evaluation.get("training_seconds"),
        "top1": evaluation["top1"],
        **{key: attention.get(key) for key in MEASURES[1:]},
        "per_part": attention.get("per_part"),
    }
    print(
        "  " + "  ".join(f"{k} {result[k]:.3f}" for k in MEASURES if result[k] is not None),
        flush=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return result


def summarise(folder):
    """Mean, min and max over seeds of every measure, per family and setting."""
    runs = {}
    for path in sorted(folder.glob("*.json")):
        # Setting names hold dashes: split FAMILY-SETTING-seedN from both ends.
        family, rest = path.stem.split("-", 1)
        setting, seed = rest.rsplit("-", 1)
        result = json.loads(path.read_text())
        if "error" not in result:
            runs.setdefault(family, {}).setdefault(setting, {})[seed] = result
    summary = {}
    for family, settings in runs.items():
        for setting, seeds in settings.items():
            row = {"seeds": sorted(seeds)}
            for key in MEASURES:
                values = [r[key] for r in seeds.values() if r.get(key) is not None]
                if values:
                    row[key] = {
                        "mean": float(np.mean(values)),
                        "min": float(np.min(values)),
                        "max": float(np.max(values)),
                    }
            row["commands"] = [seeds[s]["command"] for s in sorted(seeds)]
            summary.setdefault(family, {})[setting] = row
    return summary


def sweep_table(folder):
    """Every sweep run, worst first (pointing game, then mass in box)."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        family, rest = path.stem.split("-", 1)
        setting, seed = rest.rsplit("-", 1)
        result = json.loads(path.read_text())
        rows.append({"family": family, "setting": setting, "seed": int(seed[4:]), **result})
    measured = [r for r in rows if "error" not in r]
    measured.sort(key=lambda r: (r["pointing_game"], r["mass_in_box"]))
    families = {}
    for family in sorted({r["family"] for r in measured}):
        mine = [r for r in measured if r["family"] == family]
        families[family] = {
            "settings": len(mine),
            "worst": {k: mine[0][k] for k in ("setting", "seed", *MEASURES)},
            "mean": {k: float(np.mean([r[k] for r in mine])) for k in MEASURES},
            "min": {k: float(np.min([r[k] for r in mine])) for k in MEASURES},
        }
    failed = [r for r in rows if "error" in r]
    return {"families": families, "runs": measured, "failed": failed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["macnn", "dasrbn"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: train.py's")
    parser.add_argument("--quick", action="store_true", help="default setting, 10 epochs, seed 0")
    parser.add_argument("--sweep", type=int, default=0, help="draw this many settings")
    parser.add_argument("--sweep-seed", type=int, default=0, help="the draw's seed")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args)
    name = "attention_quick" if args.quick else "attention"
    if args.quick:
        args.settings, args.seeds, args.epochs = ["default"], [0], args.epochs or 10
    folder = RESULTS / name
    failed = []
    for family in args.families:
        for setting in args.settings:
            for seed in args.seeds:
                result = run_one(family, setting, seed, args.epochs, folder)
                if "error" in result:
                    failed.append(result["command"])
    write_json(
        name,
        {
            "benchmark": "attention",
            "dataset": "train.py's synthetic fine-grained set; settings: "
            + "; ".join(f"{k}: {' '.join(v) or 'defaults'}" for k, v in SETTINGS.items()),
            "families": summarise(folder),
        },
    )
    if failed:
        sys.exit(f"failed: {'; '.join(failed)}")


def sweep(args):
    folder = RESULTS / "attention_sweep"
    failed = []
    for setting, (flags, seed) in sweep_settings(args.sweep, args.sweep_seed).items():
        for family in args.families:
            result = run_one(family, setting, seed, args.epochs, folder, flags)
            if "error" in result:
                failed.append(result["command"])
    table = sweep_table(folder)
    write_json(
        "attention_sweep",
        {
            "benchmark": "attention_sweep",
            "dataset": "train.py's synthetic fine-grained set, settings drawn by "
            "`python bench/attention.py --sweep N --sweep-seed S` from "
            + ", ".join(f"{k} {lo}-{hi}" for k, (lo, hi) in SWEEP_RANGES.items()),
            **table,
        },
    )
    for family, row in table["families"].items():
        worst = row["worst"]
        print(
            f"{family}: {row['settings']} settings, worst {worst['setting']} seed "
            f"{worst['seed']}: pointing {worst['pointing_game']:.3f}, mass "
            f"{worst['mass_in_box']:.3f}, top-1 {worst['top1']:.3f}"
        )
    if failed:
        sys.exit(f"failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()

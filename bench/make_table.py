"""Regenerates the results tables from bench/results/*.json.

Writes docs/results.md (every benchmark's table, each row with its command) and, between the
markers `<!-- results:start -->` and `<!-- results:end -->` of README.md, the summary: one
table of the families on the bird subset and one of re-identification (nothing else in
README.md changes).

    python bench/make_table.py
"""

import json
import re

import numpy as np
from common import FAMILIES, RESULTS, ROOT

START, END = "<!-- results:start -->", "<!-- results:end -->"


def model_name(result):
    """A readable name from a result's family and options."""
    options = result.get("options", {})
    family = result.get("family", result.get("model"))
    if result.get("model") == "bcnn":
        r = options.get("reduction_dim")
        if options.get("projection_dim"):
            return f"B-CNN, compact ({r}² → {options['projection_dim']:,}-d Random Maclaurin)"
        return f"B-CNN, full ({r}² = {r * r:,}-d)"
    if result.get("model") == "macnn":
        return f"MA-CNN ({options.get('num_parts', 4)} parts)"
    return {"gap": "GAP (baseline)", "dasrbn": "DASRBN"}.get(family, family)


def load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def pct(value):
    return f"{100 * value:.1f} %"


def machine_line(result):
    m = result["machine"]
    flags = f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""
    return (
        f"{m['platform']}, {m['cpu_count']} CPUs{flags} (shared, "
        f"load {m['load_average_1_5_15'][0]}), "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, {m['date_utc'][:10]}"
    )


# The published CUB-subset rows: configs/<recipe>.yaml, run by bench/accuracy.py.
RECIPES = {
    "cub_gap": ("GAP (baseline)", "gap"),
    "cub_bcnn": ("B-CNN, full (256² → 65,536-d)", "bcnn"),
    "cub_bcnn_compact": ("B-CNN, compact (128² → 4,096-d)", "bcnn_compact"),
    "cub_macnn": ("MA-CNN, 4 parts", "macnn"),
    "cub_macnn_part_crops": ("MA-CNN, 4 parts + 112-px part crops", "macnn_part_crops"),
    "cub_dasrbn": ("DASRBN", "dasrbn"),
}


def cub_runs():
    """bench/results/cub/<recipe>_seed<S>.json, by recipe, in seed order."""
    runs = {}
    for path in sorted((RESULTS / "cub").glob("*_seed*.json")):
        result = json.loads(path.read_text())
        runs.setdefault(result["recipe"], []).append(result)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in runs.items()}


def mean_sd(values):
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return pct(values.mean())
    return f"{100 * values.mean():.1f} ± {100 * values.std(ddof=1):.1f} %"


def parameters(recipe):
    """Parameters of a recipe's model on the 50 classes (built with random weights)."""
    from keras_fg.cli.train import family_options
    from keras_fg.cli.train_config import parse_args
    from keras_fg.models import create_model

    args = parse_args(["--config", str(ROOT / "configs" / f"{recipe}.yaml"), "--weights", "none"])
    model = create_model(
        args.model, 50, backbone=args.backbone, image_size=args.image_size[0],
        **family_options(args),
    )  # fmt: skip
    return model.count_params()


def cub_section(runs, floor):
    """Every recipe's train.py runs on the CUB subset."""
    lines = [
        "### Accuracy on real birds (CUB subset: 50 species, 1,500 train / 1,449 test)",
        "",
        "`train.py --config configs/<recipe>.yaml --seed S` with the shared MobileNetV2 weights "
        "(bench/accuracy.py): top-1 on the test images, the whole image resized to 224 px; "
        "training time (the feature cache and both phases, as train.py reports it) and the "
        "wall time of the whole command (evaluation and export included), means over the "
        "seeds, with the 1-minute load of the 2 cores during the runs.",
        "",
        f"Floor (logistic regression on the frozen GAP features, C = 1): {pct(floor['top1'])}.",
        "",
        "| recipe | model | seeds | top-1 per seed | mean ± sd | vs floor | training time "
        "| wall time | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for recipe, (name, _) in RECIPES.items():
        if recipe not in runs:
            continue
        rows = runs[recipe]
        top1 = [r["evaluation"]["top1"] for r in rows]
        minutes = np.mean([r["wall_seconds"] for r in rows]) / 60
        training = np.mean([r["evaluation"]["training_seconds"] for r in rows]) / 60
        loads = [x for r in rows for x in r.get("load_average_1min", [])]
        lines.append(
            f"| `configs/{recipe}.yaml` | {name} | {', '.join(str(r['seed']) for r in rows)} "
            f"| {', '.join(pct(t) for t in top1)} | **{mean_sd(top1)}** "
            f"| {100 * (np.mean(top1) - floor['top1']):+.1f} | {training:.1f} min "
            f"| {minutes:.1f} min | {min(loads, default=0):.1f}–{max(loads, default=0):.1f} |"
        )
    loads = [
        load for rows in runs.values() for r in rows for load in r.get("load_average_1min", [])
    ]
    some = next(iter(runs.values()))[0]
    lines += [
        "",
        f"- e.g. `{some['command']}` — {machine_line(some)}; 1-minute load during the runs "
        f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} (2 cores: wall times grow "
        "with it).",
        "",
    ]
    return lines


def summary_tables(runs, floor, attention, export, reid, sweep=None):
    """The README's two tables: the families on the bird subset, and re-identification."""
    lines = [
        "Birds: the 50-species CUB subset (1,500 training images), MobileNetV2 at 224 px on a "
        "2-core CPU; top-1 on the 1,449 test images, mean ± sd of the seeds run; the wall time "
        "of the whole `train.py` command in its least loaded run (the 2 cores were shared; "
        "every run's time and load are in docs/results.md); the attention's pointing game on "
        "the synthetic set (default setting, 3 seeds); int8 "
        "TFLite latency and its top-1 agreement with Keras. Floor (logistic regression on the "
        f"frozen features): {pct(floor['top1'])}.",
        "",
        "| recipe | top-1 | seeds | train time | pointing game | parameters | int8 latency "
        "| int8 agreement |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    exported = (export or {}).get("families", {})
    pointing = {
        family: settings["default"]["pointing_game"]["mean"]
        for family, settings in (attention or {}).get("families", {}).items()
        if "default" in settings
    }
    for recipe, (name, family) in RECIPES.items():
        if recipe not in runs:
            continue
        rows = runs[recipe]
        top1 = [r["evaluation"]["top1"] for r in rows]
        quietest = min(rows, key=lambda r: np.mean(r.get("load_average_1min") or [np.inf]))
        minutes = quietest["wall_seconds"] / 60
        int8 = next(
            (
                e
                for e in exported.get(family, {}).get("exports", [])
                if e["format"] == "tflite_int8"
            ),
            None,
        )
        latency = f"{int8['latency_ms']:.1f} ms" if int8 else "—"
        agreement = pct(int8["top1_agreement"]) if int8 else "—"
        base = family.split("_")[0]
        point = pct(pointing[base]) if base in pointing else "—"
        lines.append(
            f"| [{name}](configs/{recipe}.yaml) | **{mean_sd(top1)}** | {len(rows)} "
            f"| {minutes:.0f} min | {point} | {parameters(recipe) / 1e6:.1f} M | {latency} "
            f"| {agreement} |"
        )
    for family, row in (sweep or {}).get("families", {}).items():
        mean, worst = row["mean"], row["worst"]
        lines += [
            "",
            f"{model_name({'model': family})} on {row['settings']} synthetic settings drawn at "
            f"random (`bench/attention.py --sweep`): pointing game {pct(mean['pointing_game'])} "
            f"on average, {pct(worst['pointing_game'])} at worst ({worst['setting']}, mass in "
            f"box {worst['mass_in_box']:.2f}, top-1 {pct(worst['top1'])}); top-1 "
            f"{pct(mean['top1'])} on average, {pct(row['min']['top1'])} at lowest.",
        ]
    lines += [
        "",
        "Person re-identification: mini-MARS (16 training identities; 32 queries against 529 "
        "gallery images of 16 others, 23 of the queries with a true match), MobileNetV2 at "
        "256×128, 6 epochs of `train.py --task reid`; mean ± sd over the seeds run.",
        "",
        "| model | rank-1 | mAP | seeds |",
        "| --- | --- | --- | --- |",
    ]
    rows = (reid or {}).get("rows", {})
    for key, name in (
        ("full_pcb", "PCB, 6 stripes weighed by Fisher score (the `--task reid` default)"),
        ("full", "GAP, the bag-of-tricks baseline (`--model gap`)"),
        ("full_macnn", "MA-CNN, 4 parts (`--model macnn`)"),
        ("floor", "the pretrained backbone, untrained"),
    ):
        row = rows.get(key)
        if row and "plain_rank1_mean" in row:
            figures = [
                f"{100 * row[f'plain_{m}_mean']:.1f}"
                + (f" ± {100 * row[f'plain_{m}_std']:.1f}" if row.get(f"plain_{m}_std") else "")
                + " %"
                for m in ("rank1", "mAP")
            ]
            lines.append(f"| {name} | {figures[0]} | {figures[1]} | {len(row['seeds'])} |")
    lines += ["", "Every table, each row with its command: [docs/results.md](docs/results.md).", ""]
    return lines


def growth_lines(models):
    """How training and inference rates and memory grow from 224 to 448 px and with the batch."""
    rows = {(r["family"], r["image_size"], r["batch_size"]): r for r in models if "error" not in r}
    lines = []
    for (family, size, batch), r in sorted(rows.items()):
        base = rows.get((family, 224, 32))
        if base is None or (size, batch) == (224, 32):
            continue
        change = f"{size} px" if size != 224 else f"batch {batch}"
        lines.append(
            f"- {model_name(r)}, 224 px / batch 32 → {change}: training images/s ×"
            f"{r['train_images_per_s'] / base['train_images_per_s']:.2f}, inference ×"
            f"{r['inference_images_per_s'] / base['inference_images_per_s']:.2f}, peak RSS ×"
            f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}"
        )
    return [""] + lines if lines else []


def speed_section(result, title="Speed and memory (CPU)"):
    lines = [
        f"### {title}",
        "",
        "Medians over steps; training updates every layer but BatchNormalization (AdamW); "
        "random images; each row in its own process (peak RSS is its own).",
        "",
        "| model | px | batch | train img/s | inference img/s | 1-image latency | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["models"]:
        if "error" in r:
            continue
        lines.append(
            f"| {model_name(r)} | {r['image_size']} | {r['batch_size']} "
            f"| {r['train_images_per_s']:.1f} | {r['inference_images_per_s']:.1f} "
            f"| {r['latency_one_image_ms']:.0f} ms | {r['peak_rss_mb'] / 1024:.1f} GiB |"
        )
    lines += growth_lines(result["models"])
    pipeline = result.get("pipeline") or {}
    if "images_per_s" in pipeline:
        lines += [
            "",
            f"tf.data pipeline on the CUB JPEGs (decode, resize, random crop, flip, batch "
            f"{pipeline['batch_size']}, {pipeline['image_size']} px): "
            f"**{pipeline['images_per_s']:.0f} images/s**, far above any training rate above: "
            "input is not the bottleneck.",
        ]
    lines += ["", f"- `{result['command']}` — {machine_line(result)}", ""]
    return lines


def reid_section(result):
    """Every row of bench/reid_ablation.py: rank-1 and mAP, mean ± sd over its seeds."""
    if not result:
        return []
    lines = [
        "### Person re-identification (mini-MARS: 16 training identities, 32 queries, "
        "529 gallery images)",
        "",
        "`python train.py --config configs/reid_mini_mars.yaml` with each row's flags "
        "(`bench/reid_ablation.py`: the bag of tricks added one at a time, then the families "
        "and their variants), MobileNetV2 (shared weights), 256×128, 6 epochs. Plain embeddings "
        "(train.py's default figures) and flip-averaged ones, mean ± sd over the seeds. These "
        "runs predate train.py's single tf.data pipeline over the epochs: the same recipe, "
        "with other random draws of its batches.",
        "",
        "| row | seeds | rank-1 | mAP | rank-1, flip | mAP, flip | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def figure(row, key):
        mean, sd = row.get(f"{key}_mean"), row.get(f"{key}_std")
        if mean is None:
            return "—"
        return f"{100 * mean:.1f} ± {100 * sd:.1f} %" if sd else pct(mean)

    for name, row in result["rows"].items():
        wall = row.get("wall_seconds_mean")
        lines.append(
            f"| {name} | {len(row.get('seeds', []))} | {figure(row, 'plain_rank1')} "
            f"| {figure(row, 'plain_mAP')} | {figure(row, 'flip_rank1')} "
            f"| {figure(row, 'flip_mAP')} | {f'{wall / 60:.1f} min' if wall else '—'} |"
        )
    command = result["rows"].get("full_pcb", {}).get("command", "python bench/reid_ablation.py")
    return lines + ["", f"- e.g. `{command}` — {machine_line(result)}", ""]


def attention_section(result):
    """Pointing game and mass in the dilated part box on synthetic data, beside chance."""
    if not result or not result["families"]:
        return []
    lines = [
        "### Where the attention looks (synthetic data)",
        "",
        "The best attention map's peak cell inside the true part box dilated by one grid cell "
        "(pointing game), and its mass inside that box; chance is the share of grid cells inside "
        "the dilated box. Peak mass against a uniform map's. Mean over seeds (min–max).",
        "",
        "| model | setting | seeds | top-1 | pointing game | mass in box | chance "
        "| peak mass (uniform) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(row, key):
        value = row.get(key)
        if not value:
            return "—"
        if len(row["seeds"]) == 1:
            return pct(value["mean"])
        return f"{pct(value['mean'])} ({pct(value['min'])}–{pct(value['max'])})"

    for family, settings in result["families"].items():
        for setting, row in settings.items():
            uniform = row.get("uniform_peak_mass", {}).get("mean")
            peak = cell(row, "peak_mass") + (f" ({uniform:.3f})" if uniform else "")
            lines.append(
                f"| {model_name({'model': family})} | {setting} | {len(row['seeds'])} "
                f"| {cell(row, 'top1')} | {cell(row, 'pointing_game')} "
                f"| {cell(row, 'mass_in_box')} | {pct(row['chance']['mean'])} | {peak} |"
            )
    lines += ["", f"- `python bench/attention.py` — {machine_line(result)}", ""]
    return lines


def attention_sweep_section(result):
    """bench/attention.py --sweep: per family the mean and the worst setting, then every run."""
    if not result or not result.get("families"):
        return []
    lines = [
        "### Attention on settings drawn at random (synthetic data)",
        "",
        f"{result['dataset']}; one training seed per setting, train.py's defaults. Per family: "
        "the mean over the settings and the worst setting; then every run, worst pointing "
        "game first.",
        "",
        "| model | settings | top-1 mean (min) | pointing game mean (min) "
        "| mass in box mean (min) | worst setting |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for family, row in result["families"].items():
        mean, low, worst = row["mean"], row["min"], row["worst"]
        lines.append(
            f"| {model_name({'model': family})} | {row['settings']} "
            + " ".join(f"| {pct(mean[k])} ({pct(low[k])})" for k in ("top1", "pointing_game"))
            + f" | {mean['mass_in_box']:.2f} ({low['mass_in_box']:.2f}) "
            f"| {worst['setting']}, seed {worst['seed']} |"
        )
    lines += [
        "",
        "| model | setting | seed | top-1 | pointing game | mass in box | chance | peak mass |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {model_name({'model': run['family']})} | {run['setting']} | {run['seed']} "
            f"| {pct(run['top1'])} | {pct(run['pointing_game'])} | {run['mass_in_box']:.2f} "
            f"| {pct(run['chance'])} | {run['peak_mass']:.3f} |"
        )
    for run in result.get("failed", []):
        lines.append(f"| {run['family']} | {run['setting']} | {run['seed']} | failed | | | | |")
    command = "python bench/attention.py --sweep 8 --sweep-seed 0` and `--sweep-seed 1"
    return lines + ["", f"- `{command}` — {machine_line(result)}", ""]


def int8_choice(float_layers):
    """How an int8 file was made: which layers it keeps in float."""
    whys = [layer.get("why") for layer in float_layers]
    parts = ["logits"] if "writes the logits" in whys else []
    stem = whys.count("the stem: reads the image")
    ranked = whys.count("its int8 weights move the logits")
    if stem:
        parts.append(f"stem of {stem}")
    head = [layer for layer in float_layers if layer.get("why") == "the head: after the backbone"]
    if head:
        parts.append("head")
    if ranked or not parts:
        parts.append(f"{ranked} ranked layers")
    hybrid = ", the head's weights int8" if head and head[0].get("int8_weights") else ""
    return " + ".join(parts) + " in float" + hybrid


HEAD_ALONE = "the head alone, 30 epochs on cached features"  # Runs before the recipe was kept.


def export_section(result):
    recipes = sorted({r["training"].get("recipe", HEAD_ALONE) for r in result["families"].values()})
    lines = [
        "### One-image latency, size and agreement of the exports (224 px, CPU)",
        "",
        f"`keras_fg.export.export_model` on MobileNetV2 models trained on the CUB subset "
        f"({'; '.join(recipes)}); latency: median of one-image calls through the LiteRT interpreter, the "
        "files timed in turns (7 rounds of 15 calls; the interpreter's default threads, and "
        "one thread); agreement: top-1 of each file against "
        "the Keras model on the CUB test images; int8 and 16x8 calibrated on 300 training "
        "images (6 per class), biases corrected for the int8 weights. int8 keeps in float the "
        "layer that writes the logits, the *stem* (the first layers, which read the image), "
        "the *head* (every op after the backbone; its dense and convolution layers and "
        "constant matrix products on int8 weights where said: hybrid kernels) and/or the N "
        "*ranked layers* whose int8 weights move the logits most.",
        "",
        "| model | runtime | latency | speed vs TFLite fp32 | latency, 1 thread | size "
        "| top-1 agreement with Keras |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    commands, earlier = [], set()
    for family, r in result["families"].items():
        name = model_name({"model": family, "options": r["options"]})
        keras_ms = r["keras"]
        lines.append(
            f"| {name} | Keras `model(x)` (eager) | {keras_ms['call_ms']:.1f} ms | | | | |"
        )
        lines.append(
            f"| {name} | Keras `model.predict(x)` | {keras_ms['predict_ms']:.1f} ms | | | | |"
        )
        for e in r["exports"]:
            if e.get("latency_ms") is None:
                continue
            agreement = "" if e["top1_agreement"] is None else pct(e["top1_agreement"])
            speed = e.get("speed_vs_tflite_fp32")
            runtime = e["format"].replace("_", " ")
            if e["format"].startswith("tflite_int8") and e.get("float_layers") is not None:
                default = ", the default" if e["format"] == "tflite_int8" else ""
                runtime = f"tflite int8 ({int8_choice(e['float_layers'])}{default})"
            if e.get("measured_by"):
                runtime += " (earlier run, below)"
                earlier.add(e["measured_by"])
            one_thread = e.get("latency_ms_1_thread")
            lines.append(
                f"| {name} | {runtime} | {e['latency_ms']:.1f} ms "
                f"| {'' if speed is None else f'{speed:.2f}x'} "
                f"| {'' if one_thread is None else f'{one_thread:.1f} ms'} "
                f"| {e['size_bytes'] / 2**20:.1f} MiB | {agreement} |"
            )
        command = r.get("command", result.get("command"))
        if command and command not in commands:
            commands.append(command)
    commands += sorted(earlier - set(commands))
    return (
        lines
        + [""]
        + [
            f"- `{c}` — "
            + (
                "an earlier run; its speed ratios are against its own fp32 file"
                if c in earlier
                else machine_line(result)
            )
            for c in commands
        ]
        + [""]
    )


def int8_calibration_section(result):
    """The default int8 file's agreement over calibration draws (bench/int8_calibration.py)."""
    if not result:
        return []
    lines = [
        "### int8 agreement over calibration draws (224 px)",
        "",
        "The default int8 file of the export table's models (bench/cache/), calibrated on "
        "other draws of 300 training images (6 per class; draw 0 is the export table's), "
        "each checked against Keras on the CUB test images: how much of an int8 figure is the "
        "draw. Top-1 accuracy: against the test labels, Keras's and the int8 files' mean.",
        "",
        "| model | trained | draws | top-1 agreement with Keras, mean (min–max) | per draw "
        "| top-1 accuracy, Keras | top-1 accuracy, int8 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    commands = []
    for family, r in result["families"].items():
        draws = r["draws"]
        per_draw = ", ".join(
            f"{pct(draws[d]['top1_agreement'])} ({draws[d]['changed_images']})"
            for d in sorted(draws, key=int)
        )
        name = model_name({"model": r["model"], "options": FAMILIES[family][1]})
        recipe = r.get("training", {}).get("recipe", HEAD_ALONE)
        lines.append(
            f"| {name} | {recipe} | {len(draws)} | {pct(r['mean'])} ({pct(r['min'])}–{pct(r['max'])}) "
            f"| {per_draw} | {pct(r['keras_accuracy'])} "
            f"| {pct(np.mean([d['accuracy'] for d in draws.values()]))} |"
        )
        command = (r.get("command") or "").strip()
        if command and command not in commands:
            commands.append(command)
    lines += ["", "(per draw: agreement, and in brackets the test images whose class changed)", ""]
    return lines + [f"- `{c}` — {machine_line(result)}" for c in commands] + [""]


def int8_stages_section(result):
    """float32 against int8, stage by stage, on GAP's files (bench/int8_stages.py)."""
    if not result:
        return []
    lines = [
        "### float32 against int8, stage by stage (GAP, 224 px, CPU)",
        "",
        f"{result['settings']}.",
        "",
        "| stage | float32 | int8 | int8 speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for row in result["stages"]:
        speedup = f"{row['int8_speedup']:.2f}x" if "int8_speedup" in row else ""
        lines.append(
            f"| {row['stage']} | {row['fp32_stage_ms']:.2f} ms | {row['int8_stage_ms']:.2f} ms "
            f"| {speedup} |"
        )
    stems = result.get("float_stems", [])
    if stems:
        lines += [
            "",
            "| int8 file, float stem of | latency | speed vs float32 |",
            "| --- | --- | --- |",
        ]
        for row in stems:
            default = " (the default)" if row["default"] else ""
            lines.append(
                f"| {row['int8_float_stem']} layers{default} | {row['latency_ms']:.2f} ms "
                f"| {row['speed_vs_fp32']:.2f}x |"
            )
    return lines + ["", f"- `{result['command'].strip()}` — {machine_line(result)}", ""]


def main():
    runs, floor = cub_runs(), load("cub/floor")
    lines = ["Regenerated by `python bench/make_table.py` from `bench/results/*.json`.", ""]
    if runs and floor:
        lines += cub_section(runs, floor)
    speed = load("speed") or load("speed_quick")
    if speed:
        lines += speed_section(speed)
    families = load("speed_families")  # The families side by side, in one later session.
    if families:
        lines += speed_section(families, "Speed of the families side by side (CPU, one session)")
    lines += input_path_section(load("input_path"))
    export = load("export_latency") or load("export_latency_quick")
    if export:
        lines += export_section(export)
    lines += int8_calibration_section(load("int8_calibration"))
    lines += int8_stages_section(load("int8_stages"))
    lines += reid_section(load("reid_ablation"))
    lines += attention_section(load("attention") or load("attention_quick"))
    lines += attention_sweep_section(load("attention_sweep"))
    lines += search_section()
    table = "\n".join(lines).rstrip() + "\n"
    results = ROOT / "docs" / "results.md"
    results.parent.mkdir(exist_ok=True)
    results.write_text("# Results\n\n" + table)
    print(f"wrote {results.relative_to(ROOT)}")
    readme = ROOT / "README.md"
    if readme.exists() and runs and floor:
        summary = "\n".join(
            summary_tables(
                runs,
                floor,
                load("attention"),
                export,
                load("reid_ablation"),
                load("attention_sweep"),
            )
        )
        text = readme.read_text()
        if START in text and END in text:
            pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
            readme.write_text(pattern.sub(lambda _: f"{START}\n{summary}{END}", text, count=1))
            print("updated README.md between the results markers")


def search_section():
    """bench/search.py's table: the gallery index against NumPy, 10^4 to 10^6 entries."""
    from search import markdown_table

    if not list(RESULTS.glob("search_*.json")):
        return []
    return [
        "### Person search: the gallery index (faiss) against NumPy brute force",
        "",
        "`python bench/search.py`; what the rows say: [search.md](search.md).",
        "",
        markdown_table(),
        "",
    ]


def input_path_section(result):
    """The input pipeline's ceiling, generator against tf.data, and GAP's training rates."""
    if not result:
        return []
    ceiling, gap = result["ceiling"], result["gap_training"]
    return [
        "### The input path (CUB JPEGs, 224 px, batch 32, training augmentation)",
        "",
        "| feeding `fit` | batches/s into a model that does nothing |",
        "| --- | --- |",
        f"| a Python generator of per-epoch pipelines (train.py before) "
        f"| {ceiling['generator']['batches_per_second']:.2f} |",
        f"| one tf.data pipeline over all epochs (train.py now) "
        f"| {ceiling['tf.data']['batches_per_second']:.2f} |",
        "",
        f"GAP on MobileNetV2, every layer: {gap['train_py_images_per_second']:.1f} images/s "
        f"through train.py against {gap['random_tensors_images_per_second']:.1f} on one "
        "random batch repeated: "
        + (
            f"the input path costs {100 * gap['input_path_share_of_step_time']:.0f} % of the "
            "step time on this CPU."
            if gap["input_path_share_of_step_time"] > 0.05
            else "no measurable cost on this CPU, where the model's step is the bottleneck "
            "(the two rates differ by the load of the shared cores, see the load below)."
        ),
        "",
        f"- `{result['command']}` — {machine_line(result)}",
        "",
    ]


if __name__ == "__main__":
    main()

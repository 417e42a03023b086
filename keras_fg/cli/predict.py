"""predict.py: run a trained model on your own images, in any of its exported forms.

    python predict.py MODEL IMAGE_OR_FOLDER [--top-k 5] [--output DIR] [--json]
    python predict.py MODEL QUERY_IMAGE_OR_FOLDER --gallery FOLDER [--top-k 10] [--output DIR]

MODEL is a `.keras` file (from train.py), a SavedModel directory or a `.tflite` file (from
export.py): each gives the same answers, within the export's parity bounds, because every
image is prepared by the one rule of `keras_fg.export.preprocess.decode_and_resize` (the whole
image resized to the model's input, no crop).

Classification: the top-k classes of each image with their probabilities, as a table, or as
JSON with `--json`. Re-identification (`--gallery`): every gallery image ranked by the distance
of its embedding (`"features"`) to each query's, nearest first; with Market-1501 file names
(`PPPP_cC...`), each ranked image is marked as a true match of the query's person or not.

With `--output DIR`: `DIR/predictions.json` (the JSON), and one figure per image:
`<image>_attention.png` (the attention overlays, for MA-CNN and DASRBN) or
`<image>_ranking.png` (the query, then its top-k gallery images framed green for a true match
and red for a wrong one). Unreadable files are reported by name and skipped.

Exit status: 0 on success; 2 on bad input (a missing path, an unknown model form, no readable
image), with a one-line error.
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_fg import viz
from keras_fg.cli.predict_models import PredictInputError, detect_form, load_predictor
from keras_fg.data.market1501 import FILE_NAME
from keras_fg.export.preprocess import decode_and_resize
from keras_fg.metrics import pairwise_distances

PROGRAM = "predict.py"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # What decode_and_resize reads.
CLASSES_SHOWN, RANKS_SHOWN = 5, 10  # --top-k defaults.
DISPLAY_SIDE = 512  # Figures show the original image, shrunk to at most this many pixels.


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Run a trained keras_fg model (.keras, SavedModel or .tflite) on images: "
        "the top-k classes of each, or with --gallery, the gallery ranked for each query.",
        epilog="Exit status: 0 on success; 2 on bad input (a missing path, an unknown model "
        "form, no readable image). Unreadable images in a folder are named and skipped.",
    )
    parser.add_argument("model", help="a .keras file, a SavedModel directory or a .tflite file")
    parser.add_argument("images", help="an image, or a folder of images (any nesting)")
    parser.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help=f"classes listed per image (default {CLASSES_SHOWN}), or with --gallery, gallery "
        f"images listed per query (default {RANKS_SHOWN})",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="write predictions.json and a figure per image (attention overlays, or rankings)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call")
    reid = parser.add_argument_group("re-identification")
    reid.add_argument(
        "--gallery", metavar="FOLDER", help="rank this folder's images for each query image"
    )
    reid.add_argument(
        "--metric",
        choices=("cosine", "euclidean"),
        default="cosine",
        help="distance between embeddings (default: cosine, as train.py evaluates)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PredictInputError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2


def run(args):
    """Predicts as `args` say, prints the result; returns the exit status."""
    if args.top_k is not None and args.top_k < 1:
        raise PredictInputError(f"--top-k must be >= 1. Received: {args.top_k}")
    if args.batch_size < 1:
        raise PredictInputError(f"--batch-size must be >= 1. Received: {args.batch_size}")
    detect_form(args.model)  # Every path is checked before the model takes time to load.
    queries = list_images(args.images, "Image")
    gallery = list_images(args.gallery, "Gallery") if args.gallery else None
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not output.is_dir():
        raise PredictInputError(f"Output {output} exists and is not a directory")
    predictor = load_predictor(args.model)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)

    if gallery is None:
        result = classify(predictor, queries, args, output)
        table = classification_table(result)
    else:
        result = rank_gallery(predictor, queries, gallery, args, output)
        table = ranking_table(result)
    if output is not None:
        result["output"] = str(output / "predictions.json")
        temporary = output / "predictions.json.tmp"  # Never a half-written predictions.json.
        temporary.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(temporary, output / "predictions.json")
    print(json.dumps(result, indent=2) if args.json else table)
    return 0


# ---------------------------------------------------------------------------------------------
# Classification.


def classify(predictor, paths, args, output):
    """The top-k classes of each image, and its attention overlay in `output`.

    Returns the JSON-ready dict: `model`, `form`, `task` ("classification"), `image_size`,
    `top_k`, `predictions` (per image: `image`, `top_k` as `{"index", "class",
    "probability"}`, `class` None when the model carries no names, and `attention_overlay`
    when one was written) and `skipped` (`{"image", "reason"}`).
    """
    top_k = args.top_k or CLASSES_SHOWN
    kept, outputs, skipped = predict_files(predictor, paths, args.batch_size, "image")
    probabilities = outputs["probabilities"]
    top_k = min(top_k, probabilities.shape[-1])
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    predictions = []
    for row, path in enumerate(kept):
        entry = {
            "image": str(path),
            "top_k": [
                {
                    "index": int(index),
                    "class": predictor.class_name(int(index)),
                    "probability": float(probabilities[row, index]),
                }
                for index in best[row]
            ],
        }
        if output is not None and "attention_maps" in outputs:
            entry["attention_overlay"] = str(
                write_attention_overlay(path, outputs["attention_maps"][row], entry, output, args)
            )
        predictions.append(entry)
    if output is not None and "attention_maps" not in outputs:
        print(
            f"{PROGRAM}: note: {predictor.path} has no attention maps (gap or bcnn family): "
            "no overlays written",
            file=sys.stderr,
        )
    return {
        **describe(predictor),
        "task": "classification",
        "top_k": top_k,
        "predictions": predictions,
        "skipped": skipped,
    }


def write_attention_overlay(path, attention_maps, entry, output, args):
    best = entry["top_k"][0]
    name = best["class"] if best["class"] is not None else str(best["index"])
    target = output / figure_name(path, args.images, "attention")
    figure = viz.attention_grid(
        display_image(path)[None],
        attention_maps[None],
        predicted=[best["index"]],
        class_names={best["index"]: f"{name} ({best['probability']:.1%})"},
        path=target,
        cell_size=3.0,
    )
    figure.clf()
    return target


def classification_table(result):
    rows = [("image", "rank", "class", "probability")]
    for prediction in result["predictions"]:
        for rank, guess in enumerate(prediction["top_k"], start=1):
            name = guess["class"] if guess["class"] is not None else str(guess["index"])
            image = prediction["image"] if rank == 1 else ""
            rows.append((image, str(rank), name, f"{guess['probability']:.4f}"))
    return format_rows(rows, right=(1, 3)) + summary_line(result)


# ---------------------------------------------------------------------------------------------
# Re-identification.


def rank_gallery(predictor, query_paths, gallery_paths, args, output):
    """Ranks the gallery for each query by embedding distance, nearest first.

    The whole gallery is ranked (unlike the evaluation protocol, no same-camera image is
    dropped). When file names follow Market-1501 (`PPPP_cC...`), each ranked image carries
    its `person_id` and `camera` and `match` (same person as the query; None when either
    id is unknown or junk, -1), each query its `first_match_rank`, and the result `rank1`,
    the share of queries with a true match in the gallery whose nearest image is one.
    """
    top_k = args.top_k or RANKS_SHOWN
    kept_queries, query_outputs, skipped = predict_files(
        predictor, query_paths, args.batch_size, "query"
    )
    kept_gallery, gallery_outputs, skipped_gallery = predict_files(
        predictor, gallery_paths, args.batch_size, "gallery"
    )
    distances = pairwise_distances(
        query_outputs["features"], gallery_outputs["features"], metric=args.metric
    )
    gallery_people = [market_person(path) for path in kept_gallery]
    queries = []
    for row, path in enumerate(kept_queries):
        person = market_person(path)
        order = np.argsort(distances[row], kind="stable")
        matches = [same_person(person, gallery_people[index]) for index in order]
        first = next((rank for rank, match in enumerate(matches, start=1) if match), None)
        entry = {
            "image": str(path),
            **person,
            "first_match_rank": first,
            "ranking": [
                {
                    "rank": rank,
                    "image": str(kept_gallery[index]),
                    "distance": float(distances[row, index]),
                    **gallery_people[index],
                    "match": matches[rank - 1],
                }
                for rank, index in enumerate(order[:top_k], start=1)
            ],
        }
        if output is not None:
            entry["ranking_figure"] = str(write_ranking_figure(path, entry, output, args))
        queries.append(entry)
    answerable = [query for query in queries if query["first_match_rank"] is not None]
    return {
        **describe(predictor),
        "task": "reid",
        "metric": args.metric,
        "gallery": str(args.gallery),
        "gallery_size": len(kept_gallery),
        "top_k": min(top_k, len(kept_gallery)),
        "rank1": (
            sum(query["first_match_rank"] == 1 for query in answerable) / len(answerable)
            if answerable
            else None
        ),
        "queries_with_match": len(answerable),
        "queries": queries,
        "skipped": skipped + skipped_gallery,
    }


def market_person(path):
    """`{"person_id", "camera"}` from a Market-1501 / DukeMTMC-reID file name, else Nones."""
    match = FILE_NAME.match(Path(path).name)
    if match is None:
        return {"person_id": None, "camera": None}
    return {"person_id": int(match.group(1)), "camera": int(match.group(2))}


def same_person(query, gallery):
    ids = query["person_id"], gallery["person_id"]
    if None in ids or -1 in ids:
        return None
    return ids[0] == ids[1]


def write_ranking_figure(path, entry, output, args):
    target = output / figure_name(path, args.images, "ranking")
    figure = viz.reid_ranking_figure(
        display_image(path),
        [display_image(ranked["image"]) for ranked in entry["ranking"]],
        matches=[ranked["match"] for ranked in entry["ranking"]],
        distances=[ranked["distance"] for ranked in entry["ranking"]],
        path=target,
    )
    figure.clf()
    return target


def ranking_table(result):
    rows = [("query", "rank", "distance", "match", "gallery image")]
    for query in result["queries"]:
        for ranked in query["ranking"]:
            match = {True: "yes", False: "no", None: ""}[ranked["match"]]
            image = query["image"] if ranked["rank"] == 1 else ""
            rows.append(
                (image, str(ranked["rank"]), f"{ranked['distance']:.4f}", match, ranked["image"])
            )
    table = format_rows(rows, right=(1, 2))
    if result["rank1"] is not None:
        count = result["queries_with_match"]
        table += (
            f"\nrank-1: {round(result['rank1'] * count)} of {count} queries with a true match "
            f"in the gallery have one first ({result['rank1']:.1%})"
        )
    return table + summary_line(result)


# ---------------------------------------------------------------------------------------------
# Images.


def list_images(path, role):
    """`[path]` for a file; the image files under a folder (any nesting), sorted."""
    path = Path(path)
    if not path.exists():
        raise PredictInputError(f"{role} path not found: {path}")
    if path.is_file():
        return [path]
    paths = sorted(
        Path(root) / name
        for root, _, names in os.walk(path)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise PredictInputError(
            f"{role} folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths


def predict_files(predictor, paths, batch_size, label):
    """Reads, resizes and predicts `paths` in batches; unreadable files are named and skipped.

    Returns `(kept_paths, outputs, skipped)`: the model's outputs stacked over the images
    that were read, and `[{"image", "reason"}]` for those that were not.
    """
    kept, outputs, skipped = [], [], []
    progress = Progress(len(paths), label)
    for start in range(0, len(paths), batch_size):
        batch, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(read_image(path, predictor.image_size))
                batch.append(path)
            except UnreadableImage as error:
                skipped.append({"image": str(path), "reason": str(error)})
                progress.message(f"{PROGRAM}: skipped unreadable image {path}: {error}")
        if images:
            outputs.append(predictor.predict(np.stack(images)))
            kept += batch
        progress.update(min(start + batch_size, len(paths)))
    progress.close()
    if not kept:
        raise PredictInputError(
            f"no readable image among the {len(paths)} {label} file(s) "
            f"(first: {skipped[0]['image']}: {skipped[0]['reason']})"
        )
    return kept, {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}, skipped


class UnreadableImage(Exception):
    pass


def read_image(path, size):
    """The model's input pixels for one file, by `decode_and_resize` (serving's own rule)."""
    try:
        data = Path(path).read_bytes()
        return decode_and_resize(data, size).numpy()
    except OSError as error:
        raise UnreadableImage(error.strerror or str(error)) from error
    except tf.errors.OpError as error:  # Not an image, or a corrupt one.
        raise UnreadableImage(first_line(error.message)) from error


def display_image(path):
    """The original image for a figure, shrunk to at most `DISPLAY_SIDE` pixels a side."""
    image = tf.io.decode_image(Path(path).read_bytes(), channels=3, expand_animations=False)
    height, width = image.shape[:2]
    scale = DISPLAY_SIDE / max(height, width)
    if scale < 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)
    return np.clip(image.numpy(), 0, 255).astype("uint8")


def figure_name(path, root, kind):
    """`a__b__c_attention.png` for `ROOT/a/b/c.jpg`: nested names cannot collide."""
    path, root = Path(path), Path(root)
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    return "__".join(relative.with_suffix("").parts) + f"_{kind}.png"


# ---------------------------------------------------------------------------------------------
# Console.


class Progress:
    """A progress bar on stderr (when it is a terminal), so that stdout stays clean JSON."""

    def __init__(self, total, label, width=30):
        self.total, self.label, self.width = total, label, width
        self.active = sys.stderr.isatty() and total > 1
        self.started = time.perf_counter()
        self.shown = False

    def update(self, done):
        if not self.active:
            return
        filled = self.width * done // self.total
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        bar = "=" * filled + ">" * (filled < self.width) + " " * (self.width - filled - 1)
        sys.stderr.write(
            f"\r{self.label:<8} [{bar[: self.width]}] {done}/{self.total} ({rate:.1f} images/s)"
        )
        sys.stderr.flush()
        self.shown = True

    def message(self, text):
        if self.shown:
            sys.stderr.write("\n")
            self.shown = False
        print(text, file=sys.stderr)

    def close(self):
        if self.shown:
            sys.stderr.write("\n")


def describe(predictor):
    return {
        "model": str(predictor.path),
        "form": predictor.form,
        "image_size": list(predictor.image_size),
    }


def summary_line(result):
    if not result["skipped"]:
        return ""
    names = ", ".join(entry["image"] for entry in result["skipped"])
    return f"\nskipped {len(result['skipped'])} unreadable file(s): {names}"


def format_rows(rows, right=()):
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def first_line(message):
    """The gist of a TensorFlow error: its first line, without the op's wrapping."""
    line = next((line.strip() for line in str(message).splitlines() if line.strip()), "")
    line = re.sub(r"\s*\[Op:\w+\]$", "", re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line))
    return line or "unreadable"

"""predict.py: run a trained model on your own images, in any of its exported forms.

    python predict.py MODEL IMAGE_OR_FOLDER [--top-k 5] [--output DIR] [--json]
    python predict.py MODEL QUERY_IMAGE_OR_FOLDER --gallery FOLDER [--top-k 10] [--output DIR]
    python predict.py MODEL --index DIR --build GALLERY_FOLDER [--add] [--index-type auto]
    python predict.py MODEL QUERY_IMAGE_OR_FOLDER --index DIR [--top-k 10] [--output DIR]

MODEL is a `.keras` file (from train.py), a SavedModel directory or a `.tflite` file (from
export.py): each gives the same answers, within the export's parity bounds, because every
image is prepared by the one rule of `keras_fg.export.preprocess.decode_and_resize` (the whole
image resized to the model's input, no crop).

Classification: the top-k classes of each image with their probabilities, as a table, or as
JSON with `--json`. Re-identification: the gallery images nearest each query by the distance
of their embeddings (`"features"`), nearest first; with Market-1501 file names (`PPPP_cC...`),
each ranked image is marked as a true match of the query's person or not. The gallery is a
`keras_fg.search.GalleryIndex`: `--index DIR --build FOLDER` embeds a folder once into an index
on disk (`--add` extends it with the files it does not hold yet), `--index DIR` searches it;
`--gallery FOLDER` builds a temporary exact (flat) index of the folder and searches it.

With `--output DIR`: `DIR/predictions.json` (the JSON), and one figure per image:
`<image>_attention.png` (the attention overlays, for MA-CNN and DASRBN) or
`<image>_ranking.png` (the query, then its top-k gallery images framed green for a true match
and red for a wrong one). Unreadable files are reported by name and skipped.

Exit status: 0 on success; 2 on bad input (a missing path, an unknown model form, no readable
image, an index built with another model or damaged), with a one-line error.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_fg import viz
from keras_fg.data.market1501 import FILE_NAME
from keras_fg.inference import (
    PredictInputError,
    detect_form,
    list_images,
    load_predictor,
    predict_files,
)
from keras_fg.search import (
    AUTO_FLAT_BELOW,
    DEFAULT_EF_SEARCH,
    DEFAULT_NPROBE,
    FaissMissingError,
    GalleryIndexError,
)

PROGRAM = "predict.py"
CLASSES_SHOWN, RANKS_SHOWN = 5, 10  # --top-k defaults.
# Gallery entries searched per query to find its first true match: the whole gallery up to
# this size, so that a small gallery's first_match_rank and rank-1 are exact.
MATCH_SEARCH_DEPTH = 1000
DISPLAY_SIDE = 512  # Figures show the original image, shrunk to at most this many pixels.


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Run a trained keras_fg model (.keras, SavedModel or .tflite) on images: "
        "the top-k classes of each, or with --gallery or --index, the nearest gallery images "
        "of each query.",
        epilog="Exit status: 0 on success; 2 on bad input (a missing path, an unknown model "
        "form, no readable image, an index of another model or damaged). Unreadable images in "
        "a folder are named and skipped.",
    )
    parser.add_argument("model", help="a .keras file, a SavedModel directory or a .tflite file")
    parser.add_argument(
        "images",
        nargs="?",
        help="an image, or a folder of images (any nesting); optional with --build",
    )
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
        help="distance between embeddings (default: cosine, as train.py evaluates; an index "
        "keeps the metric it was built with)",
    )
    search = parser.add_argument_group("person search (a gallery index on disk; needs faiss)")
    search.add_argument("--index", metavar="DIR", help="the gallery index's folder")
    search.add_argument(
        "--build",
        metavar="FOLDER",
        help="embed this folder's images into the index at --index (a new index)",
    )
    search.add_argument(
        "--add",
        action="store_true",
        help="with --build: extend the index at --index with the images it does not hold yet",
    )
    search.add_argument(
        "--index-type",
        choices=("auto", "flat", "ivf", "hnsw", "ivfpq"),
        default="auto",
        help="with --build: flat is exact; ivf, hnsw and ivfpq are approximate, for large "
        f"galleries; auto: flat below {AUTO_FLAT_BELOW:,} images, ivf above",
    )
    search.add_argument(
        "--nprobe",
        type=int,
        help=f"ivf lists scanned per query (default: {DEFAULT_NPROBE.replace('%', '%%')})",
    )
    search.add_argument(
        "--ef-search", type=int, help=f"hnsw candidates per query (default {DEFAULT_EF_SEARCH})"
    )
    search.add_argument("--threads", type=int, help="faiss threads (default: one per core)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (PredictInputError, GalleryIndexError, FaissMissingError) as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2


def run(args):
    """Predicts as `args` say, prints the result; returns the exit status."""
    if args.top_k is not None and args.top_k < 1:
        raise PredictInputError(f"--top-k must be >= 1. Received: {args.top_k}")
    if args.batch_size < 1:
        raise PredictInputError(f"--batch-size must be >= 1. Received: {args.batch_size}")
    check_search_arguments(args)
    detect_form(args.model)  # Every path is checked before the model takes time to load.
    queries = list_images(args.images, "Image") if args.images else None
    gallery = list_images(args.gallery, "Gallery") if args.gallery else None
    build = list_images(args.build, "Gallery") if args.build else None
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not output.is_dir():
        raise PredictInputError(f"Output {output} exists and is not a directory")
    if args.index and not args.build:
        check_index_folder(args.index)
    if args.threads is not None:
        from keras_fg.search import set_num_threads

        set_num_threads(args.threads)
    started = time.perf_counter()
    predictor = load_predictor(args.model)
    timings = {"load_model_seconds": time.perf_counter() - started}
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)

    if gallery is None and args.index is None:
        result = classify(predictor, queries, args, output)
        table = classification_table(result)
    else:
        index, built = open_index(predictor, gallery, build, args, timings)
        if queries is None:
            result, table = built, index_table(built)
        else:
            result = search_index(predictor, index, queries, args, output, timings)
            if built is not None:
                result["build"] = built
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
    kept, outputs, skipped = predict_files(
        predictor, paths, args.batch_size, "image", Progress(len(paths), "image")
    )
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


def check_search_arguments(args):
    """One line for each combination of search options that cannot work."""
    if args.images is None and not args.build:
        raise PredictInputError("an image or folder to predict is needed (or --index with --build)")
    if args.index and args.gallery:
        raise PredictInputError(
            "--gallery and --index exclude each other (--gallery is a temporary index)"
        )
    if args.build and not args.index:
        raise PredictInputError("--build needs --index DIR: the folder to write the index into")
    if args.add and not args.build:
        raise PredictInputError("--add needs --build FOLDER: the images to add")
    for name in ("nprobe", "ef_search", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PredictInputError(f"--{name.replace('_', '-')} must be >= 1. Received: {value}")
    if args.index and args.build and not args.add and (Path(args.index) / "manifest.json").exists():
        raise PredictInputError(
            f"{args.index} already holds a gallery index: pass --add to extend it, or remove it "
            "to build a new one"
        )


def check_index_folder(folder):
    if not (Path(folder) / "manifest.json").is_file():
        raise PredictInputError(
            f"no gallery index in {folder} (no manifest.json): build one with "
            f"{PROGRAM} MODEL --index {folder} --build GALLERY_FOLDER"
        )


def open_index(predictor, gallery_paths, build_paths, args, timings):
    """The `GalleryIndex` to search, and a summary of what was built (None when nothing was).

    `--gallery`: a temporary flat index of the folder; `--index --build [--add]`: the index
    at `--index` built or extended, then saved; `--index` alone: the index loaded.
    """
    from keras_fg.search import GalleryIndex

    started = time.perf_counter()
    if gallery_paths is not None:
        index = GalleryIndex(index_type="flat", metric=args.metric or "cosine")
        index.predictor = predictor
        progress = Progress(len(gallery_paths), "gallery")
        skipped = index.add(gallery_paths, predictor, args.batch_size, progress)
        index.skipped = skipped
        timings["build_seconds"] = time.perf_counter() - started
        return index, None
    folder = Path(args.index)
    if build_paths is None or (args.add and (folder / "manifest.json").exists()):
        index = GalleryIndex.load(folder, predictor)
    else:
        index = GalleryIndex(index_type=args.index_type, metric=args.metric or "cosine")
    timings["load_index_seconds"] = time.perf_counter() - started
    if args.metric is not None and args.metric != index.metric:
        raise PredictInputError(
            f"--metric {args.metric}: the index at {folder} was built for {index.metric}"
        )
    if build_paths is None:
        index.skipped = []
        return index, None
    before = len(index)
    started = time.perf_counter()
    skipped = index.add(
        build_paths, predictor, args.batch_size, Progress(len(build_paths), "gallery")
    )
    timings["build_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    if len(index) > before:  # Else every image was in the index already: nothing to write.
        index.save(folder)
    timings["save_seconds"] = time.perf_counter() - started
    index.skipped = [entry for entry in skipped if entry["reason"] != "already in the index"]
    built = {
        **describe(predictor),
        "task": "index",
        "index": str(folder),
        "index_type": index.index_type,
        "structure": index.structure,
        "metric": index.metric,
        "gallery": str(args.build),
        "added": len(index) - before,
        "already_indexed": len(skipped) - len(index.skipped),
        "count": len(index),
        "timings": dict(timings),
        "skipped": index.skipped,
    }
    return index, built


def search_index(predictor, index, query_paths, args, output, timings):
    """The nearest gallery entries of each query in `index`, nearest first.

    Unlike the evaluation protocol, no same-camera image is dropped. When file names follow
    Market-1501 (`PPPP_cC...`), each ranked image carries its `person_id` and `camera` and
    `match` (same person as the query; None when either id is unknown or junk, -1), each query
    its `first_match_rank` (searched among the `MATCH_SEARCH_DEPTH` nearest, or the whole
    gallery when smaller; None when the first match is further), and the result `rank1`, the
    share of queries whose person is in the gallery whose nearest image is one.
    """
    top_k = min(args.top_k or RANKS_SHOWN, len(index))
    started = time.perf_counter()
    kept_queries, query_outputs, skipped = predict_files(
        predictor, query_paths, args.batch_size, "query", Progress(len(query_paths), "query")
    )
    timings["embed_queries_seconds"] = time.perf_counter() - started
    depth = min(len(index), max(top_k, MATCH_SEARCH_DEPTH))
    started = time.perf_counter()
    hits = index.search(
        query_outputs["features"], depth, nprobe=args.nprobe, ef_search=args.ef_search
    )
    timings["search_seconds"] = time.perf_counter() - started
    people_in_gallery = {record["person_id"] for record in index.records}
    queries = []
    for path, ranking in zip(kept_queries, hits):
        person = market_person(path)
        matches = [same_person(person, hit) for hit in ranking]
        first = next((rank for rank, match in enumerate(matches, start=1) if match), None)
        entry = {
            "image": str(path),
            **person,
            "first_match_rank": first,
            "ranking": [
                {
                    "rank": hit["rank"],
                    "image": hit["path"],
                    "distance": hit["distance"],
                    "person_id": hit["person_id"],
                    "camera": hit["camera"],
                    "match": match,
                }
                for hit, match in zip(ranking[:top_k], matches)
            ],
        }
        if output is not None:
            entry["ranking_figure"] = str(write_ranking_figure(path, entry, output, args))
        queries.append(entry)
    answerable = [
        query
        for query in queries
        if query["person_id"] not in (None, -1) and query["person_id"] in people_in_gallery
    ]
    result = {
        **describe(predictor),
        "task": "reid",
        "metric": index.metric,
        "gallery": str(args.gallery or args.build or index_sources(index)),
        "index": str(args.index) if args.index else None,
        "index_type": index.structure,
        "gallery_size": len(index),
        "top_k": top_k,
        "rank1": (
            sum(query["first_match_rank"] == 1 for query in answerable) / len(answerable)
            if answerable
            else None
        ),
        "queries_with_match": len(answerable),
        "queries": queries,
        "timings": dict(timings),
        "skipped": skipped + index.skipped,
    }
    return result


def index_sources(index):
    """The folder the index's images share (their common parent), for the summary."""
    try:
        return os.path.commonpath([record["path"] for record in index.records])
    except ValueError:  # Relative and absolute paths mixed.
        return ""


def index_table(built):
    lines = [
        f"{built['index']}: {built['count']} images ({built['added']} added from "
        f"{built['gallery']}, {built['already_indexed']} already indexed), "
        f"{built['structure']} index, {built['metric']} distance",
        f"embedded and added in {built['timings']['build_seconds']:.1f} s, saved in "
        f"{built['timings']['save_seconds']:.1f} s",
    ]
    return "\n".join(lines) + summary_line(built)


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
        print(f"{PROGRAM}: {text}", file=sys.stderr)

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

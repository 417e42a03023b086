"""What `export.py RUN_DIR` reads from a train.py run directory: the model and its images.

A run directory holds `config.json` (the train.py flags, among them `data`, `format` and
`image_size`) and `model.keras`; nothing else is read. The dataset named by `config.json`
gives the calibration images (a stratified draw from its training split, every class
present) and the parity images (a stratified draw from its evaluation split). A run on the
built-in synthetic data is seeded, so its images are generated again from `config.json`.
"""

import inspect
import json
import math
from pathlib import Path

import numpy as np

from keras_fg.export.errors import ExportInputError

CONFIG = "config.json"
MODEL = "model.keras"
EVALUATION_SPLITS = ("test", "val", "query")


def is_run_directory(path):
    """True when `path` (or the run a `runs/latest` symlink names) holds a train.py run."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file()


def read_run_directory(path, calibration_images=300, evaluation_images=200, seed=0):
    """The model file, class names and image lists of a train.py run directory.

    Args:
        path: the run directory, or a symlink to one (`runs/latest`).
        calibration_images: at least this many training images (when the split has them),
            drawn per class so that every class is present.
        evaluation_images: about this many images of the evaluation split, drawn per class.
        seed: the seed of the draws.

    Returns:
        A dict: `model_file`, `run_directory` (the resolved path), `class_names` (the
        dataset's), `calibration_data` and `evaluation_data` (lists of image files; for a
        run on synthetic data, uint8 arrays `(N, S, S, 3)` of its images, generated
        again), and `data`: what was read, for the report.

    Raises:
        ExportInputError: no `config.json` or `model.keras`, an unreadable `config.json`,
            or a dataset that cannot be found or read.
    """
    run = Path(path).resolve()
    config_file, model_file = run / CONFIG, run / MODEL
    if not config_file.is_file():
        raise ExportInputError(f"{path} is not a train.py run directory: no {CONFIG}")
    if not model_file.is_file():
        raise ExportInputError(f"Run directory {path} has no {MODEL} (is the run finished?)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise ExportInputError(f"Cannot read {config_file}: {error}") from error
    result = {"model_file": str(model_file), "run_directory": str(run), "class_names": None}
    data, data_format = config.get("data"), config.get("format")
    if data is None or data_format in (None, "synthetic"):
        return {**result, **_synthetic_images(config, calibration_images, evaluation_images)}
    root = _find_dataset(data, run)
    options = {}
    if data_format == "aircraft" and config.get("annotation"):
        options["annotation"] = config["annotation"]
    if data_format == "folder" and config.get("validation_fraction"):
        options.update(
            validation_fraction=config["validation_fraction"], seed=config.get("seed", 0)
        )
    from keras_fg.data import load_dataset

    try:
        train = load_dataset(data_format, root, "train", **options)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise ExportInputError(f"Cannot read the run's training data {root}: {error}") from error
    evaluation, split = None, None
    for split in EVALUATION_SPLITS:
        try:
            evaluation = load_dataset(data_format, root, split, **options)
            break
        except (ValueError, FileNotFoundError, NotADirectoryError):
            continue
    if evaluation is None:
        raise ExportInputError(f"The run's dataset {root} has no test, val or query split")
    calibration = stratified_indices(train.labels, calibration_images, seed)
    chosen = stratified_indices(evaluation.labels, evaluation_images, seed, at_most=True)
    return {
        **result,
        "class_names": list(train.class_names),
        "calibration_data": [train.paths[i] for i in calibration],
        "evaluation_data": [evaluation.paths[i] for i in chosen],
        "data": {
            "format": data_format,
            "root": str(root),
            "calibration_split": "train",
            "evaluation_split": split,
        },
    }


def _synthetic_images(config, calibration_images, evaluation_images):
    """The first images of a synthetic run's training and test splits, generated again.

    `SyntheticFineGrained` draws image `i` of a split from `(seed, split, i)` alone and
    holds every class once in each block of `num_classes` images, so the first images of
    a split are the run's own, every class present.
    """
    from keras_fg.data.synthetic import SyntheticFineGrained

    defaults = inspect.signature(SyntheticFineGrained).parameters
    image_size = config.get("image_size") or [defaults["image_size"].default]
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    num_train = config.get("synthetic_train", defaults["num_train"].default)
    num_test = config.get("synthetic_test", defaults["num_test"].default)
    try:
        synthetic = SyntheticFineGrained(
            num_classes=config.get("synthetic_classes", defaults["num_classes"].default),
            image_size=int(image_size),
            num_train=min(num_train, calibration_images),
            num_test=min(num_test, evaluation_images),
            seed=config.get("seed", 0),
            clutter=config.get("synthetic_clutter", defaults["clutter"].default),
            noise=config.get("synthetic_noise", defaults["noise"].default),
        )
    except (TypeError, ValueError) as error:
        raise ExportInputError(f"Cannot generate the run's synthetic data: {error}") from error
    return {
        "class_names": list(synthetic.class_names),
        "calibration_data": synthetic.x_train,
        "evaluation_data": synthetic.x_test,
        "data": {
            "format": "synthetic",
            "seed": synthetic.seed,
            "calibration_split": "train",
            "evaluation_split": "test",
            "note": "the run's synthetic images, generated again from its config.json",
        },
    }


def stratified_indices(labels, count, seed=0, at_most=False):
    """Sorted indices of items drawn per class: `ceil(count / classes)` of each class.

    Every class is present; with `at_most`, the draw is cut to `count` (some classes then
    get one item fewer, none is dropped while `count >= classes`).
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    per_class = max(1, math.ceil(count / max(len(classes), 1)))
    drawn = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    # Round-robin over classes, so that a cut keeps the classes balanced.
    order = [group[i] for i in range(per_class) for group in drawn if i < len(group)]
    if at_most:
        order = order[:count]
    return sorted(int(i) for i in order)


def _find_dataset(data, run):
    """`config.json`'s `data`: as written (absolute, or relative to where train.py ran), else
    relative to the run directory's parent folders."""
    candidates = [Path(data)] + [parent / data for parent in run.parents]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    raise ExportInputError(
        f"The run's dataset {data!r} (config.json 'data') is not found from here nor from "
        f"the run directory's parent folders"
    )

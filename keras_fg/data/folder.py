"""A class-per-folder image tree (torchvision's ImageFolder layout)."""

from pathlib import Path

import numpy as np

from keras_fg.data.records import (
    IMAGE_EXTENSIONS,
    ImageRecords,
    check_split,
    read_table,
    require_dir,
)

NAME = "ImageFolder"
# Split sub-folders a root may hold instead of class folders; "val" also answers to these names.
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def load_image_folder(root, split="train", split_file=None, validation_fraction=None, seed=0):
    """Read a class-per-folder tree: `root/<class name>/**/<image>`.

    Splits, in order of precedence:
      - `root/train/<class>/...` with `root/val/...` (or `valid/`, `validation/`) and/or
        `root/test/...`: each sub-folder is a split; classes are the union over all of them, so
        labels agree across splits.
      - `split_file`: a text file of lines "<path relative to root> <split name>"; its split names
        are the valid splits.
      - `validation_fraction`: a stratified random "val" part of each class (at least one image of
        each class stays in "train"), fixed by `seed`. With split sub-folders it is carved out of
        `train/` when there is no validation folder.
      - none of these: split "all" (or "train") is every image.

    Labels follow the sorted class-folder names.

    Args:
        root: the tree's root folder.
        split: the split to return.
        split_file: optional path of a split file.
        validation_fraction: optional float in (0, 1).
        seed: seed of the stratified validation draw.

    Returns:
        ImageRecords.
    """
    root = require_dir(root, NAME)
    if validation_fraction is not None and not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"`validation_fraction` must be in (0, 1). "
            f"Received: validation_fraction={validation_fraction}"
        )
    split_dirs = {}
    for name, aliases in SPLIT_FOLDERS.items():
        found = [root / alias for alias in aliases if (root / alias).is_dir()]
        if found:
            split_dirs[name] = found[0]
    if "train" in split_dirs:
        return _load_split_folders(root, split_dirs, split, validation_fraction, seed)

    class_names = _class_folders(root)
    records = _scan(root, class_names)
    if split_file is not None:
        return _apply_split_file(root, records, Path(split_file), split)
    if validation_fraction is not None:
        check_split(split, ("train", "val"), NAME)
        return _stratified_split(records, validation_fraction, seed)[split]
    check_split(
        split, ("all", "train"), f"{NAME} without split folders, split file or validation_fraction"
    )
    return records


def _class_folders(folder):
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise FileNotFoundError(
            f"{folder} is not an {NAME} folder: expected one sub-folder of images per class"
        )
    return names


def _scan(folder, class_names):
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue  # a class absent from this split keeps its label
        found = sorted(
            p
            for p in class_dir.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
        paths += [str(p) for p in found]
        labels += [label] * len(found)
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return ImageRecords(paths, labels, class_names)


def _load_split_folders(root, split_dirs, split, validation_fraction, seed):
    valid = list(split_dirs)
    if validation_fraction is not None and "val" not in split_dirs:
        valid.append("val")
    check_split(split, tuple(valid), f"{NAME} at {root}")
    class_names = sorted(set().union(*(_class_folders(folder) for folder in split_dirs.values())))
    if validation_fraction is not None and "val" not in split_dirs and split in ("train", "val"):
        records = _scan(split_dirs["train"], class_names)
        return _stratified_split(records, validation_fraction, seed)[split]
    return _scan(split_dirs[split], class_names)


def _apply_split_file(root, records, split_file, split):
    if not split_file.is_file():
        raise FileNotFoundError(f"Split file not found: {split_file}")
    split_of = {Path(relative).as_posix(): name for relative, name in read_table(split_file, 2)}
    check_split(split, tuple(sorted(set(split_of.values()))), f"{NAME} split file {split_file}")
    keep = [
        split_of.get(Path(path).relative_to(root).as_posix()) == split for path in records.paths
    ]
    return records.subset(np.array(keep, dtype=bool))


def _stratified_split(records, fraction, seed):
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(records), dtype=bool)
    for label in np.unique(records.labels):
        members = np.flatnonzero(records.labels == label)
        count = min(int(round(fraction * len(members))), len(members) - 1)
        is_val[rng.permutation(members)[:count]] = True
    return {"train": records.subset(~is_val), "val": records.subset(is_val)}


def load_identity_folders(root, split):
    """Read a re-identification set laid out as one folder per person, without camera ids.

        root/train/<person>/**/<image>     training identities
        root/test/<person>/**/<image>      evaluation identities (or val/, valid/, validation/)

    The evaluation images serve as queries and gallery at once: with no camera ids, every
    other image of a person is a true match (`keras_fg.metrics.evaluate_reid_without_cameras`).

    Args:
        root: the tree's root folder.
        split: "train" (labels 0..P-1 over the training people, in sorted folder order) or
            "test" (labels 0..P-1 over the evaluation people).

    Returns:
        ImageRecords, `cameras` None; `class_names` the person folders' names.

    Raises:
        FileNotFoundError: `root` has no train/ folder, or no test/ (or val/) folder, or one of
            them holds no person folder with images.

    Example:

    >>> people = load_identity_folders("my_people", "train")  # doctest: +SKIP
    >>> people.class_names[:2], people.cameras                # doctest: +SKIP
    (['alice', 'bob'], None)
    """
    root = require_dir(root, f"{NAME} of identities")
    check_split(split, ("train", "test"), f"{NAME} of identities")
    wanted = ("train",) if split == "train" else ("test",) + SPLIT_FOLDERS["val"]
    found = [root / name for name in wanted if (root / name).is_dir()]
    if not found or not (root / "train").is_dir():
        raise FileNotFoundError(
            f"{root} is not a re-identification folder tree: expected train/ and test/ (or "
            "val/) folders, each holding one folder of images per person"
        )
    return _scan(found[0], _class_folders(found[0]))

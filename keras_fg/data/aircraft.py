"""FGVC-Aircraft 2013b: 100 variants, 70 families, 30 manufacturers."""

import numpy as np

from keras_fg.data.records import ImageRecords, check_split, read_table, require_dir, require_file

NAME = "FGVC-Aircraft"
SPLITS = ("train", "val", "trainval", "test")
ANNOTATIONS = {
    "variant": "variants.txt",
    "family": "families.txt",
    "manufacturer": "manufacturers.txt",
}


def load_aircraft(root, split, annotation="variant"):
    """Read FGVC-Aircraft in its published layout.

        data/images/<image id>.jpg
        data/images_<annotation>_<split>.txt    "<image id> <class name, may contain spaces>"
        data/variants.txt, families.txt, manufacturers.txt   class names, one per line
        data/images_box.txt                     optional, "<image id> <xmin> <ymin> <xmax> <ymax>"

    `root` may be `fgvc-aircraft-2013b/` or its `data/` folder. Labels follow the order of the
    class-name file (so they agree across splits). The images keep the 20-pixel copyright banner
    at their bottom edge, as published.

    Args:
        root: the dataset folder.
        split: "train", "val", "trainval" or "test".
        annotation: "variant" (100 classes), "family" (70) or "manufacturer" (30).

    Returns:
        ImageRecords, with `boxes` when `images_box.txt` is present.
    """
    root = require_dir(root, NAME)
    if annotation not in ANNOTATIONS:
        raise ValueError(
            f"Unknown {NAME} annotation: {annotation!r}. "
            f"Valid annotations: {', '.join(ANNOTATIONS)}"
        )
    check_split(split, SPLITS, NAME)
    data = root / "data" if (root / "data" / "images").is_dir() else root
    rows = read_table(require_file(data / f"images_{annotation}_{split}.txt", NAME, root), 2)
    class_names = [
        row[0] for row in read_table(require_file(data / ANNOTATIONS[annotation], NAME, root), 1)
    ]
    label_of = {name: label for label, name in enumerate(class_names)}
    unknown = [name for _, name in rows if name not in label_of]
    if unknown:
        raise ValueError(
            f"Class {unknown[0]!r} of images_{annotation}_{split}.txt is not in "
            f"{ANNOTATIONS[annotation]}"
        )
    boxes = None
    if (data / "images_box.txt").is_file():
        corners = {
            row[0]: [float(v) for v in row[1:]] for row in read_table(data / "images_box.txt")
        }
        corners = np.array([corners[image_id] for image_id, _ in rows], dtype=np.float32).reshape(
            -1, 4
        )
        boxes = np.concatenate([corners[:, :2] - 1, corners[:, 2:] - corners[:, :2] + 1], axis=1)
    return ImageRecords(
        paths=[str(data / "images" / f"{image_id}.jpg") for image_id, _ in rows],
        labels=[label_of[name] for _, name in rows],
        class_names=class_names,
        boxes=boxes,
    )

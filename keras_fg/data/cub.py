"""Caltech-UCSD Birds-200-2011 in its published folder layout."""

import numpy as np

from keras_fg.data.records import (
    ImageRecords,
    check_split,
    read_table,
    readable_name,
    require_dir,
    require_file,
)

NAME = "CUB-200-2011"
SPLITS = ("train", "test")


def load_cub(root, split):
    """Read a CUB-200-2011 folder.

    Layout (the published one; `root` may also be the folder that contains `CUB_200_2011/`):

        images.txt               "<image id> <relative path under images/>"
        image_class_labels.txt   "<image id> <class id>"
        train_test_split.txt     "<image id> <1 = training, 0 = test>"
        classes.txt              "<class id> <NNN.Class_Name>"
        bounding_boxes.txt       optional, "<image id> <x> <y> <w> <h>" in pixels
        images/NNN.Class_Name/*.jpg

    Class ids are mapped to contiguous labels 0..C-1 in the order of their ids (subsets with
    gaps in the ids work), and "001.Black_footed_Albatross" becomes "Black footed Albatross".

    Args:
        root: the dataset folder.
        split: "train" or "test".

    Returns:
        ImageRecords with `boxes` when `bounding_boxes.txt` is present.
    """
    root = require_dir(root, NAME)
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        root = root / "CUB_200_2011"
    check_split(split, SPLITS, NAME)
    files = {
        name: require_file(root / name, NAME, root)
        for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
    }
    images = {image_id: relative for image_id, relative in read_table(files["images.txt"], 2)}
    class_of = dict(read_table(files["image_class_labels.txt"], 2))
    is_train = dict(read_table(files["train_test_split.txt"], 2))
    classes = sorted(read_table(files["classes.txt"], 2), key=lambda row: int(row[0]))
    label_of_class = {class_id: label for label, (class_id, _) in enumerate(classes)}
    boxes_file = root / "bounding_boxes.txt"
    boxes = (
        dict((row[0], row[1:]) for row in read_table(boxes_file)) if boxes_file.exists() else None
    )

    wanted = "1" if split == "train" else "0"
    ids = [image_id for image_id in images if is_train.get(image_id) == wanted]
    missing = [image_id for image_id in ids if image_id not in class_of]
    if missing:
        raise ValueError(
            f"{files['image_class_labels.txt']} has no class for image id {missing[0]}"
        )
    return ImageRecords(
        paths=[str(root / "images" / images[image_id]) for image_id in ids],
        labels=[label_of_class[class_of[image_id]] for image_id in ids],
        class_names=[readable_name(name) for _, name in classes],
        boxes=None if boxes is None else np.array([boxes[i] for i in ids], dtype=np.float32),
    )

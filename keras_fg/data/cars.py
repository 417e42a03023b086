"""Stanford Cars (196 classes) in the layouts people have: the devkit, or class folders + CSV."""

import csv

import numpy as np

from keras_fg.data.matfile import load_mat
from keras_fg.data.records import ImageRecords, check_split, require_dir

NAME = "Stanford Cars"
SPLITS = ("train", "test")


def load_cars(root, split):
    """Read Stanford Cars.

    Two layouts are recognised:

    1. The published devkit (the layout torchvision's `StanfordCars` reads):

           cars_train/00001.jpg ...                 (a nested cars_train/cars_train/ works too)
           cars_test/00001.jpg ...
           devkit/cars_meta.mat                     class_names
           devkit/cars_train_annos.mat              annotations: bbox_x1..bbox_y2, class, fname
           cars_test_annos_withlabels.mat           (here or in devkit/) the labelled test list

       The .mat files are MATLAB v5; `keras_fg.data.matfile` reads them without SciPy.

    2. The class-folder + CSV re-packaging ("stanford-car-dataset-by-classes-folder"):

           names.csv                                one class name per line
           anno_train.csv, anno_test.csv            "<fname>,<x1>,<y1>,<x2>,<y2>,<class id>"
           [car_data/[car_data/]]train/<class>/<fname>, .../test/<class>/<fname>

    Boxes are converted from MATLAB's 1-based inclusive corners to `(x, y, w, h)`.

    Args:
        root: the dataset folder.
        split: "train" or "test".

    Returns:
        ImageRecords with `boxes`; labels are the class ids minus one.
    """
    root = require_dir(root, NAME)
    check_split(split, SPLITS, NAME)
    if (root / "devkit" / "cars_meta.mat").is_file():
        return _load_devkit(root, split)
    if (root / "names.csv").is_file():
        return _load_csv(root, split)
    raise FileNotFoundError(
        f"{root} is not a {NAME} folder: expected devkit/cars_meta.mat (devkit layout) or "
        f"names.csv (class-folder + CSV layout)"
    )


def _load_devkit(root, split):
    class_names = [
        str(name) for name in load_mat(root / "devkit" / "cars_meta.mat")["class_names"].ravel()
    ]
    if split == "train":
        candidates = [root / "devkit" / "cars_train_annos.mat"]
    else:
        candidates = [
            root / "cars_test_annos_withlabels.mat",
            root / "devkit" / "cars_test_annos_withlabels.mat",
        ]
    annos_file = next((path for path in candidates if path.is_file()), None)
    if annos_file is None:
        raise FileNotFoundError(
            f"{root} is not a complete {NAME} devkit: expected {candidates[0].relative_to(root)} "
            f"(the devkit's cars_test_annos.mat has no labels; the labelled test list is "
            f"cars_test_annos_withlabels.mat)"
        )
    image_dir = root / f"cars_{split}"
    if (image_dir / f"cars_{split}").is_dir():
        image_dir = image_dir / f"cars_{split}"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{root} is not a {NAME} folder: expected folder cars_{split}/")
    annotations = load_mat(annos_file)["annotations"].ravel()
    rows = [
        (
            str(a["fname"]),
            int(a["class"].item()),
            [float(a[f"bbox_{c}"].item()) for c in ("x1", "y1", "x2", "y2")],
        )
        for a in annotations
    ]
    return _records([image_dir / fname for fname, _, _ in rows], rows, class_names)


def _load_csv(root, split):
    with open(root / "names.csv", encoding="utf-8") as handle:
        class_names = [line.strip() for line in handle if line.strip()]
    annos_file = root / f"anno_{split}.csv"
    if not annos_file.is_file():
        raise FileNotFoundError(
            f"{root} is not a {NAME} CSV folder: expected file anno_{split}.csv"
        )
    with open(annos_file, encoding="utf-8", newline="") as handle:
        rows = [
            (row[0], int(row[5]), [float(v) for v in row[1:5]])
            for row in csv.reader(handle)
            if row and row[0].lower().endswith((".jpg", ".jpeg", ".png"))
        ]
    image_dir = next(
        (
            d
            for d in (root / split, *root.glob(f"*/{split}"), *root.glob(f"*/*/{split}"))
            if d.is_dir()
        ),
        None,
    )
    if image_dir is None:
        raise FileNotFoundError(
            f"{root} is not a {NAME} CSV folder: no {split}/ folder of class folders"
        )
    # File names are unique across classes: index them once instead of guessing folder spellings.
    found = {path.name: path for path in image_dir.glob("*/*") if path.is_file()}
    missing = [fname for fname, _, _ in rows if fname not in found]
    if missing:
        raise FileNotFoundError(f"{annos_file} lists {missing[0]}, not found under {image_dir}")
    return _records([found[fname] for fname, _, _ in rows], rows, class_names)


def _records(paths, rows, class_names):
    corners = np.array([box for _, _, box in rows], dtype=np.float32).reshape(-1, 4)
    boxes = np.stack(
        [
            corners[:, 0] - 1,
            corners[:, 1] - 1,
            corners[:, 2] - corners[:, 0] + 1,
            corners[:, 3] - corners[:, 1] + 1,
        ],
        axis=1,
    )
    return ImageRecords(
        paths=paths,
        labels=[class_id - 1 for _, class_id, _ in rows],
        class_names=class_names,
        boxes=boxes,
    )

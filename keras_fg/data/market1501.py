"""Re-identification sets in the Market-1501 layout (Market-1501, DukeMTMC-reID, MARS crops)."""

import re

from keras_fg.data.records import ImageRecords, check_split, list_images, require_dir

NAME = "Market-1501"
SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
# Market-1501 "0002_c1s1_000451_03.jpg" (MARS crops: "0004_c1s1_002012_02.jpg") and
# DukeMTMC-reID "0005_c2_f0046985.jpg": person id (-1 = junk, 0 = distractor), then camera.
FILE_NAME = re.compile(r"^(-?\d+)_c(\d+)(s\d+_\d+_\d+|_f\d+)\.\w+$")


def load_market1501(root, split):
    """Read a Market-1501-style re-identification folder.

        bounding_box_train/   training images
        query/                query images
        bounding_box_test/    gallery images

    Standard protocol: junk images (person id -1) are dropped everywhere; distractors (id 0) are
    dropped from training but stay in the gallery.

    Args:
        root: the dataset folder (or a folder holding exactly one such folder).
        split: "train" (labels relabelled 0..N-1 in sorted id order, `class_names` the original
            ids as written in the file names), "query" or "gallery" (labels are the original person
            ids, `class_names` the sorted ids present).

    Returns:
        ImageRecords with `cameras` (the camera numbers of the file names).
    """
    root = require_dir(root, NAME)
    check_split(split, tuple(SPLITS), NAME)
    if not (root / SPLITS["train"]).is_dir():
        nested = [child for child in root.iterdir() if (child / SPLITS["train"]).is_dir()]
        if len(nested) == 1:
            root = nested[0]
    folder = root / SPLITS[split]
    if not folder.is_dir():
        raise FileNotFoundError(f"{root} is not a {NAME} folder: expected folder {SPLITS[split]}/")

    paths, ids, id_text, cameras = [], [], {}, []
    for path in list_images(folder):
        match = FILE_NAME.match(path.name)
        if match is None:
            raise ValueError(
                f"{path} does not follow the {NAME} naming PPPP_cCsS_FFFFFF_BB.jpg (or DukeMTMC's "
                f"PPPP_cC_fFFFFFFF.jpg)"
            )
        person = int(match.group(1))
        if person == -1 or (person == 0 and split == "train"):
            continue
        paths.append(path)
        ids.append(person)
        id_text.setdefault(person, match.group(1))
        cameras.append(int(match.group(2)))
    if not paths:
        raise FileNotFoundError(f"No usable {NAME} images in {folder}")
    people = sorted(id_text)
    if split == "train":
        label_of = {person: label for label, person in enumerate(people)}
        ids = [label_of[person] for person in ids]
    return ImageRecords(paths, ids, [id_text[person] for person in people], cameras=cameras)

"""Stanford Dogs: 120 breeds from ImageNet."""

from keras_fg.data.matfile import load_mat
from keras_fg.data.records import ImageRecords, check_split, read_table, readable_name, require_dir

NAME = "Stanford Dogs"
SPLITS = ("train", "test")


def load_dogs(root, split):
    """Read Stanford Dogs in its published layout.

        Images/n02085620-Chihuahua/n02085620_10074.jpg ...
        train_list.mat, test_list.mat      (lists.tar) file_list: paths relative to Images/
        or train_list.txt, test_list.txt   the same paths as text, one per line (any further
                                           fields on a line are ignored)

    The text lists are preferred when both are present. Labels follow the sorted breed folders of
    `Images/` (the order of the published 1-based labels); "n02085620-Chihuahua" becomes
    "Chihuahua". The per-image XML boxes of `Annotation/` are not read.

    Args:
        root: the dataset folder.
        split: "train" or "test".

    Returns:
        ImageRecords.
    """
    root = require_dir(root, NAME)
    check_split(split, SPLITS, NAME)
    images = root / "Images"
    if not images.is_dir():
        raise FileNotFoundError(f"{root} is not a {NAME} folder: expected folder Images/")
    text_list, mat_list = root / f"{split}_list.txt", root / f"{split}_list.mat"
    if text_list.is_file():
        relative = [row[0] for row in read_table(text_list)]
    elif mat_list.is_file():
        relative = [str(name) for name in load_mat(mat_list)["file_list"].ravel()]
    else:
        raise FileNotFoundError(
            f"{root} is not a {NAME} folder: expected file {mat_list.name} (from lists.tar) "
            f"or {text_list.name}"
        )
    folders = sorted(p.name for p in images.iterdir() if p.is_dir())
    label_of = {folder: label for label, folder in enumerate(folders)}
    breeds = [path.replace("\\", "/").split("/")[0] for path in relative]
    unknown = [breed for breed in breeds if breed not in label_of]
    if unknown:
        raise FileNotFoundError(
            f"{split} list names breed folder Images/{unknown[0]}/, which does not exist"
        )
    return ImageRecords(
        paths=[str(images / path) for path in relative],
        labels=[label_of[breed] for breed in breeds],
        class_names=[readable_name(folder) for folder in folders],
    )

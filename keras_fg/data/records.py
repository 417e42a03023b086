"""The record type every dataset reader returns, and the helpers the readers share."""

import dataclasses
import re
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass
class ImageRecords:
    """A list of image files with their labels: what every dataset reader returns.

    Args:
        paths: image file paths (strings).
        labels: int32 array `(N,)`. For classification and re-ID training the labels are 0-based and
            contiguous (`0 .. len(class_names) - 1`); for re-ID query and gallery splits they
            are the original person ids.
        class_names: readable name of each class, indexed by label (re-ID: the person ids as
            strings).
        cameras: optional int32 array `(N,)` of camera ids (re-identification).
        boxes: optional float32 array `(N, 4)` of object boxes `(x, y, w, h)` in pixels of the
            original image.

    Example:

    >>> records = ImageRecords(["a.jpg", "b.jpg"], [0, 1], ["cat", "dog"])
    >>> len(records), records.subset([1]).paths
    (2, ['b.jpg'])
    """

    paths: list
    labels: np.ndarray
    class_names: list
    cameras: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __post_init__(self):
        self.paths = [str(path) for path in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        self.class_names = [str(name) for name in self.class_names]
        if len(self.labels) != len(self.paths):
            raise ValueError(
                f"`labels` must have one entry per path. Received: {len(self.paths)} paths and "
                f"{len(self.labels)} labels"
            )
        if self.cameras is not None:
            self.cameras = np.asarray(self.cameras, dtype=np.int32).reshape(-1)
            if len(self.cameras) != len(self.paths):
                raise ValueError(
                    f"`cameras` must have one entry per path. Received: {len(self.cameras)} "
                    f"cameras for {len(self.paths)} paths"
                )
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
            if len(self.boxes) != len(self.paths):
                raise ValueError(
                    f"`boxes` must have one (x, y, w, h) row per path. Received: "
                    f"{len(self.boxes)} boxes for {len(self.paths)} paths"
                )

    def __len__(self):
        return len(self.paths)

    @property
    def num_classes(self):
        return len(self.class_names)

    def subset(self, indices):
        """The records at `indices` (integers or a boolean mask); `class_names` is kept whole."""
        indices = np.asarray(indices)
        indices = np.flatnonzero(indices) if indices.dtype == bool else indices.astype(np.int64)
        return ImageRecords(
            paths=[self.paths[i] for i in indices],
            labels=self.labels[indices],
            class_names=list(self.class_names),
            cameras=None if self.cameras is None else self.cameras[indices],
            boxes=None if self.boxes is None else self.boxes[indices],
        )


def require_dir(root, format_name):
    """`root` as a Path, or FileNotFoundError when it is not an existing folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{format_name} dataset folder not found: {root}")
    return root


def require_file(path, format_name, root):
    """`path` itself, or FileNotFoundError naming the file the format expected."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a {format_name} folder: expected file {path.relative_to(root)} "
            f"is missing"
        )
    return path


def check_split(split, valid, format_name):
    if split not in valid:
        raise ValueError(
            f"Unknown split for {format_name}: {split!r}. Valid splits: {', '.join(valid)}"
        )


def read_table(path, columns=None):
    """Whitespace-separated rows of a text file, blank lines skipped.

    With `columns=n` each row is split into at most n fields, the last keeping its spaces
    (FGVC-Aircraft's class names contain spaces).
    """
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split(None, columns - 1) if columns else line.split()
            if columns and len(fields) != columns:
                raise ValueError(
                    f"{path}, line {line_number}: expected {columns} fields, got {line!r}"
                )
            rows.append(fields)
    return rows


def readable_name(folder_name):
    """A readable class name: "001.Black_footed_Albatross" -> "Black footed Albatross",
    "n02085620-Chihuahua" -> "Chihuahua"."""
    name = re.sub(r"^(\d+\.|n\d{8}-)", "", folder_name)
    return name.replace("_", " ")


def list_images(folder):
    """Image files directly inside `folder`, sorted by name (hidden files skipped)."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_EXTENSIONS
    )

"""`load_dataset`: one entry point for every on-disk dataset format."""

import inspect

from keras_fg.data.aircraft import load_aircraft
from keras_fg.data.cars import load_cars
from keras_fg.data.cub import load_cub
from keras_fg.data.dogs import load_dogs
from keras_fg.data.folder import load_image_folder
from keras_fg.data.market1501 import load_market1501

FORMATS = {
    "cub": load_cub,
    "folder": load_image_folder,
    "cars": load_cars,
    "aircraft": load_aircraft,
    "dogs": load_dogs,
    "market1501": load_market1501,
}


def load_dataset(format, root, split, **options):
    """Read the `split` of the dataset at `root` stored in `format`.

    Args:
        format: one of "cub" (CUB-200-2011), "folder" (class-per-folder tree), "cars" (Stanford
            Cars), "aircraft" (FGVC-Aircraft), "dogs" (Stanford Dogs), "market1501" (Market-1501,
            DukeMTMC-reID and MARS crops in that layout).
        root: the dataset folder.
        split: the split, e.g. "train" / "test" ("val" for folders and aircraft; "query" /
            "gallery" for re-identification).
        **options: format-specific options: `split_file`, `validation_fraction`, `seed` for
            "folder"; `annotation` ("variant" | "family" | "manufacturer") for "aircraft".

    Returns:
        ImageRecords.

    Raises:
        ValueError: unknown format, split or option.
        FileNotFoundError: `root` is missing or does not have the format's files (the message
            names the file it expected).

    Example:

    >>> train = load_dataset("cub", "CUB_200_2011", "train")  # doctest: +SKIP
    >>> len(train), train.num_classes                         # doctest: +SKIP
    (5994, 200)
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown dataset format: {format!r}. Valid formats: {', '.join(FORMATS)}")
    loader = FORMATS[format]
    valid = [name for name in inspect.signature(loader).parameters if name not in ("root", "split")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option for dataset format {format!r}: {', '.join(unknown)}. "
            f"Valid options: {', '.join(valid) or 'none'}"
        )
    return loader(root, split, **options)

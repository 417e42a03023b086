"""Tests for the dataset readers: every format read from real JPEG trees, and their errors."""

import base64
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorflow as tf

from keras_fg.data import FORMATS, ImageRecords, load_dataset, load_mat, make_pipeline

SHARED = Path(os.environ.get("KERAS_FG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CUB_IMAGES = SHARED / "data/cub200_subset/CUB_200_2011/images"

# MATLAB v5 devkit files for the small trees below, written by
# scipy.io.savemat(..., do_compression=True) (zlib-compressed elements, as MATLAB's default save).
# Contents:
#   cars_meta.mat:         class_names = {'AM General Hummer SUV 2000', 'Acura RL Sedan 2012',
#                          'Acura TL Sedan 2012'} (1x3 cell)
#   cars_train_annos.mat:  annotations (1x6 struct: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class,
#                          fname), fname 00001..00006.jpg, class 1 2 3 1 2 3,
#                          box (2+i, 3, 40+i, 30) for i = 0..5
#   cars_test_annos_withlabels.mat: 00001..00003.jpg, class 3 1 2, box (1, 1, 20, 20+i)
#   dogs train_list.mat:   file_list (4x1 cell) Chihuahua_1, Japanese_spaniel_1, Maltese_dog_1,
#                          Chihuahua_2; labels [1 2 3 1]' (double); annotation_list
#   dogs test_list.mat:    Japanese_spaniel_2, Maltese_dog_2; labels [2 3]'
CARS_META = "".join(
    "TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IFN1biBOb3YgMjIgMDQ6MjQ6"
    "NTMgMjAyNgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0PAAAA"
    "egAAAHic42NgYDBgZGBgA9IcQAxkggErEp8ZSnMDcXJOYnFxfF5ibmoxWB0fEAcwIPSzYNEvhWSuAJTv6KvgnpqX"
    "WpSYo+BRmpubWqQQHBqmYGRgYMAAN9eDgLnCaOaC+I7JpUWJCkE+CsGpKYl5QAMNjahgXgiGeQBbOBpC"
)
CARS_TRAIN_ANNOS = "".join(
    "TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IFN1biBOb3YgMjIgMDQ6MjQ6"
    "NTMgMjAyNgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0PAAAA"
    "1gAAAHicvZTbCoJAEIbHUksC6Qm67oza4bo3iVUqiloDvbA36/FadTa88GoGZmH4mXU/dviQDQHgOwbwTZqAAbTL"
    "w96B9ludE1NK67xU5T3XBZ5z/+ciU2maV+cqbvODWSXYJ5A9VVGTV61eF5Mhcvb+oOd+W9DM5zQzUrghkZsTuRmR"
    "c5A7dTi3hws63BT7yKx4+3jfcF/SE5VbCPu1/w/Vb8L06wr7XQr7tXNS/e6Yfj1hvythv9z3Yc/06wv7XQv75b4P"
    "B6bfkbDfjbBf7vtw7Pj9AUMbNK0="
)
CARS_TEST_ANNOS = "".join(
    "TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IFN1biBOb3YgMjIgMDQ6MjQ6"
    "NTMgMjAyNgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0PAAAA"
    "mgAAAHic42NgYJjBwsDABqQ5gJiJAQJYoXxGIGaG0txAnJiXl1+SWJKZn1cMVccCV2cAxElJ+RXxFYYQuhJKVxhB"
    "+UYMyTmJxSCdaXmJualAmg+qD2Y/Jxb7YZgB7D5GMJue+kTorI8Zqs8BSR8LFn2cSPoEoHwDIDDUyypIh4oP5/AV"
    "pdCd5Iav0QgJXzEy9TFRGL7GSOELAIjZJCo="
)
DOGS_TRAIN_LIST = "".join(
    "TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IFN1biBOb3YgMjIgMDQ6MjQ6"
    "NTMgMjAyNgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0PAAAA"
    "ngAAAHic42NgYDjAyMDABqQ5gBjIBANWKJ8FKgbCnECclpmTGp+TWVwCVccHxBEMCP0saPpB+pSRzBWA8vMMjAws"
    "TM2MDHSdMzIzShOBSB8uFm+ol1WQDjc/gYD5Wmjma8HNN7cw0vVKLEjMSy1OjS8G0pmpOfpwKSRriPKHKpo9qnB7"
    "LI3NdH0Tc0pA1qTkp+vDReFW0CacjOAeAAAGHzP1DwAAAKUAAAB4nONjYGA4wMjAwAakOYAYyAQDViifBSoGwvxA"
    "nJiXl1+SWJKZnxefk1lcwsAHFItgQOhnQdMP0qeMZK4AlJ9nYGRgYWpmZKDrnJGZUZoIRPpwsXhDvayCdLB6kPkJ"
    "BMzXQjNfC26+uYWRrldiQWJeanFqfDGQzkzN0YdLIVlDlD9U0exRhdtjaWym65uYUwKyJiU/XR8uCreCNuFkBPcA"
    "ABmgNpYPAAAANwAAAHic42NgYIgAYjYg5oDSIMAK5bMAMSMUg+RyEpNSc4oZGDiBbAUGGPhgD2U4QCgOB5g4AM6v"
    "BhY="
)
DOGS_TEST_LIST = "".join(
    "TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IFN1biBOb3YgMjIgMDQ6MjQ6"
    "NTMgMjAyNgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0PAAAA"
    "ewAAAHic42MAAkYGBjYgxQFhggErlM8EFQNhTiBOy8xJjc/JLC6BquMD4gQGhH4WNP0gfVpI5gpA+XkGRgYWpuYW"
    "RrpeiQWJeanFqfHFQDozNUcfLhVvpJdVkI6wJ4KAPapo9qjC7bE0NtP1TcwpAVmTkp+uDxeFWwEAWcsdkA8AAACC"
    "AAAAeJzjYwACRgYGNiDFAWGCASuUzwQVA2F+IE7My8svSSzJzM+Lz8ksLmHgA4olMCD0s6DpB+nTQjJXAMrPMzAy"
    "sDA1tzDS9UosSMxLLU6NLwbSmak5+nCpeCO9rIJ0iD6QPREE7FFFs0cVbo+lsZmub2JOCcialPx0fbgo3AoAdG4g"
    "MQ8AAAAxAAAAeJzjY2Bg8ABiNiDmgNIgwArlMwExIxSD5HISk1JzihkYOIFsAQY4cIBQHA4AcGkDlg=="
)


DOG_FOLDERS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]


@pytest.fixture(scope="module")
def jpeg_bytes():
    """Bytes of real JPEG files: CUB birds when ../shared exists, else encoded random images."""
    if CUB_IMAGES.exists():
        return [path.read_bytes() for path in sorted(CUB_IMAGES.glob("*/*.jpg"))[:6]]
    rng = np.random.default_rng(0)
    return [
        tf.io.encode_jpeg(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).numpy()
        for i in range(6)
    ]


def write_jpegs(jpeg_bytes, paths):
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes[i % len(jpeg_bytes)])


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def check_readable(records, image_size=(32, 32)):
    """Every file decodes through the real pipeline, labels come out in order."""
    batches = list(make_pipeline(records, image_size, 64, training=False))
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert images.shape == (len(records), *image_size, 3)
    np.testing.assert_array_equal(labels, records.labels)
    assert images.std() > 1.0  # real picture content, not a placeholder


# --- CUB-200-2011 ---------------------------------------------------------------------------------


def test_cub_real_subset_counts(cub_dir):
    train = load_dataset("cub", cub_dir, "train")
    test = load_dataset("cub", cub_dir, "test")
    assert (len(train), len(test)) == (1500, 1449)
    assert train.num_classes == test.num_classes == 50
    assert train.class_names[0] == "Black footed Albatross"
    np.testing.assert_array_equal(np.unique(train.labels), np.arange(50))
    np.testing.assert_array_equal(np.unique(test.labels), np.arange(50))
    assert not set(train.paths) & set(test.paths)
    assert train.boxes is None
    # Label and class folder agree image by image: label k <-> folder "%03d." % (k + 1).
    folders = [Path(path).parent.name for path in train.paths + test.paths]
    labels = np.concatenate([train.labels, test.labels])
    assert all(folder.startswith(f"{label + 1:03d}.") for folder, label in zip(folders, labels))
    assert all(Path(path).is_file() for path in train.paths[::100])
    check_readable(train.subset(np.arange(0, 1500, 300)))


def test_cub_tree_with_class_gaps_and_boxes(tmp_path, jpeg_bytes):
    rows = [
        ("1", "007.Crested_Auklet/a.jpg", "7", "1"),
        ("2", "003.Parakeet_Auklet/b.jpg", "3", "0"),
        ("3", "007.Crested_Auklet/c.jpg", "7", "0"),
        ("4", "003.Parakeet_Auklet/d.jpg", "3", "1"),
    ]
    write_lines(tmp_path / "images.txt", [f"{i} {p}" for i, p, _, _ in rows])
    write_lines(tmp_path / "image_class_labels.txt", [f"{i} {c}" for i, _, c, _ in rows])
    write_lines(tmp_path / "train_test_split.txt", [f"{i} {s}" for i, _, _, s in rows])
    write_lines(tmp_path / "classes.txt", ["3 003.Parakeet_Auklet", "7 007.Crested_Auklet"])
    write_lines(
        tmp_path / "bounding_boxes.txt", [f"{i} {i}.0 2.5 10.0 {20 + int(i)}.0" for i, *_ in rows]
    )
    write_jpegs(jpeg_bytes, [tmp_path / "images" / p for _, p, _, _ in rows])
    train = load_dataset("cub", tmp_path, "train")
    assert [Path(p).name for p in train.paths] == ["a.jpg", "d.jpg"]
    np.testing.assert_array_equal(train.labels, [1, 0])
    assert train.class_names == ["Parakeet Auklet", "Crested Auklet"]
    np.testing.assert_allclose(train.boxes, [[1, 2.5, 10, 21], [4, 2.5, 10, 24]])
    # The parent folder of CUB_200_2011/ is accepted too.
    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "CUB_200_2011").symlink_to(tmp_path, target_is_directory=True)
    assert load_dataset("cub", tmp_path / "parent", "test").paths[0].endswith("b.jpg")
    check_readable(train)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: .*missing"):
        load_dataset("cub", tmp_path / "missing", "train")
    (tmp_path / "images").mkdir()
    with pytest.raises(
        FileNotFoundError, match="not a CUB-200-2011 folder: expected file images.txt"
    ):
        load_dataset("cub", tmp_path, "train")
    with pytest.raises(
        ValueError, match="Unknown dataset format: 'coco'. Valid formats: cub, folder, cars"
    ):
        load_dataset("coco", tmp_path, "train")
    with pytest.raises(
        ValueError, match="Unknown split for CUB-200-2011: 'val'. Valid splits: train, test"
    ):
        load_dataset("cub", tmp_path, "val")
    with pytest.raises(ValueError, match="Unknown option for dataset format 'cub': annotation"):
        load_dataset("cub", tmp_path, "train", annotation="variant")
    for format in ("cars", "aircraft", "dogs", "market1501"):
        with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a"):
            load_dataset(format, tmp_path, "train" if format != "aircraft" else "trainval")
    assert set(FORMATS) == {"cub", "folder", "cars", "aircraft", "dogs", "market1501"}


def test_image_records_validation_and_subset():
    records = ImageRecords(
        ["a", "b", "c"], [0, 1, 1], ["x", "y"], cameras=[1, 2, 3], boxes=np.ones((3, 4))
    )
    part = records.subset([2, 0])
    assert (
        part.paths == ["c", "a"]
        and part.cameras.tolist() == [3, 1]
        and part.labels.dtype == np.int32
    )
    assert records.subset(np.array([False, True, False])).paths == ["b"]
    with pytest.raises(ValueError, match="one entry per path"):
        ImageRecords(["a"], [0, 1], ["x"])
    with pytest.raises(ValueError, match="one .x, y, w, h. row per path"):
        ImageRecords(["a"], [0], ["x"], boxes=np.ones((2, 4)))


# --- ImageFolder ----------------------------------------------------------------------------------


def test_image_folder_flat_fraction_and_split_file(tmp_path, jpeg_bytes):
    counts = {"sparrow": 5, "finch": 4, "wren": 2}
    for name, count in counts.items():
        write_jpegs(jpeg_bytes, [tmp_path / name / f"{name}_{i}.jpg" for i in range(count)])
    (tmp_path / "finch" / "notes.txt").write_text("not an image")
    everything = load_dataset("folder", tmp_path, "all")
    assert everything.class_names == ["finch", "sparrow", "wren"]
    assert np.bincount(everything.labels).tolist() == [4, 5, 2]
    assert load_dataset("folder", tmp_path, "train").paths == everything.paths

    train = load_dataset("folder", tmp_path, "train", validation_fraction=0.4, seed=1)
    val = load_dataset("folder", tmp_path, "val", validation_fraction=0.4, seed=1)
    assert np.bincount(val.labels).tolist() == [2, 2, 1]  # round(0.4 * n) per class
    assert sorted(train.paths + val.paths) == sorted(everything.paths)
    assert (
        val.paths == load_dataset("folder", tmp_path, "val", validation_fraction=0.4, seed=1).paths
    )
    assert (
        val.paths != load_dataset("folder", tmp_path, "val", validation_fraction=0.4, seed=5).paths
    )

    relative = [Path(p).relative_to(tmp_path).as_posix() for p in everything.paths]
    write_lines(
        tmp_path / "splits.txt",
        [f"{r} {'test' if i % 3 == 0 else 'train'}" for i, r in enumerate(relative)],
    )
    test = load_dataset("folder", tmp_path, "test", split_file=tmp_path / "splits.txt")
    assert test.paths == everything.paths[::3]
    np.testing.assert_array_equal(test.labels, everything.labels[::3])
    with pytest.raises(ValueError, match="Valid splits: test, train"):
        load_dataset("folder", tmp_path, "val", split_file=tmp_path / "splits.txt")
    with pytest.raises(ValueError, match="Valid splits: all, train"):
        load_dataset("folder", tmp_path, "val")
    with pytest.raises(ValueError, match="validation_fraction=1.5"):
        load_dataset("folder", tmp_path, "val", validation_fraction=1.5)
    check_readable(test)


def test_image_folder_split_subfolders(tmp_path, jpeg_bytes):
    write_jpegs(
        jpeg_bytes, [tmp_path / "train" / c / f"{i}.jpg" for c in ("a", "b", "c") for i in range(3)]
    )
    write_jpegs(jpeg_bytes, [tmp_path / "val" / c / "0.jpg" for c in ("b", "c")])  # no class "a"
    val = load_dataset("folder", tmp_path, "val")
    assert val.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(val.labels, [1, 2])
    assert len(load_dataset("folder", tmp_path, "train")) == 9
    with pytest.raises(ValueError, match="Valid splits: train, val"):
        load_dataset("folder", tmp_path, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected one sub-folder of images per class"):
        load_dataset("folder", tmp_path / "empty", "all")
    check_readable(val)


# --- Stanford Cars --------------------------------------------------------------------------------


def test_cars_devkit_layout(tmp_path, jpeg_bytes):
    (tmp_path / "devkit").mkdir()
    (tmp_path / "devkit" / "cars_meta.mat").write_bytes(base64.b64decode(CARS_META))
    (tmp_path / "devkit" / "cars_train_annos.mat").write_bytes(base64.b64decode(CARS_TRAIN_ANNOS))
    write_jpegs(jpeg_bytes, [tmp_path / "cars_train" / f"{i:05d}.jpg" for i in range(1, 7)])
    write_jpegs(jpeg_bytes, [tmp_path / "cars_test" / f"{i:05d}.jpg" for i in range(1, 4)])
    train = load_dataset("cars", tmp_path, "train")
    assert train.class_names == [
        "AM General Hummer SUV 2000",
        "Acura RL Sedan 2012",
        "Acura TL Sedan 2012",
    ]
    np.testing.assert_array_equal(train.labels, [0, 1, 2, 0, 1, 2])
    assert [Path(p).name for p in train.paths] == [f"{i:05d}.jpg" for i in range(1, 7)]
    # MATLAB corners (x1, y1, x2, y2), 1-based inclusive -> (x, y, w, h), 0-based.
    np.testing.assert_allclose(train.boxes[1], [2, 2, 41 - 3 + 1, 30 - 3 + 1])
    with pytest.raises(FileNotFoundError, match="cars_test_annos_withlabels.mat"):
        load_dataset("cars", tmp_path, "test")
    (tmp_path / "cars_test_annos_withlabels.mat").write_bytes(base64.b64decode(CARS_TEST_ANNOS))
    test = load_dataset("cars", tmp_path, "test")
    np.testing.assert_array_equal(test.labels, [2, 0, 1])
    np.testing.assert_allclose(test.boxes[:, 3], [20, 21, 22])
    check_readable(test)


def test_cars_csv_layout(tmp_path, jpeg_bytes):
    names = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012"]
    write_lines(tmp_path / "names.csv", names)
    write_lines(
        tmp_path / "anno_train.csv", ["00001.jpg,39,116,569,375,2", "00002.jpg,36,116,868,587,1"]
    )
    write_lines(tmp_path / "anno_test.csv", ["00003.jpg,1,2,11,12,1"])
    images = tmp_path / "car_data" / "car_data"
    write_jpegs(
        jpeg_bytes,
        [
            images / "train" / "Ram C-V Cargo Van Minivan 2012" / "00001.jpg",
            images / "train" / "AM General Hummer SUV 2000" / "00002.jpg",
            images / "test" / "AM General Hummer SUV 2000" / "00003.jpg",
        ],
    )
    train = load_dataset("cars", tmp_path, "train")
    assert train.class_names == names
    np.testing.assert_array_equal(train.labels, [1, 0])
    assert train.paths[0].endswith("Ram C-V Cargo Van Minivan 2012/00001.jpg")
    np.testing.assert_allclose(train.boxes[0], [38, 115, 531, 260])
    assert len(load_dataset("cars", tmp_path, "test")) == 1
    write_lines(tmp_path / "anno_test.csv", ["00009.jpg,1,2,11,12,1"])
    with pytest.raises(FileNotFoundError, match="lists 00009.jpg, not found"):
        load_dataset("cars", tmp_path, "test")
    check_readable(train)


# --- FGVC-Aircraft --------------------------------------------------------------------------------


def test_aircraft_annotations_and_boxes(tmp_path, jpeg_bytes):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    ids = ["0034309", "0034958", "0037511", "0037512"]
    variants = ["707-320", "727-200", "A300B4"]
    write_lines(data / "variants.txt", variants)
    write_lines(data / "families.txt", ["A300", "Boeing 707", "Boeing 727"])
    write_lines(data / "manufacturers.txt", ["Airbus", "Boeing"])
    write_lines(
        data / "images_variant_trainval.txt",
        [f"{ids[0]} 707-320", f"{ids[1]} A300B4", f"{ids[2]} 727-200"],
    )
    write_lines(
        data / "images_family_trainval.txt",
        [f"{ids[0]} Boeing 707", f"{ids[1]} A300", f"{ids[2]} Boeing 727"],
    )
    write_lines(data / "images_variant_test.txt", [f"{ids[3]} 727-200"])
    write_lines(data / "images_box.txt", [f"{i} 3 4 {10 + k} 20" for k, i in enumerate(ids)])
    write_jpegs(jpeg_bytes, [data / "images" / f"{i}.jpg" for i in ids])
    trainval = load_dataset("aircraft", tmp_path / "fgvc-aircraft-2013b", "trainval")
    assert trainval.class_names == variants
    np.testing.assert_array_equal(trainval.labels, [0, 2, 1])
    np.testing.assert_allclose(trainval.boxes[1], [2, 3, 11 - 3 + 1, 20 - 4 + 1])
    family = load_dataset("aircraft", data, "trainval", annotation="family")
    assert family.class_names[family.labels[0]] == "Boeing 707"
    np.testing.assert_array_equal(family.labels, [1, 0, 2])
    with pytest.raises(ValueError, match="Unknown FGVC-Aircraft annotation: 'model'"):
        load_dataset("aircraft", data, "trainval", annotation="model")
    with pytest.raises(FileNotFoundError, match="expected file .*images_manufacturer_trainval.txt"):
        load_dataset("aircraft", data, "trainval", annotation="manufacturer")
    check_readable(trainval)


# --- Stanford Dogs --------------------------------------------------------------------------------


def test_dogs_mat_and_text_lists(tmp_path, jpeg_bytes):
    write_jpegs(
        jpeg_bytes,
        [
            tmp_path / "Images" / f / f"{f.split('-')[0]}_{i}.jpg"
            for f in DOG_FOLDERS
            for i in (1, 2)
        ],
    )
    (tmp_path / "train_list.mat").write_bytes(base64.b64decode(DOGS_TRAIN_LIST))
    (tmp_path / "test_list.mat").write_bytes(base64.b64decode(DOGS_TEST_LIST))
    train = load_dataset("dogs", tmp_path, "train")
    assert train.class_names == ["Chihuahua", "Japanese spaniel", "Maltese dog"]
    # Labels from the folders agree with the published 1-based labels of the .mat list.
    published = load_mat(tmp_path / "train_list.mat")["labels"].ravel()
    np.testing.assert_array_equal(train.labels, published - 1)
    assert train.paths[1].endswith("n02085782-Japanese_spaniel/n02085782_1.jpg")
    write_lines(tmp_path / "test_list.txt", [f"{DOG_FOLDERS[0]}/n02085620_2.jpg 1"])
    assert load_dataset("dogs", tmp_path, "test").labels.tolist() == [0]  # text list preferred
    (tmp_path / "test_list.txt").unlink()
    np.testing.assert_array_equal(load_dataset("dogs", tmp_path, "test").labels, [1, 2])
    (tmp_path / "train_list.mat").unlink()
    with pytest.raises(FileNotFoundError, match="expected file train_list.mat"):
        load_dataset("dogs", tmp_path, "train")
    check_readable(train)


def test_matfile_reader_refuses_hdf5(tmp_path):
    path = tmp_path / "v73.mat"
    with h5py.File(path, "w", userblock_size=512) as handle:
        handle["x"] = np.arange(3.0)
    with open(path, "r+b") as handle:
        handle.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64")
    with pytest.raises(ValueError, match="v7.3 .HDF5. file"):
        load_mat(path)
    (tmp_path / "text.mat").write_text("hello")
    with pytest.raises(ValueError, match="not a MATLAB v5 .mat file"):
        load_mat(tmp_path / "text.mat")


# --- Market-1501 layout ---------------------------------------------------------------------------

NAME = re.compile(r"^(-?\d+)_c(\d)")


def expected_from_names(folder):
    """Person ids and cameras parsed straight from the file names, junk dropped."""
    parsed = [NAME.match(p.name).groups() for p in sorted(folder.glob("*.jpg"))]
    return [int(p) for p, _ in parsed if p != "-1"], [int(c) for p, c in parsed if p != "-1"]


@pytest.mark.parametrize(
    "fixture, counts", [("mars_dir", (1719, 32, 529)), ("market_dir", (32, 32, 32))]
)
def test_market1501_real_sets(fixture, counts, request):
    root = request.getfixturevalue(fixture)
    train, query, gallery = (
        load_dataset("market1501", root, s) for s in ("train", "query", "gallery")
    )
    assert (len(train), len(query), len(gallery)) == counts
    assert train.num_classes == 16
    np.testing.assert_array_equal(np.unique(train.labels), np.arange(16))
    train_ids, train_cameras = expected_from_names(root / "bounding_box_train")
    np.testing.assert_array_equal(
        [int(train.class_names[label]) for label in train.labels], train_ids
    )
    np.testing.assert_array_equal(train.cameras, train_cameras)
    for records, folder in ((query, "query"), (gallery, "bounding_box_test")):
        ids, cameras = expected_from_names(root / folder)
        np.testing.assert_array_equal(records.labels, ids)
        np.testing.assert_array_equal(records.cameras, cameras)
    assert set(query.labels) <= set(gallery.labels)
    assert query.cameras.min() >= 1 and query.cameras.max() <= 6
    check_readable(query.subset(np.arange(0, 32, 8)), image_size=(32, 16))


def test_market1501_junk_distractors_and_duke_names(tmp_path, jpeg_bytes):
    names = {
        "bounding_box_train": [
            "0002_c1s1_000451_03.jpg",
            "0002_c2s1_000301_01.jpg",
            "0007_c3s3_077344_04.jpg",
            "-1_c1s1_000401_03.jpg",
            "0000_c6s1_000401_01.jpg",
            "Thumbs.db",
        ],
        "query": ["0007_c1s1_000151_00.jpg"],
        "bounding_box_test": [
            "0007_c2s1_000401_03.jpg",
            "0000_c1s1_000401_05.jpg",
            "-1_c3s1_000401_03.jpg",
        ],
    }
    for folder, files in names.items():
        write_jpegs(jpeg_bytes, [tmp_path / "Market-1501-v15.09.15" / folder / f for f in files])
    train = load_dataset("market1501", tmp_path, "train")  # the one nested dataset folder is found
    np.testing.assert_array_equal(train.labels, [0, 0, 1])
    assert train.class_names == ["0002", "0007"]
    np.testing.assert_array_equal(train.cameras, [1, 2, 3])
    gallery = load_dataset("market1501", tmp_path, "gallery")
    assert sorted(gallery.labels.tolist()) == [0, 7]  # distractor kept, junk dropped
    check_readable(gallery)

    duke = tmp_path / "duke"
    write_jpegs(
        jpeg_bytes,
        [duke / "bounding_box_train" / f for f in ("0005_c2_f0046985.jpg", "0012_c8_f0170002.jpg")],
    )
    duke_train = load_dataset("market1501", duke, "train")
    np.testing.assert_array_equal(duke_train.cameras, [2, 8])
    assert duke_train.class_names == ["0005", "0012"]
    write_jpegs(jpeg_bytes, [duke / "query" / "person.jpg"])
    with pytest.raises(ValueError, match="person.jpg does not follow the Market-1501 naming"):
        load_dataset("market1501", duke, "query")
    with pytest.raises(FileNotFoundError, match="expected folder bounding_box_test/"):
        load_dataset("market1501", duke, "gallery")

"""Tests for the synthetic fine-grained dataset and the part hit rate."""

import numpy as np
import pytest

from keras_fg.data import SyntheticFineGrained, load_dataset, make_pipeline


def test_same_seed_same_arrays():
    first = SyntheticFineGrained(num_classes=6, image_size=40, num_train=12, num_test=6, seed=3)
    second = SyntheticFineGrained(num_classes=6, image_size=40, num_train=12, num_test=6, seed=3)
    for a, b in zip(
        first.split("train") + first.split("test"), second.split("train") + second.split("test")
    ):
        np.testing.assert_array_equal(a, b)
    other = SyntheticFineGrained(num_classes=6, image_size=40, num_train=12, num_test=6, seed=4)
    assert not np.array_equal(first.x_train, other.x_train)
    assert not np.array_equal(first.x_train, first.x_test[:6].repeat(2, axis=0))
    assert first.x_train.dtype == np.uint8 and first.x_train.shape == (12, 40, 40, 3)
    assert first.y_train.dtype == np.int32 and first.boxes_train.shape == (12, 4)
    assert np.bincount(first.y_train).tolist() == [2] * 6  # balanced
    # Image i depends on (seed, split, i) only, not on how many images were asked for.
    larger = SyntheticFineGrained(num_classes=6, image_size=40, num_train=24, num_test=0, seed=3)
    for i in range(12):
        j = np.flatnonzero((larger.x_train == first.x_train[i]).all(axis=(1, 2, 3)))
        assert len(j) == 1 and larger.y_train[j[0]] == first.y_train[i]


def test_class_names_and_arguments():
    data = SyntheticFineGrained(num_classes=10, image_size=32, num_train=0, num_test=0)
    assert data.class_names[0] == "0_red_front_upper"
    assert data.class_names[5] == "5_green_rear_upper"
    assert data.class_names[9] == "9_blue_rear_upper"
    assert data.x_train.shape == (0, 32, 32, 3)
    with pytest.raises(ValueError, match="num_classes=1"):
        SyntheticFineGrained(num_classes=1)
    with pytest.raises(ValueError, match="image_size=16"):
        SyntheticFineGrained(image_size=16)
    with pytest.raises(ValueError, match="num_train=-1"):
        SyntheticFineGrained(num_train=-1)
    with pytest.raises(ValueError, match="clutter=-1"):
        SyntheticFineGrained(clutter=-1)
    with pytest.raises(ValueError, match="noise=-0.5"):
        SyntheticFineGrained(noise=-0.5)
    with pytest.raises(ValueError, match="Unknown split: 'val'"):
        data.split("val")


def test_boxes_hold_exactly_the_part():
    """Without noise the part is a flat disc: its pixels span the box exactly."""
    data = SyntheticFineGrained(
        num_classes=8, image_size=48, num_train=24, num_test=0, seed=2, noise=0
    )
    for image, label, (x, y, w, h) in zip(data.x_train, data.y_train, data.boxes_train.astype(int)):
        colour = image[y + h // 2, x + w // 2]
        rows, cols = np.nonzero((image == colour).all(-1))
        assert (
            cols.min(),
            rows.min(),
            cols.max() - cols.min() + 1,
            rows.max() - rows.min() + 1,
        ) == (x, y, w, h)
        # The class's colour (within the per-image jitter), and a small part of the image.
        assert np.abs(colour.astype(float) - data.part_colours[label // 4]).max() < 30
        assert 3 <= w <= 0.2 * 48 and abs(w - h) <= 1


def test_parts_are_where_the_class_puts_them():
    """With noise, the box still holds the class colour; the place on the body differs by class."""
    data = SyntheticFineGrained(num_classes=4, image_size=64, num_train=40, num_test=0, seed=0)
    for image, label, (x, y, w, h) in zip(data.x_train, data.y_train, data.boxes_train.astype(int)):
        inside = image[y + 2 : y + h - 2, x + 2 : x + w - 2].reshape(-1, 3).mean(0)
        assert np.abs(inside - data.part_colours[0]).max() < 25
    # Classes 0 and 1 put the part on the upper half of the body, 2 and 3 on the lower: over ten
    # random body positions per class, the mean part position shows it.
    centre_y = data.boxes_train[:, 1] + data.boxes_train[:, 3] / 2
    means = [centre_y[data.y_train == c].mean() for c in range(4)]
    assert max(means[0], means[1]) < min(means[2], means[3])


def test_write_image_folder_round_trip(tmp_path):
    data = SyntheticFineGrained(num_classes=4, image_size=32, num_train=8, num_test=4, seed=1)
    root = data.write_image_folder(tmp_path / "synthetic")
    train = load_dataset("folder", root, "train")
    test = load_dataset("folder", root, "test")
    assert train.class_names == data.class_names and (len(train), len(test)) == (8, 4)
    images, labels = next(iter(make_pipeline(train, 32, 8, training=False)))
    for image, label, path in zip(images.numpy(), labels.numpy(), train.paths):
        index = int(path[-9:-4])
        assert label == data.y_train[index]
        distances = np.abs(image - data.x_train.astype(np.float32)).mean(axis=(1, 2, 3))
        assert distances.argmin() == index and distances[index] < 12  # JPEG, quality 95
    boxes = dict(line.split(" ", 1) for line in (root / "part_boxes.txt").read_text().splitlines())
    relative = "test/" + "/".join(test.paths[0].split("/")[-2:])
    np.testing.assert_array_equal(
        np.array(boxes[relative].split(), float), data.boxes_test[int(relative[-9:-4])]
    )

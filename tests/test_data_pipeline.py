"""Tests for the tf.data pipeline, unreadable-file handling and P×K identity sampling."""

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from keras_fg.data import (
    ImageRecords,
    PKSampler,
    SkipCounter,
    SyntheticFineGrained,
    load_dataset,
    make_pipeline,
)
from keras_fg.data.pipeline import ERASE_FILL, _random_erasing

SHARED = Path(os.environ.get("KERAS_FG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CUB_IMAGES = SHARED / "data/cub200_subset/CUB_200_2011/images"


@pytest.fixture(scope="module")
def jpeg_records(tmp_path_factory):
    """12 real JPEG files of varied sizes and 3 classes: CUB birds when ../shared exists, else
    random images encoded with tf.io.encode_jpeg."""
    if CUB_IMAGES.exists():
        paths = [str(p) for p in sorted(CUB_IMAGES.glob("*/*.jpg"))[:12]]
    else:
        folder = tmp_path_factory.mktemp("jpegs")
        rng = np.random.default_rng(0)
        paths = []
        for i in range(12):
            path = folder / f"{i}.jpg"
            image = rng.integers(0, 256, (60 + 7 * i, 80 - 3 * i, 3), dtype=np.uint8)
            path.write_bytes(tf.io.encode_jpeg(image).numpy())
            paths.append(str(path))
    return ImageRecords(paths, np.arange(12) % 3, ["a", "b", "c"])


def first_batch(dataset):
    images, labels = next(iter(dataset))
    return images.numpy(), labels.numpy()


def decode(path):
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("resize_mode", ["resize", "center_crop"])
@pytest.mark.parametrize("image_size", [48, (40, 24)])
def test_shapes_dtypes_and_range(jpeg_records, training, resize_mode, image_size):
    dataset = make_pipeline(
        jpeg_records, image_size, 5, training=training, seed=0, resize_mode=resize_mode
    )
    batches = list(dataset)
    height, width = (image_size, image_size) if np.isscalar(image_size) else image_size
    for images, labels in batches:
        assert images.dtype == tf.float32 and labels.dtype == tf.int32
        assert images.shape[1:] == (height, width, 3)
        assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) <= 255.0
    # Raw pixel scale, not preprocessed: real photos reach well beyond [0, 1] or [-1, 1].
    assert float(tf.reduce_max(batches[0][0])) > 100.0
    sizes = [len(labels) for _, labels in batches]
    assert sizes == ([5, 5] if training else [5, 5, 2])  # remainder dropped only when training
    if not training:
        np.testing.assert_array_equal(np.concatenate([l for _, l in batches]), jpeg_records.labels)


def test_evaluation_transforms_match_their_definition(jpeg_records):
    path = jpeg_records.paths[3]
    image = tf.cast(decode(path), tf.float32)
    records = jpeg_records.subset([3])
    resized, _ = first_batch(make_pipeline(records, (40, 24), 1, training=False))
    expected = tf.clip_by_value(tf.image.resize(image, (40, 24), antialias=True), 0, 255)
    np.testing.assert_allclose(resized[0], expected, atol=1e-3)

    # centre crop: shorter side scaled to ceil(side / 0.875), aspect ratio kept, then the middle.
    cropped, _ = first_batch(
        make_pipeline(records, 32, 1, training=False, resize_mode="center_crop")
    )
    h, w = image.shape[:2]
    scale = 37 / min(h, w)
    size = (max(int(np.ceil(h * scale)), 37), max(int(np.ceil(w * scale)), 37))
    big = tf.image.resize(image, size, antialias=True).numpy()
    top, left = (size[0] - 32) // 2, (size[1] - 32) // 2
    np.testing.assert_allclose(
        cropped[0], np.clip(big[top : top + 32, left : left + 32], 0, 255), atol=1e-3
    )


def test_same_seed_same_batches(jpeg_records):
    def run(seed, **options):
        return first_batch(make_pipeline(jpeg_records, 32, 6, training=True, seed=seed, **options))

    images, labels = run(7)
    again_images, again_labels = run(7, num_parallel_calls=None)
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    other_images, other_labels = run(8)
    assert not np.array_equal(images, other_images)
    for augment in ("random_erasing", ["randaugment", "mixup"], "cutmix"):
        first, second = run(3, augment=augment), run(3, augment=augment)
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])
    # A new epoch reshuffles and re-draws the augmentation.
    dataset = make_pipeline(jpeg_records, 32, 6, training=True, seed=7)
    epoch_one, epoch_two = first_batch(dataset), first_batch(dataset)
    assert not np.array_equal(epoch_one[0], epoch_two[0])


def test_training_crops_are_flipped_crops_of_the_resized_image():
    """With crop_fraction=1 and a square image, a training crop is the image or its mirror."""
    data = SyntheticFineGrained(num_classes=2, image_size=32, num_train=16, num_test=0, seed=1)
    images, labels = first_batch(
        make_pipeline(
            (data.x_train, data.y_train), 32, 16, training=True, seed=0, crop_fraction=1.0
        )
    )
    flipped = []
    for image, label in zip(images.astype(np.uint8), labels):
        same = [i for i, x in enumerate(data.x_train) if (x == image).all()]
        mirror = [i for i, x in enumerate(data.x_train) if (x[:, ::-1] == image).all()]
        assert len(same + mirror) == 1 and data.y_train[(same + mirror)[0]] == label
        flipped.append(bool(mirror))
    assert 0 < sum(flipped) < 16


def test_mixup_and_cutmix_give_one_hot_labels(jpeg_records):
    for augment in ("mixup", "cutmix"):
        images, labels = first_batch(
            make_pipeline(jpeg_records, 32, 6, training=True, seed=0, augment=augment)
        )
        assert labels.shape == (6, 3) and labels.dtype == np.float32
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
        assert images.min() >= 0.0 and images.max() <= 255.0
    _, eval_labels = first_batch(
        make_pipeline(jpeg_records, 32, 6, training=False, augment="mixup")
    )
    np.testing.assert_array_equal(eval_labels, np.eye(3)[jpeg_records.labels[:6]])


def test_random_erasing_fills_one_rectangle():
    image = tf.fill([64, 32, 3], 7.0)
    areas = []
    for seed in range(20):
        erased = _random_erasing(image, tf.constant([seed, 1], tf.int64), probability=1.0).numpy()
        inside = (erased == np.float32(ERASE_FILL)).all(-1)
        rows, cols = np.nonzero(inside)
        assert inside.sum() == (np.ptp(rows) + 1) * (
            np.ptp(cols) + 1
        )  # exactly one filled rectangle
        assert (erased[~inside] == 7.0).all()
        areas.append(inside.mean())
    assert 0.01 < min(areas) and max(areas) <= 0.41
    untouched = _random_erasing(image, tf.constant([0, 1], tf.int64), probability=0.0)
    np.testing.assert_array_equal(untouched, image)


def make_broken_records(jpeg_records, folder):
    good = jpeg_records.paths[:5]
    truncated, garbage = folder / "truncated.jpg", folder / "garbage.jpg"
    data = Path(good[0]).read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    garbage.write_bytes(b"this is not an image " * 20)
    paths = (
        good[:2]
        + [str(truncated)]
        + good[2:4]
        + [str(garbage), str(folder / "missing.jpg")]
        + good[4:]
    )
    return ImageRecords(paths, np.arange(8), [str(i) for i in range(8)])


def test_unreadable_images_are_skipped_and_counted(jpeg_records, tmp_path):
    records = make_broken_records(jpeg_records, tmp_path)
    counter = SkipCounter()
    dataset = make_pipeline(records, 32, 3, training=False, skip_counter=counter)
    labels = np.concatenate([labels for _, labels in dataset])
    np.testing.assert_array_equal(labels, [0, 1, 3, 4, 7])
    assert counter.count == 3
    assert [Path(p).name for p in counter.paths] == ["truncated.jpg", "garbage.jpg", "missing.jpg"]
    assert str(counter).startswith("3 unreadable image file(s) skipped, e.g. ")
    assert (
        len(list(make_pipeline(records, 32, 3, training=True, seed=0, skip_counter=counter))) == 1
    )
    assert counter.count == 6 and len(counter.paths) == 3  # each skip counted, each file named once
    assert (
        make_pipeline(records, 32, 3, training=False).skip_counter.count == 0
    )  # attached, nothing read yet


def test_strict_mode_stops_with_the_path(jpeg_records, tmp_path):
    records = make_broken_records(jpeg_records, tmp_path)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="Unreadable image file .strict=True.: .*truncated.jpg"
    ):
        list(make_pipeline(records, 32, 2, training=False, strict=True))


def test_bad_arguments(jpeg_records):
    with pytest.raises(ValueError, match="Unknown augmentation 'autoaugment'"):
        make_pipeline(jpeg_records, 32, 4, training=True, augment="autoaugment")
    with pytest.raises(ValueError, match="image_size=0"):
        make_pipeline(jpeg_records, 0, 4, training=True)
    with pytest.raises(ValueError, match="batch_size=0"):
        make_pipeline(jpeg_records, 32, 0, training=True)
    with pytest.raises(ValueError, match="resize_mode='crop'"):
        make_pipeline(jpeg_records, 32, 4, training=False, resize_mode="crop")
    with pytest.raises(ValueError, match="crop_fraction=1.5"):
        make_pipeline(jpeg_records, 32, 4, training=False, crop_fraction=1.5)
    with pytest.raises(ValueError, match="Arrays must be images"):
        make_pipeline((np.zeros((4, 8, 8)), np.zeros(4)), 8, 2, training=False)
    with pytest.raises(ValueError, match="empty dataset"):
        make_pipeline(jpeg_records.subset([]), 32, 4, training=False)
    sampler = PKSampler(jpeg_records.labels, num_identities=2, num_instances=2, seed=0)
    with pytest.raises(ValueError, match="sampler's P\\*K = 4. Received: batch_size=6"):
        make_pipeline(jpeg_records, 32, 6, training=True, sampler=sampler)


def test_pk_sampler_structure_and_determinism():
    labels = np.repeat(np.arange(6), [9, 5, 2, 1, 8, 4])
    sampler = PKSampler(labels, num_identities=3, num_instances=4, seed=5)
    batches = sampler.epoch_batches(0)
    assert batches.shape[1] == 12 and len(batches) >= 2
    for batch in batches:
        groups = labels[batch].reshape(3, 4)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 3
    np.testing.assert_array_equal(batches, PKSampler(labels, 3, 4, seed=5).epoch_batches(0))
    assert not np.array_equal(batches, sampler.epoch_batches(1))
    # Identities with fewer than K images are filled up by drawing with replacement.
    small = [batch[labels[batch] == 3] for batch in batches if (labels[batch] == 3).any()]
    assert all(len(set(indices)) == 1 and len(indices) == 4 for indices in small)
    with pytest.raises(
        ValueError, match="at least num_identities=7 identities; the labels hold only 6"
    ):
        PKSampler(labels, num_identities=7, num_instances=4)
    with pytest.raises(ValueError, match="num_instances=0"):
        PKSampler(labels, num_identities=2, num_instances=0)


def test_pk_batches_of_real_reid_images(mars_dir):
    train = load_dataset("market1501", mars_dir, "train")
    sampler = PKSampler(train.labels, num_identities=4, num_instances=4, seed=0)
    dataset = make_pipeline(
        train, (64, 32), 16, training=True, seed=0, sampler=sampler, augment="random_erasing"
    )
    for images, labels in dataset.take(3):
        assert images.shape == (16, 64, 32, 3)
        groups = labels.numpy().reshape(4, 4)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 4
    assert sampler.epoch == 1
    # The batches follow the sampler's index batches exactly.
    again = PKSampler(train.labels, num_identities=4, num_instances=4, seed=0)
    _, labels = first_batch(
        make_pipeline(train, (64, 32), 16, training=True, seed=0, sampler=again)
    )
    np.testing.assert_array_equal(labels, train.labels[again.epoch_batches(0)[0]])


@pytest.mark.parametrize(
    "augment", [None, "random_erasing", ["randaugment", "mixup"], ["cutmix", "random_erasing"]]
)
def test_epochs_depend_on_seed_and_epoch_alone(augment):
    """A pipeline of epochs 1-2 holds exactly the batches that one of epochs 0-2 ends with:
    the shuffling, every image's crop and flip, and every batch layer's draw."""
    data = SyntheticFineGrained(num_classes=4, image_size=32, num_train=100, num_test=0, seed=1)

    def batches(first, end):
        dataset = make_pipeline(
            (data.x_train, data.y_train),
            32,
            16,
            training=True,
            seed=3,
            augment=augment,
            epochs=(first, end),
            steps_per_epoch=6,
        )
        assert dataset.cardinality() == 6 * (end - first)
        return [(x.numpy(), y.numpy()) for x, y in dataset]

    whole, tail = batches(0, 3), batches(1, 3)
    assert len(whole) == 18 and len(tail) == 12
    for (x, y), (x_again, y_again) in zip(whole[6:], tail, strict=True):
        np.testing.assert_array_equal(x, x_again)
        np.testing.assert_array_equal(y, y_again)
    assert not np.array_equal(whole[0][0], whole[6][0])  # Each epoch is a new draw.


def test_sampler_epochs_follow_the_sampler_draw_of_each_epoch(mars_dir):
    train = load_dataset("market1501", mars_dir, "train")
    sampler = PKSampler(train.labels, num_identities=4, num_instances=4, seed=0)
    dataset = make_pipeline(
        train, (64, 32), 16, training=True, seed=0, sampler=sampler, epochs=(2, 4),
        steps_per_epoch=3,
    )  # fmt: skip
    labels = [y.numpy() for _, y in dataset]
    assert len(labels) == 6
    for epoch, first in ((2, 0), (3, 3)):
        expected = train.labels[sampler.epoch_batches(epoch)[:3]]
        np.testing.assert_array_equal(np.stack(labels[first : first + 3]), expected)
    assert sampler.epoch == 0  # Explicit epochs leave the sampler's own counter alone.


def test_epochs_argument_errors():
    data = SyntheticFineGrained(num_classes=2, image_size=32, num_train=16, num_test=0)
    arrays = (data.x_train, data.y_train)
    with pytest.raises(ValueError, match="applies to training pipelines only"):
        make_pipeline(arrays, 32, 4, training=False, epochs=(0, 1))
    with pytest.raises(ValueError, match=r"Received: epochs=\(2, 2\)"):
        make_pipeline(arrays, 32, 4, training=True, epochs=(2, 2))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_pipeline(arrays, 32, 4, training=True, steps_per_epoch=3)

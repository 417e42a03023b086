"""train.py's data classes, built from explicit settings rather than a command line."""

import dataclasses

import numpy as np
import pytest

from keras_fg.cli.train_config import parse_args
from keras_fg.cli.train_data import ClassificationData, DataSettings, ReidData


def test_settings_defaults_are_train_py_defaults():
    parsed = DataSettings.from_args(parse_args([]))
    assert parsed == DataSettings()  # A field whose default drifted from its flag's fails here.
    assert parsed.image_size == (64,) and parsed.size == 64


def test_settings_from_args_reads_every_field_and_overrides():
    args = parse_args(["--image-size", "48", "40", "--augment", "mixup", "--seed", "3"])
    settings = DataSettings.from_args(args, batch_size=7)
    assert settings.image_size == (48, 40) and settings.size == (48, 40)
    assert settings.augment == ("mixup",) and settings.seed == 3 and settings.batch_size == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 4
    with pytest.raises(TypeError, match="unknown"):
        DataSettings.from_args(args, unknown=1)


def test_classification_data_without_a_command_line():
    settings = DataSettings(
        image_size=(32,), batch_size=8, synthetic_classes=4, synthetic_train=40, synthetic_test=16
    )
    data = ClassificationData(settings)
    assert data.num_classes == 4 and data.evaluation_size == 16
    assert data.steps_per_epoch(settings.batch_size) == 5

    def epoch(first):
        batches = list(ClassificationData(settings).training_dataset(first, first + 1))
        return np.concatenate([images.numpy() for images, _ in batches]), len(batches)

    (first, steps), (again, _), (second, _) = epoch(0), epoch(0), epoch(1)
    assert steps == 5 and first.shape == (40, 32, 32, 3)
    np.testing.assert_array_equal(first, again)  # (seed, epoch) alone decides a batch.
    assert not np.array_equal(first, second)
    images, labels = data.sample_images(3)
    assert images.shape == (3, 32, 32, 3) and labels.shape == (3,)


def test_reid_data_without_a_command_line(mars_dir):
    settings = DataSettings(
        format="market1501", data=str(mars_dir), image_size=(64, 32), batch_size=8,
        num_identities=4, num_instances=2, random_erasing=True,
    )  # fmt: skip
    data = ReidData(settings)
    images, labels = next(iter(data.training_dataset(0, 1)))
    assert images.shape == (8, 64, 32, 3)
    # P x K: 4 people, 2 images each.
    assert sorted(np.unique(labels.numpy(), return_counts=True)[1].tolist()) == [2] * 4
    assert data.evaluation_size == len(data.query) + len(data.gallery)

"""Tests for PartCrop: boxes, bilinear crops, serialisation, gradients, TFLite."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from litert_helpers import export_builtins_only

from keras_fg.layers import PartCrop


def boxes_reference(maps, image_size, box_fraction):
    """The box rule of the PartCrop docstring, transcribed loop by loop."""
    height, width = image_size
    batch, map_height, map_width, parts = maps.shape
    side = max(box_fraction * min(height, width) - 1, 0)
    boxes = np.zeros((batch, parts, 4))
    for n in range(batch):
        for p in range(parts):
            row, col = np.unravel_index(np.argmax(maps[n, :, :, p]), (map_height, map_width))
            centre_y = (row + 0.5) * height / map_height - 0.5
            centre_x = (col + 0.5) * width / map_width - 0.5
            y1 = min(max(centre_y - side / 2, 0), height - 1 - side)
            x1 = min(max(centre_x - side / 2, 0), width - 1 - side)
            boxes[n, p] = [y1, x1, y1 + side, x1 + side]
    return boxes


def random_inputs(batch=2, image_size=(20, 24), map_size=(5, 6), parts=3, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(batch, *image_size, channels)).astype("float32")
    maps = rng.uniform(size=(batch, *map_size, parts)).astype("float32")
    return images, maps


@pytest.mark.parametrize(
    "crop_size, box_fraction, image_size, map_size",
    [
        ((7, 9), 0.5, (20, 24), (5, 6)),
        (12, 128 / 448, (28, 28), (7, 7)),
        ((1, 5), 0.3, (16, 12), (4, 3)),  # one row: sampled at the box centre
        (6, 1.0, (10, 14), (3, 5)),
    ],
)
def test_matches_tf_crop_and_resize(crop_size, box_fraction, image_size, map_size):
    images, maps = random_inputs(image_size=image_size, map_size=map_size)
    layer = PartCrop(crop_size, box_fraction)
    crops = keras.ops.convert_to_numpy(layer([images, maps]))
    boxes = boxes_reference(maps, image_size, box_fraction)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.compute_boxes(image_size, maps)), boxes, atol=1e-4
    )
    # tf.image.crop_and_resize takes [y1, x1, y2, x2] normalised by (H - 1, W - 1).
    height, width = image_size
    normalised = (boxes / [height - 1, width - 1, height - 1, width - 1]).reshape(-1, 4)
    batch, parts = boxes.shape[:2]
    crop_hw = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    expected = tf.image.crop_and_resize(
        images, normalised.astype("float32"), np.repeat(np.arange(batch), parts), crop_hw
    ).numpy()
    assert crops.shape == (batch, parts, *crop_hw, 3)
    np.testing.assert_allclose(crops, expected.reshape(crops.shape), atol=1e-4)


def test_boxes_are_shifted_inside_the_image():
    maps = np.zeros((1, 4, 4, 2), "float32")
    maps[0, 0, 0, 0] = 1  # top-left corner
    maps[0, 3, 3, 1] = 1  # bottom-right corner
    boxes = keras.ops.convert_to_numpy(PartCrop(4, 0.5).compute_boxes((32, 32), maps))
    np.testing.assert_allclose(boxes[0], [[0, 0, 15, 15], [16, 16, 31, 31]])


def test_planted_peak_selects_its_region():
    images = np.zeros((1, 64, 64, 3), "float32")
    images[0, 40:48, 8:16] = 1.0  # a bright square centred at (43.5, 11.5)
    maps = np.zeros((1, 8, 8, 2), "float32")
    maps[0, 5, 1, 0] = 1.0  # the cell over the square: centre (43.5, 11.5)
    maps[0, 0, 7, 1] = 1.0  # a dark corner
    crops = keras.ops.convert_to_numpy(PartCrop(16, 0.25)([images, maps]))
    # Box side 15 around (43.5, 11.5): rows 36..51, columns 4..19, one pixel per sample.
    np.testing.assert_allclose(crops[0, 0], images[0, 36:52, 4:20])
    assert crops[0, 0, 4:12, 4:12].min() == 1.0
    assert crops[0, 1].max() == 0.0


def test_whole_image_box_is_the_identity():
    images, maps = random_inputs(image_size=(11, 11))
    crops = keras.ops.convert_to_numpy(PartCrop(11, box_fraction=1.0)([images, maps]))
    for part in range(3):
        np.testing.assert_allclose(crops[:, part], images, atol=1e-6)


def test_config_round_trip():
    layer = PartCrop(8, box_fraction=0.4, name="crops")
    config = layer.get_config()
    assert config["crop_size"] == (8, 8) and config["box_fraction"] == 0.4
    restored = PartCrop.from_config(config)
    assert restored.get_config() == config
    images, maps = random_inputs()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored([images, maps])),
        keras.ops.convert_to_numpy(layer([images, maps])),
    )


def test_symbolic_and_eager_calls_agree_on_shape():
    images = keras.Input((20, 24, 3))
    maps = keras.Input((5, 6, 4))
    layer = PartCrop((6, 10))
    assert layer([images, maps]).shape == (None, 4, 6, 10, 3)
    assert layer.compute_output_shape([(None, 20, 24, 3), (None, 5, 6, 4)]) == (None, 4, 6, 10, 3)
    eager = layer(list(random_inputs(parts=4)))
    assert tuple(eager.shape) == (2, 4, 6, 10, 3)


def test_gradient_reaches_the_image_only():
    images, maps = (tf.constant(x) for x in random_inputs())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([images, maps])
        loss = tf.reduce_sum(PartCrop(5, 0.5)([images, maps]) ** 2)
    image_grad = tape.gradient(loss, images)
    maps_grad = tape.gradient(loss, maps)
    assert np.isfinite(image_grad.numpy()).all() and np.abs(image_grad.numpy()).sum() > 0
    assert maps_grad is None or np.abs(maps_grad.numpy()).sum() == 0


def test_mixed_precision_crops_follow_the_compute_dtype():
    images, maps = random_inputs()
    full = keras.ops.convert_to_numpy(PartCrop(6, 0.5)([images, maps]))
    half = PartCrop(6, 0.5, dtype="mixed_float16")([images, maps])
    assert keras.backend.standardize_dtype(half.dtype) == "float16"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(half), full, atol=2e-3)


def small_model(parts=3):
    images = keras.Input((32, 32, 3))
    maps = keras.layers.Conv2D(parts, 1)(keras.layers.AveragePooling2D(4)(images))
    crops = PartCrop(12, 0.5)([images, maps])
    logits = keras.layers.Dense(5)(keras.layers.Flatten()(crops))
    return keras.Model(images, logits)


def test_fit_step_trains_through_the_crops():
    keras.utils.set_random_seed(0)
    images, maps = keras.Input((20, 24, 3)), keras.Input((5, 6, 3))
    crops = PartCrop(6, 0.5)([images, maps])
    dense = keras.layers.Dense(4)
    model = keras.Model([images, maps], dense(keras.layers.Flatten()(crops)))
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    before = keras.ops.convert_to_numpy(dense.kernel).copy()
    history = model.fit(list(random_inputs()), np.arange(2), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(keras.ops.convert_to_numpy(dense.kernel), before)


def test_keras_save_and_load_identical(tmp_path):
    keras.utils.set_random_seed(1)
    model = small_model()
    x = np.random.rand(2, 32, 32, 3).astype("float32")
    path = str(tmp_path / "part_crop.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("crop_size", [0, -3, (4,), (4, 0), (4.5, 4), True, "8", None])
def test_bad_crop_size(crop_size):
    with pytest.raises(ValueError, match="crop_size"):
        PartCrop(crop_size)


@pytest.mark.parametrize("box_fraction", [0, -0.1, 1.5, "0.3", None, True])
def test_bad_box_fraction(box_fraction):
    with pytest.raises(ValueError, match="box_fraction"):
        PartCrop(8, box_fraction)


def test_bad_inputs():
    images, maps = random_inputs()
    layer = PartCrop(4)
    with pytest.raises(ValueError, match="list of two tensors"):
        layer(images)
    with pytest.raises(ValueError, match="list of two tensors"):
        PartCrop(4)([images, maps, maps])
    with pytest.raises(ValueError, match=r"rank-4 images.*images.shape=\(20, 24, 3\)"):
        PartCrop(4)([images[0], maps])
    with pytest.raises(ValueError, match="rank-4 attention_maps"):
        PartCrop(4)([images, maps[..., None]])
    with pytest.raises(ValueError, match="same batch size"):
        PartCrop(4)([images, maps[:1]])


def test_tflite_builtins_match_keras(tmp_path):
    keras.utils.set_random_seed(2)
    images = keras.Input((32, 32, 3))
    maps = keras.layers.Conv2D(3, 1)(keras.layers.AveragePooling2D(4)(images))
    model = keras.Model(images, PartCrop((12, 10), 0.5)([images, maps]))
    run = export_builtins_only(model, tmp_path / "part_crop.tflite")
    x = np.random.default_rng(3).uniform(size=(1, 32, 32, 3)).astype("float32")
    output = run(x)
    assert output.shape == (1, 3, 12, 10, 3)
    np.testing.assert_allclose(output, model.predict(x, verbose=0), atol=1e-4)

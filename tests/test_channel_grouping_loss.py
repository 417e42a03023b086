"""Tests for the MA-CNN channel grouping losses (Dis, Div, L_cng)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fg.losses import ChannelGroupingLoss, distance_loss, diversity_loss


def random_maps(batch=3, height=5, width=4, parts=3):
    """Maps that each sum to one over positions, with distinct values (one peak)."""
    logits = np.random.normal(0, 2, (batch, height, width, parts))
    exp = np.exp(logits)
    return (exp / exp.sum(axis=(1, 2), keepdims=True)).astype("float32")


def numpy_losses(maps, margin, normalize_coordinates):
    """Loop-by-loop transcription of Dis and Div, summed over i, averaged over b."""
    maps = maps.astype(np.float64)
    batch, height, width, parts = maps.shape
    x_scale = max(height - 1, 1) if normalize_coordinates else 1
    y_scale = max(width - 1, 1) if normalize_coordinates else 1
    dis = div = 0.0
    for b in range(batch):
        peaks = [maps[b, :, :, k].max() for k in range(parts)]
        for i in range(parts):
            m = maps[b, :, :, i]
            t_x, t_y = np.unravel_index(np.argmax(m), m.shape)
            for x in range(height):
                for y in range(width):
                    dis += m[x, y] * (((x - t_x) / x_scale) ** 2 + ((y - t_y) / y_scale) ** 2)
                    others = [maps[b, x, y, k] / peaks[k] for k in range(parts) if k != i]
                    if others:
                        div += m[x, y] * max(0.0, max(others) - margin)
    return dis / batch, div / batch


@pytest.mark.parametrize("normalize_coordinates", [False, True])
def test_losses_match_loop_transcription(normalize_coordinates):
    maps = random_maps()
    expected_dis, expected_div = numpy_losses(maps, 0.6, normalize_coordinates)
    dis = distance_loss(maps, normalize_coordinates=normalize_coordinates)
    div = diversity_loss(maps, margin=0.6)
    total = ChannelGroupingLoss(
        margin=0.6, diversity_weight=1.5, normalize_coordinates=normalize_coordinates
    )(maps)
    np.testing.assert_allclose(float(dis), expected_dis, rtol=1e-5)
    np.testing.assert_allclose(float(div), expected_div, rtol=1e-5)
    np.testing.assert_allclose(float(total), expected_dis + 1.5 * expected_div, rtol=1e-5)


def test_default_margin_and_weight():
    maps = random_maps()
    expected_dis, expected_div = numpy_losses(maps, 0.25, True)
    assert expected_div > 0  # the hinge is active somewhere, so the check means something
    np.testing.assert_allclose(float(diversity_loss(maps)), expected_div, rtol=1e-5)
    np.testing.assert_allclose(
        float(ChannelGroupingLoss()(maps)), expected_dis + expected_div, rtol=1e-5
    )


def blob(height, width, cells):
    """A map holding equal mass on `cells` and exactly zero elsewhere."""
    m = np.zeros((height, width))
    for cell in cells:
        m[cell] = 1.0 / len(cells)
    return m


def test_diversity_is_zero_apart_and_positive_once_parts_overlap_beyond_the_margin():
    first = blob(6, 6, [(0, 0), (0, 1), (1, 0), (1, 1)])
    apart = np.stack([first, blob(6, 6, [(4, 4), (4, 5), (5, 4), (5, 5)])], -1)[None]
    assert float(diversity_loss(apart.astype("float32"))) == 0.0
    # Two uniform maps stand at their peak everywhere: each part's whole mass overlaps, less
    # the margin. Flattening the maps cannot hide an overlap.
    flat = np.full((1, 6, 6, 2), 1 / 36, "float32")
    np.testing.assert_allclose(float(diversity_loss(flat, margin=0.25)), 2 * 0.75, rtol=1e-5)
    shared = np.stack([first, blob(6, 6, [(1, 1), (1, 2), (2, 1), (2, 2)])], -1)[None]
    # One cell shared, at 1/4 of each part's mass and at its peak: 2 parts · 1/4 · (1 − 0.25).
    np.testing.assert_allclose(
        float(diversity_loss(shared.astype("float32"))), 2 * 0.25 * 0.75, rtol=1e-5
    )
    # A part's faint tail (0.025 per cell against its 0.9 peak, below the margin) does not
    # charge the part it lies on; the tail itself, 0.1 of its mass on the other's peak, pays.
    tail = blob(6, 6, [(3, 3)]) * 0.9 + first * 0.1
    faint = np.stack([first, tail], -1)[None].astype("float32")
    np.testing.assert_allclose(float(diversity_loss(faint)), 0.1 * 0.75, rtol=1e-5)


def test_single_part_has_zero_diversity():
    maps = random_maps(parts=1)
    expected_dis, _ = numpy_losses(maps, 0.25, True)
    assert float(diversity_loss(maps)) == 0.0
    np.testing.assert_allclose(float(ChannelGroupingLoss()(maps)), expected_dis, rtol=1e-5)


def test_ties_between_parts():
    # Two identical maps: for each, the largest other map is itself.
    maps = random_maps(parts=1)
    maps = np.concatenate([maps, maps], axis=-1)
    _, expected_div = numpy_losses(maps, 0.25, False)
    np.testing.assert_allclose(float(diversity_loss(maps)), expected_div, rtol=1e-5)


def test_float16_maps_give_float32_losses():
    maps = random_maps().astype("float16")
    for value in (distance_loss(maps), diversity_loss(maps), ChannelGroupingLoss()(maps)):
        assert keras.backend.standardize_dtype(value.dtype) == "float32"


def test_gradient_steps_make_the_blob_compact():
    logits = tf.Variable(np.random.normal(0, 1, (2, 8, 8, 2)).astype("float32"))
    loss_fn = ChannelGroupingLoss(normalize_coordinates=False)

    def maps():
        return keras.ops.softmax(tf.reshape(logits, (2, 64, 2)), axis=1)

    def as_grid(flat):
        return tf.reshape(flat, (2, 8, 8, 2))

    start = float(distance_loss(as_grid(maps())))
    for _ in range(10):
        with tf.GradientTape() as tape:
            loss = loss_fn(as_grid(maps()))
        (gradient,) = tape.gradient(loss, [logits])
        assert np.all(np.isfinite(gradient.numpy()))
        logits.assign_sub(2.0 * gradient)
    assert float(distance_loss(as_grid(maps()))) < 0.5 * start


def test_gradients_are_finite_on_uniform_maps():
    # Ties everywhere: every position is a peak, every map equals the others.
    maps = tf.Variable(np.full((1, 4, 4, 3), 1 / 16, "float32"))
    with tf.GradientTape() as tape:
        loss = ChannelGroupingLoss(normalize_coordinates=True)(maps)
    assert np.all(np.isfinite(tape.gradient(loss, maps).numpy()))


def test_config_round_trip():
    loss = ChannelGroupingLoss(margin=0.3, diversity_weight=0.5, normalize_coordinates=False)
    assert ChannelGroupingLoss.from_config(loss.get_config()).get_config() == loss.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, ChannelGroupingLoss)
    assert restored.get_config() == loss.get_config()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"margin": "0.02"}, "Received: margin='0.02'"),
        ({"margin": -1.0}, "Received: margin=-1.0"),
        ({"margin": 1.0}, "Received: margin=1.0"),
        ({"diversity_weight": -1.0}, "Received: diversity_weight=-1.0"),
        ({"normalize_coordinates": 1}, "Received: normalize_coordinates=1"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChannelGroupingLoss(**kwargs)


def test_maps_of_wrong_rank_raise():
    for fn in (distance_loss, diversity_loss, ChannelGroupingLoss()):
        with pytest.raises(ValueError, match=r"rank 4 .* Received: maps.shape=\(3, 5, 4\)"):
            fn(np.zeros((3, 5, 4), "float32"))

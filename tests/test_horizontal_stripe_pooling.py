"""HorizontalStripePooling against a NumPy transcription, a planted band, errors, saving."""

import keras
import numpy as np
import pytest

from keras_fg.layers import HorizontalStripePooling


def numpy_stripes(feature_map, count):
    """PyTorch's adaptive_avg_pool2d(F, (S, 1)): rows floor(s·H/S) to ceil((s+1)·H/S)."""
    height = feature_map.shape[1]
    stripes = []
    for s in range(count):
        first = int(np.floor(s * height / count))
        end = int(np.ceil((s + 1) * height / count))
        stripes.append(feature_map[:, first:end].mean(axis=(1, 2)))
    return np.stack(stripes, axis=1)


@pytest.mark.parametrize("height, count", [(16, 4), (16, 6), (7, 3), (5, 5), (8, 1)])
def test_matches_the_numpy_transcription(height, count):
    feature_map = np.random.default_rng(0).normal(size=(2, height, 3, 5)).astype("float32")
    pooled = np.asarray(HorizontalStripePooling(count)(feature_map))
    assert pooled.shape == (2, count, 5)
    np.testing.assert_allclose(pooled, numpy_stripes(feature_map, count), rtol=1e-5, atol=1e-6)


def test_uneven_bands_overlap_by_one_row_as_adaptive_pooling_does():
    assert HorizontalStripePooling(3).stripe_rows(7) == [(0, 3), (2, 5), (4, 7)]
    assert HorizontalStripePooling(4).stripe_rows(16) == [(0, 4), (4, 8), (8, 12), (12, 16)]


def test_a_planted_band_lights_up_its_stripe_only():
    """A hot band of rows 8..11 of a 16-row map is the third of four stripes, nothing else."""
    feature_map = np.zeros((1, 16, 8, 2), "float32")
    feature_map[0, 8:12, :, 1] = 1.0
    pooled = np.asarray(HorizontalStripePooling(4)(feature_map))[0]
    expected = np.zeros((4, 2))
    expected[2, 1] = 1.0
    np.testing.assert_allclose(pooled, expected, atol=1e-7)


@pytest.mark.parametrize("num_stripes", [0, -1, 2.0, True, None])
def test_bad_stripe_counts_are_refused(num_stripes):
    with pytest.raises(ValueError, match="num_stripes"):
        HorizontalStripePooling(num_stripes)


def test_a_map_lower_than_the_stripe_count_or_not_4d_is_refused():
    with pytest.raises(ValueError, match="at least `num_stripes`=6 rows"):
        HorizontalStripePooling(6)(keras.Input((4, 8, 3)))
    with pytest.raises(ValueError, match="static height"):
        HorizontalStripePooling(2)(keras.Input((None, 8, 3)))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        HorizontalStripePooling(2)(keras.Input((8, 3)))


def test_saved_and_reloaded_gives_identical_outputs(tmp_path):
    inputs = keras.Input((12, 4, 3))
    model = keras.Model(inputs, HorizontalStripePooling(5, name="stripes")(inputs))
    path = tmp_path / "stripes.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert reloaded.get_layer("stripes").get_config()["num_stripes"] == 5
    feature_map = np.random.default_rng(1).normal(size=(2, 12, 4, 3)).astype("float32")
    np.testing.assert_array_equal(model(feature_map), reloaded(feature_map))

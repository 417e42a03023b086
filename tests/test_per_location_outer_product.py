"""PerLocationOuterProduct against a NumPy transcription, and its Keras anatomy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fg.layers import PerLocationOuterProduct


def numpy_reference(a, b, signed_sqrt=True, l2_normalize=True, eps=1e-7):
    batch, height, width, _ = a.shape
    out = []
    for n in range(batch):
        rows = []
        for h in range(height):
            cells = []
            for w in range(width):
                z = np.outer(a[n, h, w], b[n, h, w]).reshape(-1)
                if signed_sqrt:
                    z = np.sign(z) * (np.sqrt(np.abs(z) + eps) - np.sqrt(eps))
                if l2_normalize:
                    z = z / max(np.linalg.norm(z), np.sqrt(eps))
                cells.append(z)
            rows.append(cells)
        out.append(rows)
    return np.array(out)


@pytest.mark.parametrize("signed_sqrt, l2_normalize", [(True, True), (False, False), (True, False)])
def test_matches_numpy(signed_sqrt, l2_normalize):
    a = np.random.normal(size=(2, 3, 4, 5)).astype("float32")
    b = np.random.normal(size=(2, 3, 4, 6)).astype("float32")
    layer = PerLocationOuterProduct(signed_sqrt=signed_sqrt, l2_normalize=l2_normalize)
    np.testing.assert_allclose(
        layer([a, b]), numpy_reference(a, b, signed_sqrt, l2_normalize), atol=1e-5
    )
    np.testing.assert_allclose(
        layer(a), numpy_reference(a, a, signed_sqrt, l2_normalize), atol=1e-5
    )


def test_symbolic_shapes_config_and_save(tmp_path):
    inputs = keras.Input((4, 4, 3))
    a = keras.layers.Conv2D(3, 1)(inputs)
    b = keras.layers.Conv2D(2, 1)(inputs)
    outputs = PerLocationOuterProduct(name="outer")([a, b])
    assert outputs.shape == (None, 4, 4, 6)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(outputs)))
    layer = model.get_layer("outer")
    clone = PerLocationOuterProduct.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.normal(size=(4, 4, 4, 3)).astype("float32")
    model.fit(x, np.zeros((4, 2)), verbose=0)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_finite_gradient_at_zero():
    x = tf.zeros((1, 2, 2, 3))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(PerLocationOuterProduct()(x) * 1.0)
    assert np.isfinite(tape.gradient(y, x).numpy()).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="Received: epsilon=0"):
        PerLocationOuterProduct(epsilon=0)
    with pytest.raises(ValueError, match="a list of 3"):
        PerLocationOuterProduct()([np.zeros((1, 2, 2, 1))] * 3)
    with pytest.raises(ValueError, match="share the grid"):
        PerLocationOuterProduct()([np.zeros((1, 2, 2, 1)), np.zeros((1, 3, 2, 1))])
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        PerLocationOuterProduct()(np.zeros((1, 2, 2)))

"""Tests for BilinearPooling: math, serialisation, training, gradients, precision, TFLite."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from litert_helpers import export_builtins_only

from keras_fg.layers import BilinearPooling


def bilinear_reference(a, b, signed_sqrt=True, l2_normalize=True, epsilon=1e-8):
    """B-CNN pooling transcribed directly: mean of per-position outer products."""
    batch, height, width, _ = a.shape
    z = np.stack(
        [
            sum(np.outer(a[n, h, w], b[n, h, w]) for h in range(height) for w in range(width))
            / (height * width)
            for n in range(batch)
        ]
    ).reshape(batch, -1)
    if signed_sqrt:
        z = np.sign(z) * np.sqrt(np.abs(z))
    if l2_normalize:
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), epsilon)
    return z


def random_maps(batch=2, size=5, channels_a=4, channels_b=3):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(batch, size, size, channels_a)).astype("float32")
    b = rng.normal(size=(batch, size, size, channels_b)).astype("float32")
    return a, b


@pytest.mark.parametrize("signed_sqrt", [True, False])
@pytest.mark.parametrize("l2_normalize", [True, False])
def test_two_inputs_match_numpy(signed_sqrt, l2_normalize):
    a, b = random_maps()
    layer = BilinearPooling(signed_sqrt=signed_sqrt, l2_normalize=l2_normalize)
    output = keras.ops.convert_to_numpy(layer([a, b]))
    expected = bilinear_reference(a, b, signed_sqrt, l2_normalize)
    assert output.shape == (2, 4 * 3)
    np.testing.assert_allclose(output, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("signed_sqrt", [True, False])
def test_one_input_is_pooled_with_itself(signed_sqrt):
    a, _ = random_maps()
    output = keras.ops.convert_to_numpy(BilinearPooling(signed_sqrt=signed_sqrt)(a))
    np.testing.assert_allclose(output, bilinear_reference(a, a, signed_sqrt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projection_dim", [None, 16])
def test_config_round_trip(projection_dim):
    layer = BilinearPooling(
        signed_sqrt=False, l2_normalize=True, epsilon=1e-6, projection_dim=projection_dim, seed=3
    )
    config = layer.get_config()
    clone = BilinearPooling.from_config(config)
    assert clone.get_config() == config
    assert (clone.signed_sqrt, clone.epsilon, clone.projection_dim, clone.seed) == (
        False,
        1e-6,
        projection_dim,
        3,
    )
    a, b = random_maps()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer([a, b])), keras.ops.convert_to_numpy(clone([a, b]))
    )


@pytest.mark.parametrize("projection_dim, features", [(None, 12), (10, 10)])
def test_symbolic_and_eager_shapes(projection_dim, features):
    layer = BilinearPooling(projection_dim=projection_dim)
    a = keras.Input((None, None, 4))
    b = keras.Input((None, None, 3))
    symbolic = layer([a, b])
    assert tuple(symbolic.shape) == (None, features)
    assert layer.compute_output_shape([(None, 6, 6, 4), (None, 6, 6, 3)]) == (None, features)
    eager = layer(list(random_maps(batch=3, size=6)))
    assert tuple(eager.shape) == (3, features)
    assert BilinearPooling().compute_output_shape((None, 7, 7, 5)) == (None, 25)


def tiny_model(projection_dim=None, size=8):
    inputs = keras.Input((size, size, 3))
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    pooled = BilinearPooling(projection_dim=projection_dim, name="bilinear")(features)
    return keras.Model(inputs, keras.layers.Dense(3)(pooled))


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_fit_step(projection_dim):
    model = tiny_model(projection_dim)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = np.random.rand(4, 8, 8, 3).astype("float32")
    y = np.array([0, 1, 2, 0])
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.allclose(w0, w1) for w0, w1 in zip(before, model.get_weights()))
    if projection_dim:  # the projection stays fixed
        layer = model.get_layer("bilinear")
        assert not layer.trainable_weights and len(layer.non_trainable_weights) == 2


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_keras_save_and_load(tmp_path, projection_dim):
    model = tiny_model(projection_dim)
    x = np.random.rand(2, 8, 8, 3).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    # With seed=None a rebuilt projection would be drawn anew: identical
    # outputs show that the saved matrices were restored.
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    assert isinstance(loaded.get_layer("bilinear"), BilinearPooling)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"projection_dim": 0}, "projection_dim=0"),
        ({"projection_dim": -4}, "projection_dim=-4"),
        ({"projection_dim": 8.0}, "projection_dim=8.0"),
        ({"projection_dim": "8"}, "projection_dim='8'"),
        ({"epsilon": 0}, "epsilon=0"),
        ({"epsilon": -1e-3}, "epsilon=-0.001"),
        ({"epsilon": "1e-8"}, "epsilon='1e-8'"),
        ({"seed": 1.5}, "seed=1.5"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BilinearPooling(**kwargs)


def test_bad_inputs():
    a = np.zeros((2, 4, 4, 3), "float32")
    with pytest.raises(ValueError, match="exactly two tensors.*list of 3"):
        BilinearPooling()([a, a, a])
    with pytest.raises(ValueError, match="exactly two tensors.*list of 1"):
        BilinearPooling()([a])
    with pytest.raises(ValueError, match="same spatial dimensions"):
        BilinearPooling()([a, np.zeros((2, 5, 4, 3), "float32")])
    with pytest.raises(ValueError, match="same spatial dimensions"):
        BilinearPooling()([keras.Input((4, 4, 3)), keras.Input((4, 6, 3))])
    with pytest.raises(ValueError, match=r"rank-4 inputs.*a.shape=\(2, 16, 3\)"):
        BilinearPooling()(np.zeros((2, 16, 3), "float32"))
    with pytest.raises(ValueError, match=r"rank-4 inputs.*b.shape=\(2, 4, 4\)"):
        BilinearPooling()([a, np.zeros((2, 4, 4), "float32")])
    layer = BilinearPooling()
    layer([a, a])
    with pytest.raises(ValueError, match="same spatial dimensions"):
        layer([a, np.zeros((2, 4, 2, 3), "float32")])


@pytest.mark.parametrize("projection_dim", [None, 8])
@pytest.mark.parametrize("inputs", ["zeros", "orthogonal"])
def test_gradients_are_finite_where_z_is_zero(projection_dim, inputs):
    if inputs == "zeros":
        a = tf.zeros((2, 4, 4, 3))
        b = tf.zeros((2, 4, 4, 2))
    else:  # a and b on disjoint channels: most entries of z are exactly 0
        a = tf.constant(np.eye(3, dtype="float32")[np.zeros((2, 4, 4), int)])
        b = tf.constant(np.eye(3, dtype="float32")[np.ones((2, 4, 4), int)][..., :2])
    layer = BilinearPooling(projection_dim=projection_dim, seed=0)
    weights = tf.random.normal((2, projection_dim or 6))
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        loss = tf.reduce_sum(layer([a, b]) * weights)
    grad_a, grad_b = tape.gradient(loss, [a, b])
    assert np.all(np.isfinite(grad_a.numpy())) and np.all(np.isfinite(grad_b.numpy()))


@pytest.mark.parametrize(
    "z, slope",
    [(0.0, 1e4), (1e-30, 1e4), (1e-9, 1e4), (1e-4, 0.5 / np.sqrt(1e-4)), (4.0, 0.25)],
)
def test_signed_sqrt_slope_is_bounded_near_zero(z, slope):
    # a = z and b = 1 everywhere give z exactly; the slope of the signed
    # square root is 1/(2·sqrt(z)) above epsilon = 1e-8 and 1/sqrt(epsilon) below.
    a = tf.fill((1, 2, 2, 1), z)
    with tf.GradientTape() as tape:
        tape.watch(a)
        output = BilinearPooling(l2_normalize=False, epsilon=1e-8)([a, tf.ones((1, 2, 2, 1))])
    np.testing.assert_allclose(output.numpy(), [[np.sqrt(z) if z >= 1e-8 else z / 1e-4]])
    np.testing.assert_allclose(tf.reduce_sum(tape.gradient(output, a)).numpy(), slope, rtol=1e-4)


def test_gradients_through_a_model_on_zero_images():
    model = tiny_model()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(tf.zeros((2, 8, 8, 3))))
    for gradient in tape.gradient(loss, model.trainable_weights):
        assert np.all(np.isfinite(gradient.numpy()))


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_float32_under_mixed_precision(mixed_float16):
    # Values near 100: z near 1e4 and ‖y‖² near 1e6 overflow float16 (max 65504),
    # so float16 math would give inf/NaN here.
    inputs = keras.Input((4, 4, 8))
    features = keras.layers.Conv2D(8, 1, kernel_initializer="ones")(inputs)
    outputs = BilinearPooling(name="bilinear")(features)
    model = keras.Model(inputs, [features, outputs])
    assert model.get_layer("bilinear").compute_dtype == "float32"
    assert outputs.dtype == "float32"
    x = np.random.default_rng(0).uniform(0, 12, size=(2, 4, 4, 8)).astype("float32")
    features, pooled = model(x)
    assert features.dtype == "float16" and pooled.dtype == "float32"
    f = features.numpy().astype("float64")
    np.testing.assert_allclose(pooled.numpy(), bilinear_reference(f, f), atol=1e-6, rtol=1e-5)


def test_compact_inner_products_approximate_full_ones():
    # Features with a shared pattern mixed in at varying strength, so that the
    # pairwise inner products spread over a wide range.
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(6, 6, 16))
    mix = np.linspace(0, 1, 12)[:, None, None, None]
    x = (mix * shared + rng.normal(size=(12, 6, 6, 16))).astype("float32")
    full = BilinearPooling(signed_sqrt=False, l2_normalize=False)(x).numpy()
    compact = BilinearPooling(signed_sqrt=False, l2_normalize=False, projection_dim=4096, seed=1)(
        x
    ).numpy()
    pairs = np.triu_indices(len(x), k=1)
    exact = (full @ full.T)[pairs]
    approx = (compact @ compact.T)[pairs]
    assert np.corrcoef(exact, approx)[0, 1] > 0.9
    # Unbiased: on average the estimates neither shrink nor grow.
    assert abs(approx.sum() / exact.sum() - 1) < 0.1


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_tflite_builtins_match_keras(tmp_path, projection_dim):
    inputs = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, BilinearPooling(projection_dim=projection_dim, seed=0)(features))
    run = export_builtins_only(model, tmp_path / "model.tflite")
    x = np.random.rand(1, 8, 8, 3).astype("float32")
    np.testing.assert_allclose(run(x), model.predict(x, verbose=0), atol=1e-4)

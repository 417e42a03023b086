import keras
import numpy as np
import pytest

from keras_fg.layers import SpatialAttentionLSTM


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# The corner each sweep starts from, as the grid axes (of (B, H, W, ...)) flipped to get there.
SWEEP_FLIPS = [(), (1, 2), (2,), (1,)]


def _raster_recurrence(attended, kernel, recurrent, bias, units):
    """The 2-D LSTM over `attended` (B, H, W, C), cell by cell in raster order (i, then j)."""
    batch, height, width, _ = attended.shape
    u_up, u_left = recurrent[:units], recurrent[units:]
    h = np.zeros((batch, height + 1, width + 1, units))  # row/column 0 is outside the grid
    c = np.zeros_like(h)
    for i in range(height):
        for j in range(width):
            z = attended[:, i, j] @ kernel + h[:, i, j + 1] @ u_up + h[:, i + 1, j] @ u_left + bias
            gate_i, f_up, f_left, gate_o, g = np.split(z, 5, axis=-1)
            c[:, i + 1, j + 1] = (
                _sigmoid(f_up) * c[:, i, j + 1]
                + _sigmoid(f_left) * c[:, i + 1, j]
                + _sigmoid(gate_i) * np.tanh(g)
            )
            h[:, i + 1, j + 1] = _sigmoid(gate_o) * np.tanh(c[:, i + 1, j + 1])
    return h[:, 1:, 1:]


def _numpy_reference(layer, x):
    """The layer's equations: each sweep flips the grid to its corner, runs the raster-order
    recurrence, and flips the hidden states back."""
    x = x.astype(np.float64)
    batch, height, width, _ = x.shape
    units = layer.units
    w1, b1, w2, kernel, recurrent, bias = (np.asarray(w, np.float64) for w in layer.get_weights())

    scores = (np.tanh(x @ w1 + b1) @ w2)[..., 0].reshape(batch, -1)
    alpha = np.exp(scores - scores.max(axis=1, keepdims=True))
    alpha = (alpha / alpha.sum(axis=1, keepdims=True)).reshape(batch, height, width)
    attended = height * width * alpha[..., None] * x

    features = []
    for sweep, axes in enumerate(SWEEP_FLIPS[: layer.directions]):
        flipped = np.flip(attended, axis=axes) if axes else attended
        hidden = _raster_recurrence(flipped, kernel, recurrent[sweep], bias[sweep], units)
        hidden = np.flip(hidden, axis=axes) if axes else hidden
        last_cell = np.flip(hidden, axis=axes)[:, -1, -1] if axes else hidden[:, -1, -1]
        features.append(
            {
                "last": last_cell,  # the sweep's last cell: the corner opposite its start
                "attention": np.einsum("bhw,bhwu->bu", alpha, hidden),
                "mean": hidden.mean(axis=(1, 2)),
            }[layer.pooling]
        )
    return np.concatenate(features, axis=-1), alpha, scores.reshape(batch, height, width)


def _random_inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# A 1×1 grid is valid (attention is then 1); Keras warns about the size-1 softmax.
@pytest.mark.filterwarnings("ignore:You are using a softmax over axis")
@pytest.mark.parametrize("pooling", ["last", "attention", "mean"])
@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (5, 2), (1, 3), (1, 1)])
def test_matches_raster_order_numpy_recurrence(grid, pooling):
    x = _random_inputs((2, *grid, 3))
    # Non-zero biases so that every gate and both forget paths matter.
    layer = SpatialAttentionLSTM(
        4, attention_units=5, pooling=pooling, bias_initializer="random_normal"
    )
    outputs = layer(x)
    features, alpha, _ = _numpy_reference(layer, x)
    np.testing.assert_allclose(outputs["features"], features, atol=1e-5)
    np.testing.assert_allclose(outputs["attention_maps"], alpha, atol=1e-6)


@pytest.mark.parametrize("pooling", ["last", "attention"])
@pytest.mark.parametrize("directions", [2, 4])
@pytest.mark.parametrize("grid", [(3, 5), (5, 2)])
def test_each_sweep_matches_a_flipped_raster_order_numpy_recurrence(grid, directions, pooling):
    x = _random_inputs((2, *grid, 3), seed=3)
    layer = SpatialAttentionLSTM(
        4,
        attention_units=5,
        pooling=pooling,
        directions=directions,
        bias_initializer="random_normal",
    )
    features = keras.ops.convert_to_numpy(layer(x)["features"])
    expected, _, _ = _numpy_reference(layer, x)
    assert features.shape == (2, directions * 4)
    for sweep in range(directions):  # each sweep's slice of the features on its own
        block = slice(4 * sweep, 4 * (sweep + 1))
        np.testing.assert_allclose(features[:, block], expected[:, block], atol=1e-5)
    # The sweeps have different weights and see the grid from different corners.
    assert np.abs(features[:, :4] - features[:, 4:8]).max() > 1e-3


def test_attention_is_softmax_of_mlp_scores_and_sums_to_one():
    x = _random_inputs((3, 3, 5, 4), seed=1)
    layer = SpatialAttentionLSTM(2, attention_units=6)
    maps = keras.ops.convert_to_numpy(layer(x)["attention_maps"])
    _, _, scores = _numpy_reference(layer, x)
    flat = scores.reshape(3, -1)
    softmax = np.exp(flat) / np.exp(flat).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(maps, softmax.reshape(maps.shape), atol=1e-6)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-6)
    assert maps.std() > 1e-3  # a non-trivial map, not uniform


def test_config_round_trip():
    layer = SpatialAttentionLSTM(
        6,
        attention_units=3,
        activation="relu",
        recurrent_activation="hard_sigmoid",
        pooling="attention",
        directions=4,
        recurrent_initializer="glorot_uniform",
        kernel_regularizer="l2",
        name="salstm",
    )
    config = layer.get_config()
    clone = SpatialAttentionLSTM.from_config(config)
    assert clone.get_config() == config
    assert (config["units"], config["attention_units"], config["pooling"]) == (6, 3, "attention")


def test_symbolic_and_eager_call_shapes():
    layer = SpatialAttentionLSTM(7, attention_units=4)
    symbolic = layer(keras.Input((3, 5, 2)))
    assert symbolic["features"].shape == (None, 7)
    assert symbolic["attention_maps"].shape == (None, 3, 5)
    assert layer.compute_output_shape((None, 3, 5, 2)) == {
        "features": (None, 7),
        "attention_maps": (None, 3, 5),
    }
    eager = layer(_random_inputs((2, 3, 5, 2)))
    assert tuple(eager["features"].shape) == (2, 7)
    assert tuple(eager["attention_maps"].shape) == (2, 3, 5)
    assert len(layer.trainable_weights) == 6


def _tiny_model(pooling="last"):
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inputs)
    outputs = SpatialAttentionLSTM(8, attention_units=4, pooling=pooling, name="salstm")(x)
    logits = keras.layers.Dense(3, name="classifier")(outputs["features"])
    return keras.Model(inputs, {"logits": logits, "attention_maps": outputs["attention_maps"]})


def test_fit_lowers_the_loss():
    keras.utils.set_random_seed(0)
    model = _tiny_model("attention")
    training = keras.Model(model.input, model.output["logits"])
    training.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = _random_inputs((12, 6, 6, 3), seed=2)
    y = np.arange(12) % 3
    history = training.fit(x, y, batch_size=12, epochs=15, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0]


def test_keras_save_and_load_give_identical_outputs(tmp_path):
    model = _tiny_model()
    x = _random_inputs((2, 6, 6, 3), seed=3)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.get_layer("salstm"), SpatialAttentionLSTM)
    before, after = model.predict(x, verbose=0), reloaded.predict(x, verbose=0)
    for name in ("logits", "attention_maps"):
        np.testing.assert_array_equal(before[name], after[name])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"units": 0}, "units=0"),
        ({"units": 2.5}, "units=2.5"),
        ({"units": 4, "attention_units": 0}, "attention_units=0"),
        ({"units": 4, "pooling": "max"}, "pooling='max'"),
        ({"units": 4, "directions": 3}, "directions=3"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpatialAttentionLSTM(**kwargs)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((4, 4), "4-D feature map"),
        ((2, 4, 4, 3, 1), "4-D feature map"),
        ((None, 4, 3), "static spatial size"),
        ((4, None, 3), "static spatial size"),
    ],
)
def test_bad_input_shapes_raise(shape, message):
    with pytest.raises(ValueError, match=message):
        SpatialAttentionLSTM(4)(keras.Input(shape))


def test_mixed_precision_computes_and_returns_float32():
    x = _random_inputs((2, 3, 4, 3), seed=4)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = SpatialAttentionLSTM(4, bias_initializer="random_normal")
        symbolic = layer(keras.Input((3, 4, 3)))
        eager = layer(keras.ops.cast(x, "float16"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert layer.kernel.dtype == "float32"
    for outputs in (symbolic, eager):
        for tensor in outputs.values():
            assert keras.backend.standardize_dtype(tensor.dtype) == "float32"
    # The float32 math on the float16-rounded inputs matches the float64 reference.
    features, alpha, _ = _numpy_reference(layer, x.astype("float16").astype("float32"))
    np.testing.assert_allclose(eager["features"], features, atol=1e-5)
    np.testing.assert_allclose(eager["attention_maps"], alpha, atol=1e-6)


def test_tflite_builtins_without_while_match_keras():
    tf = pytest.importorskip("tensorflow")
    from ai_edge_litert.interpreter import Interpreter

    keras.utils.set_random_seed(5)
    inputs = keras.Input((8, 8, 3))  # a symbolic batch, which keras.layers.LSTM cannot convert
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    outputs = SpatialAttentionLSTM(8, pooling="attention", bias_initializer="random_normal")(x)
    model = keras.Model(inputs, [outputs["features"], outputs["attention_maps"]])

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = Interpreter(model_content=converter.convert())
    op_names = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "FULLY_CONNECTED" in op_names and "SOFTMAX" in op_names
    assert "WHILE" not in op_names
    assert not any(name.startswith("Flex") for name in op_names)

    images = _random_inputs((2, 8, 8, 3), seed=6)
    input_index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(input_index, images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_index, images)
    interpreter.invoke()
    # The flatbuffer does not keep the output order; the two outputs differ in shape.
    results = {}
    for detail in interpreter.get_output_details():
        result = interpreter.get_tensor(detail["index"])
        results[result.shape] = result
    for expected in model(images):
        expected = keras.ops.convert_to_numpy(expected)
        np.testing.assert_allclose(results[expected.shape], expected, atol=1e-4)

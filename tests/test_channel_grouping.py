"""Tests for ChannelGrouping: math, shapes, serialisation, training, precision, TFLite."""

import keras
import numpy as np
import pytest
from litert_helpers import export_builtins_only

from keras_fg.layers import ChannelGrouping


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_channel_grouping(layer, features):
    """Direct transcription of the equations, part by part, in float64."""
    hidden_kernel, hidden_bias, channel_kernel, channel_bias, temperature_logit = (
        np.asarray(w, np.float64) for w in layer.get_weights()
    )
    features = features.astype(np.float64)
    batch, height, width, channels = features.shape
    maps = np.zeros((batch, height, width, layer.num_parts))
    weights = np.zeros((batch, layer.num_parts, channels))
    for b in range(batch):
        pooled = features[b].mean(axis=(0, 1))
        for i in range(layer.num_parts):
            d = sigmoid(
                np.tanh(pooled @ hidden_kernel[i] + hidden_bias[i]) @ channel_kernel[i]
                + channel_bias[i]
            )
            response = (features[b] * (2 * d - 1)).sum(axis=-1) / np.sqrt(channels)
            z = (response - response.mean()) / np.sqrt(
                response.var() + 1e-3 * (response**2).mean() + 1e-6
            )
            span = layer.max_temperature - layer.min_temperature
            tau = layer.min_temperature + span * sigmoid(temperature_logit[i])
            scores = np.exp(tau * z)
            maps[b, :, :, i] = scores / scores.sum()
            weights[b, i] = d
    return maps, weights


def randomized(layer, features):
    """Builds `layer` and gives every weight, biases included, random values."""
    layer(features)
    rng = np.random.default_rng(1)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    return layer


def test_maps_match_numpy_transcription():
    features = np.random.normal(0, 3, (2, 5, 4, 6)).astype("float32")
    layer = ChannelGrouping(3, hidden_units=4, min_temperature=0.5)
    layer = randomized(layer, features)
    outputs = layer(features)
    expected_maps, expected_weights = numpy_channel_grouping(layer, features)
    maps = keras.ops.convert_to_numpy(outputs["attention_maps"])
    np.testing.assert_allclose(maps, expected_maps, atol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(outputs["channel_weights"]), expected_weights, atol=1e-5
    )
    # The maps are far from uniform, so the comparison above means something.
    assert maps.max() > 2 * maps.min()
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_temperature_starts_as_asked_and_stays_below_its_bound():
    layer = ChannelGrouping(3, initial_temperature=0.8, min_temperature=0.0, max_temperature=2.0)
    layer.build((None, 4, 4, 5))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.temperatures()), 0.8, rtol=1e-6)
    layer.temperature_logit.assign([-50.0, 0.0, 50.0])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.temperatures()), [0, 1, 2], atol=1e-6
    )
    floored = ChannelGrouping(2, initial_temperature=1.5, min_temperature=1.0, max_temperature=3.0)
    floored.build((None, 4, 4, 5))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(floored.temperatures()), 1.5, rtol=1e-6)
    floored.temperature_logit.assign([-50.0, 50.0])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(floored.temperatures()), [1, 3], atol=1e-6
    )


def test_maps_do_not_depend_on_the_scale_of_the_features():
    """VGG's conv5 activations are in the hundreds, MobileNetV2's below 6: same maps."""
    features = np.random.uniform(0, 1, (2, 5, 5, 6)).astype("float32")
    layer = randomized(ChannelGrouping(2, hidden_units=3), features)
    # d_i reads GAP(F): fix it by zeroing the hidden kernel, so only F's scale changes.
    weights = layer.get_weights()
    weights[0][:] = 0
    layer.set_weights(weights)
    maps = [
        keras.ops.convert_to_numpy(layer(scale * features)["attention_maps"])
        for scale in (2, 1, 300)
    ]
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-2, atol=1e-6)  # up to the 1e-6 floor
    np.testing.assert_allclose(maps[2], maps[1], rtol=1e-2, atol=1e-6)
    flat = layer(np.full((1, 5, 5, 6), 7.0, "float32"))["attention_maps"]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(flat), 1 / 25, rtol=1e-5)
    zero = layer(np.zeros((1, 5, 5, 6), "float32"))["attention_maps"]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(zero), 1 / 25, rtol=1e-5)


def planted_hot_spots(count=32, size=6, channels=8, seed=0):
    """Noise features with channels 0-1 hot at one cell and channels 2-7 warm over a 3×3 decoy.

    The decoy holds more of the channel mean than the hot spot, so an untrained map that
    weighs every channel alike peaks on the decoy.
    """
    rng = np.random.default_rng(seed)
    features = rng.uniform(0, 0.5, (count, size, size, channels)).astype("float32")
    spots = rng.integers(0, size, (count, 2))
    for n, (row, col) in enumerate(spots):
        decoy = (row + size // 2) % size, (col + size // 2) % size
        features[
            n, max(decoy[0] - 1, 0) : decoy[0] + 2, max(decoy[1] - 1, 0) : decoy[1] + 2, 2:
        ] += 1.5
        features[n, row, col, :2] += 3.0
    return features, spots


def test_a_few_training_steps_put_most_of_the_mass_on_a_planted_hot_spot():
    features, spots = planted_hot_spots()
    inputs = keras.Input(features.shape[1:])
    grouping = ChannelGrouping(1, name="grouping")
    outputs = grouping(inputs)
    # The part feature's response to the hot-spot channels is what the part has to find.
    model = keras.Model(inputs, keras.ops.mean(outputs["part_features"][:, 0, :2], axis=-1))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=lambda y, response: -response)
    maps_model = keras.Model(inputs, outputs["attention_maps"])

    def mass_on_spots():
        maps = maps_model.predict(features, verbose=0)[..., 0]
        return maps[np.arange(len(maps)), spots[:, 0], spots[:, 1]].mean()

    before = mass_on_spots()
    model.fit(features, np.zeros(len(features)), batch_size=32, epochs=60, verbose=0)
    after = mass_on_spots()
    assert before < 0.05  # the untrained map looks at the decoy
    assert after > 0.5, (before, after)


def fixed_channel_weights(layer, features, weights):
    """Builds `layer` with `d_i` fixed at `weights` `(P, C)`, whatever the input."""
    layer(features)
    values = layer.get_weights()
    values[2][:] = 0  # channel_kernel: d_i no longer reads GAP(F)
    values[3][:] = np.log(weights / (1 - weights))  # channel_bias: sigmoid⁻¹(d)
    layer.set_weights(values)
    return layer


def test_parts_find_their_own_channels_beside_a_salient_cell():
    """The failure on MobileNetV2 features: one salient cell fires in every channel.

    Part 0 weighs channels 0-3 (d = 0.9) over 4-7 (d = 0.1), part 1 the reverse. Channels
    0-3 peak at one cell, 4-7 at another, and all eight fire twice as strongly at a third.
    With the signed weights 2d − 1, each part finds its own cell; with MA-CNN's d (computed
    here in NumPy), both would peak on the salient cell.
    """
    features = np.zeros((1, 5, 5, 8), "float32")
    features[0, 1, 1, :4] = 1.0  # part 0's cell
    features[0, 3, 3, 4:] = 1.0  # part 1's cell
    features[0, 2, 4, :] = 2.0  # the salient cell
    d = np.array([[0.9] * 4 + [0.1] * 4, [0.1] * 4 + [0.9] * 4])
    layer = fixed_channel_weights(ChannelGrouping(2), features, d)
    maps = keras.ops.convert_to_numpy(layer(features)["attention_maps"])[0]
    peaks = [np.unravel_index(maps[..., i].argmax(), (5, 5)) for i in range(2)]
    assert peaks == [(1, 1), (3, 3)]
    assert maps[1, 1, 0] > 0.5 and maps[3, 3, 1] > 0.5
    unsigned = np.einsum("hwc,pc->hwp", features[0], d)  # MA-CNN's response, up to a scale.
    assert [np.unravel_index(unsigned[..., i].argmax(), (5, 5)) for i in range(2)] == [(2, 4)] * 2


def test_part_features_pool_with_the_layers_own_maps():
    features = np.random.normal(0, 3, (2, 5, 4, 6)).astype("float32")
    outputs = randomized(ChannelGrouping(2), features)(features)
    maps = keras.ops.convert_to_numpy(outputs["attention_maps"]).astype(np.float64)
    expected = np.zeros((2, 2, 6))
    for b in range(2):
        for i in range(2):
            for x in range(5):
                for y in range(4):
                    expected[b, i] += maps[b, x, y, i] * features[b, x, y]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(outputs["part_features"]), expected, atol=1e-5
    )


@pytest.mark.parametrize("feature_gradient", [False, True])
def test_maps_pass_gradients_to_the_features_only_when_asked(feature_gradient):
    import tensorflow as tf

    features = tf.constant(np.random.normal(1, 1, (2, 5, 4, 6)).astype("float32"))
    layer = randomized(ChannelGrouping(2, feature_gradient=feature_gradient), features.numpy())
    # Weighted so that no gradient cancels (the maps sum to one, a plain sum has none).
    weights = tf.constant(np.random.uniform(0, 1, (1, 5, 4, 2)).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(features)
        outputs = layer(features)
        map_loss = tf.reduce_sum(outputs["attention_maps"] * weights)
        part_loss = tf.reduce_sum(outputs["part_features"])
    map_gradient = tape.gradient(map_loss, features)
    assert (map_gradient is not None and np.abs(map_gradient).max() > 1e-6) == feature_gradient
    # The grouping FCs learn from the maps either way, the features from the part features.
    assert all(g is not None for g in tape.gradient(map_loss, layer.trainable_weights[:4]))
    assert np.abs(tape.gradient(part_loss, features)).max() > 1e-3


def test_weights_are_batched_and_named():
    layer = ChannelGrouping(4)
    layer.build((None, 7, 7, 10))
    shapes = {w.name: tuple(w.shape) for w in layer.trainable_weights}
    assert shapes == {
        "hidden_kernel": (4, 10, 8),  # hidden_units defaults to max(C // 16, 8)
        "hidden_bias": (4, 8),
        "channel_kernel": (4, 8, 10),
        "channel_bias": (4, 10),
        "temperature_logit": (4,),
    }
    layer = ChannelGrouping(2)
    layer.build((None, 7, 7, 1280))
    assert tuple(layer.hidden_kernel.shape) == (2, 1280, 80)
    layer = ChannelGrouping(4, hidden_units=3)
    layer.build((None, 7, 7, 10))
    assert tuple(layer.hidden_kernel.shape) == (4, 10, 3)
    assert tuple(layer.channel_kernel.shape) == (4, 3, 10)


def test_symbolic_and_eager_calls_agree_on_shapes():
    layer = ChannelGrouping(3)
    symbolic = layer(keras.Input((6, 5, 8)))
    eager = layer(np.random.rand(2, 6, 5, 8).astype("float32"))
    expected = {"attention_maps": (6, 5, 3), "part_features": (3, 8), "channel_weights": (3, 8)}
    assert {k: tuple(v.shape) for k, v in symbolic.items()} == {
        k: (None, *s) for k, s in expected.items()
    }
    assert {k: tuple(v.shape) for k, v in eager.items()} == {
        k: (2, *s) for k, s in expected.items()
    }
    assert layer.compute_output_shape((None, 6, 5, 8)) == {
        k: (None, *s) for k, s in expected.items()
    }


def test_config_round_trip():
    layer = ChannelGrouping(
        3,
        hidden_units=5,
        initial_temperature=0.3,
        min_temperature=0.1,
        max_temperature=3.0,
        kernel_initializer="he_normal",
        feature_gradient=True,
        name="grouping",
    )
    restored = ChannelGrouping.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, ChannelGrouping)
    assert restored.get_config() == layer.get_config()


def tiny_model(num_parts=2):
    inputs = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    grouping = ChannelGrouping(num_parts, name="grouping")(features)
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(grouping["part_features"]))
    return keras.Model(inputs, {"logits": logits, "attention_maps": grouping["attention_maps"]})


def test_fit_step_updates_the_grouping_weights():
    model = tiny_model()
    classifier = keras.Model(model.input, model.output["logits"])
    classifier.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [w.numpy().copy() for w in model.get_layer("grouping").trainable_weights]
    history = classifier.fit(
        np.random.rand(4, 8, 8, 3).astype("float32"),
        np.array([0, 1, 2, 0]),
        batch_size=4,
        epochs=1,
        verbose=0,
    )
    assert np.isfinite(history.history["loss"][0])
    after = model.get_layer("grouping").trainable_weights
    assert all(not np.allclose(b, a.numpy()) for b, a in zip(before, after))


def test_keras_save_and_load_give_identical_outputs(tmp_path):
    model = tiny_model()
    x = np.random.rand(2, 8, 8, 3).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    expected, actual = model.predict(x, verbose=0), restored.predict(x, verbose=0)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_parts": 0}, "Received: num_parts=0"),
        ({"num_parts": 2.0}, "Received: num_parts=2.0"),
        ({"num_parts": 2, "hidden_units": 0}, "Received: hidden_units=0"),
        ({"num_parts": 2, "max_temperature": 0}, "Received: max_temperature=0"),
        ({"num_parts": 2, "initial_temperature": -1.0}, "Received: initial_temperature=-1.0"),
        ({"num_parts": 2, "initial_temperature": 4.0}, "Received: initial_temperature=4.0"),
        ({"num_parts": 2, "min_temperature": -1}, "Received: min_temperature=-1"),
        ({"num_parts": 2, "min_temperature": 2.5}, "Received: initial_temperature=2.0"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChannelGrouping(**kwargs)


def test_bad_input_shapes_raise():
    with pytest.raises(ValueError, match=r"rank-4 input .* Received: input_shape=\(2, 8, 3\)"):
        ChannelGrouping(2)(np.zeros((2, 8, 3), "float32"))
    with pytest.raises(ValueError, match="channel dimension of the input must be known"):
        ChannelGrouping(2).build((None, 8, 8, None))


def test_mixed_float16_gives_float32_maps():
    features = np.random.normal(0, 3, (2, 5, 4, 6)).astype("float32")
    reference = randomized(ChannelGrouping(2), features)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = ChannelGrouping(2)
        layer(features)
        layer.set_weights(reference.get_weights())
        outputs = layer(features)
        symbolic = layer(keras.Input((5, 4, 6)))
        # Near float16's largest value, at the sharpest temperature: still finite maps.
        sharp = ChannelGrouping(2, hidden_units=2)
        sharp.build((None, 5, 4, 6))
        sharp.temperature_logit.assign([50.0, 50.0])
        huge = np.zeros((1, 5, 4, 6), "float32")
        huge[0, 2, 1] = 6e4
        extreme = keras.ops.convert_to_numpy(sharp(huge)["attention_maps"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(w.dtype == "float32" for w in layer.weights)
    dtypes = {"attention_maps": "float32", "channel_weights": "float32", "part_features": "float16"}
    assert {k: keras.backend.standardize_dtype(v.dtype) for k, v in outputs.items()} == dtypes
    assert {k: v.dtype for k, v in symbolic.items()} == dtypes
    # Only the float16 rounding of the inputs separates the two.
    np.testing.assert_allclose(
        outputs["attention_maps"], reference(features)["attention_maps"], rtol=1e-2, atol=1e-4
    )
    assert np.all(np.isfinite(extreme)) and np.all(extreme[0, 2, 1] > 0.999)


def test_tflite_builtins_match_keras(tmp_path):
    inputs = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(6, 3, padding="same")(inputs)
    model = keras.Model(inputs, ChannelGrouping(2, initial_temperature=2.0)(features))
    run = export_builtins_only(model, tmp_path / "model.tflite")
    x = np.random.rand(1, 8, 8, 3).astype("float32")
    actual = run(x)
    expected = model.predict(x, verbose=0)
    assert set(actual) == set(expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], atol=1e-4)

import keras
import numpy as np
import pytest

from keras_fg.models import (
    FeatureHead,
    create_backbone,
    create_model,
    extract_features,
    split_at_backbone,
    train_head,
    transfer_weights,
)
from keras_fg.models.bilinear_cnn import BilinearCNN

FAMILIES = {
    "gap": {},
    "bcnn": {"reduction_dim": 8, "projection_dim": 32},
    "macnn": {"num_parts": 2, "hidden_units": 8},
    "dasrbn": {"stream_dim": 4, "lstm_units": 8, "attention_units": 4},
}


def images(n=4, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_head_on_backbone_features_equals_the_model(family):
    model = create_model(family, 5, backbone="tiny", image_size=32, **FAMILIES[family])
    backbone, head = split_at_backbone(model)
    x = images()
    features = extract_features(model, x, batch_size=3)
    # DASRBN's backbone also returns its earlier block (64 channels) pooled to the grid.
    assert features.shape == (4, 4, 4, 192 if family == "dasrbn" else 128)
    np.testing.assert_allclose(features, backbone.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    whole = model.predict(x, verbose=0)
    split = head.predict(features, verbose=0)
    assert sorted(split) == sorted(whole)
    for key in whole:
        np.testing.assert_allclose(split[key], whole[key], rtol=1e-4, atol=1e-5)
    # The head shares the model's layers: no backbone variable, every head variable.
    backbone_ids = {id(v) for v in backbone.weights}
    assert not backbone_ids & {id(v) for v in head.weights}
    assert len(head.weights) + len(backbone.weights) == len(model.weights)


def test_extract_features_flips_and_reads_labelled_batches():
    import tensorflow as tf

    model = create_model("gap", 3, backbone="tiny", image_size=32)
    x = images(5)
    data = tf.data.Dataset.from_tensor_slices((x, np.arange(5))).batch(2)
    features, labels = extract_features(model, data, flip=True, dtype="float16")
    assert features.dtype == np.float16 and labels.tolist() == [0, 1, 2, 3, 4]
    expected = model.backbone.predict(x[:, :, ::-1], verbose=0)
    np.testing.assert_allclose(features, expected, rtol=1e-2, atol=1e-2)


def test_train_head_learns_with_the_joint_loss_and_leaves_the_backbone():
    keras.utils.set_random_seed(0)
    model = create_model("macnn", 2, backbone="tiny", image_size=32, num_parts=2, hidden_units=8)
    backbone_before = [v.numpy().copy() for v in model.backbone.weights]
    x = images(16, seed=1)
    x[8:, :16] = 255.0  # Class 1: a bright top half.
    y = np.array([0] * 8 + [1] * 8)
    features = extract_features(model, x)
    untrained = model.predict(x, verbose=0)["logits"]
    optimizer = keras.optimizers.Adam(1e-2)
    history = train_head(model, features, y, epochs=20, batch_size=8, optimizer=optimizer)
    for term in ("loss", "accuracy", "classification_loss", "part_loss", "channel_grouping_loss"):
        assert term in history.history
    assert history.history["classification_loss"][-1] < history.history["classification_loss"][0]
    assert history.history["accuracy"][-1] == 1.0
    # The full model now predicts with the trained head.
    trained = model.predict(x, verbose=0)["logits"]
    assert not np.allclose(trained, untrained)
    assert (trained.argmax(-1) == y).mean() == 1.0
    for before, after in zip(backbone_before, model.backbone.weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_feature_head_loss_is_the_models_joint_loss():
    model = create_model("gap", 3, backbone="tiny", image_size=32, label_smoothing=0.1)
    model.compile(optimizer="sgd")
    x, y = images(6), np.array([0, 1, 2, 0, 1, 2])
    head = FeatureHead(model)
    head.compile(optimizer="sgd")
    expected = model.evaluate(x, y, verbose=0, return_dict=True)
    got = head.evaluate(extract_features(model, x), y, verbose=0, return_dict=True)
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], expected["accuracy"])


def test_bad_inputs_raise_clear_errors():
    two_streams = BilinearCNN(
        create_backbone("tiny", image_size=32),
        3,
        second_backbone=create_backbone("tiny", image_size=32, name_prefix="second_"),
        reduction_dim=4,
    )
    with pytest.raises(ValueError, match="exactly one backbone"):
        split_at_backbone(two_streams)
    model = create_model("gap", 3, backbone="tiny", image_size=32)
    with pytest.raises(ValueError, match="Received: 4 features and 3 labels"):
        train_head(model, np.zeros((4, 4, 4, 128)), [0, 1, 2])
    with pytest.raises(ValueError, match="epochs=0"):
        train_head(model, np.zeros((3, 4, 4, 128)), [0, 1, 2], epochs=0)
    with pytest.raises(ValueError, match="yielded no images"):
        extract_features(model, np.zeros((0, 32, 32, 3), "float32"))


MIRRORED_HEAD_SCRIPT = """
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_fg.models import FeatureHead, create_model

rng = np.random.default_rng(0)
features = rng.uniform(0, 6, (8, 4, 4, 128)).astype("float32")
labels = np.arange(8) % 4


def one_step(initial):
    model = create_model("macnn", 4, backbone="tiny", image_size=32, num_parts=2, hidden_units=8)
    if initial is not None:
        model.set_weights(initial)
    start = [w.copy() for w in model.get_weights()]
    head = FeatureHead(model)
    head.compile(optimizer=keras.optimizers.SGD(0.5))
    head.fit(features, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return start, model.get_weights()


start, single = one_step(None)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    _, mirrored = one_step(start)
moved = max(float(np.abs(s - w).max()) for s, w in zip(start, single))
error = max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored))
print(json.dumps({"moved": moved, "error": error}))
"""


def test_feature_head_step_under_mirrored_strategy_equals_the_single_device_step():
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_HEAD_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["moved"] > 1e-3  # The step did change the weights...
    assert figures["error"] < 1e-5  # ...by the same amount on two replicas as on one.


def test_feature_head_honours_sample_weights():
    model = create_model("gap", 3, backbone="tiny", image_size=32)
    x, y = images(6), np.array([0, 1, 2, 0, 1, 2])
    features = extract_features(model, x)
    head = FeatureHead(model)
    head.compile(optimizer="sgd")
    weights = np.array([1, 1, 1, 0, 0, 0], "float32")
    weighted = head.evaluate(features, y, sample_weight=weights, verbose=0, return_dict=True)
    half = head.evaluate(features[:3], y[:3], verbose=0, return_dict=True)
    # Keras' reduction: Σ w·l / B, so zero weights halve the mean of the other three.
    np.testing.assert_allclose(weighted["loss"], half["loss"] / 2, rtol=1e-5)


def test_transfer_weights_grows_macnn_into_part_crops_with_the_same_predictions():
    plain = create_model("macnn", 5, backbone="tiny", image_size=64, num_parts=2, hidden_units=8)
    full = create_model(
        "macnn", 5, backbone="tiny", image_size=64, num_parts=2, hidden_units=8, part_crop_size=32
    )
    assert transfer_weights(plain, full) == ["classifier"]
    x = images(size=64)
    before, after = plain.predict(x, verbose=0), full.predict(x, verbose=0)
    for key in ("logits", "attention_maps", "part_logits"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-6)
    # The crops' rows start at zero, so their gradient can still move the logits.
    kernel = full.get_layer("classifier").get_weights()[0]
    rows = plain.get_layer("classifier").get_weights()[0].shape[0]
    np.testing.assert_array_equal(kernel[rows:], 0.0)
    np.testing.assert_array_equal(kernel[:rows], plain.get_layer("classifier").get_weights()[0])


def test_transfer_weights_rejects_a_missing_layer_or_a_shrinking_weight():
    small = create_model("gap", 5, backbone="tiny", image_size=32)
    large = create_model("gap", 7, backbone="tiny", image_size=32)
    with pytest.raises(ValueError, match="may only grow"):
        transfer_weights(large, small)
    other = create_model("bcnn", 5, backbone="tiny", image_size=32, reduction_dim=8)
    with pytest.raises(ValueError, match="has no layer"):
        transfer_weights(other, small)


# --------------------------------------------------------------------------- FeatureCache


def labelled_batches(x, labels, batch_size=3):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, labels)).batch(batch_size)


def test_feature_cache_holds_the_features_then_their_flips_in_memory_or_on_disk(tmp_path):
    from keras_fg.models import FeatureCache, feature_fingerprint

    model = create_model("gap", 3, backbone="tiny", image_size=32)
    x, y = images(7), np.arange(7) % 3
    expected = np.concatenate(
        [model.backbone.predict(x, verbose=0), model.backbone.predict(x[:, :, ::-1], verbose=0)]
    )
    memory = FeatureCache.build(model, labelled_batches(x, y), count=7, verbose=0)
    assert memory.in_memory and memory.labels.tolist() == [*y, *y]
    np.testing.assert_allclose(memory.features, expected, rtol=1e-5, atol=1e-5)
    fingerprint = feature_fingerprint(model.backbone, (x, y), 32, True)
    disk = FeatureCache.build(
        model,
        labelled_batches(x, y),
        count=7,
        directory=tmp_path,
        memory_budget=1000,  # Bytes: far below 14 maps of 4x4x128 float32.
        fingerprint=fingerprint,
        verbose=0,
    )
    assert not disk.in_memory and disk.path == tmp_path / f"features-{fingerprint}.npy"
    np.testing.assert_array_equal(np.asarray(disk.features), memory.features)
    # A complete file of the same fingerprint is read back, not computed again: the data
    # handed over this time has no batches at all.
    again = FeatureCache.build(
        model, [], count=7, directory=tmp_path, memory_budget=1000, fingerprint=fingerprint
    )
    np.testing.assert_array_equal(np.asarray(again.features), memory.features)
    # Other images, labels or backbone weights make another fingerprint.
    assert feature_fingerprint(model.backbone, (x, y + 1), 32, True) != fingerprint
    other = create_model("gap", 3, backbone="tiny", image_size=32)
    assert feature_fingerprint(other.backbone, (x, y), 32, True) != fingerprint
    with pytest.raises(ValueError, match="over the memory budget"):
        FeatureCache.build(model, labelled_batches(x, y), count=7, memory_budget=1000)


def test_feature_cache_dataset_epochs_depend_on_seed_and_epoch_alone():
    from keras_fg.models import FeatureCache

    features = np.arange(10, dtype="float32").reshape(10, 1, 1, 1)
    cache = FeatureCache(features, np.arange(10) % 2)

    def epochs(first, end):
        batches = cache.dataset(4, seed=3, epochs=(first, end))
        return [(f.numpy().ravel().tolist(), y.numpy().tolist()) for f, y in batches]

    whole, tail = epochs(0, 3), epochs(1, 3)
    assert len(whole) == 9 and whole[3:] == tail  # 3 batches an epoch, the last of 2.
    first_epoch = sorted(v for f, _ in whole[:3] for v in f)
    assert first_epoch == list(range(10))  # Each feature once per epoch...
    assert whole[:3] != whole[3:6]  # ...in a new order each epoch.
    for values, labels in whole:
        assert [int(v) % 2 for v in values] == labels
    in_order = [f.numpy().ravel().tolist() for f, _ in cache.dataset(4, shuffle=False)]
    assert in_order == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="non-empty and of one length"):
        FeatureCache(features, np.arange(9))


PREDICT_UNDER_STRATEGY_SCRIPT = """
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_fg.models import create_model, extract_features

x = np.random.default_rng(0).uniform(0, 255, (7, 32, 32, 3)).astype("float32")
single = create_model("macnn", 4, backbone="tiny", image_size=32, num_parts=2)
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    mirrored = create_model("macnn", 4, backbone="tiny", image_size=32, num_parts=2)
mirrored.set_weights(single.get_weights())
expected = single.predict_on_batch(x)
figures = {}
for name, outputs in (
    ("predict_on_batch", mirrored.predict_on_batch(x)),
    ("predict", mirrored.predict(x, batch_size=4, verbose=0)),
):
    figures[name] = {
        "rows": int(outputs["logits"].shape[0]),
        "error": max(float(np.abs(outputs[k] - expected[k]).max()) for k in expected),
    }
features = extract_features(mirrored, x, batch_size=5)
figures["extract_features"] = {
    "rows": int(features.shape[0]),
    "error": float(np.abs(features - single.backbone.predict(x, verbose=0)).max()),
}
print(json.dumps(figures))
"""


def test_a_model_built_under_a_mirrored_strategy_predicts_one_row_per_image():
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", PREDICT_UNDER_STRATEGY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for name, figure in figures.items():
        assert figure["rows"] == 7, name
        assert figure["error"] < 1e-5, name

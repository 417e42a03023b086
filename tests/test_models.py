"""The model families on the tiny backbone: build, train, save, phases, errors."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_fg.models import (
    ChannelGroupingInitializer,
    PhaseSchedule,
    cluster_channels,
    create_model,
)

FAMILIES = {
    "gap": {},
    "bcnn": {"reduction_dim": 16},
    "bcnn_compact": {"reduction_dim": 16, "projection_dim": 64},
    "macnn": {"num_parts": 2},
    "dasrbn": {"stream_dim": 8, "lstm_units": 16, "attention_units": 8, "dropout": 0.0},
    "pcb": {"num_stripes": 4},
}


def build(family, num_classes=4, image_size=64, **extra):
    options = dict(FAMILIES[family], **extra)
    name = "bcnn" if family.startswith("bcnn") else family
    return create_model(name, num_classes, backbone="tiny", image_size=image_size, **options)


@pytest.fixture(scope="module")
def bird_batch(cub_dir):
    """32 real CUB images of 4 species at 64 px, labels 0..3."""
    folders = sorted((cub_dir / "images").iterdir())[:4]
    images, labels = [], []
    for label, folder in enumerate(folders):
        for path in sorted(folder.glob("*.jpg"))[:8]:
            image = keras.utils.load_img(path, target_size=(64, 64))
            images.append(keras.utils.img_to_array(image))
            labels.append(label)
    order = np.random.default_rng(0).permutation(len(labels))  # Mix species in every batch.
    return np.stack(images)[order].astype("float32"), np.array(labels, dtype="int32")[order]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("image_size", [64, 96])
def test_builds_for_two_image_sizes(family, image_size):
    model = build(family, image_size=image_size)
    images = np.random.uniform(0, 255, (2, image_size, image_size, 3)).astype("float32")
    outputs = model.predict(images, verbose=0)
    assert outputs["logits"].shape == (2, 4)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    if family in ("macnn", "dasrbn"):
        maps = outputs["attention_maps"]
        grid = image_size // 8  # The tiny backbone's stride.
        assert maps.shape[1:3] == (grid, grid)
        sums = maps.reshape(2, grid * grid, -1).sum(axis=1)
        np.testing.assert_allclose(sums, 1.0, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_epoch_on_real_birds_lowers_the_training_loss(family, bird_batch, tmp_path):
    images, labels = bird_batch
    model = build(family)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    before = model.evaluate(images, labels, verbose=0, return_dict=True)
    history = model.fit(images, labels, batch_size=8, epochs=1, verbose=0, shuffle=False)
    after = model.evaluate(images, labels, verbose=0, return_dict=True)
    assert after["loss"] < before["loss"]
    # Every loss term of the family is reported on its own.
    assert "classification_loss" in history.history and "accuracy" in history.history
    if family == "macnn":
        assert {"part_loss", "channel_grouping_loss"} <= set(history.history)
    if family == "pcb":
        assert "part_loss" in history.history

    path = tmp_path / f"{family}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    expected = model.predict(images[:4], verbose=0)
    actual = reloaded.predict(images[:4], verbose=0)
    assert set(actual) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])
    # The reloaded model is compiled as saved, optimizer state included, and keeps training
    # with its own joint loss.
    assert reloaded.compiled and isinstance(reloaded.optimizer, keras.optimizers.Adam)
    assert int(reloaded.optimizer.iterations) == int(model.optimizer.iterations) > 0
    reloaded.fit(images[:8], labels[:8], verbose=0)


def test_user_loss_replaces_the_joint_objective():
    model = build("gap")
    model.compile(
        optimizer="sgd",
        loss={"logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
    )
    images = np.random.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    history = model.fit(images, {"logits": np.arange(8) % 4}, verbose=0)
    assert "classification_loss" not in history.history


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_epoch_metrics_over_a_dataset_of_unknown_length(drop_remainder):
    """The epoch's loss terms and accuracy are the means over its samples.

    keras_fg pipelines have an unknown length (unreadable images are skipped); Keras then
    ends each epoch with a step on the exhausted iterator, which once added an empty batch
    to every count. With a zero learning rate the weights do not move, so `fit`'s figures
    must equal those computed from `predict` on the same images.
    """
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = build("gap", image_size=32)
    images = np.random.uniform(0, 255, (96, 32, 32, 3)).astype("float32")
    labels = np.arange(96) % 4
    data = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .batch(32, drop_remainder=drop_remainder)
        .filter(lambda x, y: True)  # Unknown length, as a pipeline that skips files.
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    history = model.fit(data, epochs=2, verbose=0).history
    logits = model.predict(images, verbose=0)["logits"].astype("float64")
    log_probabilities = logits - logits.max(1, keepdims=True)
    log_probabilities -= np.log(np.exp(log_probabilities).sum(1, keepdims=True))
    cross_entropy = -log_probabilities[np.arange(96), labels].mean()
    accuracy = (logits.argmax(1) == labels).mean()
    for epoch in range(2):
        assert history["accuracy"][epoch] == pytest.approx(accuracy, abs=1e-6)
        assert history["classification_loss"][epoch] == pytest.approx(cross_entropy, rel=1e-5)
        assert history["loss"][epoch] == pytest.approx(cross_entropy, rel=1e-5)


def test_label_smoothing_changes_the_loss():
    images = np.random.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    labels = np.arange(8) % 4
    plain = build("gap")
    smoothed = build("gap", label_smoothing=0.2)
    smoothed.set_weights(plain.get_weights())
    for model in (plain, smoothed):
        model.compile(optimizer="sgd")
    logits = plain.predict(images, verbose=0)["logits"]
    one_hot = np.eye(4)[labels] * 0.8 + 0.2 / 4
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -(one_hot * log_softmax).sum(axis=1).mean()
    actual = smoothed.evaluate(images, labels, verbose=0, return_dict=True)["loss"]
    assert actual == pytest.approx(expected, rel=1e-4)


def _variables_by_group(model):
    grouping = {id(v) for v in model.channel_grouping_variables()}
    every = model.backbone.trainable_weights + [
        v for layer in model.layers if layer is not model.backbone for v in layer.trainable_weights
    ]
    return (
        [v for v in every if id(v) in grouping],
        [v for v in every if id(v) not in grouping],
    )


@pytest.mark.parametrize(
    "phase, grouping_moves, others_move",
    [("joint", True, True), ("channel_grouping", True, False), ("classification", False, True)],
)
def test_training_phases_freeze_what_they_say(phase, grouping_moves, others_move):
    model = build("macnn")
    # AdamW decays weights: a phase must keep even the decay off what it freezes.
    model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.1))
    images = np.random.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    labels = np.arange(8) % 4
    model.fit(images, labels, epochs=1, verbose=0)  # Builds the optimizer in the joint phase.
    grouping, others = _variables_by_group(model)
    assert grouping and others
    before = [v.numpy().copy() for v in grouping + others]
    model.set_phase(phase)
    model.fit(images, labels, epochs=1, verbose=0)
    after = [v.numpy() for v in grouping + others]
    moved = [not np.array_equal(b, a) for b, a in zip(before, after)]
    assert any(moved[: len(grouping)]) == grouping_moves
    assert all(moved[: len(grouping)]) == grouping_moves
    assert any(moved[len(grouping) :]) == others_move


def test_phase_schedule_switches_between_epochs_without_recompiling():
    model = build("macnn")
    model.compile(optimizer="sgd")
    images = np.random.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(model.phase)
    )
    schedule = PhaseSchedule(["channel_grouping", "classification"])
    model.fit(images, np.arange(8) % 4, epochs=3, verbose=0, callbacks=[schedule, record])
    assert seen == ["channel_grouping", "classification", "channel_grouping"]


def test_phase_errors():
    with pytest.raises(ValueError, match="Unknown phase.*Received: phase='warmup'"):
        build("macnn").set_phase("warmup")
    with pytest.raises(ValueError, match="only MA-CNN"):
        build("gap").set_phase("channel_grouping")


def test_channel_clustering_groups_channels_by_peak_position():
    # Channels 0-2 peak top-left, channels 3-5 bottom-right, on every image.
    features = np.random.uniform(0, 0.1, (10, 6, 6, 6)).astype("float32")
    features[:, 0, 0, :3] = 1.0
    features[:, 5, 5, 3:] = 1.0
    groups = cluster_channels(features, 2)
    assert groups.shape == (2, 6)
    np.testing.assert_array_equal(groups.sum(axis=0), np.ones(6))
    first = groups[:, 0].argmax()
    np.testing.assert_array_equal(groups[first], [1, 1, 1, 0, 0, 0])


def test_channel_grouping_initialisation_pretrains_soft_unsaturated_targets(bird_batch):
    images, _ = bird_batch
    model = build("macnn")
    result = model.initialize_channel_grouping(images, max_images=16, epochs=60, learning_rate=0.05)
    channels = model.backbone.output.shape[-1]
    assert result["groups"].shape == (2, channels)
    assert sum(result["group_sizes"]) == channels
    grouping = model.get_layer("channel_grouping")
    features = keras.Model(model.input, grouping.input).predict(images[:4], verbose=0)
    predicted = keras.ops.convert_to_numpy(grouping(features)["channel_weights"])
    # Each part's channel weights now follow its group's indicator...
    agreement = ((predicted > 0.5) == result["groups"][None]).mean()
    assert agreement > 0.9
    # ...towards the soft targets 0.1 / 0.9, even at a high learning rate: no sigmoid
    # saturates, so the part losses can still move every channel weight.
    assert 0.03 < predicted.min() and predicted.max() < 0.97
    # The BCE optimum of a 0.1 / 0.9 target is the target itself.
    np.testing.assert_allclose(np.median(predicted[:, result["groups"] > 0]), 0.9, atol=0.05)
    with pytest.raises(ValueError, match="Received: target_smoothing=0.5"):
        model.initialize_channel_grouping(images, target_smoothing=0.5)


def test_clustering_callback_runs_once_before_its_epoch(bird_batch):
    images, labels = bird_batch[0][:8], bird_batch[1][:8]
    model = build("macnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    callback = ChannelGroupingInitializer(images, at_epoch=1, verbose=0, epochs=1)
    model.fit(images, labels, epochs=1, verbose=0, callbacks=[callback])
    assert callback.result is None
    model.fit(images, labels, initial_epoch=1, epochs=3, verbose=0, callbacks=[callback])
    assert sum(callback.result["group_sizes"]) == model.backbone.output.shape[-1]
    with pytest.raises(ValueError, match="Received: at_epoch=-1"):
        ChannelGroupingInitializer(images, at_epoch=-1)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown model 'resnet'.*bcnn, dasrbn, gap, macnn"):
        create_model("resnet", 10)
    with pytest.raises(ValueError, match="mobilenetv2"):
        create_model("gap", 10, backbone="mobilenet_v9")


def test_bad_family_arguments():
    with pytest.raises(ValueError, match="Received: num_classes=1"):
        build("gap", num_classes=1)
    with pytest.raises(ValueError, match="Received: label_smoothing=1.5"):
        build("gap", label_smoothing=1.5)
    with pytest.raises(ValueError, match="class_names"):
        build("gap", class_names=["a", "b"])
    with pytest.raises(ValueError, match="Received: reduction_dim=0"):
        build("bcnn", reduction_dim=0)
    with pytest.raises(ValueError, match="second_backbone"):
        create_model("gap", 4, backbone="tiny", image_size=64, second_backbone="tiny")


def test_two_stream_bilinear_cnn():
    model = create_model(
        "bcnn", 4, backbone="tiny", image_size=64, second_backbone="tiny", reduction_dim=8
    )
    assert model.output["features"].shape[-1] == 64
    model.compile(optimizer="sgd")
    model.fit(np.random.uniform(0, 255, (4, 64, 64, 3)), np.arange(4), verbose=0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_outputs(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        for family in ("bcnn", "macnn", "dasrbn"):
            model = build(family)
            model.compile(optimizer="adam")
            images = np.random.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
            history = model.fit(images, np.arange(8) % 4, verbose=0)
            assert np.isfinite(history.history["loss"][0])
            outputs = model(images[:2])
            for key in ("logits", "probabilities", "features"):
                assert outputs[key].dtype == "float32", (family, key)
            if "attention_maps" in outputs:
                assert outputs["attention_maps"].dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras
    from keras_fg.models import create_model

    family, options = sys.argv[1], json.loads(sys.argv[2])
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = np.arange(8) % 4

    def one_step(initial):
        model = create_model(family, 4, backbone="tiny", image_size=32, **options)
        if initial is not None:
            model.set_weights(initial)
        start = [w.copy() for w in model.get_weights()]
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        model.fit(images, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return start, model.get_weights()

    start, single = one_step(None)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        _, mirrored = one_step(start)
    moved = max(float(np.abs(s - w).max()) for s, w in zip(start, single))
    error = max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored))
    print(json.dumps({"moved": moved, "error": error}))
    """
)


@pytest.mark.parametrize("family", ["gap", "macnn", "dasrbn"])
def test_mirrored_strategy_step_equals_the_single_device_step(family):
    options = {
        "gap": {},
        "macnn": {"num_parts": 2},
        # No dropout: the replicas would draw different masks.
        "dasrbn": {"stream_dim": 4, "lstm_units": 8, "attention_units": 4, "dropout": 0.0},
    }[family]
    import json

    result = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED_SCRIPT, family, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["moved"] > 1e-3  # The step did change the weights...
    assert figures["error"] < 1e-5  # ...by the same amount on two replicas as on one.


def test_full_macnn_classifies_part_crops_and_converts_to_tflite_builtins(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    model = create_model("macnn", 4, backbone="tiny", image_size=64, num_parts=2, part_crop_size=32)
    # Global pooled (128) + two attention-pooled parts (2 × 128) + two crops (2 × 128).
    assert model.output["features"].shape == (None, 640)
    images = np.random.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    model.compile(optimizer="adam")
    model.fit(images, np.arange(8) % 4, verbose=0)
    model.save(tmp_path / "full.keras")
    reloaded = keras.saving.load_model(tmp_path / "full.keras")
    expected = model.predict(images, verbose=0)["probabilities"]
    np.testing.assert_array_equal(reloaded.predict(images, verbose=0)["probabilities"], expected)

    from keras_fg.export import export_tflite

    ops = export_tflite(model, tmp_path / "full.tflite", "fp32")  # Builtin ops only, or raises.
    assert "BATCH_MATMUL" in ops or "FULLY_CONNECTED" in ops
    runner = Interpreter(model_path=str(tmp_path / "full.tflite")).get_signature_runner()
    for image, probabilities in zip(images[:3], expected[:3]):
        output = runner(images=image[None])["probabilities"]
        np.testing.assert_allclose(output[0], probabilities, atol=1e-4)


def test_full_macnn_crop_classifiers_have_their_own_loss_and_join_the_served_score():
    model = create_model("macnn", 4, backbone="tiny", image_size=64, num_parts=2, part_crop_size=32)
    images = np.random.default_rng(0).uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    labels = np.arange(8) % 4
    assert not model.get_layer("crop_classifiers").get_weights()[0].any()  # Start at zero.
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(images, labels, epochs=2, verbose=0)
    assert model.get_layer("crop_classifiers").get_weights()[0].any()  # Their own loss moved them.
    out = model.predict(images, verbose=0)
    assert out["crop_logits"].shape == (8, 2, 4)
    served = out["classifier_logits"] + out["part_logits"].mean(1) + out["crop_logits"].mean(1)
    np.testing.assert_allclose(out["logits"], served, rtol=1e-5, atol=1e-5)

    def cross_entropy(logits):
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -log_softmax[np.arange(len(labels)), labels]

    expected = sum(
        cross_entropy(out["part_logits"][:, i]) + cross_entropy(out["crop_logits"][:, i])
        for i in range(2)
    )
    part_loss = model.compute_loss_terms(labels, out)["part_loss"][1]
    np.testing.assert_allclose(np.asarray(part_loss), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric_loss", ["triplet", "circle"])
def test_reid_embedding_model_trains_with_its_metric_loss(metric_loss, tmp_path):
    model = build("gap", bnneck=True, triplet_weight=1.0, metric_loss=metric_loss)
    assert set(model.output) >= {"embedding", "features", "logits"}
    images = np.random.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    labels = np.repeat(np.arange(4), 2)  # Two images of each identity: every anchor has a positive.
    model.compile(optimizer="adam")
    history = model.fit(images, labels, epochs=2, batch_size=8, verbose=0, shuffle=False)
    term = history.history[f"{metric_loss}_loss"]
    assert term[0] > 0 and np.isfinite(term).all()
    model.save(tmp_path / "reid.keras")
    assert keras.saving.load_model(tmp_path / "reid.keras").metric_loss == metric_loss
    with pytest.raises(ValueError, match="Received: metric_loss='arcface'"):
        build("gap", bnneck=True, triplet_weight=1.0, metric_loss="arcface")


@pytest.mark.parametrize("weighting", ["class_weight", "sample_weight"])
def test_weights_change_the_gradient_exactly_as_in_plain_keras(weighting):
    """One SGD step of the joint loss equals one of Keras' own cross-entropy, weights included."""
    images = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = np.array([0, 0, 0, 0, 0, 1, 2, 3])
    options = {
        "class_weight": {"class_weight": {0: 0.25, 1: 3.0, 2: 1.0, 3: 0.5}},
        "sample_weight": {"sample_weight": np.linspace(0.0, 2.0, 8).astype("float32")},
    }[weighting]
    ours = build("gap", image_size=32)
    twin = build("gap", image_size=32)
    twin.set_weights(ours.get_weights())
    plain = keras.Model(twin.input, twin.output["logits"])
    plain.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ours.compile(optimizer=keras.optimizers.SGD(1.0))
    start = [w.copy() for w in ours.get_weights()]
    ours_loss = ours.fit(images, labels, batch_size=8, shuffle=False, verbose=0, **options)
    plain_loss = plain.fit(images, labels, batch_size=8, shuffle=False, verbose=0, **options)
    assert ours_loss.history["loss"][0] == pytest.approx(plain_loss.history["loss"][0], rel=1e-5)
    unweighted = build("gap", image_size=32)
    unweighted.set_weights(start)
    unweighted.compile(optimizer=keras.optimizers.SGD(1.0))
    unweighted.fit(images, labels, batch_size=8, shuffle=False, verbose=0)
    changed = False
    for a, b, c in zip(ours.get_weights(), plain.get_weights(), unweighted.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        changed = changed or not np.allclose(a, c, atol=1e-6)
    assert changed  # The weights did change the step.


def test_every_term_is_weighted_per_sample():
    """A sample of weight 0 leaves the per-sample terms as if it were not in the batch."""
    model = build("gap", bnneck=True, triplet_weight=1.0)
    images = np.random.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    labels = np.repeat(np.arange(4), 2)
    y_pred = model(images)
    weights = np.array([1, 1, 1, 1, 1, 1, 0, 0], "float32")
    terms = model.compute_loss_terms(keras.ops.convert_to_tensor(labels), y_pred)
    for name, (_, value) in terms.items():
        value = keras.ops.convert_to_numpy(value)
        assert value.shape == (8,), name  # Per-sample, as the contract says.
    model.compile(optimizer="sgd")
    total = model.compute_loss(images, labels, y_pred, sample_weight=weights)
    expected = sum(
        float((keras.ops.convert_to_numpy(v) * weights).sum() / 8) * w for w, v in terms.values()
    )
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_num_classes_accepts_numpy_integers():
    for family in ("gap", "macnn"):
        model = build(family, num_classes=np.int64(5))
        assert model.num_classes == 5 and type(model.num_classes) is int
    with pytest.raises(ValueError, match="Received: num_classes=True"):
        build("gap", num_classes=True)
    with pytest.raises(ValueError, match="Received: num_classes=2.5"):
        build("gap", num_classes=2.5)


def test_phase_switches_reuse_one_train_function_per_phase():
    model = build("macnn")
    model.compile(optimizer="sgd")
    images = np.random.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    functions = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: functions.append(model.train_function)
    )
    schedule = PhaseSchedule(["channel_grouping", "classification"])
    model.fit(images, np.arange(8) % 4, epochs=4, verbose=0, callbacks=[schedule, record])
    assert functions[0] is functions[2] and functions[1] is functions[3]
    assert functions[0] is not functions[1]


def test_partial_multi_optimizer_trains_a_frozen_backbones_head_and_reloads(tmp_path):
    from keras_fg.models.multi_optimizer import PartialMultiOptimizer

    model = build("macnn", image_size=32)
    slow = keras.optimizers.SGD(1e-3)
    mapping = keras.optimizers.OptimizerMap(
        keras.optimizers.SGD(0.1), {v.path: slow for v in model.backbone.trainable_weights}
    )
    model.compile(optimizer=PartialMultiOptimizer(mapping))
    model.optimizer.build(model.trainable_variables)
    images = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = np.arange(8) % 4
    backbone = [v.numpy().copy() for v in model.backbone.trainable_weights]
    model.set_backbone_trainable(False)  # Keras' MultiOptimizer refuses this subset.
    model.set_phase("channel_grouping")
    model.fit(images, labels, epochs=1, verbose=0)
    for before, after in zip(backbone, model.backbone.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())
    model.set_phase("joint")
    model.set_backbone_trainable(True)
    model.fit(images, labels, epochs=1, verbose=0)
    assert int(slow.iterations) == 1 and int(model.optimizer.iterations) == 2
    assert any(
        not np.array_equal(b, a.numpy()) for b, a in zip(backbone, model.backbone.trainable_weights)
    )
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert isinstance(reloaded.optimizer, PartialMultiOptimizer)
    reloaded.fit(images, labels, epochs=1, verbose=0)


def test_dasrbn_streams_read_two_depths_of_the_backbone():
    model = build("dasrbn")
    # The tiny backbone's last map (128 channels) and its penultimate block (64), on one grid.
    assert model.get_layer("stream_a").input.shape == (None, 8, 8, 128)
    assert model.get_layer("stream_b").input.shape == (None, 8, 8, 64)
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    probe = keras.Model(model.input, [model.get_layer(n).input for n in ("stream_a", "stream_b")])
    feature_a, feature_b = (np.asarray(f) for f in probe.predict(images, verbose=0))
    backbone = model.backbone
    direct_a = backbone.get_layer("conv4").output
    direct_b = backbone.get_layer("conv3").output
    expected_a, expected_b = keras.Model(backbone.input, [direct_a, direct_b]).predict(
        images, verbose=0
    )
    np.testing.assert_allclose(feature_a, expected_a, atol=1e-5)
    pooled_b = expected_b.reshape(2, 8, 2, 8, 2, 64).mean(axis=(2, 4))  # 16×16 -> 8×8
    np.testing.assert_allclose(feature_b, pooled_b, atol=1e-5)
    # A second backbone replaces the earlier block.
    second = build("dasrbn", second_backbone="tiny")
    assert second.get_layer("stream_a").input.shape[-1] == 128
    assert second.second_backbone is not None


def _attended_branch_against_numpy(model, images, source):
    """The attended branch's logits against W · LN(Σ_hw α_hw v_hw) + b, where v is
    `source(model, bilinear_outcomes)`."""
    probe = keras.Model(
        model.input,
        [model.get_layer("bilinear_outcomes").output, model.output["attention_maps"]],
    )
    bilinear, alpha = (np.asarray(t, np.float64) for t in probe.predict(images, verbose=0))
    attended = np.einsum("bhw,bhwc->bc", alpha, np.asarray(source(model, bilinear), np.float64))
    norm = model.get_layer("attended_norm")
    gamma, beta = norm.get_weights()
    mean, var = attended.mean(-1, keepdims=True), attended.var(-1, keepdims=True)
    normalised = (attended - mean) / np.sqrt(var + norm.epsilon) * gamma + beta
    kernel, bias = model.get_layer("attended_classifier").get_weights()
    logits = model.predict(images, verbose=0)["branch_logits"]
    assert logits.shape == (len(images), 3, model.num_classes)  # recurrent, global, attended
    np.testing.assert_allclose(logits[:, 2], normalised @ kernel + bias, rtol=1e-4, atol=1e-4)


def test_dasrbn_attended_classifier_reads_the_attention_pooled_second_stream():
    from keras_fg.models.backbones import earlier_channels

    def second_stream(model, bilinear):  # F_b: the two-depth backbone's earlier map.
        features = model.backbone.predict(images, verbose=0)
        return features[..., -earlier_channels(model.backbone) :]

    model = build("dasrbn")
    images = np.random.default_rng(1).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    _attended_branch_against_numpy(model, images, second_stream)


def test_dasrbn_attended_classifier_sends_no_gradient_into_the_features_it_reads():
    import tensorflow as tf

    images = np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)).astype("float32")

    model = build("dasrbn")
    lstm = model.get_layer("spatial_attention_lstm")
    lstm.attention_vector.assign(np.zeros(lstm.attention_vector.shape))  # α uniform, constant.

    def backbone_gradient(branch):
        with tf.GradientTape() as tape:
            branch_logits = model(images, training=False)["branch_logits"][:, branch]
            loss = tf.reduce_sum(branch_logits**2)
        gradients = tape.gradient(loss, model.backbone.trainable_weights)
        return sum(float(tf.reduce_sum(tf.abs(g))) for g in gradients if g is not None)

    # With α held constant, Σ α sg(F_b) reaches the backbone by no path at all.
    assert backbone_gradient(2) == 0.0
    assert backbone_gradient(0) > 0.0  # The recurrent branch does reach it: the test can fail.


def _check_fused_score(model, auxiliary, images, labels):
    """Served logits = z + mean of the `auxiliary` logits, probabilities their softmax, and
    the main classifier's cross-entropy on z, not on the fused score. Returns z."""
    outputs = {k: np.asarray(v, np.float64) for k, v in model.predict(images, verbose=0).items()}
    expected = outputs["classifier_logits"] + outputs[auxiliary].mean(axis=1)
    np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-5, atol=1e-5)
    softmax = np.exp(expected - expected.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(outputs["probabilities"], softmax, rtol=1e-4, atol=1e-6)
    assert np.abs(outputs["logits"] - outputs["classifier_logits"]).max() > 1e-3
    terms = model.compute_loss_terms(labels, model(images, training=False))
    z = outputs["classifier_logits"]
    log_softmax = z - z.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    expected_loss = -log_softmax[np.arange(len(labels)), labels]
    np.testing.assert_allclose(terms["classification_loss"][1], expected_loss, rtol=1e-4)
    return z


def test_dasrbn_serves_the_main_and_branch_classifiers_together_and_trains_each_alone():
    images = np.random.default_rng(3).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    labels = np.array([0, 1, 2, 1])
    model = build("dasrbn")
    z = _check_fused_score(model, "branch_logits", images, labels)
    # Without it, z is served.
    unfused = build("dasrbn", fuse_branch_logits=False)
    assert "classifier_logits" not in unfused.output
    unfused.set_weights(model.get_weights())
    np.testing.assert_allclose(
        unfused.predict(images, verbose=0)["logits"], z, rtol=1e-5, atol=1e-5
    )


def _planted_location_data(n, grid, channels, classes, seed):
    """Every cell shows a random class (a one-hot over the first `classes` channels) and
    noise; one marked cell (channel `classes` set) holds the label. Only that cell decides."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.2, (n, *grid, channels)).astype("float32")
    x += np.eye(channels, dtype="float32")[rng.integers(0, classes, (n, *grid))]
    labels = rng.integers(0, classes, n).astype("int32")
    rows, cols = rng.integers(0, grid[0], n), rng.integers(0, grid[1], n)
    x[np.arange(n), rows, cols, :classes] = 0.0
    x[np.arange(n), rows, cols, labels] = 1.0
    x[np.arange(n), rows, cols, classes] = 1.0
    return x, labels, (np.arange(n), rows, cols)


def test_dasrbn_attention_finds_a_planted_salient_location():
    from keras_fg.models import DASRBN

    keras.utils.set_random_seed(0)
    grid, channels, classes = (5, 6), 8, 4
    features = keras.Input((*grid, channels))
    identity = keras.Model(features, keras.layers.Identity()(features), name="feature_backbone")
    model = DASRBN(identity, classes, stream_dim=4, lstm_units=8, attention_units=8, dropout=0.0)
    x, y, _ = _planted_location_data(256, grid, channels, classes, seed=0)
    test_x, _, planted = _planted_location_data(128, grid, channels, classes, seed=1)

    def planted_mass():
        return model.predict(test_x, verbose=0)["attention_maps"][planted].mean()

    assert planted_mass() < 0.1  # About 1/30 before training.
    model.compile(optimizer=keras.optimizers.Adam(3e-2))
    model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    assert planted_mass() > 0.5


def test_macnn_serves_the_fused_and_part_classifiers_together_and_trains_each_alone():
    images = np.random.default_rng(5).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    model = build("macnn")
    z = _check_fused_score(model, "part_logits", images, np.array([0, 1, 2, 1]))
    # Without it, or without part losses: z is served.
    assert "classifier_logits" not in build("macnn", part_loss_weight=0.0).output
    unfused = build("macnn", fuse_part_logits=False)
    assert "classifier_logits" not in unfused.output
    for layer in unfused.layers:  # By name: the two graphs list their layers in other orders.
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    np.testing.assert_allclose(
        unfused.predict(images, verbose=0)["logits"], z, rtol=1e-5, atol=1e-5
    )

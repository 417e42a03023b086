"""PCB: horizontal stripes as parts, against NumPy; the metric losses read GAP(F) alone."""

import keras
import numpy as np
import pytest

from keras_fg.models import PCB, create_model

NUM_IDS, PER_ID = 4, 4


def reid_pcb(**options):
    return create_model(
        "pcb",
        NUM_IDS,
        backbone="tiny",
        image_size=(64, 32),  # An 8x4 grid on the tiny backbone.
        num_stripes=4,
        triplet_weight=1.0,
        center_loss_weight=5e-4,
        label_smoothing=0.1,
        **options,
    )


def batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (NUM_IDS * PER_ID, 64, 32, 3)).astype("float32")
    return images, np.repeat(np.arange(NUM_IDS), PER_ID)


def feature_map_of(model, images):
    return np.asarray(keras.Model(model.input, model.get_layer("global_pool").input)(images))


@pytest.mark.parametrize("descriptor", ["fused", "stripes"])
def test_outputs_against_numpy(descriptor):
    """features = [GAP(F), p_1..p_S] or [√w_s p_s/‖p_s‖]_s; embedding = GAP(F);
    logits = z + mean_s stripe_logits_s."""
    model = reid_pcb(bnneck=False, descriptor=descriptor)
    weights = np.array([0.1, 0.2, 0.3, 0.4], "float32")
    if descriptor == "stripes":
        model.get_layer("stripe_descriptor").part_weights.assign(weights)
    images, _ = batch()
    feature_map = feature_map_of(model, images)  # (B, 8, 4, C)
    stripes = feature_map.reshape(len(images), 4, 2, 4, -1).mean(axis=(2, 3))  # 2 rows each
    pooled = feature_map.mean(axis=(1, 2))
    outputs = model.predict(images, verbose=0)
    np.testing.assert_allclose(outputs["embedding"], pooled, rtol=1e-5, atol=1e-6)
    if descriptor == "fused":
        served = np.concatenate([pooled, stripes.reshape(len(images), -1)], axis=1)
    else:
        unit = stripes / np.linalg.norm(stripes, axis=-1, keepdims=True)
        served = (np.sqrt(weights)[None, :, None] * unit).reshape(len(images), -1)
    np.testing.assert_allclose(outputs["features"], served, rtol=1e-5, atol=1e-6)
    kernel, bias = (np.asarray(w) for w in model.get_layer("stripe_classifiers").weights)
    stripe_logits = np.einsum("bsc,sck->bsk", stripes, kernel) + bias
    np.testing.assert_allclose(outputs["part_logits"], stripe_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        outputs["logits"],
        outputs["classifier_logits"] + stripe_logits.mean(axis=1),
        rtol=1e-4,
        atol=1e-5,
    )


def test_part_loss_is_the_sum_of_the_stripe_cross_entropies():
    model = reid_pcb(bnneck=True)
    images, labels = batch()
    outputs = model(images, training=False)
    terms = model.compute_loss_terms(labels, outputs)
    assert model.loss_term_names() == [
        "classification_loss",
        "triplet_loss",
        "center_loss",
        "part_loss",
    ]
    weight, part_loss = terms["part_loss"]
    logits = np.asarray(outputs["part_logits"], "float64")  # (B, S, K)
    smoothed = np.full((len(labels), NUM_IDS), 0.1 / NUM_IDS)
    smoothed[np.arange(len(labels)), labels] += 0.9
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(smoothed[:, None, :] * log_softmax).sum(-1).sum(-1)
    assert weight == 1.0
    np.testing.assert_allclose(part_loss, expected, rtol=1e-5)


def test_the_stripe_classifiers_do_not_move_the_metric_losses():
    model = reid_pcb(bnneck=True)
    images, labels = batch()

    def metric_terms():
        terms = model.compute_loss_terms(labels, model(images, training=False))
        return [np.asarray(terms[name][1]) for name in ("triplet_loss", "center_loss")]

    before = metric_terms()
    layer = model.get_layer("stripe_classifiers")
    layer.kernel.assign(np.random.default_rng(1).normal(0, 1, layer.kernel.shape))
    for after, expected in zip(metric_terms(), before):
        np.testing.assert_array_equal(after, expected)


def test_trains_saves_and_reloads_to_identical_outputs(tmp_path):
    model = reid_pcb(bnneck=True)
    images, labels = batch()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(images, labels, batch_size=16, epochs=3, verbose=0, shuffle=False)
    assert {"part_loss", "triplet_loss", "center_loss"} <= set(history.history)
    assert history.history["loss"][-1] < history.history["loss"][0]
    descriptor = model.get_layer("stripe_descriptor")
    np.testing.assert_array_equal(descriptor.part_weights, np.full(4, 0.25, "float32"))
    parts = keras.Model(model.input, descriptor.input).predict(images, verbose=0)
    descriptor.adapt(parts, labels)
    path = tmp_path / "pcb.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded, PCB) and reloaded.num_stripes == 4
    adapted = reloaded.get_layer("stripe_descriptor").part_weights
    np.testing.assert_array_equal(adapted, descriptor.part_weights)
    expected, actual = model.predict(images, verbose=0), reloaded.predict(images, verbose=0)
    assert set(actual) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key])


def test_bad_arguments():
    with pytest.raises(ValueError, match="part_loss_weight"):
        reid_pcb(part_loss_weight=-1.0)
    with pytest.raises(ValueError, match="descriptor"):
        reid_pcb(descriptor="global")
    with pytest.raises(ValueError, match="at least `num_stripes`=9 rows"):
        create_model("pcb", 4, backbone="tiny", image_size=(64, 32), num_stripes=9)

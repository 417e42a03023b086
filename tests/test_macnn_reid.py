"""MA-CNN for re-identification: its metric losses read the global feature (issue #16).

With the batch-hard triplet and center losses on the fused vector `[GAP(F), p_1..p_P]`, the
part features of two images of one person (pooled wherever each image's map peaks) were
about as far apart as a negative pair's, and the triplet loss fell fastest by shrinking
every feature: on mini-MARS the backbone's last ReLU6 died within the warm-up and every
image got the same embedding.
"""

import keras
import numpy as np
import pytest

from keras_fg.models import MACNN, create_model

NUM_IDS, PER_ID = 4, 4


def reid_macnn(**options):
    return create_model(
        "macnn",
        NUM_IDS,
        backbone="tiny",
        image_size=(32, 16),
        bnneck=True,
        triplet_weight=1.0,
        center_loss_weight=5e-4,
        label_smoothing=0.1,
        **options,
    )


def batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (NUM_IDS * PER_ID, 32, 16, 3)).astype("float32")
    return images, np.repeat(np.arange(NUM_IDS), PER_ID)


def metric_terms(model, images, labels):
    terms = model.compute_loss_terms(labels, model(images, training=False))
    return {name: np.asarray(terms[name][1]) for name in ("triplet_loss", "center_loss")}


def test_the_embedding_is_the_global_average_of_the_feature_map():
    """e = GAP(F) (NumPy transcription); the served features keep the parts."""
    model = reid_macnn()
    images, _ = batch()
    feature_map = keras.Model(model.input, model.get_layer("global_pool").input)
    expected = np.asarray(feature_map(images)).mean(axis=(1, 2))
    outputs = model.predict(images, verbose=0)
    np.testing.assert_allclose(outputs["embedding"], expected, rtol=1e-5, atol=1e-6)
    channels = expected.shape[-1]
    assert model.centers.shape == (NUM_IDS, channels)
    assert outputs["features"].shape[-1] == (1 + model.num_parts) * channels


@pytest.mark.parametrize(
    "metric_embedding, parts_move_the_metric_loss", [("global", False), ("fused", True)]
)
def test_the_part_maps_do_not_move_the_metric_losses(metric_embedding, parts_move_the_metric_loss):
    """The cause of the collapse: a batch-hard triplet loss reading the part features."""
    model = reid_macnn(metric_embedding=metric_embedding)
    images, labels = batch()
    before = metric_terms(model, images, labels)
    parts_before = model.predict(images, verbose=0)["part_logits"]
    grouping = model.get_layer("channel_grouping")
    rng = np.random.default_rng(1)
    grouping.channel_kernel.assign(rng.normal(0, 1, grouping.channel_kernel.shape))
    assert not np.allclose(model.predict(images, verbose=0)["part_logits"], parts_before)
    after = metric_terms(model, images, labels)
    for name in before:
        moved = not np.allclose(after[name], before[name], rtol=1e-6, atol=1e-7)
        assert moved == parts_move_the_metric_loss, name


def test_a_few_reid_steps_give_finite_distinct_embeddings(tmp_path):
    model = reid_macnn()
    images, labels = batch()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(images, labels, batch_size=16, epochs=5, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"]).all()
    features = model.predict(images, verbose=0)["features"]
    assert np.isfinite(features).all()
    assert features.std(axis=0).mean() > 1e-3  # Not one embedding for every image.
    model.save(tmp_path / "reid.keras")
    reloaded = keras.saving.load_model(tmp_path / "reid.keras")
    assert reloaded.metric_embedding == "global"
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0)["embedding"],
        model.predict(images, verbose=0)["embedding"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_config_round_trip():
    model = reid_macnn(metric_embedding="fused")
    config = model.get_config()
    assert config["metric_embedding"] == "fused"
    rebuilt = MACNN.from_config(config)
    assert rebuilt.metric_embedding == "fused"
    assert rebuilt.output["embedding"].shape[-1] == (1 + rebuilt.num_parts) * 128


def test_classification_models_gain_no_embedding_output():
    model = create_model("macnn", NUM_IDS, backbone="tiny", image_size=(32, 16))
    assert "embedding" not in model.output


def test_bad_metric_embedding():
    with pytest.raises(ValueError, match="Received: metric_embedding='parts'"):
        reid_macnn(metric_embedding="parts")

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fg.losses import BatchHardTripletLoss, batch_hard_triplet_loss


def loop_batch_hard(labels, embeddings, margin, soft, metric):
    """Hermans et al.'s batch-hard loss, anchor by anchor."""

    def distance(a, b):
        if metric == "cosine":
            return 1.0 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
        return np.linalg.norm(a - b)

    losses = []
    for a in range(len(labels)):
        positives = [
            distance(embeddings[a], embeddings[p])
            for p in range(len(labels))
            if labels[p] == labels[a] and p != a
        ]
        negatives = [
            distance(embeddings[a], embeddings[n])
            for n in range(len(labels))
            if labels[n] != labels[a]
        ]
        if not positives or not negatives:
            losses.append(0.0)
            continue
        difference = max(positives) - min(negatives)
        losses.append(np.log1p(np.exp(difference)) if soft else max(0.0, difference + margin))
    return np.array(losses)


def pk_batch(rng, identities=4, images_per_identity=3, dim=8):
    labels = np.repeat(np.arange(identities), images_per_identity)
    embeddings = rng.normal(size=(len(labels), dim)).astype("float32")
    return labels, embeddings


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_matches_a_loop_over_anchors(soft, metric):
    labels, embeddings = pk_batch(np.random.default_rng(0))
    labels = np.append(labels, 9)  # an identity with a single image: no positive
    embeddings = np.concatenate([embeddings, embeddings[:1] + 0.1])
    expected = loop_batch_hard(labels, embeddings.astype(np.float64), 0.3, soft, metric)
    per_anchor = batch_hard_triplet_loss(labels, embeddings, margin=0.3, soft=soft, metric=metric)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(per_anchor), expected, atol=1e-5)
    assert (
        expected[-1] == 0.0 and expected[:-1].max() > 0
    )  # the lone anchor adds nothing; others do

    loss = BatchHardTripletLoss(margin=0.3, soft=soft, metric=metric)
    assert float(loss(labels[:, None], embeddings)) == pytest.approx(expected.mean(), abs=1e-5)


def test_well_separated_identities_give_zero_and_margin_matters():
    labels = [0, 0, 1, 1]
    embeddings = np.array([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]], "float32")
    # Hardest positive 1, hardest negative 3: zero below a margin of 2, then linear in it.
    assert float(BatchHardTripletLoss(margin=0.3)(labels, embeddings)) == 0.0
    assert float(BatchHardTripletLoss(margin=2.5)(labels, embeddings)) == pytest.approx(0.5)
    # A batch of a single identity has no negatives.
    assert float(BatchHardTripletLoss()([1, 1], embeddings[:2])) == 0.0


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("soft", [False, True])
def test_gradients_are_finite_when_embeddings_coincide(metric, soft):
    labels = tf.constant([0, 0, 1, 1, 2])
    # Images 0 and 1 (same identity) and images 3 and 4 (different identities) coincide.
    embeddings = tf.Variable([[1.0, 2.0], [1.0, 2.0], [0.5, -1.0], [2.0, 0.0], [2.0, 0.0]])
    with tf.GradientTape() as tape:
        loss = BatchHardTripletLoss(margin=1.0, soft=soft, metric=metric)(labels, embeddings)
    gradient = tape.gradient(loss, embeddings).numpy()
    assert np.all(np.isfinite(gradient))
    assert np.abs(gradient).sum() > 0


def test_computes_in_float32_and_fits():
    labels, embeddings = pk_batch(np.random.default_rng(1))
    assert batch_hard_triplet_loss(labels, embeddings.astype("float16")).dtype == "float32"
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile("sgd", BatchHardTripletLoss())
    history = model.fit(embeddings, labels, batch_size=12, epochs=2, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_serialization_round_trip(tmp_path):
    loss = BatchHardTripletLoss(margin=0.5, soft=True, metric="cosine", name="triplet")
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, BatchHardTripletLoss)
    assert restored.get_config() == loss.get_config()
    assert BatchHardTripletLoss.from_config(loss.get_config()).get_config() == loss.get_config()

    labels, embeddings = pk_batch(np.random.default_rng(2))
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile("sgd", loss)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert (
        isinstance(reloaded.loss, BatchHardTripletLoss)
        and reloaded.loss.get_config() == loss.get_config()
    )
    assert reloaded.evaluate(embeddings, labels, verbose=0) == pytest.approx(
        model.evaluate(embeddings, labels, verbose=0)
    )


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="margin=-0.1"):
        BatchHardTripletLoss(margin=-0.1)
    with pytest.raises(ValueError, match="metric='manhattan'"):
        BatchHardTripletLoss(metric="manhattan")
    with pytest.raises(ValueError, match="soft=yes"):
        batch_hard_triplet_loss([0, 1], np.zeros((2, 3)), soft="yes")
    with pytest.raises(ValueError, match="2-D"):
        batch_hard_triplet_loss([0, 1], np.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match="batch size"):
        batch_hard_triplet_loss([0, 1, 1], np.zeros((2, 3)))

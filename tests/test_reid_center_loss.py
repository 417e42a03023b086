"""Center loss (Wen et al. 2016): the loss and the centre update against NumPy, in a model."""

import keras
import numpy as np
import pytest

from keras_fg.losses import center_loss, updated_centers
from keras_fg.models import create_model


def numpy_center_loss(labels, embeddings, centers):
    return np.array([np.sum((x - centers[y]) ** 2) for x, y in zip(embeddings, labels)])


def numpy_updated_centers(labels, embeddings, centers, alpha):
    """Wen et al., Eq. 4, class by class."""
    new = centers.copy()
    for j in range(len(centers)):
        members = [x for x, y in zip(embeddings, labels) if y == j]
        delta = sum((centers[j] - x for x in members), np.zeros_like(centers[j]))
        delta = delta / (1 + len(members))
        new[j] = centers[j] - alpha * delta
    return new


def test_loss_and_update_match_numpy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 12)  # class 4 may be absent: its centre must stay
    labels[labels == 4] = 3
    embeddings = rng.normal(size=(12, 7)).astype("float32")
    centers = rng.normal(size=(5, 7)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(center_loss(labels, embeddings, centers)),
        numpy_center_loss(labels, embeddings, centers),
        rtol=1e-5,
    )
    for alpha in (0.5, 1.0):
        new = updated_centers(labels[:, None], embeddings, centers, alpha)
        new = keras.ops.convert_to_numpy(new)
        np.testing.assert_allclose(
            new, numpy_updated_centers(labels, embeddings, centers, alpha), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_array_equal(new[4], centers[4])


def test_repeated_updates_find_the_class_means():
    # Planted answer: fixed embeddings, centres from zero converge to each class's mean.
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 4)
    embeddings = (rng.normal(size=(3, 5)) * 3)[labels] + rng.normal(size=(12, 5))
    centers = np.zeros((3, 5), "float32")
    for _ in range(60):
        centers = keras.ops.convert_to_numpy(updated_centers(labels, embeddings, centers))
    means = np.stack([embeddings[labels == j].mean(0) for j in range(3)])
    np.testing.assert_allclose(centers, means, atol=1e-4)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="alpha=0"):
        updated_centers([0], [[1.0]], [[0.0]], alpha=0)
    with pytest.raises(ValueError, match="same dimension"):
        center_loss([0], [[1.0, 2.0]], [[0.0]])
    with pytest.raises(ValueError, match="must be 2-D"):
        center_loss([0], [1.0], [[0.0]])
    with pytest.raises(ValueError, match="center_loss_weight=-1"):
        create_model("gap", 3, backbone="tiny", image_size=16, center_loss_weight=-1)


def test_model_trains_the_term_moves_the_centres_and_reloads(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (16, 32, 16, 3)).astype("float32")
    y = np.repeat(np.arange(4), 4)
    model = create_model(
        "gap",
        4,
        backbone="tiny",
        image_size=(32, 16),
        bnneck=True,
        triplet_weight=1.0,
        center_loss_weight=5e-4,
    )
    assert model.loss_term_names() == ["classification_loss", "triplet_loss", "center_loss"]
    assert not any(v is model.centers for v in model.trainable_variables)
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # Only the centres may move.
    embedding = model.predict(x, verbose=0)["embedding"]
    expected_loss = numpy_center_loss(y, embedding, np.zeros((4, 128))).mean()
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(history.history["center_loss"][0], expected_loss, rtol=1e-4)
    np.testing.assert_allclose(
        model.centers.numpy(),
        numpy_updated_centers(y, embedding, np.zeros((4, 128)), 0.5),
        rtol=1e-4,
        atol=1e-5,
    )
    before = model.centers.numpy()
    model.evaluate(x, y, verbose=0)  # Evaluation reads the centres, never moves them.
    np.testing.assert_array_equal(model.centers.numpy(), before)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.center_loss_weight == 5e-4
    np.testing.assert_array_equal(loaded.centers.numpy(), before)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0)["features"], model.predict(x, verbose=0)["features"], atol=1e-6
    )

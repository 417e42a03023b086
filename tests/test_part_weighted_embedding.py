"""PartWeightedEmbedding: the descriptor and its Fisher weights against NumPy; a planted part."""

import keras
import numpy as np
import pytest

from keras_fg.layers import PartWeightedEmbedding
from keras_fg.layers.part_weighted_embedding import fisher_scores
from keras_fg.metrics import evaluate_reid


def fisher_scores_by_pairs(parts, labels, cameras):
    """The Fisher score of each part, pair by pair, as the docstring writes it."""
    scores = []
    for p in range(parts.shape[1]):
        matching, different = [], []
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                a, b = parts[i, p], parts[j, p]
                distance = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
                if labels[i] != labels[j]:
                    different.append(distance)
                elif cameras[i] != cameras[j]:
                    matching.append(distance)
        gap = max(np.mean(different) - np.mean(matching), 0)
        scores.append(gap**2 / (np.var(matching) + np.var(different)))
    return np.array(scores)


def planted(num_people=6, per_person=6, channels=16, seed=0):
    """Part 0 carries the identity (a fixed direction a person, plus noise); part 1 is noise
    alone; part 2 carries it too, under four times the noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_people), per_person)
    cameras = np.tile(np.arange(per_person) % 2, num_people)
    identity = rng.normal(size=(num_people, channels))[labels]
    noise = lambda: rng.normal(size=(len(labels), channels))  # noqa: E731
    parts = np.stack([identity + 0.3 * noise(), noise(), identity + 1.2 * noise()], axis=1)
    return parts.astype("float32"), labels, cameras


def test_descriptor_against_numpy_and_its_cosine_is_the_weighted_mean():
    rng = np.random.default_rng(1)
    parts = rng.normal(size=(5, 3, 8)).astype("float32")
    weights = np.array([0.5, 0.2, 0.3], "float32")
    layer = PartWeightedEmbedding()
    layer.build(parts.shape)
    layer.part_weights.assign(weights)
    unit = parts / np.linalg.norm(parts, axis=-1, keepdims=True)
    expected = (np.sqrt(weights)[None, :, None] * unit).reshape(5, 24)
    descriptor = np.asarray(layer(parts))
    np.testing.assert_allclose(descriptor, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(descriptor, axis=1), 1.0, rtol=1e-5)
    per_part_cosines = np.einsum("ipc,jpc->ijp", unit, unit)
    np.testing.assert_allclose(
        descriptor @ descriptor.T, per_part_cosines @ weights, rtol=1e-5, atol=1e-6
    )


def test_equal_weights_until_adapted_and_an_all_zero_part_stays_zero():
    layer = PartWeightedEmbedding()
    parts = np.zeros((2, 4, 3), "float32")
    parts[:, 0] = 1.0
    np.testing.assert_allclose(layer(parts), [[0.5 / np.sqrt(3)] * 3 + [0.0] * 9] * 2, atol=1e-7)
    np.testing.assert_array_equal(layer.part_weights, np.full(4, 0.25, "float32"))
    assert not layer.trainable_weights


def test_fisher_scores_against_a_pair_by_pair_transcription():
    parts, labels, cameras = planted()
    np.testing.assert_allclose(
        fisher_scores(parts, labels, cameras),
        fisher_scores_by_pairs(parts.astype("float64"), labels, cameras),
        rtol=1e-6,
    )


def test_adapt_finds_the_part_that_carries_the_identity():
    parts, labels, cameras = planted()
    layer = PartWeightedEmbedding()
    found = layer.adapt(parts, labels, cameras)
    weights = np.asarray(layer.part_weights)
    np.testing.assert_allclose(weights, found["part_weights"], rtol=1e-6)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
    assert weights[0] > weights[2] > weights[1]
    assert weights[1] < 0.01

    # And it retrieves people better than equal weights, on new images of the same kind.
    test_parts, test_labels, test_cameras = planted(seed=1)
    equal = PartWeightedEmbedding()

    def mean_average_precision(embedding):
        features = np.asarray(embedding(test_parts))
        query = np.arange(len(test_labels)) % 6 == 0
        return evaluate_reid(
            features[query], test_labels[query], test_cameras[query],
            features[~query], test_labels[~query], test_cameras[~query], metric="cosine",
        )["mAP"]  # fmt: skip

    assert mean_average_precision(layer) > mean_average_precision(equal) + 0.05


def test_without_cameras_every_pair_of_one_identity_matches():
    parts, labels, cameras = planted()
    scores = fisher_scores(parts, labels)
    expected = fisher_scores_by_pairs(parts.astype("float64"), labels, np.arange(len(labels)))
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_adapted_weights_save_and_reload(tmp_path):
    parts, labels, cameras = planted()
    inputs = keras.Input((3, 16))
    model = keras.Model(inputs, PartWeightedEmbedding(name="descriptor")(inputs))
    model.get_layer("descriptor").adapt(parts, labels, cameras)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(
        reloaded.get_layer("descriptor").part_weights, model.get_layer("descriptor").part_weights
    )
    np.testing.assert_array_equal(
        reloaded.predict(parts, verbose=0), model.predict(parts, verbose=0)
    )


def test_bad_inputs():
    parts, labels, cameras = planted()
    with pytest.raises(ValueError, match=r"\(B, P, C\)"):
        PartWeightedEmbedding()(np.zeros((2, 8), "float32"))
    layer = PartWeightedEmbedding()
    layer.build((None, 3, 16))
    with pytest.raises(ValueError, match=r"must be \(N, 3, C\)"):
        layer.adapt(parts[:, :2], labels, cameras)
    with pytest.raises(ValueError, match="one label per row"):
        layer.adapt(parts, labels[:-1], cameras)
    with pytest.raises(ValueError, match="one camera per row"):
        layer.adapt(parts, labels, cameras[:-1])
    with pytest.raises(ValueError, match="seen by two cameras"):
        layer.adapt(parts, labels, np.zeros_like(cameras))
    with pytest.raises(ValueError, match="pairs of two identities"):
        layer.adapt(parts, np.zeros_like(labels), cameras)
    np.testing.assert_array_equal(layer.part_weights, np.full(3, 1 / 3, "float32"))

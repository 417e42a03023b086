import keras
import numpy as np
import pytest

from keras_fg.metrics import (
    MeanPerClassAccuracy,
    classification_report,
    confusion_matrix,
    mean_per_class_accuracy,
    top_k_accuracy,
)

SCORES = np.array(
    [
        [0.1, 0.6, 0.3],  # label 1: top-1
        [0.5, 0.2, 0.3],  # label 2: second
        [0.2, 0.3, 0.5],  # label 0: third
        [0.7, 0.2, 0.1],  # label 0: top-1
    ]
)
LABELS = np.array([1, 2, 0, 0])


def loop_top_k(labels, scores, k):
    return np.mean([label in np.argsort(-row)[:k] for label, row in zip(labels, scores)])


def loop_mean_per_class(labels, predictions):
    recalls = []
    for c in np.unique(labels):
        of_class = [p for y, p in zip(labels, predictions) if y == c]
        recalls.append(np.mean([p == c for p in of_class]))
    return np.mean(recalls)


def random_problem(rng, num_images=60, num_classes=7):
    labels = rng.integers(0, num_classes, num_images)
    scores = rng.normal(size=(num_images, num_classes))
    scores[np.arange(num_images), labels] += 1.0  # better than chance
    return labels, scores


def test_top_k_accuracy_hand_computed():
    assert top_k_accuracy(LABELS, SCORES, 1) == 0.5
    assert top_k_accuracy(LABELS, SCORES, 2) == 0.75
    assert top_k_accuracy(LABELS, SCORES, 3) == 1.0
    assert top_k_accuracy(LABELS, SCORES, 10) == 1.0
    # A tie at the boundary counts as a hit (as tf.math.in_top_k).
    assert top_k_accuracy([1], [[0.5, 0.5, 0.0]], 1) == 1.0


def test_top_k_accuracy_matches_a_loop():
    labels, scores = random_problem(np.random.default_rng(0))
    for k in (1, 2, 5):
        assert top_k_accuracy(labels, scores, k) == pytest.approx(
            loop_top_k(labels, scores, k), abs=1e-12
        )


def test_mean_per_class_accuracy_hand_computed():
    labels = [0, 0, 1, 1, 1, 3]
    predictions = [0, 1, 1, 1, 0, 3]
    # Class 0: 1/2, class 1: 2/3, class 3: 1/1; class 2 never occurs in the labels and is excluded.
    expected = (1 / 2 + 2 / 3 + 1) / 3
    assert mean_per_class_accuracy(labels, predictions, num_classes=4) == pytest.approx(expected)
    assert mean_per_class_accuracy(labels, predictions) == pytest.approx(expected)
    assert mean_per_class_accuracy(LABELS, SCORES) == pytest.approx((1 + 0 + 1 / 2) / 3)


def test_mean_per_class_accuracy_and_confusion_matrix_match_loops():
    labels, scores = random_problem(np.random.default_rng(1))
    predictions = np.argmax(scores, axis=1)
    assert mean_per_class_accuracy(labels, scores) == pytest.approx(
        loop_mean_per_class(labels, predictions)
    )
    expected = np.zeros((7, 7), int)
    for y, p in zip(labels, predictions):
        expected[y, p] += 1
    np.testing.assert_array_equal(confusion_matrix(labels, scores), expected)
    np.testing.assert_array_equal(confusion_matrix(labels, predictions, num_classes=7), expected)


def test_classification_report():
    report = classification_report(LABELS, SCORES, class_names=["wren", "finch", "tern"])
    assert report == {
        "top1": 0.5,
        "top5": 1.0,
        "mean_per_class_accuracy": pytest.approx(0.5),
        "num_images": 4,
        "per_class_accuracy": {"wren": 0.5, "finch": 1.0, "tern": 0.0},
    }
    assert classification_report(LABELS, SCORES)["per_class_accuracy"] == {0: 0.5, 1: 1.0, 2: 0.0}


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="k=0"):
        top_k_accuracy(LABELS, SCORES, 0)
    with pytest.raises(ValueError, match="disagree on the number of images"):
        top_k_accuracy(LABELS[:3], SCORES, 1)
    with pytest.raises(ValueError, match="empty"):
        top_k_accuracy([], np.zeros((0, 3)), 1)
    with pytest.raises(ValueError, match="2-D"):
        top_k_accuracy(LABELS, SCORES[None], 1)
    with pytest.raises(ValueError, match="outside the 3 classes"):
        top_k_accuracy([0, 1, 2, 3], SCORES, 1)
    with pytest.raises(ValueError, match="disagree on the number of images"):
        mean_per_class_accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="predictions.*outside the 2 classes"):
        confusion_matrix([0, 1], [0, 2], num_classes=2)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix([0.5, 1], [0, 1])
    with pytest.raises(ValueError, match="class_names"):
        classification_report(LABELS, SCORES, class_names=["wren"])
    with pytest.raises(ValueError, match="num_classes=0"):
        MeanPerClassAccuracy(0)


def test_streaming_metric_equals_numpy_over_batches():
    labels, scores = random_problem(np.random.default_rng(2), num_images=50, num_classes=6)
    metric = MeanPerClassAccuracy(6)
    for start in range(0, 50, 16):  # batches of 16, 16, 16, 2
        metric.update_state(labels[start : start + 16], scores[start : start + 16])
    assert float(metric.result()) == pytest.approx(
        mean_per_class_accuracy(labels, scores), abs=1e-6
    )

    # One-hot labels and (B, 1) labels give the same counts.
    metric.reset_state()
    assert float(metric.result()) == 0.0
    metric.update_state(np.eye(6)[labels[:25]], scores[:25])
    metric.update_state(labels[25:, None], scores[25:])
    assert float(metric.result()) == pytest.approx(
        mean_per_class_accuracy(labels, scores), abs=1e-6
    )


def test_streaming_metric_sample_weight():
    metric = MeanPerClassAccuracy(2)
    # Class 0: weights 1 (right) and 3 (wrong) -> 1/4; class 1: right -> 1.
    metric.update_state(
        [0, 0, 1], [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], sample_weight=[1.0, 3.0, 1.0]
    )
    assert float(metric.result()) == pytest.approx((1 / 4 + 1) / 2)


def test_streaming_metric_in_compile_and_config_round_trip():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5)).astype("float32")
    y = rng.integers(0, 4, 40)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
    model.compile(
        "sgd",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[MeanPerClassAccuracy(4)],
    )
    evaluated = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    expected = mean_per_class_accuracy(y, model.predict(x, verbose=0))
    assert evaluated["mean_per_class_accuracy"] == pytest.approx(expected, abs=1e-6)

    restored = MeanPerClassAccuracy.from_config(MeanPerClassAccuracy(4, name="mpca").get_config())
    assert restored.num_classes == 4 and restored.name == "mpca"
    assert isinstance(
        keras.metrics.deserialize(keras.metrics.serialize(restored)), MeanPerClassAccuracy
    )

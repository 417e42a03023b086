"""Classification metrics: top-k accuracy, mean per-class accuracy, confusion matrix.

The functions work on NumPy arrays at evaluation time; `MeanPerClassAccuracy` is the streaming
Keras metric for `model.compile(metrics=...)`.
"""

import keras
import numpy as np
from keras import ops


def _is_positive_int(value):
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def _as_labels(labels, name="labels"):
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            f"`{name}` must be 1-D (one integer class per image). Received shape {labels.shape}."
        )
    if labels.size == 0:
        raise ValueError(f"`{name}` is empty: there is nothing to evaluate.")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(
                f"`{name}` must hold integer class indices. Received dtype {labels.dtype}."
            )
        labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(
            f"`{name}` must be non-negative class indices. Received a label {labels.min()}."
        )
    return labels


def _as_scores(scores, num_images):
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(
            f"`scores` must be 2-D (num_images, num_classes). Received shape {scores.shape}."
        )
    if scores.shape[0] != num_images:
        raise ValueError(
            f"`labels` and `scores` disagree on the number of images: {num_images} labels, "
            f"scores of shape {scores.shape}."
        )
    return scores


def _check_labels_in_range(labels, num_classes, name="labels"):
    if labels.max() >= num_classes:
        raise ValueError(
            f"`{name}` holds class {labels.max()}, outside the {num_classes} classes "
            f"(valid indices 0..{num_classes - 1})."
        )


def _labels_and_predictions(labels, predictions_or_scores, num_classes):
    """Returns (labels, predicted labels, num_classes) from class indices or a score matrix."""
    labels = _as_labels(labels)
    predictions = np.asarray(predictions_or_scores)
    if predictions.ndim == 2:
        scores = _as_scores(predictions, len(labels))
        predictions = np.argmax(scores, axis=1)
        inferred = scores.shape[1]
    else:
        predictions = _as_labels(predictions, "predictions")
        if len(predictions) != len(labels):
            raise ValueError(
                f"`labels` and `predictions` disagree on the number of images: "
                f"{len(labels)} vs {len(predictions)}."
            )
        inferred = int(max(labels.max(), predictions.max())) + 1
    if num_classes is None:
        num_classes = inferred
    elif int(num_classes) < 1:
        raise ValueError(f"`num_classes` must be at least 1. Received: num_classes={num_classes}")
    num_classes = int(num_classes)
    _check_labels_in_range(labels, num_classes)
    _check_labels_in_range(predictions, num_classes, "predictions")
    return labels, predictions, num_classes


def top_k_accuracy(labels, scores, k=1):
    """Fraction of images whose true class is among the `k` highest scores.

    A class ties into the top k when fewer than `k` classes score strictly higher than it (the
    rule of `tf.math.in_top_k`), so the result does not depend on how ties are broken.

    Args:
        labels: integer array `(N,)` of true classes.
        scores: array `(N, C)` of class scores (logits or probabilities).
        k: positive integer; `k >= C` gives 1.0.

    Returns:
        A float in [0, 1].

    Example:

    >>> top_k_accuracy([0, 1], [[0.9, 0.1], [0.8, 0.2]], k=1)
    0.5
    """
    if not _is_positive_int(k):
        raise ValueError(f"`k` must be a positive integer. Received: k={k}")
    labels = _as_labels(labels)
    scores = _as_scores(scores, len(labels))
    _check_labels_in_range(labels, scores.shape[1])
    true_scores = scores[np.arange(len(labels)), labels]
    num_higher = np.sum(scores > true_scores[:, None], axis=1)
    return float(np.mean(num_higher < k))


def confusion_matrix(labels, predictions_or_scores, num_classes=None):
    """Counts of (true class, predicted class) pairs.

    Args:
        labels: integer array `(N,)` of true classes.
        predictions_or_scores: integer array `(N,)` of predicted classes, or scores `(N, C)`
            whose argmax is the prediction.
        num_classes: number of classes; inferred from the scores' width or the largest label.

    Returns:
        An int64 array `(C, C)`; entry `[i, j]` counts images of class `i` predicted as `j`.
    """
    labels, predictions, num_classes = _labels_and_predictions(
        labels, predictions_or_scores, num_classes
    )
    counts = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _per_class_accuracy(matrix):
    """Recall of every class present in the labels: {class index: accuracy}."""
    totals = matrix.sum(axis=1)
    present = np.flatnonzero(totals)
    return {int(c): float(matrix[c, c] / totals[c]) for c in present}


def mean_per_class_accuracy(labels, predictions_or_scores, num_classes=None):
    """Mean over classes of the per-class accuracy (recall), so every class weighs the same.

        mean_per_class_accuracy = (1 / |C*|) · Σ_{c ∈ C*} #{i : y_i = c, ŷ_i = c} / #{i : y_i = c}

    where `C*` is the set of classes that occur in `labels`: classes absent from the labels are
    excluded rather than counted as 0.

    Args:
        labels: integer array `(N,)` of true classes.
        predictions_or_scores: integer array `(N,)` of predicted classes, or scores `(N, C)`.
        num_classes: number of classes; inferred when omitted.

    Returns:
        A float in [0, 1].
    """
    per_class = _per_class_accuracy(confusion_matrix(labels, predictions_or_scores, num_classes))
    return float(np.mean(list(per_class.values())))


def classification_report(labels, scores, class_names=None):
    """The standard fine-grained evaluation summary of a score matrix.

    Args:
        labels: integer array `(N,)` of true classes.
        scores: array `(N, C)` of class scores.
        class_names: optional sequence of `C` names used as keys of `per_class_accuracy`.

    Returns:
        A dict with `top1`, `top5`, `mean_per_class_accuracy` (fractions in [0, 1]),
        `num_images`, and `per_class_accuracy` ({class name or index: accuracy} for the classes
        present in `labels`).
    """
    labels = _as_labels(labels)
    scores = _as_scores(scores, len(labels))
    if class_names is not None and len(class_names) != scores.shape[1]:
        raise ValueError(
            f"`class_names` has {len(class_names)} names but the scores have "
            f"{scores.shape[1]} classes."
        )
    per_class = _per_class_accuracy(confusion_matrix(labels, scores))
    if class_names is not None:
        per_class = {class_names[c]: accuracy for c, accuracy in per_class.items()}
    return {
        "top1": top_k_accuracy(labels, scores, 1),
        "top5": top_k_accuracy(labels, scores, 5),
        "mean_per_class_accuracy": float(np.mean(list(per_class.values()))),
        "num_images": int(len(labels)),
        "per_class_accuracy": per_class,
    }


@keras.saving.register_keras_serializable(package="keras_fg")
class MeanPerClassAccuracy(keras.metrics.Metric):
    """Streaming mean per-class accuracy, for `model.compile(metrics=...)`.

    Keeps two confusion counts per class over all batches seen — how many images carry the
    class, and how many of them were predicted correctly — and reports

        result = (1 / |C*|) · Σ_{c ∈ C*} correct_c / total_c,   C* = {c : total_c > 0}.

    Args:
        num_classes: number of classes (the width of `y_pred`).
        name: name of the metric.
        dtype: dtype of the counts and the result.

    Call arguments:
        y_true: integer labels `(B,)` or `(B, 1)`, or one-hot labels `(B, C)`.
        y_pred: scores `(B, C)`; the argmax is the prediction.
        sample_weight: optional weights `(B,)`.

    Labels outside `[0, num_classes)` are ignored (they cannot raise inside a compiled graph);
    the NumPy `mean_per_class_accuracy` rejects them.

    Example:

    ```python
    model.compile("adam", "sparse_categorical_crossentropy",
                  metrics=["accuracy", keras_fg.metrics.MeanPerClassAccuracy(200)])
    ```
    """

    def __init__(self, num_classes, name="mean_per_class_accuracy", dtype=None):
        if not _is_positive_int(num_classes):
            raise ValueError(
                f"`num_classes` must be a positive integer. Received: num_classes={num_classes}"
            )
        super().__init__(name=name, dtype=dtype)
        self.num_classes = int(num_classes)
        self._direction = "up"
        self.total_counts = self.add_variable(
            shape=(self.num_classes,), initializer="zeros", dtype=self.dtype, name="total_counts"
        )
        self.correct_counts = self.add_variable(
            shape=(self.num_classes,), initializer="zeros", dtype=self.dtype, name="correct_counts"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] != 1:
            y_true = ops.argmax(y_true, axis=-1)  # one-hot labels
        y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        predicted = ops.reshape(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), (-1,))
        weights = ops.ones_like(y_true, dtype=self.dtype)
        if sample_weight is not None:
            weights = weights * ops.reshape(ops.cast(sample_weight, self.dtype), (-1,))
        true_one_hot = ops.one_hot(y_true, self.num_classes, dtype=self.dtype) * weights[:, None]
        correct = ops.cast(ops.equal(y_true, predicted), self.dtype)
        self.total_counts.assign_add(ops.sum(true_one_hot, axis=0))
        self.correct_counts.assign_add(ops.sum(true_one_hot * correct[:, None], axis=0))

    def result(self):
        present = ops.cast(self.total_counts > 0, self.dtype)
        recall = self.correct_counts / ops.maximum(self.total_counts, 1e-12)
        return ops.sum(recall * present) / ops.maximum(ops.sum(present), 1.0)

    def reset_state(self):
        for variable in (self.total_counts, self.correct_counts):
            variable.assign(ops.zeros_like(variable))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}

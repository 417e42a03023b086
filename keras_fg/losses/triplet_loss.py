"""Batch-hard triplet loss for metric learning (person re-identification)."""

import numbers

import keras
from keras import ops

METRICS = ("euclidean", "cosine")

# Distances are floored at sqrt(1e-12) = 1e-6: sqrt has an infinite slope at 0, and the
# distance of an embedding to itself (or to an identical one) is exactly 0.
_MIN_SQUARED_DISTANCE = 1e-12
# Stands in for "no negative in the batch" when taking the minimum over negatives.
_NO_NEGATIVE = 1e9


def _check_arguments(margin, soft, metric):
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or margin < 0:
        raise ValueError(f"`margin` must be a non-negative number. Received: margin={margin}")
    if not isinstance(soft, bool):
        raise ValueError(f"`soft` must be True or False. Received: soft={soft}")
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}. Received: metric={metric!r}")


def _pairwise_distances(embeddings, metric):
    """(B, B) distances between all embeddings, with a finite gradient everywhere."""
    if metric == "cosine":
        normalized = embeddings / ops.maximum(ops.norm(embeddings, axis=-1, keepdims=True), 1e-12)
        return 1.0 - ops.matmul(normalized, ops.transpose(normalized))
    squared_norms = ops.sum(ops.square(embeddings), axis=-1)
    squared = (
        squared_norms[:, None]
        + squared_norms[None, :]
        - 2.0 * ops.matmul(embeddings, ops.transpose(embeddings))
    )
    return ops.sqrt(ops.maximum(squared, _MIN_SQUARED_DISTANCE))


def batch_hard_triplet_loss(labels, embeddings, margin=0.3, soft=False, metric="euclidean"):
    """Batch-hard triplet loss of every anchor in a batch.

    For each anchor `a`, with `d` the distance between embeddings:

        d_ap = max_{p : y_p = y_a, p ≠ a} d(a, p)      hardest positive
        d_an = min_{n : y_n ≠ y_a}        d(a, n)      hardest negative
        loss_a = max(0, d_ap − d_an + margin)          (soft: log(1 + exp(d_ap − d_an)))

    An anchor whose identity has no other image in the batch (no positive), or a batch holding
    a single identity (no negative), gives a loss of 0; P×K identity sampling (K ≥ 2) avoids both.
    Everything is computed in float32. The Euclidean distance is `sqrt(max(‖a − b‖², 1e-12))`,
    so its gradient stays finite when two embeddings coincide.

    Args:
        labels: integer identity labels, `(B,)` or `(B, 1)`.
        embeddings: float embeddings `(B, D)`.
        margin: the hinge margin (ignored when `soft=True`).
        soft: use the soft-margin form `softplus(d_ap − d_an)`.
        metric: `"euclidean"` or `"cosine"` (1 − cos).

    Returns:
        A float32 tensor `(B,)` with the loss of each anchor; `BatchHardTripletLoss` averages it.

    Example:

    ```python
    labels = [0, 0, 1, 1]
    embeddings = [[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]]
    batch_hard_triplet_loss(labels, embeddings, margin=0.3)  # [0, 0, 0, 0]: well separated
    ```

    Reference:
        A. Hermans, L. Beyer, B. Leibe, "In Defense of the Triplet Loss for Person
        Re-Identification", arXiv:1703.07737, 2017.
    """
    _check_arguments(margin, soft, metric)
    embeddings = ops.cast(ops.convert_to_tensor(embeddings), "float32")
    labels = ops.reshape(ops.cast(ops.convert_to_tensor(labels), "int32"), (-1,))
    if len(embeddings.shape) != 2:
        raise ValueError(
            f"`embeddings` must be 2-D (batch, dim). Received shape {embeddings.shape}."
        )
    if (
        labels.shape[0] is not None
        and embeddings.shape[0] is not None
        and labels.shape[0] != embeddings.shape[0]
    ):
        raise ValueError(
            f"`labels` and `embeddings` disagree on the batch size: {labels.shape[0]} labels, "
            f"embeddings of shape {embeddings.shape}."
        )

    distances = _pairwise_distances(embeddings, metric)
    same_identity = ops.equal(labels[:, None], labels[None, :])
    not_itself = ops.logical_not(ops.eye(ops.shape(labels)[0], dtype="bool"))
    is_positive = ops.logical_and(same_identity, not_itself)
    is_negative = ops.logical_not(same_identity)

    # Distances are >= 0, so 0 is a neutral fill for the maximum over positives.
    hardest_positive = ops.max(ops.where(is_positive, distances, 0.0), axis=1)
    hardest_negative = ops.min(ops.where(is_negative, distances, _NO_NEGATIVE), axis=1)
    difference = hardest_positive - hardest_negative
    losses = ops.softplus(difference) if soft else ops.relu(difference + margin)
    has_triplet = ops.logical_and(ops.any(is_positive, axis=1), ops.any(is_negative, axis=1))
    return ops.where(has_triplet, losses, 0.0)


@keras.saving.register_keras_serializable(package="keras_fg")
class BatchHardTripletLoss(keras.losses.Loss):
    """Batch-hard triplet loss (Hermans et al. 2017), averaged over the anchors of a batch.

        loss = (1/B) · Σ_a max(0, max_p d(a, p) − min_n d(a, n) + margin)

    with positives `p ≠ a` of the anchor's identity and negatives `n` of any other identity
    (soft margin: `softplus(d_ap − d_an)`). Anchors with no positive or no negative in the
    batch contribute 0. See `batch_hard_triplet_loss`.

    Args:
        margin: the hinge margin, >= 0 (BoT uses 0.3); ignored when `soft=True`.
        soft: use the soft-margin form.
        metric: `"euclidean"` or `"cosine"`.
        reduction: how per-anchor losses are combined (Keras `Loss` reductions).
        name: name of the loss.
        dtype: dtype of the reduction; the loss itself is computed in float32.

    Call arguments:
        y_true: integer identity labels `(B,)` or `(B, 1)`.
        y_pred: embeddings `(B, D)`.

    Returns:
        A scalar: the mean loss over the anchors (with the default reduction).

    Example:

    ```python
    model.compile("adam", loss={"embedding": keras_fg.losses.BatchHardTripletLoss(margin=0.3),
                                "logits": "sparse_categorical_crossentropy"})
    ```

    Reference:
        A. Hermans, L. Beyer, B. Leibe, "In Defense of the Triplet Loss for Person
        Re-Identification", arXiv:1703.07737, 2017.
    """

    def __init__(
        self,
        margin=0.3,
        soft=False,
        metric="euclidean",
        reduction="sum_over_batch_size",
        name="batch_hard_triplet_loss",
        dtype=None,
    ):
        _check_arguments(margin, soft, metric)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.margin = margin
        self.soft = soft
        self.metric = metric

    def call(self, y_true, y_pred):
        return batch_hard_triplet_loss(
            y_true, y_pred, margin=self.margin, soft=self.soft, metric=self.metric
        )

    def get_config(self):
        return {
            **super().get_config(),
            "margin": self.margin,
            "soft": self.soft,
            "metric": self.metric,
        }

"""Center loss: pulls each embedding towards a running centre of its class (Wen et al. 2016)."""

import numbers

import keras
from keras import ops


def _check_inputs(labels, embeddings, centers):
    embeddings = ops.cast(ops.convert_to_tensor(embeddings), "float32")
    centers = ops.cast(ops.convert_to_tensor(centers), "float32")
    labels = ops.reshape(ops.cast(ops.convert_to_tensor(labels), "int32"), (-1,))
    if len(embeddings.shape) != 2 or len(centers.shape) != 2:
        raise ValueError(
            f"`embeddings` (batch, dim) and `centers` (num_classes, dim) must be 2-D. "
            f"Received shapes {embeddings.shape} and {centers.shape}."
        )
    if embeddings.shape[-1] is not None and embeddings.shape[-1] != centers.shape[-1]:
        raise ValueError(
            f"`embeddings` and `centers` must have the same dimension. Received shapes "
            f"{embeddings.shape} and {centers.shape}."
        )
    return labels, embeddings, centers


@keras.saving.register_keras_serializable(package="keras_fg")
def center_loss(labels, embeddings, centers):
    """Squared distance of every embedding to its class centre.

        loss_i = ‖x_i − c_{y_i}‖²

    The mean over the batch is the loss of Wen et al. as the re-ID "bag of tricks" uses it
    (Luo et al. 2019, weight 0.0005 beside the cross-entropy and triplet losses; the paper's
    ½ is folded into that weight). Computed in float32.

    Args:
        labels: integer class ids `(B,)` or `(B, 1)`, in `[0, num_classes)`.
        embeddings: float embeddings `(B, D)`.
        centers: the class centres `(num_classes, D)`.

    Returns:
        A float32 tensor `(B,)`: each sample's loss.

    Example:

    ```python
    center_loss([0, 1], [[1.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]])  # [1, 4]
    ```

    Reference:
        Y. Wen, K. Zhang, Z. Li, Y. Qiao, "A Discriminative Feature Learning Approach for
        Deep Face Recognition", ECCV 2016.
    """
    labels, embeddings, centers = _check_inputs(labels, embeddings, centers)
    own_centers = ops.take(centers, labels, axis=0)
    return ops.sum(ops.square(embeddings - own_centers), axis=-1)


@keras.saving.register_keras_serializable(package="keras_fg")
def updated_centers(labels, embeddings, centers, alpha=0.5):
    """The centres after one step of Wen et al.'s update rule (their Eq. 4).

        Δc_j = Σ_i δ(y_i = j) · (c_j − x_i) / (1 + Σ_i δ(y_i = j))
        c_j ← c_j − α · Δc_j

    Classes absent from the batch keep their centre. The embeddings are treated as constants
    (no gradient flows into them from the update).

    Args:
        labels: integer class ids `(B,)` or `(B, 1)`.
        embeddings: float embeddings `(B, D)`.
        centers: the current centres `(num_classes, D)`.
        alpha: the centres' learning rate, in (0, 1] (the paper and BoT: 0.5).

    Returns:
        The new centres, float32 `(num_classes, D)`.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"`alpha` must be in (0, 1]. Received: alpha={alpha}")
    labels, embeddings, centers = _check_inputs(labels, embeddings, centers)
    embeddings = ops.stop_gradient(embeddings)
    num_classes = centers.shape[0]
    one_hot = ops.one_hot(labels, num_classes, dtype="float32")  # (B, num_classes)
    counts = ops.sum(one_hot, axis=0)  # (num_classes,)
    sums = ops.matmul(ops.transpose(one_hot), embeddings)  # Σ_i δ(y_i = j) x_i
    delta = (counts[:, None] * centers - sums) / (1.0 + counts[:, None])
    return centers - alpha * delta

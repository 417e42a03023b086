"""Part-weighted embedding: one re-ID descriptor from several part features, each by its worth."""

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="keras_fg")
class PartWeightedEmbedding(keras.layers.Layer):
    """Concatenates L2-normalised part features, each scaled by the square root of its weight.

        e = [√w_1 x_1/‖x_1‖, ..., √w_P x_P/‖x_P‖]           Σ_p w_p = 1, w_p ≥ 0

    so that the cosine similarity of two descriptors is the weighted mean of their parts'
    cosine similarities, `cos(e, e') = Σ_p w_p cos(x_p, x'_p)`: each part counts as much as
    its weight says, whatever the scale of its features. With equal weights (the default,
    until `adapt`) it is PCB's descriptor of concatenated stripes, each normalised.

    `adapt` sets the weights from labelled training images by each part's Fisher score of
    its cosine distances `d_p(i, j) = 1 − cos(x_ip, x_jp)` (cf. Fisher's criterion):

        J_p = max(μ⁻_p − μ⁺_p, 0)² / (σ⁺_p² + σ⁻_p²)          w_p = J_p / Σ_q J_q

    where μ⁺, σ⁺² are the mean and variance over pairs of one identity seen by two different
    cameras (the pairs a re-ID query must match) and μ⁻, σ⁻² over pairs of two identities. A
    part whose distances part people from others well gets a large weight; one that moves
    as much within a person as between people (a pedestrian's feet, from frame to frame)
    gets a small one: a stripe of the body is a fixed place whose worth can be measured
    once (docs/reid.md#pcb-and-its-fisher-weighed-stripes).

    The weights are a non-trainable variable: `fit` leaves them alone, and they are saved
    and exported with the model.

    Args:
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: `(B, P, C)` part features.

    Returns:
        `(B, P·C)`: the descriptor, of unit norm.

    Example:

    >>> layer = PartWeightedEmbedding()
    >>> layer(keras.random.uniform((2, 3, 8))).shape
    (2, 24)
    """

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                f"PartWeightedEmbedding expects (B, P, C) part features with static P and C. "
                f"Received: input_shape={input_shape}"
            )
        num_parts = input_shape[1]
        self.part_weights = self.add_weight(
            shape=(num_parts,),
            initializer=keras.initializers.Constant(1.0 / num_parts),
            trainable=False,
            name="part_weights",
        )

    def call(self, inputs):
        # The squared norm is clamped: a part of dead ReLUs (all zeros) stays zero, not NaN.
        squared_norms = ops.sum(ops.square(inputs), axis=-1, keepdims=True)
        unit = inputs * ops.rsqrt(ops.maximum(squared_norms, 1e-24))
        scaled = unit * ops.sqrt(ops.cast(self.part_weights, inputs.dtype))[None, :, None]
        return ops.reshape(scaled, (-1, inputs.shape[1] * inputs.shape[2]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] * input_shape[2])

    def adapt(self, part_features, labels, cameras=None):
        """Sets the weights to the parts' Fisher scores on `part_features`; returns them.

        Every pair of images is compared (N² distances a part): pass a sample of at most a few
        thousand images.

        Args:
            part_features: `(N, P, C)` part features of training images (this layer's input).
            labels: `(N,)` identity labels.
            cameras: `(N,)` camera ids, or None. With them, the positive pairs are those of
                one identity across two cameras, as re-ID evaluation counts matches.

        Returns:
            dict with the weights `"part_weights"` and each part's `"fisher_scores"`.
        """
        features = np.asarray(part_features)
        if not self.built:
            self.build(features.shape)
        if features.ndim != 3 or features.shape[1] != self.part_weights.shape[0]:
            raise ValueError(
                f"`part_features` must be (N, {self.part_weights.shape[0]}, C). "
                f"Received: shape={features.shape}"
            )
        scores = fisher_scores(features, labels, cameras)
        if scores.sum() > 0:
            weights = scores / scores.sum()
        else:  # No part tells people apart better than another: keep them equal.
            weights = np.full(len(scores), 1.0 / len(scores))
        self.part_weights.assign(weights.astype("float32"))
        return {"part_weights": weights.tolist(), "fisher_scores": scores.tolist()}


def fisher_scores(part_features, labels, cameras=None):
    """Each part's Fisher score of its cosine distances between identities (see the layer)."""
    features = np.asarray(part_features, dtype="float64")
    if features.ndim != 3:
        raise ValueError(f"`part_features` must be (N, P, C). Received: shape={features.shape}")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(features):
        raise ValueError(
            f"`labels` must hold one label per row of `part_features`. "
            f"Received: {len(labels)} labels for {len(features)} rows"
        )
    upper = np.triu_indices(len(labels), 1)
    same = (labels[:, None] == labels[None, :])[upper]
    positive = same
    if cameras is not None:
        cameras = np.asarray(cameras).reshape(-1)
        if len(cameras) != len(labels):
            raise ValueError(
                f"`cameras` must hold one camera per row of `part_features`. "
                f"Received: {len(cameras)} cameras for {len(features)} rows"
            )
        positive = same & (cameras[:, None] != cameras[None, :])[upper]
    if not positive.any() or same.all():
        raise ValueError(
            "Part weights need pairs of one identity"
            + (" seen by two cameras" if cameras is not None else "")
            + " and pairs of two identities; the labels hold "
            + ("none of the first." if not positive.any() else "none of the second.")
        )
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    unit = features / np.maximum(norms, 1e-12)
    scores = []
    for part in range(features.shape[1]):
        distances = 1.0 - (unit[:, part] @ unit[:, part].T)[upper]
        matching, different = distances[positive], distances[~same]
        gap = max(different.mean() - matching.mean(), 0.0)
        scores.append(gap**2 / (matching.var() + different.var() + 1e-12))
    return np.asarray(scores)

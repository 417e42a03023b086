"""MA-CNN channel grouping loss: compact (Dis) and diverse (Div) part maps.

Both terms take part attention maps `maps` of shape `(B, H, W, P)`, map `i`
in `maps[..., i]` with value `m_i(x, y)` at grid cell `(x, y)`, such as the
`"attention_maps"` output of `keras_fg.layers.ChannelGrouping`. Each is
summed over positions and parts, averaged over the batch, and computed in
float32 whatever the dtype of `maps`.

Reference:
    - H. Zheng, J. Fu, T. Mei, J. Luo, "Learning Multi-Attention
      Convolutional Neural Network for Fine-Grained Image Recognition",
      ICCV 2017.
"""

import numbers

import keras
from keras import ops


def _as_maps(maps):
    maps = ops.cast(maps, "float32")
    if len(maps.shape) != 4:
        raise ValueError(
            "Attention maps must have rank 4 (batch, height, width, parts). "
            f"Received: maps.shape={tuple(maps.shape)}"
        )
    return maps


def distance_loss(maps, normalize_coordinates=False):
    """Distance loss of MA-CNN: pulls each part map into a blob round its peak.

        Dis(M_i) = Σ_{(x,y)} m_i(x,y) · [ (x − t_x)² + (y − t_y)² ]
        loss     = mean_b Σ_i Dis(M_i)

    where `(t_x, t_y)` is the cell of the peak (argmax) of `M_i`; no gradient
    flows through the choice of the peak. Coordinates are cell indices,
    `x ∈ {0..H−1}` along the height and `y ∈ {0..W−1}` along the width, so
    the loss grows with the square of the grid size (a uniform 28×28 map
    with its peak at the centre has `Dis ≈ 131`); with
    `normalize_coordinates=True` they are divided by `H − 1` and `W − 1` to
    lie in `[0, 1]`, which makes the loss independent of the resolution
    (the same map then has `Dis ≈ 0.18`).

    Args:
        maps: tensor `(B, H, W, P)` of attention maps.
        normalize_coordinates: bool, measure distances in `[0, 1]` instead
            of in cells.

    Returns:
        A float32 scalar.
    """
    maps = _as_maps(maps)
    shape = ops.shape(maps)
    height, width, parts = shape[1], shape[2], shape[3]
    peaks = ops.argmax(ops.reshape(maps, (-1, height * width, parts)), axis=1)  # (B, P)
    peak_rows = ops.cast(ops.floor_divide(peaks, width), "float32")[:, None, None, :]
    peak_cols = ops.cast(ops.mod(peaks, width), "float32")[:, None, None, :]
    rows = ops.cast(ops.arange(height), "float32")[None, :, None, None]
    cols = ops.cast(ops.arange(width), "float32")[None, None, :, None]
    squared_distance = ops.stop_gradient(
        _scaled_square(rows - peak_rows, height, normalize_coordinates)
        + _scaled_square(cols - peak_cols, width, normalize_coordinates)
    )
    return ops.mean(ops.sum(maps * squared_distance, axis=(1, 2, 3)))


def _scaled_square(offset, size, normalize):
    if normalize:
        offset = offset / ops.cast(ops.maximum(size - 1, 1), "float32")
    return offset * offset


def diversity_loss(maps, margin=2.0):
    """Diversity loss of MA-CNN: a hinge on the overlap of the part maps.

        Div(M_i) = Σ_{(x,y)} m_i(x,y) · max(0, max_{k≠i} m_k(x,y) − mrg / (H·W))
        loss     = mean_b Σ_i Div(M_i)

    The margin is in units of the uniform map's value `1 / (H·W)`, so that it
    means the same on every grid: `margin=2` counts another part's map only
    where it holds more than twice its uniform share. For maps that each sum
    to one, `Div(M_i) ∈ [0, 1)`: two maps that put mass `a` on the same cell
    cost about `a²` each, maps that are no more than `margin` times uniform
    wherever another map lives cost nothing, and maps with disjoint supports
    cost exactly 0. (Without the hinge, `Σ m_i · (max m_k − mrg)` has the
    margin enter as the constant `−mrg · P`, which changes no gradient.)

    The gradient flows through both `m_i` and the largest of the other
    maps. With a single part there is no `k ≠ i`, and the loss is 0.

    Args:
        maps: tensor `(B, H, W, P)` of attention maps, each summing to one.
        margin: float ≥ 0, `mrg` in multiples of `1 / (H·W)`. Default 2.0.

    Returns:
        A float32 scalar.
    """
    maps = _as_maps(maps)
    if maps.shape[-1] == 1:
        return ops.zeros((), "float32")
    shape = ops.shape(maps)
    threshold = margin / ops.cast(shape[1] * shape[2], "float32")
    # The largest other map is the top value, except where m_i is the top.
    top_two, _ = ops.top_k(maps, k=2)
    first, second = top_two[..., :1], top_two[..., 1:]
    largest_other = ops.where(maps >= first, second, first)
    return ops.mean(ops.sum(maps * ops.relu(largest_other - threshold), axis=(1, 2, 3)))


@keras.saving.register_keras_serializable(package="keras_fg")
class ChannelGroupingLoss:
    """MA-CNN channel grouping loss `L_cng = Σ_i Dis(M_i) + λ · Div(M_i)`.

        Dis(M_i) = Σ_{(x,y)} m_i(x,y) · [ (x − t_x)² + (y − t_y)² ]
        Div(M_i) = Σ_{(x,y)} m_i(x,y) · max(0, max_{k≠i} m_k(x,y) − mrg / (H·W))
        L_cng    = mean_b Σ_i ( Dis(M_i) + λ · Div(M_i) )

    See `distance_loss` and `diversity_loss` for the details (peak without
    gradient, coordinate units, the single-part case). The loss takes only
    the attention maps: it has no target, so it is called as
    `loss_fn(maps)` (not as a `keras.losses.Loss(y_true, y_pred)`), typically
    inside a model's `compute_loss`, added to the part classification
    losses: `L = Σ_i L_cls(Y⁽ⁱ⁾, Y*) + L_cng`. The result is a plain batch
    mean; under a distribution strategy, divide it by the number of replicas
    as Keras' own losses do.

    Args:
        margin: float ≥ 0, `mrg` of the diversity hinge, in multiples of
            the uniform value `1 / (H·W)`. Default 2.0.
        diversity_weight: float ≥ 0, `λ`. Default 1.0. Div is below 1 per
            part for maps that sum to one, as Dis is with coordinates in
            `[0, 1]`.
        normalize_coordinates: bool, measure distances in `[0, 1]` instead
            of in grid cells (where Dis grows with the square of the grid
            and swamps Div). Default True.

    Call arguments:
        maps: tensor `(B, H, W, P)` of attention maps, each summing to one
            over positions.

    Returns:
        A float32 scalar.

    Example:

    ```python
    grouping = keras_fg.layers.ChannelGrouping(num_parts=4)
    maps = grouping(keras.random.uniform((2, 14, 14, 32)))["attention_maps"]
    loss = ChannelGroupingLoss()(maps)
    ```

    Reference:
        - H. Zheng, J. Fu, T. Mei, J. Luo, "Learning Multi-Attention
          Convolutional Neural Network for Fine-Grained Image Recognition",
          ICCV 2017.
    """

    def __init__(self, margin=2.0, diversity_weight=1.0, normalize_coordinates=True):
        if not isinstance(margin, numbers.Real) or isinstance(margin, bool) or margin < 0:
            raise ValueError(f"`margin` must be a number >= 0. Received: margin={margin!r}")
        if (
            not isinstance(diversity_weight, numbers.Real)
            or isinstance(diversity_weight, bool)
            or diversity_weight < 0
        ):
            raise ValueError(
                "`diversity_weight` must be a number >= 0. "
                f"Received: diversity_weight={diversity_weight!r}"
            )
        if not isinstance(normalize_coordinates, bool):
            raise ValueError(
                "`normalize_coordinates` must be a bool. "
                f"Received: normalize_coordinates={normalize_coordinates!r}"
            )
        self.margin = float(margin)
        self.diversity_weight = float(diversity_weight)
        self.normalize_coordinates = normalize_coordinates

    def __call__(self, maps):
        distance = distance_loss(maps, normalize_coordinates=self.normalize_coordinates)
        diversity = diversity_loss(maps, margin=self.margin)
        return distance + self.diversity_weight * diversity

    def get_config(self):
        return {
            "margin": self.margin,
            "diversity_weight": self.diversity_weight,
            "normalize_coordinates": self.normalize_coordinates,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

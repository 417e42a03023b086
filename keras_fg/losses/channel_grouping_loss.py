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


def diversity_loss(maps, margin=0.25):
    """Diversity loss of MA-CNN: a hinge on the overlap of the part maps.

        m̂_k(x,y) = m_k(x,y) / max_{(x',y')} m_k(x',y')              map k relative to its peak
        Div(M_i) = Σ_{(x,y)} m_i(x,y) · max(0, max_{k≠i} m̂_k(x,y) − mrg)
        loss     = mean_b Σ_i Div(M_i)

    `Div(M_i)` is the share of part i's mass that lies where another part's
    map stands above `mrg` of its own peak, less the margin: in `[0, 1 − mrg]`
    for maps that sum to one, 0 for maps with disjoint supports, and
    `1 − mrg` for a part that sits entirely on another's peak. The other
    parts are read relative to their peaks, in `[0, 1]` as the paper's
    sigmoid maps are, because in absolute units (`max_k m_k − mrg/(H·W)`)
    flattening every map under the margin makes Div vanish: it then pushes
    the maps of a softmax towards uniform rather than apart
    (docs/design.md#the-channel-grouping-loss). Here a flat map overlaps
    everything. (Without the hinge, `Σ m_i · (max m̂_k −
    mrg)` has the margin enter as the constant `−mrg · P`, which changes no
    gradient.)

    The gradient flows through `m_i` and through the largest of the other
    maps, its peak included. With a single part there is no `k ≠ i`, and
    the loss is 0.

    Args:
        maps: tensor `(B, H, W, P)` of attention maps, each summing to one.
        margin: float in `[0, 1)`, `mrg` as a fraction of the other map's
            peak. Default 0.25.

    Returns:
        A float32 scalar.
    """
    maps = _as_maps(maps)
    if maps.shape[-1] == 1:
        return ops.zeros((), "float32")
    relative = maps / ops.maximum(ops.max(maps, axis=(1, 2), keepdims=True), 1e-12)
    # The largest other map is the top value, except where m̂_i is the top.
    top_two, _ = ops.top_k(relative, k=2)
    first, second = top_two[..., :1], top_two[..., 1:]
    largest_other = ops.where(relative >= first, second, first)
    return ops.mean(ops.sum(maps * ops.relu(largest_other - margin), axis=(1, 2, 3)))


@keras.saving.register_keras_serializable(package="keras_fg")
class ChannelGroupingLoss:
    """MA-CNN channel grouping loss `L_cng = Σ_i Dis(M_i) + λ · Div(M_i)`.

        Dis(M_i) = Σ_{(x,y)} m_i(x,y) · [ (x − t_x)² + (y − t_y)² ]
        Div(M_i) = Σ_{(x,y)} m_i(x,y) · max(0, max_{k≠i} m̂_k(x,y) − mrg)
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
        margin: float in `[0, 1)`, `mrg` of the diversity hinge, as a
            fraction of the other map's peak (`m̂_k = m_k / max m_k`).
            Default 0.25.
        diversity_weight: float ≥ 0, `λ`. Default 1.0. Div is below 1 per
            part, as Dis is with coordinates in
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

    def __init__(self, margin=0.25, diversity_weight=1.0, normalize_coordinates=True):
        if not isinstance(margin, numbers.Real) or isinstance(margin, bool) or not 0 <= margin < 1:
            raise ValueError(f"`margin` must be a number in [0, 1). Received: margin={margin!r}")
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

"""Soft spatial attention followed by a 2-D (multi-dimensional) LSTM over the feature grid."""

import keras
from keras import activations, initializers, ops, regularizers

_POOLINGS = ("last", "attention", "mean")
# The corner each sweep starts from, and the grid axes flipped to start there.
_CORNERS = {
    "top_left": (),
    "bottom_right": (1, 2),
    "top_right": (2,),
    "bottom_left": (1,),
}


@keras.saving.register_keras_serializable(package="keras_fg")
class SpatialAttentionLSTM(keras.layers.Layer):
    """Attention over locations, then a 2-D spatial LSTM run as an anti-diagonal wavefront.

    The attention-based spatially recurrent part of DASRBN (Wu & Wang). A small MLP scores
    every location of a `(B, H, W, C)` feature map, a softmax over the H·W positions turns the
    scores into an attention map, and a 2-D LSTM (Graves' multi-dimensional LSTM) reads the
    attended features in raster order, each cell seeing the cell above and the cell to its left:

        s_hw   = w2ᵀ tanh(W1 x_hw + b1)                          attention score
        α      = softmax_{h,w}(s)                                 Σ_hw α_hw = 1
        x̃_hw   = H·W · α_hw · x_hw                                attended input
        [i, f_up, f_left, o, g]
               = x̃_ij W + h_{i−1,j} U_up + h_{i,j−1} U_left + b
        i, f_up, f_left, o = recurrent_activation(·),  g = activation(·)
        c_ij   = f_up ⊙ c_{i−1,j} + f_left ⊙ c_{i,j−1} + i ⊙ g
        h_ij   = o ⊙ activation(c_ij)

    with `h` and `c` zero outside the grid. The factor H·W makes uniform attention
    (α = 1/HW) leave the features unchanged; without it the inputs shrink with the grid
    (by 784× on a 28×28 map) and the gates would see little but their biases.

    Cell (i, j) depends only on cells with a smaller i + j, so the layer computes one
    anti-diagonal d = i + j per step: H + W − 1 steps, each one matmul over the whole
    diagonal. The grid is skewed once (row i shifted right by i) so that every diagonal is
    a contiguous slice. The loop is a Python loop over the static grid size and unrolls into
    plain ops: a model with a fixed input size converts to TFLite builtins (no `WHILE`).

    Two forget gates add two cell states, so their biases start at zero (f_up + f_left ≈ 1)
    rather than at one as in Keras' `LSTM(unit_forget_bias=True)`: with both near σ(1) ≈ 0.73
    the cell state grows geometrically along the diagonals (at initialisation on a 14×14
    grid, a median |c| of about 10³ at the last cell instead of about 2). Even at zero bias,
    units whose two forget gates add up to more than one grow on large grids (28×28), the
    known instability of multi-dimensional LSTM cells (Leifert et al., JMLR 2016).

    With `directions` > 1 the grid is swept from several corners (Graves' multi-directional
    MDLSTM): sweep k flips the attended grid so that its corner comes first, runs the
    recurrence above, and flips back. The sweeps share the input kernel `W` (the attended
    grid is projected once) and each has its own `[U_up; U_left]` and bias; `"features"`
    concatenates the sweeps' pooled states, `[f_1, …, f_D]`. All sweeps run as one
    wavefront, stacked along the batch axis. With `pooling="attention"` every location
    reaches the output directly, and from every corner: the attention receives a gradient
    from each cell, not only through the last cell of one sweep.

    The layer computes in float32 under a mixed-precision policy (like `GroupNormalization`)
    and returns float32: such cell states can leave float16's range (±65504), and a softmax
    over hundreds of positions loses precision in float16.

    Args:
        units: Positive integer, size of the hidden and cell states and of `"features"`.
        attention_units: Positive integer, hidden size of the attention MLP. Defaults to
            `units`.
        activation: Activation of the candidate `g` and of the cell output. Defaults to
            `"tanh"`.
        recurrent_activation: Activation of the gates `i`, `f_up`, `f_left`, `o`. Defaults
            to `"sigmoid"`.
        pooling: What `"features"` holds:
            - `"last"` (default): `h` of the last cell (H−1, W−1), the only cell whose state
              has seen every location: the spatially recurrent summary of the whole grid,
              as in DASRBN.
            - `"attention"`: `Σ_hw α_hw h_hw`, the hidden states pooled with the attention
              map; every cell then reaches the output directly, a shorter gradient path on
              large grids.
            - `"mean"`: the average of all hidden states.
        directions: 1, 2 or 4, the sweeps over the grid, starting from the corners
            top-left; bottom-right; top-right; bottom-left, in that order (the first
            `directions` of them). Defaults to 1.
        kernel_initializer: Initializer of the input kernel `W` and of the attention
            MLP (`W1`, `w2`). Defaults to `"glorot_uniform"`.
        recurrent_initializer: Initializer of `[U_up; U_left]`. Defaults to `"orthogonal"`.
        bias_initializer: Initializer of `b`. Defaults to `"zeros"`.
        kernel_regularizer: Regularizer of `W`, `W1` and `w2`.
        recurrent_regularizer: Regularizer of `[U_up; U_left]`.
        bias_regularizer: Regularizer of `b` and `b1`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Weights: `attention_kernel` `W1` (C, A), `attention_bias` `b1` (A,),
    `attention_vector` `w2` (A, 1), `kernel` `W` (C, 5·units), `recurrent_kernel`
    `[U_up; U_left]` (directions, 2·units, 5·units) — the first `units` rows act on the cell
    above, in the sweep's own (flipped) frame — and `bias` `b` (directions, 5·units), gates
    ordered `[i, f_up, f_left, o, g]`.

    Call arguments:
        inputs: Feature map of shape `(batch, H, W, C)`; H, W and C must be known when the
            layer is built (a static input size).

    Returns:
        A dict with `"features"` `(batch, directions·units)` and `"attention_maps"` `(batch, H, W)`,
        the map α, which sums to one over the H·W positions. Both are float32.

    Example:

    >>> inputs = keras.Input((14, 14, 64))
    >>> outputs = SpatialAttentionLSTM(128)(inputs)
    >>> outputs["features"].shape, outputs["attention_maps"].shape
    ((None, 128), (None, 14, 14))

    Reference:
        - L. Wu, Y. Wang, "Where to Focus: Deep Attention-based Spatially Recurrent Bilinear
          Networks for Fine-Grained Visual Recognition", arXiv:1709.05769, 2017.
        - A. Graves, S. Fernández, J. Schmidhuber, "Multi-Dimensional Recurrent Neural
          Networks", ICANN 2007.
    """

    def __init__(
        self,
        units,
        attention_units=None,
        activation="tanh",
        recurrent_activation="sigmoid",
        pooling="last",
        directions=1,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        if not _is_positive_int(units):
            raise ValueError(f"`units` must be a positive integer. Received: units={units}")
        if attention_units is not None and not _is_positive_int(attention_units):
            raise ValueError(
                "`attention_units` must be a positive integer or None. "
                f"Received: attention_units={attention_units}"
            )
        if pooling not in _POOLINGS:
            raise ValueError(f"`pooling` must be one of {_POOLINGS}. Received: pooling={pooling!r}")
        if directions not in (1, 2, 4) or isinstance(directions, bool):
            raise ValueError(f"`directions` must be 1, 2 or 4. Received: directions={directions!r}")
        super().__init__(**kwargs)
        # Inputs are not cast down to float16 under mixed precision; `call` casts them up.
        self.autocast = False
        self.units = units
        self.attention_units = attention_units
        self.activation = activations.get(activation)
        self.recurrent_activation = activations.get(recurrent_activation)
        self.pooling = pooling
        self.directions = directions
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.recurrent_initializer = initializers.get(recurrent_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = regularizers.get(recurrent_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)

    def build(self, input_shape):
        _check_input_shape(input_shape)
        channels = input_shape[-1]
        attention_units = self.attention_units or self.units

        def add(name, shape, initializer, regularizer):
            # autocast=False: read as float32 even inside a float16 autocast scope.
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=initializer,
                regularizer=regularizer,
                autocast=False,
            )

        kernel_args = (self.kernel_initializer, self.kernel_regularizer)
        self.attention_kernel = add("attention_kernel", (channels, attention_units), *kernel_args)
        self.attention_bias = add(
            "attention_bias", (attention_units,), "zeros", self.bias_regularizer
        )
        self.attention_vector = add("attention_vector", (attention_units, 1), *kernel_args)
        self.kernel = add("kernel", (channels, 5 * self.units), *kernel_args)

        def recurrent_initializer(shape, dtype=None):
            # One (D·2·units, 5·units) draw: for D = 1 exactly the initializer's matrix.
            flat = self.recurrent_initializer((shape[0] * shape[1], shape[2]), dtype=dtype)
            return ops.reshape(flat, shape)

        self.recurrent_kernel = add(
            "recurrent_kernel",
            (self.directions, 2 * self.units, 5 * self.units),
            recurrent_initializer,
            self.recurrent_regularizer,
        )
        self.bias = add(
            "bias",
            (self.directions, 5 * self.units),
            self.bias_initializer,
            self.bias_regularizer,
        )

    @property
    def _math_dtype(self):
        # float32 under float16/bfloat16 policies; float64 stays float64.
        return keras.backend.result_type(self.variable_dtype, "float32")

    def call(self, inputs):
        _, height, width, channels = inputs.shape
        positions = height * width
        dtype = self._math_dtype

        def weight(variable):
            return ops.cast(variable, dtype)

        x = ops.reshape(ops.cast(inputs, dtype), (-1, positions, channels))
        hidden = ops.tanh(_matmul(x, weight(self.attention_kernel)) + weight(self.attention_bias))
        scores = _matmul(hidden, weight(self.attention_vector))  # (B, HW, 1)
        # Softmax over the last axis: over axis 1 TFLite would add two transposes.
        alpha = ops.softmax(ops.reshape(scores, (-1, positions)), axis=-1)
        attended = x * ops.reshape(alpha * positions, (-1, positions, 1))
        projected = _matmul(attended, weight(self.kernel))
        projected = ops.reshape(projected, (-1, height, width, 5 * self.units))
        alpha_grid = ops.reshape(alpha, (-1, height, width, 1))
        # Every sweep is the top-left sweep of a flipped grid; the sweeps are stacked along
        # the batch axis (sweep-major) and run as one wavefront.
        bias = weight(self.bias)
        corners = list(_CORNERS.values())[: self.directions]
        projected = _stack_sweeps(
            [_flip(projected, axes) + bias[k] for k, axes in enumerate(corners)], height, width
        )
        # After the skew, diagonal d is column d of rows max(0, d-W+1)..min(d, H-1). Unstacking
        # the columns once keeps the backward pass from building a full-size gradient per step.
        diagonals = ops.unstack(_skew(projected), axis=2)
        if self.pooling == "attention":
            alpha_grid = _stack_sweeps([_flip(alpha_grid, axes) for axes in corners], height, width)
            alpha_diagonals = ops.unstack(_skew(alpha_grid), axis=2)

        recurrent_kernel = weight(self.recurrent_kernel)
        pooled = 0.0
        for d in range(height + width - 1):
            first, last = max(0, d - width + 1), min(d, height - 1)
            z = diagonals[d][:, first : last + 1]  # (D·B, n, 5·units), rows first..last
            if d == 0:
                c_up = c_left = None
            else:
                # The previous diagonal holds rows first_prev..last_prev; one zero row on
                # each side stands for the neighbours outside the grid. Cell (i, d-i) finds
                # its upper neighbour at padded index i-first_prev and its left one at +1.
                offset = first - max(0, d - width)
                up = slice(offset, offset + last - first + 1)
                left = slice(offset + 1, offset + last - first + 2)
                h_padded, c_padded = (ops.pad(t, [[0, 0], [1, 1], [0, 0]]) for t in (h, c))
                neighbours = ops.concatenate([h_padded[:, up], h_padded[:, left]], axis=-1)
                z = z + self._recurrent_matmul(neighbours, recurrent_kernel)
                c_up, c_left = c_padded[:, up], c_padded[:, left]
            h, c = self._cell(z, c_up, c_left)
            if self.pooling == "attention":
                pooled = pooled + ops.sum(alpha_diagonals[d][:, first : last + 1] * h, axis=1)
            elif self.pooling == "mean":
                pooled = pooled + ops.sum(h, axis=1)

        if self.pooling == "last":
            features = h[:, 0]
        elif self.pooling == "attention":
            features = pooled
        else:
            features = pooled / positions
        features = _unstack_sweeps(features, self.directions)
        return {
            "features": features,
            "attention_maps": ops.reshape(alpha, (-1, height, width)),
        }

    def _recurrent_matmul(self, neighbours, recurrent_kernel):
        """Each sweep's `[h_up, h_left] @ [U_up; U_left]`, for sweeps stacked batch-major."""
        if self.directions == 1:
            return _matmul(neighbours, recurrent_kernel[0])
        _, rows, features = neighbours.shape
        per_sweep = ops.reshape(neighbours, (self.directions, -1, features))
        product = ops.matmul(per_sweep, recurrent_kernel)  # (D, B·n, 5·units)
        return ops.reshape(product, (-1, rows, 5 * self.units))

    def _cell(self, z, c_up, c_left):
        input_gate, forget_up, forget_left, output_gate, candidate = ops.split(z, 5, axis=-1)
        c = self.recurrent_activation(input_gate) * self.activation(candidate)
        if c_up is not None:
            c = (
                c
                + self.recurrent_activation(forget_up) * c_up
                + self.recurrent_activation(forget_left) * c_left
            )
        h = self.recurrent_activation(output_gate) * self.activation(c)
        return h, c

    def compute_output_shape(self, input_shape):
        _check_input_shape(input_shape)
        batch, height, width, _ = input_shape
        return {
            "features": (batch, self.directions * self.units),
            "attention_maps": (batch, height, width),
        }

    def compute_output_spec(self, inputs):
        # The default spec would carry the policy's compute dtype (float16), not float32.
        shapes = self.compute_output_shape(inputs.shape)
        return {
            name: keras.KerasTensor(shape, dtype=self._math_dtype) for name, shape in shapes.items()
        }

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "attention_units": self.attention_units,
            "activation": activations.serialize(self.activation),
            "recurrent_activation": activations.serialize(self.recurrent_activation),
            "pooling": self.pooling,
            "directions": self.directions,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "recurrent_initializer": initializers.serialize(self.recurrent_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "recurrent_regularizer": regularizers.serialize(self.recurrent_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
        }


def _is_positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_input_shape(input_shape):
    if len(input_shape) != 4:
        raise ValueError(
            "SpatialAttentionLSTM expects a 4-D feature map (batch, H, W, C). "
            f"Received: input_shape={tuple(input_shape)}"
        )
    if any(size is None for size in input_shape[1:]):
        raise ValueError(
            "SpatialAttentionLSTM needs a static spatial size: H, W and C must be known, "
            "because its wavefront loop unrolls over the H×W grid. Give the model a fixed "
            "input size, e.g. keras.Input((224, 224, 3)). "
            f"Received: input_shape={tuple(input_shape)}"
        )


def _matmul(x, kernel):
    """`x @ kernel` over the last axis of a 3-D `x`, written as one 2-D matmul.

    A 3-D @ 2-D `ops.matmul` becomes `tf.tensordot` on TensorFlow, which adds shape
    arithmetic (SHAPE, GATHER, REDUCE_PROD, PACK) to a TFLite graph; with static sizes a
    reshape to 2-D gives a plain FULLY_CONNECTED.
    """
    _, rows, features = x.shape
    product = ops.matmul(ops.reshape(x, (-1, features)), kernel)
    return ops.reshape(product, (-1, rows, kernel.shape[-1]))


def _flip(grid, axes):
    for axis in axes:
        grid = ops.flip(grid, axis=axis)
    return grid


def _stack_sweeps(grids, height, width):
    """D grids (B, H, W, F) -> (D·B, H, W, F), sweep-major."""
    if len(grids) == 1:
        return grids[0]
    return ops.reshape(ops.stack(grids, axis=0), (-1, height, width, grids[0].shape[-1]))


def _unstack_sweeps(features, directions):
    """(D·B, F), sweep-major -> (B, D·F): each sample's sweeps side by side."""
    if directions == 1:
        return features
    units = features.shape[-1]
    per_sweep = ops.reshape(features, (directions, -1, units))
    return ops.reshape(ops.transpose(per_sweep, (1, 0, 2)), (-1, directions * units))


def _skew(grid):
    """(B, H, W, F) -> (B, H, H+W-1, F) with out[:, i, i+j] = grid[:, i, j], zeros elsewhere.

    Padding each row with H zeros and re-reading the flat buffer with rows one shorter
    shifts row i right by i: element (i, j) sits at flat index i(N+1) + j = iN + (i+j)
    for N = H+W-1.
    """
    _, height, width, features = grid.shape
    diagonals = height + width - 1
    grid = ops.pad(grid, [[0, 0], [0, 0], [0, height], [0, 0]])
    flat = ops.reshape(grid, (-1, height * (diagonals + 1), features))
    return ops.reshape(flat[:, : height * diagonals], (-1, height, diagonals, features))

"""MA-CNN channel grouping: P part attention maps from one feature map."""

import numbers

import keras
from keras import ops

NORMALIZATIONS = ("softmax", "sum")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_positive_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0


@keras.saving.register_keras_serializable(package="keras_fg")
class ChannelGrouping(keras.layers.Layer):
    """MA-CNN channel grouping: part attention maps and part features.

    Each part `i = 1..P` weighs the channels of the feature map `F`
    `(B, H, W, C)` with its own two-layer FC network on the globally
    average-pooled features, and turns the weighted channel sum into an
    attention map over positions, which then pools its part feature:

        d_i = sigmoid(FC_i2(tanh(FC_i1(GAP(F)))))          channel weights, (B, C)
        M_i = normalise_over_positions(r_i)                 attention map, (B, H, W)
        p_i = Σ_{x,y} M_i(x,y) · F(x,y)                     part feature, (B, C)

    with `FC_i1(g) = g·W1_i + b1_i` (`C → hidden_units`) and
    `FC_i2(h) = h·W2_i + b2_i` (`hidden_units → C`). The P networks are
    batched: `hidden_kernel (P, C, hidden_units)`, `hidden_bias
    (P, hidden_units)`, `channel_kernel (P, hidden_units, C)` and
    `channel_bias (P, C)` are the layer's only weights, so
    `layer.trainable_weights` are exactly "the channel-grouping variables"
    that MA-CNN's alternating training updates on its own.

    The map normalisation is one of:

    - `"softmax"` (default, the authors' released model): a softmax over the
      `H·W` positions of a squashed response,

          r_i(x,y) = mean_c(d_ic · F_c(x,y))
          M_i      = softmax_{x,y}(sharpness · log(softplus(tanh(response_scale · r_i))))

      with `sharpness = 4` and `response_scale = 0.1` as released. Since
      `softmax(k·log s) = s^k / Σ s^k`, this is the `k`-th power of a
      bounded positive response (`softplus(tanh(·)) ∈ (0.31, 1.31)`),
      normalised: a peak is at most `(1.313/0.313)^4 ≈ 310` times the
      weakest position, so no single position can take all the mass.
    - `"sum"` (the paper's text): a sigmoid divided by its sum over positions,

          r_i(x,y) = Σ_c d_ic · F_c(x,y)
          M_i      = sigmoid(r_i) / Σ_{x,y} sigmoid(r_i)

      computed as the identical `softmax_{x,y}(log_sigmoid(r_i))`, which
      cannot divide by zero when every sigmoid underflows. `sharpness` and
      `response_scale` do not apply. Note that with hundreds of channels
      `Σ_c` saturates the sigmoid easily, flattening the map.

    Either way each map sums to one over its `H·W` positions. All of the
    attention math runs in float32, also under a mixed-precision policy:
    the weights are read in float32 and the inputs are cast up, so
    `attention_maps` and `channel_weights` are always float32;
    `part_features` are returned in the layer's compute dtype.

    Args:
        num_parts: int ≥ 1, the number of parts `P` (MA-CNN uses 2 or 4).
        hidden_units: int ≥ 1, width of each part's hidden FC layer. `None`
            (default) uses `C`, the input channels, as MA-CNN does
            (512 → 512 → 512 on VGG-19 conv5_4); then the layer has
            `2·P·C·(C+1)` weights, about 2.1 M for `P = 4, C = 512`. A
            squeeze-and-excitation-style `C // 16` is a much cheaper choice.
        normalization: `"softmax"` (default) or `"sum"`, see above.
        sharpness: positive float, the exponent `k` of the `"softmax"`
            normalisation (an inverse temperature). Default 4.0.
        response_scale: positive float, the scale applied to the mean
            response before `tanh` in the `"softmax"` normalisation.
            Default 0.1; features much larger or smaller than VGG's conv5
            activations may want another value, so that `tanh` is not
            saturated.
        kernel_initializer: initializer of `hidden_kernel` and
            `channel_kernel`. Default `"glorot_uniform"`. (MA-CNN overwrites
            the initial weights anyway by pre-training each `d_i` to a
            channel-cluster indicator vector.)
        bias_initializer: initializer of both biases. Default `"zeros"`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: feature map of shape `(B, H, W, C)`, `C` known.

    Returns:
        A dict of three tensors:

        - `"attention_maps"`: float32 `(B, H, W, P)`, map `i` in
          `[..., i]`, each summing to 1 over `(H, W)`;
        - `"part_features"`: `(B, P, C)`, `p_i` in `[:, i]`;
        - `"channel_weights"`: float32 `(B, P, C)`, `d_i` in `[:, i]`, the
          outputs that MA-CNN's clustering initialisation pre-trains.

    Example:

    ```python
    features = keras.random.uniform((2, 14, 14, 64))
    outputs = ChannelGrouping(num_parts=4)(features)
    outputs["attention_maps"].shape    # (2, 14, 14, 4)
    outputs["part_features"].shape     # (2, 4, 64)
    outputs["channel_weights"].shape   # (2, 4, 64)
    ```

    Reference:
        - H. Zheng, J. Fu, T. Mei, J. Luo, "Learning Multi-Attention
          Convolutional Neural Network for Fine-Grained Image Recognition",
          ICCV 2017.
    """

    def __init__(
        self,
        num_parts,
        hidden_units=None,
        normalization="softmax",
        sharpness=4.0,
        response_scale=0.1,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not _is_int(num_parts) or num_parts < 1:
            raise ValueError(
                f"`num_parts` must be an int >= 1. Received: num_parts={num_parts!r}"
            )
        if hidden_units is not None and (not _is_int(hidden_units) or hidden_units < 1):
            raise ValueError(
                "`hidden_units` must be None or an int >= 1. "
                f"Received: hidden_units={hidden_units!r}"
            )
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"`normalization` must be one of {NORMALIZATIONS}. "
                f"Received: normalization={normalization!r}"
            )
        if not _is_positive_number(sharpness):
            raise ValueError(
                f"`sharpness` must be a positive number. Received: sharpness={sharpness!r}"
            )
        if not _is_positive_number(response_scale):
            raise ValueError(
                "`response_scale` must be a positive number. "
                f"Received: response_scale={response_scale!r}"
            )
        self.num_parts = int(num_parts)
        self.hidden_units = None if hidden_units is None else int(hidden_units)
        self.normalization = normalization
        self.sharpness = float(sharpness)
        self.response_scale = float(response_scale)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def _check_input_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4:
            raise ValueError(
                "ChannelGrouping expects a rank-4 input (batch, height, width, "
                f"channels). Received: input_shape={input_shape}"
            )
        if input_shape[-1] is None:
            raise ValueError(
                "The channel dimension of the input must be known. "
                f"Received: input_shape={input_shape}"
            )
        return input_shape

    def build(self, input_shape):
        channels = self._check_input_shape(input_shape)[-1]
        hidden = channels if self.hidden_units is None else self.hidden_units
        parts = self.num_parts

        def weight(name, shape, initializer):
            # autocast=False: the attention math reads its weights in float32.
            return self.add_weight(
                name=name, shape=shape, initializer=initializer, autocast=False
            )

        self.hidden_kernel = weight("hidden_kernel", (parts, channels, hidden), self.kernel_initializer)
        self.hidden_bias = weight("hidden_bias", (parts, hidden), self.bias_initializer)
        self.channel_kernel = weight("channel_kernel", (parts, hidden, channels), self.kernel_initializer)
        self.channel_bias = weight("channel_bias", (parts, channels), self.bias_initializer)

    def call(self, inputs):
        features = ops.cast(inputs, "float32")
        pooled = ops.mean(features, axis=(1, 2))  # GAP(F), (B, C)
        hidden = ops.tanh(ops.einsum("bc,pch->bph", pooled, self.hidden_kernel) + self.hidden_bias)
        channel_weights = ops.sigmoid(
            ops.einsum("bph,phc->bpc", hidden, self.channel_kernel) + self.channel_bias
        )
        response = ops.einsum("bhwc,bpc->bhwp", features, channel_weights)
        if self.normalization == "softmax":
            response = response / features.shape[-1]  # Σ_c -> mean_c
            logits = self.sharpness * ops.log(
                ops.softplus(ops.tanh(self.response_scale * response))
            )
        else:
            logits = ops.log_sigmoid(response)  # softmax(log σ) = σ / Σ σ
        # Softmax over the H·W positions of each map.
        logits = logits - ops.max(logits, axis=(1, 2), keepdims=True)
        exp = ops.exp(logits)
        attention_maps = exp / ops.sum(exp, axis=(1, 2), keepdims=True)
        part_features = ops.einsum("bhwp,bhwc->bpc", attention_maps, features)
        return {
            "attention_maps": attention_maps,
            "part_features": ops.cast(part_features, self.compute_dtype),
            "channel_weights": channel_weights,
        }

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = self._check_input_shape(input_shape)
        return {
            "attention_maps": (batch, height, width, self.num_parts),
            "part_features": (batch, self.num_parts, channels),
            "channel_weights": (batch, self.num_parts, channels),
        }

    def compute_output_spec(self, inputs):
        # The base class would give every output the compute dtype.
        shapes = self.compute_output_shape(inputs.shape)
        dtypes = {
            "attention_maps": "float32",
            "part_features": self.compute_dtype,
            "channel_weights": "float32",
        }
        return {key: keras.KerasTensor(shapes[key], dtype=dtypes[key]) for key in shapes}

    def get_config(self):
        return {
            **super().get_config(),
            "num_parts": self.num_parts,
            "hidden_units": self.hidden_units,
            "normalization": self.normalization,
            "sharpness": self.sharpness,
            "response_scale": self.response_scale,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }

"""MA-CNN channel grouping: P part attention maps from one feature map."""

import math
import numbers

import keras
from keras import ops

# Added to the variance, relative to the mean square of the response: a constant map stays
# uniform and the standardisation does not depend on the scale of the features.
RELATIVE_EPSILON = 1e-3
ABSOLUTE_EPSILON = 1e-6  # Representable in float16 (TFLite fp16 constants): 0 · rsqrt(0) is NaN.


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_positive_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0


@keras.saving.register_keras_serializable(package="keras_fg")
class ChannelGrouping(keras.layers.Layer):
    """MA-CNN channel grouping: part attention maps and part features.

    Each part `i = 1..P` weighs the channels of the feature map `F`
    `(B, H, W, C)` with its own two-layer FC network on the globally
    average-pooled features. The weighted channel mean is standardised over
    the positions of the map and turned into an attention map by a softmax
    at a learned inverse temperature; the map then pools the part feature:

        F̄     = stop_gradient(F)                              (see `feature_gradient`)
        d_i   = sigmoid(FC_i2(tanh(FC_i1(GAP(F̄)))))          channel weights, (B, C)
        r_i   = Σ_c (2·d_ic − 1) · F̄_c / √C                   response, (B, H, W)
        z_i   = (r_i − mean_xy r_i) / sqrt(var_xy r_i + ε · mean_xy r_i² + 10⁻⁶)
        τ_i   = τ_min + (τ_max − τ_min) · sigmoid(θ_i)         inverse temperature
        M_i   = softmax_xy(τ_i · z_i)                          attention map, (B, H, W)
        p_i   = Σ_{x,y} M_i(x,y) · F(x,y)                      part feature, (B, C)

    with `FC_i1(g) = g·W1_i + b1_i` (`C → hidden_units`),
    `FC_i2(h) = h·W2_i + b2_i` (`hidden_units → C`) and `ε = 10⁻³`.

    The response weighs each channel by `2·d − 1`, in (−1, 1), where MA-CNN
    weighs by `d`: a part adds its own channels and subtracts the others, so
    the parts can peak apart instead of all on the most salient cell
    (docs/design.md#channel-grouping-and-part-attention). A sum of `C` terms
    of either sign grows as `√C`, hence the `√C`: it keeps `r` about the size
    of one channel, its square within float16's range, and its variance
    above the `10⁻⁶` floor of the standardisation.

    The standardisation makes the map independent of the scale of the
    features (VGG's conv5 activations are in the hundreds, MobileNetV2's
    ReLU6 outputs below 6), and `τ_i` alone sets how sharp the map can be:
    on an `H×W` grid `z` lies within `±sqrt(H·W − 1)`, so at `τ = 1` a
    response that stands out at one cell already puts most of the mass
    there (0.98 on 8×8), and at `τ → 0` the map is uniform (GAP). `τ_i` is
    learned, from `initial_temperature`, and kept in `(min_temperature,
    max_temperature)` by the sigmoid, so a map can neither collapse to one
    cell by accident nor flatten into a global average. (The authors' released
    model squashes the response instead,
    `softmax(4·log(softplus(tanh(0.1·r))))`, which bounds a map's peak to
    about 4× its minimum on features the size of MobileNetV2's.)

    The P networks are batched: `hidden_kernel (P, C, hidden_units)`,
    `hidden_bias (P, hidden_units)`, `channel_kernel (P, hidden_units, C)`,
    `channel_bias (P, C)` and `temperature_logit (P,)` (`θ`) are the
    layer's only weights, so `layer.trainable_weights` are exactly "the
    channel-grouping variables" that MA-CNN's alternating training updates
    on its own.

    All of the attention math runs in float32, also under a mixed-precision
    policy: the weights are read in float32 and the inputs are cast up, so
    `attention_maps` and `channel_weights` are always float32 and finite;
    `part_features` are returned in the layer's compute dtype.

    Args:
        num_parts: int ≥ 1, the number of parts `P` (MA-CNN uses 2 or 4).
        hidden_units: int ≥ 1, width of each part's hidden FC layer. `None`
            (default) uses `max(C // 16, 8)`, squeeze-and-excitation style;
            MA-CNN itself uses `C` (512 → 512 → 512 on VGG-19 conv5_4),
            `2·P·C·(C+1)` weights, 13 M for `P = 4, C = 1280`.
        initial_temperature: float strictly between `min_temperature` and
            `max_temperature`, `τ` at initialisation. Default 2.0.
        min_temperature: float ≥ 0, the lower bound of `τ`. Default 1.0: with
            `τ → 0` the parts flatten into global averages, all alike, and
            nothing pulls them back (measured on the synthetic set).
        max_temperature: positive float, the upper bound of `τ`. Default 4.0.
        kernel_initializer: initializer of `hidden_kernel` and
            `channel_kernel`. Default `"glorot_uniform"`.
        bias_initializer: initializer of both biases. Default `"zeros"`.
        feature_gradient: bool, whether gradients through the maps (from
            `L_cng` and from the part losses via `M_i`) reach the input
            features `F`. Default `False`: the maps are computed from
            `stop_gradient(F)`, so they are shaped by the channel-grouping
            FCs alone, as in MA-CNN's alternation, where `L_cng` never
            trains the convolutions; the backbone still learns from every
            classifier through `p_i`, which pools the live `F`. With `True`,
            `L_cng` also pulls on the backbone.
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
        initial_temperature=2.0,
        max_temperature=4.0,
        min_temperature=1.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        feature_gradient=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not _is_int(num_parts) or num_parts < 1:
            raise ValueError(f"`num_parts` must be an int >= 1. Received: num_parts={num_parts!r}")
        if hidden_units is not None and (not _is_int(hidden_units) or hidden_units < 1):
            raise ValueError(
                "`hidden_units` must be None or an int >= 1. "
                f"Received: hidden_units={hidden_units!r}"
            )
        if not _is_positive_number(max_temperature):
            raise ValueError(
                "`max_temperature` must be a positive number. "
                f"Received: max_temperature={max_temperature!r}"
            )
        if (
            not isinstance(min_temperature, numbers.Real)
            or isinstance(min_temperature, bool)
            or not 0 <= min_temperature < max_temperature
        ):
            raise ValueError(
                "`min_temperature` must be a number in [0, max_temperature). "
                f"Received: min_temperature={min_temperature!r}"
            )
        if (
            not _is_positive_number(initial_temperature)
            or not min_temperature < initial_temperature < max_temperature
        ):
            raise ValueError(
                "`initial_temperature` must be a number between `min_temperature` and "
                f"`max_temperature` ({min_temperature}, {max_temperature}). "
                f"Received: initial_temperature={initial_temperature!r}"
            )
        self.num_parts = int(num_parts)
        self.hidden_units = None if hidden_units is None else int(hidden_units)
        self.initial_temperature = float(initial_temperature)
        self.max_temperature = float(max_temperature)
        self.min_temperature = float(min_temperature)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.feature_gradient = bool(feature_gradient)

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
        hidden = max(channels // 16, 8) if self.hidden_units is None else self.hidden_units
        parts = self.num_parts

        def weight(name, shape, initializer):
            # autocast=False: the attention math reads its weights in float32.
            return self.add_weight(name=name, shape=shape, initializer=initializer, autocast=False)

        self.hidden_kernel = weight(
            "hidden_kernel", (parts, channels, hidden), self.kernel_initializer
        )
        self.hidden_bias = weight("hidden_bias", (parts, hidden), self.bias_initializer)
        self.channel_kernel = weight(
            "channel_kernel", (parts, hidden, channels), self.kernel_initializer
        )
        self.channel_bias = weight("channel_bias", (parts, channels), self.bias_initializer)
        span = self.max_temperature - self.min_temperature
        ratio = (self.initial_temperature - self.min_temperature) / span
        self.temperature_logit = weight(
            "temperature_logit",
            (parts,),
            keras.initializers.Constant(math.log(ratio / (1.0 - ratio))),
        )

    def temperatures(self):
        """`τ_i`, the inverse temperature of each part's softmax, `(P,)` float32."""
        span = self.max_temperature - self.min_temperature
        return self.min_temperature + span * ops.sigmoid(self.temperature_logit)

    def call(self, inputs):
        features = ops.cast(inputs, "float32")
        # The maps read the features without passing gradients back to them (see
        # `feature_gradient`); the part features pool the live features below.
        source = features if self.feature_gradient else ops.stop_gradient(features)
        pooled = ops.mean(source, axis=(1, 2))  # GAP(F), (B, C)
        hidden = ops.tanh(ops.einsum("bc,pch->bph", pooled, self.hidden_kernel) + self.hidden_bias)
        channel_weights = ops.sigmoid(
            ops.einsum("bph,phc->bpc", hidden, self.channel_kernel) + self.channel_bias
        )
        # Signed, a part subtracts the channels of the others and can peak away from them.
        weights = 2.0 * channel_weights - 1.0
        response = ops.einsum("bhwc,bpc->bhwp", source, weights) / math.sqrt(features.shape[-1])
        mean = ops.mean(response, axis=(1, 2), keepdims=True)
        centred = response - mean
        # centred · centred, not ops.square: TensorFlow fuses (a − b)² into SQUARED_DIFFERENCE,
        # which TFLite runs in float32 and int32 only, so a 16x8 file could not run.
        variance = ops.mean(centred * centred, axis=(1, 2), keepdims=True)
        mean_square = variance + ops.square(mean)
        standardised = centred * ops.rsqrt(
            variance + RELATIVE_EPSILON * mean_square + ABSOLUTE_EPSILON
        )
        logits = self.temperatures() * standardised
        # Softmax over the H·W positions of each map (|logits| ≤ τ_max·sqrt(H·W): no overflow).
        exp = ops.exp(logits - ops.max(logits, axis=(1, 2), keepdims=True))
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
            "initial_temperature": self.initial_temperature,
            "max_temperature": self.max_temperature,
            "min_temperature": self.min_temperature,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "feature_gradient": self.feature_gradient,
        }

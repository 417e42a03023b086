"""Horizontal stripe pooling: the part features of PCB (Sun et al., ECCV 2018)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_fg")
class HorizontalStripePooling(keras.layers.Layer):
    """Average-pools a feature map over `num_stripes` horizontal bands of rows.

    A pedestrian crop is upright, so its rows hold roughly the same body part from image to
    image (head, torso, legs). PCB pools each band as one part feature:

        s = 0..S-1:   r0(s) = ⌊s·H/S⌋,   r1(s) = ⌈(s+1)·H/S⌉
        p_s = 1/((r1 − r0)·W) · Σ_{r0 ≤ h < r1} Σ_w F(h, w)

    the bands of PyTorch's `adaptive_avg_pool2d(F, (S, 1))`: equal when `S` divides `H`,
    overlapping by one row otherwise. The bands are static slices of the map, so the layer
    converts to TFLite builtins (STRIDED_SLICE, MEAN, PACK).

    Args:
        num_stripes: the number of bands `S`, at least 1 and at most the map's height.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: a `(B, H, W, C)` feature map with a static `H`.

    Returns:
        `(B, S, C)`: the bands' mean features, top to bottom.

    Example:

    >>> HorizontalStripePooling(4)(keras.random.uniform((2, 16, 8, 32))).shape
    (2, 4, 32)

    Reference:
        Y. Sun, L. Zheng, Y. Yang, Q. Tian, S. Wang, "Beyond Part Models: Person Retrieval
        with Refined Part Pooling (and a Strong Convolutional Baseline)", ECCV 2018.
    """

    def __init__(self, num_stripes, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_stripes, bool) or not isinstance(num_stripes, int) or num_stripes < 1:
            raise ValueError(
                f"`num_stripes` must be an integer >= 1. Received: num_stripes={num_stripes!r}"
            )
        self.num_stripes = num_stripes

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"HorizontalStripePooling expects a (B, H, W, C) feature map. "
                f"Received: input_shape={input_shape}"
            )
        height = input_shape[1]
        if height is None or height < self.num_stripes:
            raise ValueError(
                f"The feature map needs a static height of at least `num_stripes`="
                f"{self.num_stripes} rows. Received: input_shape={input_shape}"
            )

    def stripe_rows(self, height):
        """The `(first, end)` rows of each band of a map `height` rows high."""
        count = self.num_stripes
        return [(s * height // count, -(-(s + 1) * height // count)) for s in range(count)]

    def call(self, inputs):
        stripes = [
            ops.mean(inputs[:, first:end], axis=(1, 2))
            for first, end in self.stripe_rows(inputs.shape[1])
        ]
        return ops.stack(stripes, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_stripes, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "num_stripes": self.num_stripes}

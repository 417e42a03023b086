"""Token grid: a vision transformer's patch tokens laid back out as a feature map."""

import numbers

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_fg")
class TokenGrid(keras.layers.Layer):
    """Drops a transformer's leading tokens and reshapes its patch tokens to their grid.

    A ViT cuts a `(H, W)` image into `(H/p) × (W/p)` patches of `p × p` pixels, row by
    row, and embeds each as one token; before them it puts its class token, and DINOv2
    with registers also its register tokens. The model families read feature *maps*
    `(B, h, w, C)`, so the patch tokens are put back where their patches were:

        sequence (B, K + h·w, C),  K leading tokens
        F(b, r, c, :) = sequence(b, K + r·w + c, :)     0 ≤ r < h, 0 ≤ c < w

    A slice and a reshape: the layer converts to TFLite builtins (STRIDED_SLICE, RESHAPE).

    Args:
        grid_size: int or `(int, int)`. The patch grid `(h, w)`: the image size divided by
            the patch size.
        num_prefix_tokens: int. The leading tokens to drop (class and register tokens).
            Defaults to `1`, a class token.
        **kwargs: base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: a `(B, K + h·w, C)` token sequence.

    Returns:
        `(B, h, w, C)`: the patch tokens on their grid.

    Example:

    >>> tokens = keras.random.uniform((2, 1 + 4 * 6, 32))  # A class token, then 4x6 patches.
    >>> TokenGrid((4, 6), num_prefix_tokens=1)(tokens).shape
    (2, 4, 6, 32)

    Reference:
        A. Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
        Recognition at Scale", ICLR 2021 (the patch order); T. Darcet et al., "Vision
        Transformers Need Registers", ICLR 2024 (the register tokens).
    """

    def __init__(self, grid_size, num_prefix_tokens=1, **kwargs):
        super().__init__(**kwargs)
        sides = grid_size
        if isinstance(sides, numbers.Integral) and not isinstance(sides, bool):
            sides = (sides, sides)
        if not (
            isinstance(sides, (tuple, list))
            and len(sides) == 2
            and all(
                isinstance(side, numbers.Integral) and not isinstance(side, bool) and side > 0
                for side in sides
            )
        ):
            raise ValueError(
                "`grid_size` must be a positive int or a (height, width) pair of positive "
                f"ints. Received: grid_size={grid_size!r}"
            )
        if (
            isinstance(num_prefix_tokens, bool)
            or not isinstance(num_prefix_tokens, numbers.Integral)
            or num_prefix_tokens < 0
        ):
            raise ValueError(
                "`num_prefix_tokens` must be an integer >= 0. "
                f"Received: num_prefix_tokens={num_prefix_tokens!r}"
            )
        self.grid_size = tuple(int(side) for side in sides)
        self.num_prefix_tokens = int(num_prefix_tokens)

    def build(self, input_shape):
        height, width = self.grid_size
        expected = self.num_prefix_tokens + height * width
        if len(input_shape) != 3 or input_shape[1] not in (None, expected):
            raise ValueError(
                f"TokenGrid expects (B, {self.num_prefix_tokens} + {height}·{width}, C) tokens "
                f"(num_prefix_tokens={self.num_prefix_tokens}, grid_size={self.grid_size}). "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.input_spec = keras.layers.InputSpec(ndim=3, axes={-1: input_shape[-1]})

    def call(self, inputs):
        height, width = self.grid_size
        # The patch tokens are the last h·w, whatever a model's symbolic shape says of the
        # leading ones (see `HubBackbone` on SigLIP).
        patches = inputs[:, -height * width :, :]
        return ops.reshape(patches, (-1, height, width, inputs.shape[-1]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.grid_size, input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "grid_size": self.grid_size,
            "num_prefix_tokens": self.num_prefix_tokens,
        }

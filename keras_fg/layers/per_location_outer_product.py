"""The bilinear outer product at every location, before any pooling (DASRBN)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_fg")
class PerLocationOuterProduct(keras.layers.Layer):
    """Outer product of two feature maps at every location, kept on the grid.

    Where `BilinearPooling` averages the outer products over locations, this layer keeps one
    bilinear vector per location, so that attention and a spatial LSTM can weigh and read
    them (Wu & Wang's "bilinear outcomes" that the attention sits on):

        z_hw = vec(a_hw ⊗ b_hw)                 (Ca·Cb,), index i·Cb + j
        y_hw = sign(z_hw) · (sqrt(|z_hw| + ε) − sqrt(ε))   if signed_sqrt
        out_hw = y_hw · rsqrt(max(‖y_hw‖₂², ε))   if l2_normalize

    The shifted square root is exact at z = 0, within sqrt(ε) elsewhere, and keeps the gradient
    finite at 0. The norm's floor is ε itself, never ε²: a float16 TFLite export stores
    constants in float16, where 1e-7 survives but 1e-14 becomes 0 (and 0 · rsqrt(0) is NaN).
    Computed in float32 under mixed precision.

    Args:
        signed_sqrt: apply the signed square root to each product.
        l2_normalize: L2-normalise each location's vector.
        epsilon: the small constant of both steps, > 0; at least 6e-8 (the smallest float16
            value) for float16 exports.

    Call arguments:
        inputs: a list `[a, b]` of `(B, H, W, Ca)` and `(B, H, W, Cb)` tensors on the same
            grid, or one tensor `a` meaning `[a, a]`.

    Returns:
        `(B, H, W, Ca·Cb)` float32.

    Example:

    >>> a = keras.random.normal((2, 7, 7, 16))
    >>> b = keras.random.normal((2, 7, 7, 8))
    >>> PerLocationOuterProduct()([a, b]).shape
    (2, 7, 7, 128)

    Reference:
        L. Wu, Y. Wang, "Where to Focus: Deep Attention-based Spatially Recurrent Bilinear
        Networks for Fine-Grained Visual Recognition", arXiv:1709.05769, 2017.
    """

    def __init__(self, signed_sqrt=True, l2_normalize=True, epsilon=1e-7, **kwargs):
        if epsilon <= 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        super().__init__(**kwargs)
        self.signed_sqrt = bool(signed_sqrt)
        self.l2_normalize = bool(l2_normalize)
        self.epsilon = float(epsilon)

    def _split(self, inputs):
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != 2:
                raise ValueError(
                    f"PerLocationOuterProduct takes one tensor or a list of two. "
                    f"Received: a list of {len(inputs)}"
                )
            return inputs[0], inputs[1]
        return inputs, inputs

    def build(self, input_shape):
        shapes = (
            input_shape
            if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple))
            else [input_shape, input_shape]
        )
        if len(shapes) != 2:
            raise ValueError(
                f"PerLocationOuterProduct takes one tensor or a list of two. "
                f"Received: a list of {len(shapes)}"
            )
        for shape in shapes:
            if len(shape) != 4:
                raise ValueError(
                    f"PerLocationOuterProduct expects (B, H, W, C) inputs. Received: shape={shape}"
                )
        for axis in (1, 2):
            a, b = shapes[0][axis], shapes[1][axis]
            if a is not None and b is not None and a != b:
                raise ValueError(
                    f"Both inputs must share the grid. Received: shapes {shapes[0]} and {shapes[1]}"
                )

    def call(self, inputs):
        a, b = self._split(inputs)
        a = ops.cast(a, "float32")
        b = ops.cast(b, "float32")
        z = ops.einsum("bhwi,bhwj->bhwij", a, b)
        shape = ops.shape(z)
        z = ops.reshape(z, (shape[0], shape[1], shape[2], shape[3] * shape[4]))
        if self.signed_sqrt:
            eps = self.epsilon
            z = ops.sign(z) * (ops.sqrt(ops.abs(z) + eps) - eps**0.5)
        if self.l2_normalize:
            squared_norm = ops.sum(ops.square(z), axis=-1, keepdims=True)
            z = z * ops.rsqrt(ops.maximum(squared_norm, self.epsilon))
        return z

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            a, b = input_shape
        else:
            a = b = input_shape
        channels = None if a[-1] is None or b[-1] is None else a[-1] * b[-1]
        return (a[0], a[1], a[2], channels)

    def compute_output_spec(self, inputs):
        a, _ = self._split(inputs)
        shape = self.compute_output_shape(
            [tuple(t.shape) for t in inputs]
            if isinstance(inputs, (list, tuple))
            else tuple(a.shape)
        )
        return keras.KerasTensor(shape, dtype="float32")

    def get_config(self):
        return {
            **super().get_config(),
            "signed_sqrt": self.signed_sqrt,
            "l2_normalize": self.l2_normalize,
            "epsilon": self.epsilon,
        }

"""Bilinear pooling (B-CNN) and its compact Random Maclaurin form."""

import numbers

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_fg")
class BilinearPooling(keras.layers.Layer):
    """Bilinear pooling of two feature maps, with signed square root and L2.

    Pools the outer products of two feature maps over all spatial
    positions (Lin et al., B-CNN):

        z   = (1/HW) · Σ_{h,w} a_hw ⊗ b_hw        shape (B, Ca·Cb), index i·Cb + j
        y   = sign(z) · sqrt(|z|)                  if `signed_sqrt`
        out = y / max(‖y‖₂, ε)                     if `l2_normalize`

    `z` is computed as one batched matrix product, `Aᵀ B / HW` with `A` of
    shape (B, HW, Ca) and `B` of shape (B, HW, Cb); the (B, H, W, Ca, Cb)
    tensor of per-position outer products is never formed.

    The signed square root is computed as `z / sqrt(max(|z|, ε))`. It equals
    `sign(z) · sqrt(|z|)` exactly wherever `|z| ≥ ε`, is linear with slope
    `1/sqrt(ε)` on `|z| < ε` (there it differs from the exact value by at most
    `sqrt(ε)/4`), and so has a finite gradient at `z = 0`, where the gradient
    of `sqrt` is infinite. The L2 step is `y · rsqrt(max(Σ y², ε))` (a floor
    of `sqrt(ε)` on the norm), whose gradient is finite at `y = 0` too. Both use
    keras.ops only, with no custom gradient, and convert to TFLite builtin ops.
    Both floors are `ε` itself, never `ε²`: a float16 TFLite export stores the
    constants in float16, where `1e-7` survives (its smallest value is 6e-8)
    but `1e-14` becomes 0, and `0 · rsqrt(0)` would be NaN.

    With `projection_dim=d` the layer returns a compact bilinear feature
    of size `d` instead of `Ca·Cb`, by Random Maclaurin projection
    (Gao et al.): with fixed random ±1 matrices `W1 (Ca, d)` and `W2 (Cb, d)`,

        φ = (1/HW) · Σ_{h,w} (a_hw W1) ⊙ (b_hw W2) / sqrt(d)

    followed by the same signed square root and L2 steps. Its inner products
    are unbiased estimates of the full ones, `E<φ(x), φ(y)> = <z(x), z(y)>`,
    with an error that shrinks as `1/sqrt(d)` relative to `‖z(x)‖·‖z(y)‖`
    (measured on real features: docs/design.md#compact-bilinear-pooling).
    `W1` and `W2` are drawn once from `seed` in
    `build` and kept as non-trainable weights, so they are saved with the
    model. The projection is matrix products only and converts to TFLite
    builtin ops (Tensor Sketch, the other compact form, needs an FFT). It
    costs `HW·d·(Ca + Cb)` multiply-adds against `HW·Ca·Cb` for the full form;
    what it saves is the size of the classifier that follows (d instead of
    Ca·Cb inputs).

    The whole computation runs in float32 even under a mixed-precision
    policy: unless a `dtype` is given, the layer's dtype policy is
    `"float32"`, so float16 inputs are cast to float32 on entry and the output
    is float32 (as for the output layers of a mixed-precision model). With a
    given `dtype` the math still runs in at least float32.

    Args:
        signed_sqrt: Whether to apply the signed square root.
        l2_normalize: Whether to L2-normalise each output vector.
        epsilon: Small positive float: the threshold `|z| < epsilon` below
            which the signed square root is linear (its largest slope is
            `1/sqrt(epsilon)`), and the floor of the squared L2 norm. Keep it
            at least 6e-8, the smallest float16 value, for float16 exports.
        projection_dim: `None` for the full `Ca·Cb` bilinear feature, or a
            positive int `d` for the compact Random Maclaurin feature of size
            `d`.
        seed: Optional int, seed of the random ±1 projection matrices.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A list `[a, b]` of two tensors of shapes `(B, H, W, Ca)` and
            `(B, H, W, Cb)` on the same spatial grid, or a single tensor `a`,
            which is pooled with itself (`[a, a]`).

    Returns:
        A float32 tensor of shape `(B, Ca·Cb)`, or `(B, projection_dim)` when
        `projection_dim` is set.

    Example:

    ```python
    a = keras.random.uniform((2, 7, 7, 16))
    b = keras.random.uniform((2, 7, 7, 8))
    BilinearPooling()([a, b])                       # shape (2, 128)
    BilinearPooling()(a)                            # shape (2, 256): [a, a]
    BilinearPooling(projection_dim=64, seed=0)(a)   # shape (2, 64)
    ```

    Reference:
        - T.-Y. Lin, A. RoyChowdhury, S. Maji, "Bilinear CNN Models for
          Fine-grained Visual Recognition", ICCV 2015.
        - Y. Gao, O. Beijbom, N. Zhang, T. Darrell, "Compact Bilinear
          Pooling", CVPR 2016.
    """

    def __init__(
        self,
        signed_sqrt=True,
        l2_normalize=True,
        epsilon=1e-7,
        projection_dim=None,
        seed=None,
        **kwargs,
    ):
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool) or epsilon <= 0:
            raise ValueError(f"`epsilon` must be a positive number. Received: epsilon={epsilon!r}")
        if projection_dim is not None and (
            not isinstance(projection_dim, numbers.Integral)
            or isinstance(projection_dim, bool)
            or projection_dim <= 0
        ):
            raise ValueError(
                "`projection_dim` must be None or a positive int. "
                f"Received: projection_dim={projection_dim!r}"
            )
        if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
            raise ValueError(f"`seed` must be None or an int. Received: seed={seed!r}")
        self.signed_sqrt = signed_sqrt
        self.l2_normalize = l2_normalize
        self.epsilon = float(epsilon)
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self.seed = None if seed is None else int(seed)

    def _split_shapes(self, input_shape):
        """Returns the shapes of `a` and `b`, checked, from a build/call shape."""
        is_list_of_shapes = len(input_shape) > 0 and all(
            isinstance(shape, (list, tuple)) for shape in input_shape
        )
        if is_list_of_shapes:
            if len(input_shape) != 2:
                raise ValueError(
                    "BilinearPooling expects a single tensor or a list of exactly two "
                    f"tensors [a, b]. Received a list of {len(input_shape)}: {input_shape}"
                )
            a_shape, b_shape = (tuple(shape) for shape in input_shape)
        else:
            a_shape = b_shape = tuple(input_shape)
        for name, shape in (("a", a_shape), ("b", b_shape)):
            if len(shape) != 4:
                raise ValueError(
                    f"BilinearPooling expects rank-4 inputs (batch, height, width, "
                    f"channels). Received: {name}.shape={shape}"
                )
            if shape[-1] is None:
                raise ValueError(
                    f"The channel dimension of the inputs must be known. "
                    f"Received: {name}.shape={shape}"
                )
        for axis in (1, 2):
            if None not in (a_shape[axis], b_shape[axis]) and a_shape[axis] != b_shape[axis]:
                raise ValueError(
                    "Both inputs must have the same spatial dimensions (height, width). "
                    f"Received: a.shape={a_shape}, b.shape={b_shape}"
                )
        return a_shape, b_shape

    def _math_dtype(self):
        """float32, or wider if the layer's policy asks for it."""
        return keras.backend.result_type(self.compute_dtype, "float32")

    def build(self, input_shape):
        a_shape, b_shape = self._split_shapes(input_shape)
        if self.projection_dim is not None:
            # One generator for both matrices: W1 and W2 must be independent,
            # also when a single input is pooled with itself.
            seeds = keras.random.SeedGenerator(self.seed)

            def rademacher(shape, dtype=None):
                bits = keras.random.randint(shape, 0, 2, seed=seeds)
                return ops.cast(2 * bits - 1, dtype)

            self.projection_a = self.add_weight(
                name="projection_a",
                shape=(a_shape[-1], self.projection_dim),
                initializer=rademacher,
                trainable=False,
            )
            self.projection_b = self.add_weight(
                name="projection_b",
                shape=(b_shape[-1], self.projection_dim),
                initializer=rademacher,
                trainable=False,
            )

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            self._split_shapes([tuple(x.shape) for x in inputs])
            a, b = inputs
        else:
            self._split_shapes(tuple(inputs.shape))
            a = b = inputs
        dtype = self._math_dtype()
        a = ops.cast(a, dtype)
        b = ops.cast(b, dtype)
        a_shape, b_shape = ops.shape(a), ops.shape(b)
        positions = a_shape[1] * a_shape[2]
        a = ops.reshape(a, (-1, positions, a_shape[3]))
        b = ops.reshape(b, (-1, positions, b_shape[3]))
        if self.projection_dim is None:
            z = ops.matmul(ops.transpose(a, (0, 2, 1)), b)  # (B, Ca, Cb)
            z = ops.reshape(z, (-1, a_shape[3] * b_shape[3]))
            z = z / ops.cast(positions, dtype)
        else:
            a = ops.matmul(a, ops.cast(self.projection_a, dtype))  # (B, HW, d)
            b = ops.matmul(b, ops.cast(self.projection_b, dtype))
            z = ops.mean(a * b, axis=1) / ops.sqrt(ops.cast(self.projection_dim, dtype))
        if self.signed_sqrt:
            # sign(z)·sqrt(|z|) for |z| >= eps, linear below: finite gradient at 0.
            z = z / ops.sqrt(ops.maximum(ops.abs(z), self.epsilon))
        if self.l2_normalize:
            squared_norm = ops.sum(ops.square(z), axis=-1, keepdims=True)
            z = z * ops.rsqrt(ops.maximum(squared_norm, self.epsilon))
        return z

    def compute_output_shape(self, input_shape):
        a_shape, b_shape = self._split_shapes(input_shape)
        if self.projection_dim is not None:
            return (a_shape[0], self.projection_dim)
        return (a_shape[0], a_shape[-1] * b_shape[-1])

    def compute_output_spec(self, inputs):
        shape = self.compute_output_shape(
            [tuple(x.shape) for x in inputs]
            if isinstance(inputs, (list, tuple))
            else tuple(inputs.shape)
        )
        return keras.KerasTensor(shape, dtype=self._math_dtype())

    def get_config(self):
        return {
            **super().get_config(),
            "signed_sqrt": self.signed_sqrt,
            "l2_normalize": self.l2_normalize,
            "epsilon": self.epsilon,
            "projection_dim": self.projection_dim,
            "seed": self.seed,
        }

"""Crops around the peak of each part attention map (full MA-CNN)."""

import numbers

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_fg")
class PartCrop(keras.layers.Layer):
    """Crops a square box around each part's attention peak and resizes it.

    For every image and every part map `M_p` (MA-CNN's P part attention
    maps), the layer finds the peak of `M_p`, centres a square box on it and
    resamples the box of the image bilinearly to `crop_size` — the part
    crops that full MA-CNN classifies with its part networks (the authors'
    release crops 128 px at 448 px, `box_fraction = 128/448 ≈ 0.29`, and
    resizes to 224).

    Coordinates are in pixels with pixel centres at the integers
    `0 .. H−1` (the convention of `tf.image.crop_and_resize`). For maps of
    size `(h, w)` on an image of size `(H, W)`:

        (r, c)   = argmax_{(y,x)} M_p(y, x)                    the peak cell
        (cy, cx) = ((r + ½)·H/h − ½, (c + ½)·W/w − ½)          its centre in the image
        s        = max(box_fraction · min(H, W) − 1, 0)        box side, spans s + 1 pixels
        y1       = clip(cy − s/2, 0, H − 1 − s),  y2 = y1 + s  (x1, x2 likewise)

    so the box is shifted, never shrunk, to stay inside the image. The crop
    samples `crop_h` rows evenly from `y1` to `y2` inclusive,
    `y_i = y1 + i·s/(crop_h − 1)` (`y1 + s/2` when `crop_h = 1`), and the
    crop-and-resize is two matrix products with bilinear interpolation
    matrices built from the box:

        A_y[i, k] = max(0, 1 − |y_i − k|)                        (crop_h, H)
        A_x[j, k] = max(0, 1 − |x_j − k|)                        (crop_w, W)
        crop_p    = A_y · X · A_xᵀ                               per channel

    Each row of `A_y` holds the two bilinear weights of sample `y_i` on its
    neighbouring rows `floor(y_i)` and `floor(y_i) + 1`. With a box given as
    normalised `[y1/(H−1), x1/(W−1), y2/(H−1), x2/(W−1)]` this is exactly
    `tf.image.crop_and_resize(..., method="bilinear")`, but written with
    matrix products only: it is differentiable with respect to the image,
    runs on every Keras backend and converts to TFLite builtin ops.

    The peak is the hard argmax of each map, as in the authors' release.
    No gradient flows into the attention maps (argmax has none); the
    maps train through the channel-grouping loss and the part classifiers.
    The box is computed in float32; the crop in the layer's compute dtype.

    Args:
        crop_size: Positive int, or tuple `(crop_height, crop_width)`, the
            size of each output crop.
        box_fraction: Float in (0, 1], the side of the square box as a
            fraction of the shorter image side. Defaults to `128/448`, the
            box of the MA-CNN release.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A list `[images, attention_maps]`: images of shape
            `(B, H, W, C)` and part attention maps of shape `(B, h, w, P)`
            on any grid (e.g. the 28×28 conv5_4 grid of a 448-px image).

    Returns:
        A tensor of shape `(B, P, crop_height, crop_width, C)`: the crop of
        part `p` is `crops[:, p]`, ready for a per-part network; a network
        shared by all parts can take `keras.layers.TimeDistributed` or the
        reshape to `(B·P, crop_height, crop_width, C)`.

    Example:

    ```python
    images = keras.random.uniform((2, 448, 448, 3))
    part_maps = keras.random.uniform((2, 28, 28, 4))
    PartCrop(224)([images, part_maps])     # shape (2, 4, 224, 224, 3)
    ```

    Reference:
        - H. Zheng, J. Fu, T. Mei, J. Luo, "Learning Multi-Attention
          Convolutional Neural Network for Fine-Grained Image Recognition",
          ICCV 2017.
    """

    def __init__(self, crop_size, box_fraction=128 / 448, **kwargs):
        super().__init__(**kwargs)
        size = (crop_size, crop_size) if isinstance(crop_size, numbers.Integral) else crop_size
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in size)
            or min(size) <= 0
        ):
            raise ValueError(
                "`crop_size` must be a positive int or a tuple of two positive ints "
                f"(height, width). Received: crop_size={crop_size!r}"
            )
        if (
            not isinstance(box_fraction, numbers.Real)
            or isinstance(box_fraction, bool)
            or not 0 < box_fraction <= 1
        ):
            raise ValueError(
                "`box_fraction` must be a number in (0, 1]. "
                f"Received: box_fraction={box_fraction!r}"
            )
        self.crop_size = (int(size[0]), int(size[1]))
        self.box_fraction = float(box_fraction)

    def _split_shapes(self, input_shape):
        """Returns the checked shapes of `images` and `attention_maps`."""
        if not (
            isinstance(input_shape, (list, tuple))
            and len(input_shape) == 2
            and all(isinstance(shape, (list, tuple)) for shape in input_shape)
        ):
            raise ValueError(
                "PartCrop expects a list of two tensors [images, attention_maps]. "
                f"Received input shape: {input_shape}"
            )
        images_shape, maps_shape = (tuple(shape) for shape in input_shape)
        for name, shape, layout in (
            ("images", images_shape, "(batch, height, width, channels)"),
            ("attention_maps", maps_shape, "(batch, height, width, parts)"),
        ):
            if len(shape) != 4:
                raise ValueError(
                    f"PartCrop expects rank-4 {name} {layout}. Received: {name}.shape={shape}"
                )
        if None not in (images_shape[0], maps_shape[0]) and images_shape[0] != maps_shape[0]:
            raise ValueError(
                "images and attention_maps must have the same batch size. Received: "
                f"images.shape={images_shape}, attention_maps.shape={maps_shape}"
            )
        return images_shape, maps_shape

    def build(self, input_shape):
        self._split_shapes(input_shape)

    def compute_boxes(self, image_size, attention_maps):
        """Returns the box of each part, `(B, P, 4)` float32 `[y1, x1, y2, x2]`.

        Args:
            image_size: `(H, W)`, the image height and width in pixels.
            attention_maps: Tensor of shape `(B, h, w, P)`.

        Returns:
            Box corners in pixel coordinates (pixel centres at `0 .. H−1`),
            inclusive: the crop's first and last samples lie on them.
        """
        height = ops.cast(image_size[0], "float32")
        width = ops.cast(image_size[1], "float32")
        maps = ops.stop_gradient(ops.cast(attention_maps, "float32"))
        maps_shape = ops.shape(maps)
        map_height, map_width, parts = maps_shape[1], maps_shape[2], maps_shape[3]
        positions = map_height * map_width
        flat = ops.reshape(ops.transpose(maps, (0, 3, 1, 2)), (-1, parts, positions))
        # argmax as the first position holding the maximum: ops.argmax on floats
        # adds a sign-bit test (tf.BitwiseAnd) that TFLite has no builtin for.
        index = ops.cast(ops.arange(positions), "float32")
        is_peak = flat >= ops.max(flat, axis=-1, keepdims=True)
        peak = ops.min(ops.where(is_peak, index, ops.cast(positions, "float32")), axis=-1)
        map_width = ops.cast(map_width, "float32")
        row = ops.floor(peak / map_width)
        col = peak - row * map_width
        centre_y = (row + 0.5) * height / ops.cast(map_height, "float32") - 0.5
        centre_x = (col + 0.5) * width / map_width - 0.5
        side = ops.maximum(self.box_fraction * ops.minimum(height, width) - 1.0, 0.0)
        # Shift the box into the image: side <= min(H, W) - 1, so the bounds never cross.
        y1 = ops.minimum(ops.maximum(centre_y - side / 2, 0.0), height - 1.0 - side)
        x1 = ops.minimum(ops.maximum(centre_x - side / 2, 0.0), width - 1.0 - side)
        return ops.stack([y1, x1, y1 + side, x1 + side], axis=-1)

    def _interpolation_matrix(self, start, end, samples, source_size):
        """Bilinear weights `(B, P, samples, source_size)` of `samples` points in [start, end]."""
        if samples == 1:
            steps = ops.convert_to_tensor([0.5], "float32")
        else:
            steps = ops.cast(ops.arange(samples), "float32") / (samples - 1)
        positions = start[..., None] + (end - start)[..., None] * steps  # (B, P, samples)
        pixels = ops.cast(ops.arange(source_size), "float32")
        return ops.relu(1.0 - ops.abs(positions[..., None] - pixels))

    def call(self, inputs):
        self._split_shapes([tuple(x.shape) for x in inputs])
        images, attention_maps = inputs
        images = ops.cast(images, self.compute_dtype)
        images_shape = ops.shape(images)
        height, width = images_shape[1], images_shape[2]
        boxes = self.compute_boxes((height, width), attention_maps)
        crop_height, crop_width = self.crop_size
        a_y = self._interpolation_matrix(boxes[..., 0], boxes[..., 2], crop_height, height)
        a_x = self._interpolation_matrix(boxes[..., 1], boxes[..., 3], crop_width, width)
        a_y = ops.cast(a_y, images.dtype)[:, :, None]  # (B, P, 1, crop_h, H)
        a_x = ops.cast(a_x, images.dtype)[:, :, None]  # (B, P, 1, crop_w, W)
        channels_first = ops.transpose(images, (0, 3, 1, 2))[:, None]  # (B, 1, C, H, W)
        crops = ops.matmul(ops.matmul(a_y, channels_first), ops.swapaxes(a_x, -1, -2))
        return ops.transpose(crops, (0, 1, 3, 4, 2))  # (B, P, crop_h, crop_w, C)

    def compute_output_shape(self, input_shape):
        images_shape, maps_shape = self._split_shapes(input_shape)
        return (images_shape[0], maps_shape[3], *self.crop_size, images_shape[3])

    def get_config(self):
        return {
            **super().get_config(),
            "crop_size": self.crop_size,
            "box_fraction": self.box_fraction,
        }

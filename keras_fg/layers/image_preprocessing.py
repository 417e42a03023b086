"""The input preprocessing of a pretrained backbone, as a layer inside the model."""

import keras
from keras import ops

# ImageNet statistics, as in keras.applications.imagenet_utils.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="keras_fg")
class ImagePreprocessing(keras.layers.Layer):
    """Maps raw RGB pixel values in [0, 255] to what a backbone was trained on.

    Putting this layer first in every backbone lets datasets, exported models
    and servers feed raw pixels, whatever the backbone. With `x` the input,
    channels last in RGB order, the modes compute (as the matching modes of
    `keras.applications.imagenet_utils.preprocess_input`):

        "tf":     x / 127.5 − 1                       range [−1, 1]
        "caffe":  x[..., ::-1] − (103.939, 116.779, 123.68)   BGR, ImageNet mean removed
        "torch":  (x / 255 − (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
        "unit":   x / 255                              range [0, 1]
        "none":   x

    The math runs in float32: unless a `dtype` is given, the layer's dtype
    policy is `"float32"`, so even under a mixed-precision policy the pixels
    are not rounded to float16 before they are scaled (the next layer casts
    the result to its own compute dtype).

    Args:
        mode: One of `"tf"`, `"caffe"`, `"torch"`, `"unit"`, `"none"`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A float tensor of shape `(B, H, W, 3)` (or `(..., C)` for
            `"tf"`, `"unit"` and `"none"`) of raw pixel values in [0, 255].

    Returns:
        A tensor of the same shape, preprocessed.

    Example:

    >>> images = keras.Input((224, 224, 3))  # raw RGB pixels in [0, 255]
    >>> x = ImagePreprocessing("caffe")(images)  # as vgg16.preprocess_input
    >>> features = keras.applications.VGG16(include_top=False, input_tensor=x)

    Reference:
        `keras.applications.imagenet_utils.preprocess_input`; the "caffe"
        statistics are those of Simonyan & Zisserman's VGG release, the
        "torch" ones those of torchvision.
    """

    MODES = ("tf", "caffe", "torch", "unit", "none")

    def __init__(self, mode="tf", **kwargs):
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(
                f"`mode` must be one of {', '.join(map(repr, self.MODES))}. Received: mode={mode!r}"
            )
        self.mode = mode

    def build(self, input_shape):
        if self.mode in ("caffe", "torch") and input_shape[-1] != 3:
            raise ValueError(
                f"ImagePreprocessing(mode={self.mode!r}) expects RGB images with 3 channels "
                f"last. Received: input_shape={tuple(input_shape)}"
            )
        self.built = True

    def call(self, inputs):
        dtype = keras.backend.result_type(self.compute_dtype, "float32")
        x = ops.cast(inputs, dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN_RGB, dtype)
            std = ops.convert_to_tensor(_TORCH_STD_RGB, dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "unit":
            return x / 255.0
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}

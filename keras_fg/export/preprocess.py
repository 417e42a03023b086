"""The one image rule shared by serving, prediction and evaluation: decode, resize the whole image.

    image = decode_image(bytes, channels=3, expand_animations=False)     uint8 (h, w, 3), RGB
    image = resize(float32(image), (H, W), bilinear, antialias=True)     the whole image, no crop
    image = clip(image, 0, 255)                                          raw pixels for the model

The keras_fg models carry their backbone's preprocessing inside, so these raw pixels are all
they need. The same op runs inside the exported SavedModel (its `serving_default` signature),
in `keras_fg.data.make_pipeline` for evaluation (`resize_mode="resize"`), and wherever an
image is prepared for a TFLite model, so that every route sees identical pixels.
"""

import os

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
RESIZE_RULE = (
    "tf.io.decode_image(channels=3, expand_animations=False); tf.image.resize of the whole "
    "image to the model's (height, width), method='bilinear', antialias=True; clipped to "
    "[0, 255]; no crop"
)


def decode_and_resize(image_bytes, size):
    """Decodes one encoded image and resizes the whole of it to the model's input size.

    Args:
        image_bytes: a scalar string tensor: the bytes of a JPEG, PNG, GIF (first frame) or BMP.
        size: the output size, an int or `(height, width)`.

    Returns:
        A float32 tensor `(height, width, 3)`, RGB pixel values in [0, 255].

    Raises:
        tf.errors.InvalidArgumentError: when the bytes are not an image of a known format.

    Example:

    >>> image = decode_and_resize(tf.io.read_file("bird.jpg"), 224)
    >>> image.shape
    TensorShape([224, 224, 3])
    """
    height, width = _pair(size)
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(
        tf.cast(image, tf.float32), (height, width), method="bilinear", antialias=True
    )
    return tf.clip_by_value(tf.ensure_shape(image, (height, width, 3)), 0.0, 255.0)


def list_images(directory):
    """The image files under `directory` (any nesting), sorted, by extension."""
    return sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )


def load_images(directory, size, max_images=None):
    """Reads, decodes and resizes the images of a folder for calibration or evaluation.

    Args:
        directory: a folder of images, any nesting (e.g. one sub-folder per class), or a
            list of image files.
        size: the model's input size, an int or `(height, width)`.
        max_images: keep at most this many, spread evenly over the sorted list so that
            every class folder is represented.

    Returns:
        A dict: `"paths"` of the images read, `"encoded"` their bytes, `"images"` a float32
        array `(N, height, width, 3)` (by `decode_and_resize`), and `"skipped"`, the paths
        that could not be decoded.
    """
    paths = list(directory) if isinstance(directory, (list, tuple)) else list_images(directory)
    if max_images is not None and len(paths) > max_images:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_images).round().astype(int)]
    kept, encoded, images, skipped = [], [], [], []
    for path in paths:
        with open(path, "rb") as file:
            data = file.read()
        try:
            images.append(decode_and_resize(data, size).numpy())
        except tf.errors.InvalidArgumentError:
            skipped.append(path)
            continue
        kept.append(path)
        encoded.append(data)
    images = np.stack(images) if images else np.zeros((0, *_pair(size), 3), "float32")
    return {"paths": kept, "encoded": encoded, "images": images, "skipped": skipped}


def synthetic_images(size, count, seed=0):
    """Encoded PNG images of smooth random colour fields with noise, and their decoded pixels.

    The fallback when no folder of real images is given: parity can still be measured, but
    says nothing about the accuracy of a quantized model on real images.
    """
    height, width = _pair(size)
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (count, 4, 4, 3)).astype("float32")
    smooth = tf.image.resize(coarse, (height, width), method="bicubic").numpy()
    noisy = smooth + rng.normal(0, 12, smooth.shape)
    return encode_images(np.clip(noisy, 0, 255).astype("uint8"), size)


def encode_images(pixels, size):
    """Images given as pixels, encoded as PNG (lossless) and read back by the image rule.

    The SavedModel's serving signature takes encoded images and the TFLite files take
    decoded pixels; both then see the same images.

    Args:
        pixels: uint8 images `(N, height, width, 3)`, RGB.
        size: the model's input size, an int or `(height, width)`.

    Returns:
        A dict as `load_images` returns it, with no `paths`.
    """
    encoded = [tf.io.encode_png(image).numpy() for image in np.asarray(pixels, "uint8")]
    images = np.stack([decode_and_resize(data, size).numpy() for data in encoded])
    return {"paths": [], "encoded": encoded, "images": images, "skipped": []}


def _pair(size):
    return (size, size) if np.isscalar(size) else tuple(size)

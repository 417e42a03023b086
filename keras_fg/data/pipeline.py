"""The tf.data input pipeline: decode, resize, crop, flip, augment, batch, skip bad files."""

import logging
import math
import threading

import keras
import numpy as np
import tensorflow as tf

from keras_fg.data.records import ImageRecords

logger = logging.getLogger(__name__)

RESIZE_MODES = ("resize", "center_crop")
AUGMENTS = ("randaugment", "mixup", "cutmix", "random_erasing")
# Random erasing fills with the ImageNet mean colour (Zhong et al. fill with the dataset mean).
ERASE_FILL = (123.675, 116.28, 103.53)


class SkipCounter:
    """Counts the image files a pipeline skipped because they could not be read or decoded.

    Pass one to `make_pipeline(..., skip_counter=counter)` and print it when the epoch (or the run)
    is over. Every skip is counted, so a broken file met in three epochs counts three times;
    `paths` lists each broken file once, in the order first met, and each is logged once.

    Example:

    >>> counter = SkipCounter()
    >>> counter.record("images/broken.jpg")
    >>> counter.count, str(counter)
    (1, '1 unreadable image file(s) skipped, e.g. images/broken.jpg')
    """

    def __init__(self):
        self.count = 0
        self.paths = []
        self._lock = threading.Lock()

    def record(self, path):
        path = path.numpy().decode("utf-8", "replace") if isinstance(path, tf.Tensor) else str(path)
        with self._lock:
            self.count += 1
            if path in self.paths:
                return
            self.paths.append(path)
        logger.warning("Skipped unreadable image file: %s", path)

    def reset(self):
        with self._lock:
            self.count = 0
            self.paths = []

    def __str__(self):
        example = f", e.g. {self.paths[0]}" if self.paths else ""
        return f"{self.count} unreadable image file(s) skipped{example}"


def make_pipeline(
    records_or_arrays,
    image_size,
    batch_size,
    training,
    seed=None,
    augment=None,
    resize_mode="resize",
    strict=False,
    drop_remainder=None,
    shuffle_buffer=None,
    skip_counter=None,
    num_parallel_calls=tf.data.AUTOTUNE,
    sampler=None,
    crop_fraction=0.875,
    num_classes=None,
):
    """A tf.data.Dataset of `(images, labels)` batches for `model.fit` / `evaluate` / `predict`.

    Images are float32 `(B, height, width, 3)`, RGB, in [0, 255], and **not** preprocessed: the
    keras_fg models carry their backbone's preprocessing inside. Labels are int32 `(B,)`, or float32
    one-hot `(B, num_classes)` whenever `augment` contains "mixup" or "cutmix" (in evaluation
    pipelines too, so one compiled loss serves both).

    Per image (decoded in parallel, `decode_image(channels=3, expand_animations=False)`):

    - training: resize to `image_size / crop_fraction` (with `resize_mode="center_crop"`: keep the
      aspect ratio, the shorter side scaled to cover it), take a random `image_size` crop, flip
      horizontally at random, then (if asked) random erasing;
    - evaluation: `resize_mode="resize"` resizes the whole image to `image_size` (the default: it
      keeps the whole object, and gave better accuracy than a centre crop on the CUB subset);
      `"center_crop"` scales the shorter side to `image_size / crop_fraction` and takes the
      central crop.

    Per batch, when training: RandAugment (`keras.layers.RandAugment`, one op choice per batch),
    then MixUp or CutMix (`keras.layers.MixUp` / `CutMix`).

    Randomness is stateless and seeded per element (a `Dataset.random(seed)` stream zipped with the
    shuffled indices) and the batch layers run in order, so the same `seed` gives the same batches,
    shuffling and augmentation included, whatever `num_parallel_calls` is.

    Unreadable files (missing, truncated, not an image) never end an epoch with an opaque error:
    each image is decoded in its own one-element dataset with `ignore_errors()`, falling back to a
    marked placeholder. The placeholder is dropped and its path recorded in `skip_counter` (also
    attached to the returned dataset as `.skip_counter`), or, with `strict=True`, the pipeline stops
    at once with an InvalidArgumentError whose message names the file. With a `sampler`, a skipped
    image shifts the P×K structure of the batches that follow it.

    Args:
        records_or_arrays: an `ImageRecords`, or a tuple `(images, labels)` of a uint8 array
            `(N, h, w, 3)` and int labels `(N,)` (e.g. `SyntheticFineGrained`).
        image_size: output side, or `(height, width)` (re-ID: `(256, 128)`).
        batch_size: images per batch (`P*K` with a sampler).
        training: shuffle and augment when True.
        seed: the random seed (None: a fresh one every call).
        augment: None, or one or several of "randaugment", "mixup", "cutmix", "random_erasing"
            (a string or a sequence of strings); applied only when training.
        resize_mode: "resize" or "center_crop" (see above).
        strict: stop at the first unreadable file instead of skipping it.
        drop_remainder: drop the last incomplete batch (default: when training).
        shuffle_buffer: shuffle buffer size (default: the whole dataset; only indices are
            shuffled, so this costs 8 bytes per image).
        skip_counter: a `SkipCounter` to record skipped files (default: a new one).
        num_parallel_calls: parallelism of decoding (`tf.data.AUTOTUNE`, an int, or None).
        sampler: a `PKSampler` that orders the images (then no shuffling here).
        crop_fraction: fraction of the resized image the crop keeps, in (0, 1].
        num_classes: number of classes for one-hot labels (default: from the records, or the
            largest label + 1 for arrays).

    Returns:
        A `tf.data.Dataset`, prefetched.

    Example:

    >>> data = SyntheticFineGrained(num_train=64, num_test=0)
    >>> dataset = make_pipeline((data.x_train, data.y_train), 64, 32, training=True, seed=0)
    >>> images, labels = next(iter(dataset))
    >>> images.shape, labels.dtype
    (TensorShape([32, 64, 64, 3]), tf.int32)
    """
    height, width = _pair(image_size)
    augments = _parse_augment(augment)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: batch_size={batch_size}"
        )
    if resize_mode not in RESIZE_MODES:
        raise ValueError(
            f"`resize_mode` must be one of {', '.join(RESIZE_MODES)}. "
            f"Received: resize_mode={resize_mode!r}"
        )
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(
            f"`crop_fraction` must be in (0, 1]. Received: crop_fraction={crop_fraction}"
        )
    if sampler is not None and batch_size != sampler.batch_size:
        raise ValueError(
            f"`batch_size` must equal the sampler's P*K = {sampler.batch_size}. "
            f"Received: batch_size={batch_size}"
        )

    if isinstance(records_or_arrays, ImageRecords):
        records, images = records_or_arrays, None
        labels = records.labels
        num_classes = num_classes or records.num_classes
    elif isinstance(records_or_arrays, (tuple, list)) and len(records_or_arrays) == 2:
        records, (images, labels) = None, records_or_arrays
        images, labels = np.asarray(images), np.asarray(labels, dtype=np.int32).reshape(-1)
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
            raise ValueError(
                f"Arrays must be images (N, h, w, 3) and labels (N,). Received shapes "
                f"{images.shape} and {labels.shape}"
            )
        num_classes = num_classes or int(labels.max()) + 1
    else:
        raise ValueError(
            f"Expected ImageRecords or a tuple (images, labels). "
            f"Received: {type(records_or_arrays).__name__}"
        )
    if len(labels) == 0:
        raise ValueError("Cannot build a pipeline over an empty dataset")
    if sampler is not None and len(sampler.labels) != len(labels):
        raise ValueError(
            f"The sampler indexes {len(sampler.labels)} images, the data has {len(labels)}"
        )

    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**31)
    shuffle_seed, element_seed, *layer_seeds = (
        int(s) for s in np.random.SeedSequence(seed).generate_state(5) % 2**31
    )
    drop_remainder = training if drop_remainder is None else drop_remainder
    one_hot = "mixup" in augments or "cutmix" in augments
    skip_counter = SkipCounter() if skip_counter is None else skip_counter
    transform = _make_transform(
        height, width, training, resize_mode, crop_fraction, "random_erasing" in augments
    )

    if sampler is not None:
        indices = sampler.as_dataset()
        drop_remainder = True
    else:
        indices = tf.data.Dataset.range(len(labels))
        if training:
            indices = indices.shuffle(
                shuffle_buffer or len(labels), seed=shuffle_seed, reshuffle_each_iteration=True
            )
    randoms = tf.data.Dataset.random(seed=element_seed, rerandomize_each_iteration=True)
    dataset = tf.data.Dataset.zip((indices, randoms))
    labels_table = tf.constant(labels, dtype=tf.int32)

    if records is None:
        images_table = tf.constant(images.astype(np.uint8))

        def from_array(index, random):
            return transform(tf.gather(images_table, index), random), tf.gather(labels_table, index)

        dataset = dataset.map(from_array, num_parallel_calls=num_parallel_calls)
    else:
        paths_table = tf.constant(records.paths)
        placeholder = tf.zeros([height, width, 3], tf.float32)

        def load(index, random):
            path = tf.gather(paths_table, index)
            decoded = (
                tf.data.Dataset.from_tensors(path)
                .map(lambda p: (transform(_decode(p), random), True))
                .ignore_errors()
            )
            fallback = tf.data.Dataset.from_tensors((placeholder, False))
            return (
                decoded.concatenate(fallback)
                .take(1)
                .map(
                    lambda image, readable: (image, tf.gather(labels_table, index), path, readable)
                )
            )

        def keep(image, label, path, readable):
            if strict:
                message = tf.strings.join(["Unreadable image file (strict=True): ", path])
                with tf.control_dependencies([tf.debugging.Assert(readable, [message])]):
                    return tf.identity(readable)
            return tf.cond(
                readable,
                lambda: tf.constant(True),
                lambda: tf.py_function(lambda p: skip_counter.record(p) or False, [path], tf.bool),
            )

        parallel = (
            {}
            if num_parallel_calls is None
            else {"num_parallel_calls": num_parallel_calls, "deterministic": True}
        )
        dataset = dataset.interleave(load, **parallel)
        dataset = dataset.filter(keep).map(lambda image, label, path, readable: (image, label))

    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if one_hot:
        dataset = dataset.map(lambda x, y: (x, tf.one_hot(y, num_classes, dtype=tf.float32)))
    batch_layers = []
    if training and "randaugment" in augments:
        randaugment = keras.layers.RandAugment(value_range=(0, 255), seed=layer_seeds[0])
        batch_layers.append(
            lambda x, y: (tf.clip_by_value(randaugment(x, training=True), 0.0, 255.0), y)
        )
    mixers = (("mixup", keras.layers.MixUp), ("cutmix", keras.layers.CutMix))
    for (name, layer_class), layer_seed in zip(mixers, layer_seeds[1:]):
        if training and name in augments:
            layer = layer_class(seed=layer_seed)
            batch_layers.append(lambda x, y, layer=layer: _mix(layer, x, y))
    for apply in batch_layers:
        dataset = dataset.map(apply)  # sequential: the layers' seed generators advance in order
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    dataset.skip_counter = skip_counter
    return dataset


def _pair(image_size):
    size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(
            f"`image_size` must be a positive int or (height, width). "
            f"Received: image_size={image_size}"
        )
    return int(size[0]), int(size[1])


def _parse_augment(augment):
    names = () if augment is None else (augment,) if isinstance(augment, str) else tuple(augment)
    unknown = [name for name in names if name not in AUGMENTS]
    if unknown:
        raise ValueError(
            f"Unknown augmentation {unknown[0]!r}. Valid: {', '.join(AUGMENTS)}. "
            f"Received: augment={augment!r}"
        )
    return names


def _decode(path):
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def _make_transform(height, width, training, resize_mode, crop_fraction, random_erasing):
    """The per-image function: uint8 (h, w, 3) and a random int64 -> float32 (height, width, 3)."""
    outer = (math.ceil(height / crop_fraction), math.ceil(width / crop_fraction))

    def cover(image, target):
        # Keep the aspect ratio; the smallest size that covers `target`.
        size = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = tf.reduce_max(tf.constant(target, tf.float32) / size)
        return tf.maximum(tf.cast(tf.math.ceil(size * scale), tf.int32), target)

    def transform(image, random):
        image = tf.cast(image, tf.float32)
        if training:
            size = cover(image, outer) if resize_mode == "center_crop" else outer
            image = tf.image.resize(image, size, antialias=True)
            seeds = tf.random.experimental.stateless_split(
                tf.stack([random, tf.constant(0, tf.int64)]), 3
            )
            image = tf.image.stateless_random_crop(image, [height, width, 3], seeds[0])
            image = tf.image.stateless_random_flip_left_right(image, seeds[1])
            if random_erasing:
                image = _random_erasing(image, seeds[2])
        elif resize_mode == "center_crop":
            image = tf.image.resize(image, cover(image, outer), antialias=True)
            size = tf.shape(image)
            top, left = (size[0] - height) // 2, (size[1] - width) // 2
            image = image[top : top + height, left : left + width]
        else:
            image = tf.image.resize(image, (height, width), antialias=True)
        image = tf.ensure_shape(image, [height, width, 3])
        return tf.clip_by_value(image, 0.0, 255.0)

    return transform


def _random_erasing(image, seed, probability=0.5, area=(0.02, 0.4), aspect=0.3):
    """Random erasing (Zhong et al., AAAI 2020), as in the BoT re-ID baseline.

    With probability 0.5, a rectangle of area `U(0.02, 0.4)·HW` and aspect ratio `U(0.3, 1/0.3)`
    (clipped to the image rather than re-drawn) at a uniform position is filled with the mean
    colour.
    """
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    draws = tf.random.stateless_uniform([6], seed)
    target_area = (area[0] + (area[1] - area[0]) * draws[0]) * height * width
    ratio = aspect + (1.0 / aspect - aspect) * draws[1]
    erase_h = tf.minimum(tf.round(tf.sqrt(target_area * ratio)), height)
    erase_w = tf.minimum(tf.round(tf.sqrt(target_area / ratio)), width)
    top = tf.floor(draws[2] * (height - erase_h + 1))
    left = tf.floor(draws[3] * (width - erase_w + 1))
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (rows >= top) & (rows < top + erase_h) & (cols >= left) & (cols < left + erase_w)
    inside &= draws[4] < probability
    return tf.where(inside[..., None], tf.constant(ERASE_FILL, tf.float32), image)


def _mix(layer, images, labels):
    mixed = layer({"images": images, "labels": labels}, training=True)
    return mixed["images"], mixed["labels"]

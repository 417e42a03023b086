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
    skip_counter=None,
    num_parallel_calls=tf.data.AUTOTUNE,
    sampler=None,
    crop_fraction=0.875,
    num_classes=None,
    epochs=None,
    steps_per_epoch=None,
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

    **Epochs.** A training pipeline is a sequence of epochs, each a function of `(seed, epoch)`
    alone: its shuffling (a stateless permutation, or the `sampler`'s draw for that epoch), each
    image's crop, flip and erasing, and each batch's RandAugment and mixing. With
    `epochs=(first, end)` the dataset holds epochs `first .. end - 1` one after another, each
    exactly `steps_per_epoch` batches long, so that one `fit(..., initial_epoch=first,
    epochs=end, steps_per_epoch=...)` reads it end to end and a resumed run sees the batches an
    uninterrupted one saw. Without `epochs`, every pass over the dataset (every Keras epoch) is
    a new epoch, drawn from `seed`. Everything runs in tf.data: no Python step per batch.

    Unreadable files (missing, truncated, not an image) never end an epoch with an opaque error:
    each image is decoded in its own one-element dataset with `ignore_errors()`, falling back to a
    marked placeholder. The placeholder is dropped and its path recorded in `skip_counter` (also
    attached to the returned dataset as `.skip_counter`), or, with `strict=True`, the pipeline stops
    at once with an InvalidArgumentError whose message names the file. An epoch shortened by
    skipped images repeats its own first batches up to `steps_per_epoch`; with a `sampler`, a
    skipped image shifts the P×K structure of the batches that follow it.

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
        skip_counter: a `SkipCounter` to record skipped files (default: a new one).
        num_parallel_calls: parallelism of decoding (`tf.data.AUTOTUNE`, an int, or None).
        sampler: a `PKSampler` that orders the images (then no shuffling here).
        crop_fraction: fraction of the resized image the crop keeps, in (0, 1].
        num_classes: number of classes for one-hot labels (default: from the records, or the
            largest label + 1 for arrays).
        epochs: training only: `(first, end)`, the epochs the dataset holds (see above).
        steps_per_epoch: with `epochs`, the batches of each epoch (default: one pass over the
            images, or the sampler's batches of the epoch).

    Returns:
        A `tf.data.Dataset`, prefetched.

    Example:

    >>> data = SyntheticFineGrained(num_train=64, num_test=0)
    >>> dataset = make_pipeline((data.x_train, data.y_train), 64, 32, training=True, seed=0)
    >>> images, labels = next(iter(dataset))
    >>> images.shape, labels.dtype
    (TensorShape([32, 64, 64, 3]), tf.int32)
    >>> resumable = make_pipeline((data.x_train, data.y_train), 64, 32, training=True, seed=0,
    ...                           epochs=(3, 10), steps_per_epoch=2)   # epochs 4 to 10
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
    if epochs is not None:
        if not training:
            raise ValueError("`epochs` applies to training pipelines only (training=True).")
        if len(epochs) != 2 or not 0 <= epochs[0] < epochs[1]:
            raise ValueError(
                f"`epochs` must be (first, end) with 0 <= first < end. Received: epochs={epochs}"
            )
    if steps_per_epoch is not None and (epochs is None or steps_per_epoch < 1):
        raise ValueError(
            "`steps_per_epoch` must be >= 1 and comes with `epochs`. "
            f"Received: steps_per_epoch={steps_per_epoch}, epochs={epochs}"
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
    labels_table = tf.constant(labels, dtype=tf.int32)
    if records is None:
        images_table = tf.constant(images.astype(np.uint8))

        def read(elements, parallel):
            return elements.map(
                lambda index, random: (
                    transform(tf.gather(images_table, index), random),
                    tf.gather(labels_table, index),
                ),
                **parallel,
            )

    else:
        load, keep = _file_loader(records.paths, labels_table, transform, height, width, strict)
        keep = keep or (
            lambda image, label, path, readable: tf.cond(
                readable,
                lambda: tf.constant(True),
                lambda: tf.py_function(lambda p: skip_counter.record(p) or False, [path], tf.bool),
            )
        )

        def read(elements, parallel):
            return (
                elements.interleave(load, **parallel)
                .filter(keep)
                .map(lambda image, label, path, readable: (image, label))
            )

    def epoch_order(key):
        """The image indices of the epoch `key`, in the order they are read."""
        if not training:
            return tf.range(len(labels), dtype=tf.int64)
        if sampler is not None:
            draw = sampler.epoch_batches if epochs is not None else _next_epoch(sampler)
            order = tf.numpy_function(
                lambda k: draw(int(k)).reshape(-1).astype(np.int64), [key], tf.int64
            )
            return tf.ensure_shape(order, [None])
        return epoch_permutation(len(labels), shuffle_seed, key)

    def one_epoch(key):
        order = epoch_order(key)
        randoms = tf.random.stateless_uniform(
            tf.shape(order), _seed_pair(element_seed, key), minval=None, maxval=None, dtype=tf.int64
        )
        elements = tf.data.Dataset.from_tensor_slices((order, randoms))
        parallel = (
            {}
            if num_parallel_calls is None
            else {"num_parallel_calls": num_parallel_calls, "deterministic": True}
        )
        batches = read(elements, parallel).batch(batch_size, drop_remainder=drop_remainder)
        if steps_per_epoch is not None:
            batches = batches.repeat().take(steps_per_epoch)
        # Each batch's key for the batch layers: (epoch, position in the epoch).
        positions = tf.data.Dataset.range(np.iinfo(np.int64).max)
        return tf.data.Dataset.zip((batches, positions)).map(
            lambda batch, position: (*batch, key, position)
        )

    if not training:
        keys = tf.data.Dataset.range(1)
    elif epochs is not None:
        keys = tf.data.Dataset.range(*epochs)
    else:  # A new key each time the dataset is iterated: every Keras epoch differs.
        keys = tf.data.Dataset.random(seed=shuffle_seed, rerandomize_each_iteration=True).take(1)
    dataset = keys.flat_map(one_epoch)
    if one_hot:
        dataset = dataset.map(
            lambda x, y, key, position: (
                x,
                tf.one_hot(y, num_classes, dtype=tf.float32),
                key,
                position,
            )
        )
    batch_layers = []
    if training and "randaugment" in augments:
        randaugment = keras.layers.RandAugment(value_range=(0, 255), seed=layer_seeds[0])
        batch_layers.append(
            (
                randaugment,
                lambda x, y: (tf.clip_by_value(randaugment(x, training=True), 0.0, 255.0), y),
            )
        )
    mixers = (("mixup", keras.layers.MixUp), ("cutmix", keras.layers.CutMix))
    for (name, layer_class), layer_seed in zip(mixers, layer_seeds[1:]):
        if training and name in augments:
            layer = layer_class(seed=layer_seed)
            batch_layers.append((layer, lambda x, y, layer=layer: _mix(layer, x, y)))
    for (layer, apply), layer_seed in zip(batch_layers, layer_seeds):
        dataset = dataset.map(
            lambda x, y, key, position, layer=layer, apply=apply, layer_seed=layer_seed: (
                *_seeded(layer, layer_seed, key, position, apply, x, y),
                key,
                position,
            )
        )  # Sequential, as the layers' own random state requires.
    dataset = dataset.map(lambda x, y, key, position: (x, y))
    if epochs is not None:
        steps = steps_per_epoch or _epoch_length(len(labels), batch_size, drop_remainder, sampler)
        if steps is not None:  # Lets fit and its progress bar know the length.
            dataset = dataset.apply(
                tf.data.experimental.assert_cardinality(steps * (epochs[1] - epochs[0]))
            )
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    dataset.skip_counter = skip_counter
    return dataset


def epoch_permutation(size, seed, epoch):
    """The order of `size` items in epoch `epoch`: a stateless random permutation.

    A function of `(seed, epoch)` alone, so any epoch can be drawn again without the ones before.
    """
    keys = tf.random.stateless_uniform([size], _seed_pair(seed, epoch))
    return tf.cast(tf.argsort(keys, stable=True), tf.int64)


def _seed_pair(seed, key):
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(key, tf.int64)])


def _seeded(layer, seed, key, position, apply, images, labels):
    """Applies a Keras augmentation layer with its random state set from (seed, key, position).

    The layer draws from its own `SeedGenerator`, whose state would otherwise run on from batch
    to batch across epochs: set per batch, the draw depends on the batch alone.
    """
    state = tf.random.experimental.stateless_fold_in(_seed_pair(seed, key), position)
    generator = layer.generator
    generator.state.assign(tf.cast(state, generator.state.dtype))
    return apply(images, labels)


def _next_epoch(sampler):
    """`key -> index batches` of the sampler's next epoch (each pass over a dataset without
    explicit epochs takes the next one, as `PKSampler.__iter__` does)."""

    def draw(key):
        batches = sampler.epoch_batches(sampler.epoch)
        sampler.epoch += 1
        return batches

    return draw


def _epoch_length(size, batch_size, drop_remainder, sampler):
    if sampler is not None:
        return None  # The sampler's epochs differ in length.
    return size // batch_size if drop_remainder else -(-size // batch_size)


def _file_loader(paths, labels_table, transform, height, width, strict):
    """(index, random) -> a one-element dataset of (image, label, path, readable), and the
    strict filter (None when unreadable files are skipped)."""
    paths_table = tf.constant(paths)
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
            .map(lambda image, readable: (image, tf.gather(labels_table, index), path, readable))
        )

    def keep_strict(image, label, path, readable):
        message = tf.strings.join(["Unreadable image file (strict=True): ", path])
        with tf.control_dependencies([tf.debugging.Assert(readable, [message])]):
            return tf.identity(readable)

    return load, keep_strict if strict else None


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

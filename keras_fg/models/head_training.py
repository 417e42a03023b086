"""Train a model's head on backbone features computed once (phase one of fine-tuning).

With a frozen backbone, every epoch of ordinary training recomputes the same backbone
features: on a 2-core CPU that is nearly all of its cost. Computing them once and training
the head on them is 50–200× cheaper per epoch, so the head can be trained to convergence —
which a few epochs over images cannot do, and which small fine-grained datasets need before
the backbone is unfrozen (docs/design.md#training-recipe). The head's layers are the model's own: after
`train_head`, the full model predicts with the trained head and can be fine-tuned further.
"""

import hashlib
import json
import os
from pathlib import Path

import keras
import numpy as np
from keras import ops

from keras_fg.models.fine_grained_model import (
    SampleMean,
    joint_loss,
    predict_batch,
    sample_ones,
)
from keras_fg.models.keras_internals import call_site_output


def split_at_backbone(model):
    """Splits a keras_fg model into its backbone and the head that reads its feature map.

    Args:
        model: a one-backbone keras_fg model (`create_model(...)`).

    Returns:
        `(backbone, head)`: `backbone` maps images to `(B, h, w, C)` features; `head` is a
        Functional model from those features to the model's output dict, sharing its layers
        (and so its weights) with `model`.

    Raises:
        ValueError: the model has no backbone, or its head also reads the images (a second
            backbone).

    Example:

    >>> model = create_model("bcnn", 10, backbone="tiny", image_size=32)
    >>> backbone, head = split_at_backbone(model)
    >>> head.input_shape
    (None, 4, 4, 128)
    """
    backbones = model.backbones() if hasattr(model, "backbones") else []
    if len(backbones) != 1:
        raise ValueError(
            "`split_at_backbone` needs a model with exactly one backbone. "
            f"Received: {model.name} with {len(backbones)} backbones"
        )
    backbone = backbones[0]
    # The backbone's output where the model calls it, not inside the backbone's own graph.
    feature_map = call_site_output(backbone)
    try:
        head = keras.Model(feature_map, model.output, name=f"{model.name}_head")
    except ValueError as error:
        raise ValueError(
            f"The head of {model.name} does not read only its backbone's features: {error}"
        ) from error
    return backbone, head


def extract_features(model, data, batch_size=32, flip=False, dtype="float32"):
    """Backbone features of every image in `data`, computed once.

    Args:
        model: a keras_fg model (its backbone is used), or a backbone.
        data: a NumPy array of images (raw pixels in [0, 255]), or a `tf.data.Dataset` of
            image batches or `(images, labels)` batches (an evaluation pipeline: no
            shuffling, no random augmentation).
        batch_size: batch size for NumPy input.
        flip: flip every image horizontally first (cached features of flipped images are
            the augmentation of head training).
        dtype: dtype of the returned array (`"float16"` halves memory at 448 px).

    Returns:
        `features` `(N, h, w, C)`, or `(features, labels)` when the dataset yields labels.

    Example:

    >>> features = extract_features(model, images)                  # doctest: +SKIP
    >>> features, labels = extract_features(model, test_pipeline)   # doctest: +SKIP
    """
    backbone = split_at_backbone(model)[0] if hasattr(model, "backbones") else model
    if isinstance(data, np.ndarray):
        data = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    features, labels = [], []
    for batch, batch_labels in _image_batches(data):
        if batch_labels is not None:
            labels.append(batch_labels)
        features.append(_backbone_features(backbone, batch, flip).astype(dtype))
    if not features:
        raise ValueError("`data` yielded no images.")
    features = np.concatenate(features)
    return (features, np.concatenate(labels)) if labels else features


def _image_batches(data):
    """`(images, labels or None)` of each batch of an array list or a dataset."""
    for batch in data:
        if isinstance(batch, (tuple, list)):
            yield batch[0], ops.convert_to_numpy(batch[1])
        else:
            yield batch, None


def _backbone_features(backbone, images, flip):
    if flip:
        images = ops.flip(images, axis=2)
    # A compiled predict step: an eager call of MobileNetV2 at 448 px, batch 32, peaks at
    # 12 GB of memory on CPU against 2.7 GB for `predict_on_batch`; `predict_batch` keeps one
    # row per image under a distribution strategy.
    return np.asarray(predict_batch(backbone, images))


class FeatureCache:
    """Backbone features of a set of images and their labels, computed once.

    The features live in memory, or, when they would exceed `memory_budget` bytes, in a
    `.npy` file in `directory` that is read batch by batch. A file is named by the cache's
    `fingerprint` (the images, their labels, the flips and the backbone's weights), so a run
    that is resumed finds and reuses a complete file and never reads one made from other
    images or another backbone.

    Use `FeatureCache.build` to compute one, `dataset` to train on it.

    Args:
        features: `(N, h, w, C)` array (or a read-only memory map).
        labels: `(N,)` integer class ids.
        path: the file holding `features`, if on disk.
    """

    def __init__(self, features, labels, path=None):
        labels = np.asarray(labels, dtype="int32").reshape(-1)
        if len(features) != len(labels) or len(features) == 0:
            raise ValueError(
                "`features` and `labels` must be non-empty and of one length. "
                f"Received: {len(features)} features and {len(labels)} labels"
            )
        self.features = features
        self.labels = labels
        self.path = None if path is None else Path(path)

    def __len__(self):
        return len(self.labels)

    @property
    def nbytes(self):
        return int(self.features.nbytes)

    @property
    def in_memory(self):
        return self.path is None

    def describe(self):
        """One line: how many maps, their shape, size and where they are."""
        where = "in memory" if self.in_memory else f"on disk ({self.path})"
        shape = "x".join(str(s) for s in self.features.shape[1:])
        return f"{len(self)} feature maps of {shape}, {self.nbytes / 2**30:.2f} GiB, {where}"

    @classmethod
    def build(
        cls,
        model,
        data,
        count,
        flips=True,
        directory=None,
        memory_budget=None,
        fingerprint=None,
        verbose=1,
    ):
        """Computes the backbone features of `data` (and of its horizontal flips).

        Args:
            model: a one-backbone keras_fg model, or a backbone.
            data: a `tf.data.Dataset` of `(images, labels)` batches in a fixed order (an
                evaluation pipeline: the whole image resized, no random augmentation).
            count: the number of images `data` holds (an upper bound when unreadable files
                are skipped).
            flips: also cache the features of every image flipped horizontally, the
                augmentation that survives caching.
            directory: where a cache that exceeds `memory_budget` is written.
            memory_budget: bytes the cache may hold in memory (None: no limit).
            fingerprint: a string naming the images and the backbone (see
                `feature_fingerprint`); a complete file of that name in `directory` is reused.
            verbose: 0 silent, 1 a progress bar, 2 a line when done.

        Returns:
            A `FeatureCache`: the images' features, then their flips' (labels repeated).
        """
        backbone = split_at_backbone(model)[0] if hasattr(model, "backbones") else model
        copies = 2 if flips else 1
        shape = tuple(int(s) for s in backbone.output.shape[1:])
        size = copies * count * int(np.prod(shape)) * 4
        on_disk = memory_budget is not None and size > memory_budget
        if on_disk and directory is None:
            raise ValueError(
                f"The feature cache needs {size / 2**30:.2f} GiB, over the memory budget of "
                f"{memory_budget / 2**30:.2f} GiB, and no `directory` was given for it."
            )
        path = None
        if on_disk:
            name = f"features-{fingerprint or 'unnamed'}"
            path = Path(directory) / f"{name}.npy"
            done = path.with_suffix(".json")
            if fingerprint and path.exists() and done.exists():
                labels = np.asarray(json.loads(done.read_text())["labels"], dtype="int32")
                features = np.load(path, mmap_mode="r")
                if verbose:
                    print(f"Feature cache: reusing {path}")
                return cls(features[: len(labels)], labels, path)
            Path(directory).mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f"{name}.tmp.npy")
            features = np.lib.format.open_memmap(
                temporary, mode="w+", dtype="float32", shape=(copies * count, *shape)
            )
        else:
            features = np.empty((copies * count, *shape), dtype="float32")
        if verbose:
            where = f"on disk in {directory}" if on_disk else "in memory"
            print(
                f"Feature cache: {copies} x {count} maps of {'x'.join(map(str, shape))}, "
                f"{size / 2**30:.2f} GiB, {where}"
            )
        progress = keras.utils.Progbar(copies * count, verbose=verbose, unit_name="image")
        labels, filled = [], 0
        for flip in (False, True)[:copies]:
            for images, batch_labels in _image_batches(data):
                batch = _backbone_features(backbone, images, flip)
                features[filled : filled + len(batch)] = batch
                filled += len(batch)
                labels.append(batch_labels)
                progress.add(len(batch))
        labels = np.concatenate(labels).astype("int32")
        if on_disk:
            features.flush()
            del features
            os.replace(temporary, path)
            path.with_suffix(".json").write_text(json.dumps({"labels": labels.tolist()}))
            features = np.load(path, mmap_mode="r")
        return cls(features[:filled], labels, path)

    def dataset(self, batch_size, seed=0, epochs=None, steps_per_epoch=None, shuffle=True):
        """`(features, labels)` batches, each epoch shuffled by `(seed, epoch)` alone.

        Args:
            batch_size: features per batch (the last batch of an epoch may be smaller).
            seed: the shuffling seed.
            epochs: `(first, end)`: the epochs the dataset holds, one after another, as
                `keras_fg.data.make_pipeline` does (None: one epoch, 0).
            steps_per_epoch: batches of each epoch (default: one pass over the cache).
            shuffle: False keeps the cache's order (evaluation).
        """
        import tensorflow as tf

        from keras_fg.data.pipeline import epoch_permutation

        size = len(self)
        steps = steps_per_epoch or -(-size // batch_size)
        first, end = epochs or (0, 1)
        labels = tf.constant(self.labels)
        if self.in_memory:
            table = tf.constant(np.asarray(self.features, dtype="float32"))
            rows = lambda indices: tf.gather(table, indices)
        else:  # Read from the file, a batch at a time.
            array, shape = self.features, self.features.shape[1:]

            def rows(indices):
                read = tf.numpy_function(lambda i: np.asarray(array[i]), [indices], tf.float32)
                return tf.ensure_shape(read, [None, *shape])

        def one_epoch(epoch):
            order = (
                epoch_permutation(size, seed, epoch) if shuffle else tf.range(size, dtype=tf.int64)
            )
            batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
            return batches.repeat().take(steps)

        return (
            tf.data.Dataset.range(first, end)
            .flat_map(one_epoch)
            .map(lambda indices: (rows(indices), tf.gather(labels, indices)))
            .apply(tf.data.experimental.assert_cardinality(steps * (end - first)))
            .prefetch(tf.data.AUTOTUNE)
        )


def feature_fingerprint(backbone, source, image_size, flips):
    """A short hash of what a feature cache holds: the images (paths and labels, or pixel
    arrays), the image size, the flips and the backbone's weights."""
    digest = hashlib.sha256(repr((tuple(np.atleast_1d(image_size)), flips)).encode())
    for part in source:
        digest.update(np.ascontiguousarray(part).tobytes())
    for weight in backbone.weights:
        digest.update(np.ascontiguousarray(ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:16]


class FeatureHead(keras.Model):
    """A keras_fg model's head as a trainable model on cached backbone features.

    It trains the head's variables (the model's own) with the model's joint objective
    (`model.compute_loss_terms`: classification, part and channel-grouping, triplet), and
    reports each term and the accuracy as `fit` metrics, as the full model does.

    Args:
        model: a one-backbone keras_fg model.

    Call arguments:
        features: `(B, h, w, C)` backbone features.

    Returns:
        The model's output dict.

    It is a training helper and is not saved: save `model`, whose head it trains.
    """

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.head = split_at_backbone(model)[1]
        # A bound method, not the model: tracking the model would add its backbone's variables.
        self.compute_loss_terms = model.compute_loss_terms
        self.loss_tracker = SampleMean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.loss_term_trackers = {n: keras.metrics.Mean(name=n) for n in model.loss_term_names()}

    def call(self, features, training=None):
        return self.head(features, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # The full model's objective: sample weights and replica scaling included.
        y = ops.reshape(y, (-1,))
        terms = self.compute_loss_terms(y, y_pred)
        return joint_loss(
            terms, y, sample_weight, self.loss_term_trackers, self.loss_tracker, self.losses
        )

    @property
    def metrics(self):
        # This model's own loss tracker replaces Keras' (see `SampleMean`).
        return [m for m in super().metrics if m.name != "loss" or m is self.loss_tracker]

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        labels = ops.reshape(y, (-1,))
        self.accuracy_tracker.update_state(
            labels, y_pred["logits"], sample_weight=sample_ones(labels)
        )
        return super().compute_metrics(x, y, y_pred, sample_weight)


def train_head(
    model,
    features,
    labels=None,
    epochs=30,
    batch_size=64,
    optimizer=None,
    validation_data=None,
    validation_freq=1,
    callbacks=None,
    class_weights=None,
    seed=0,
    initial_epoch=0,
    verbose=0,
):
    """Trains the head of `model` on cached backbone features, with the model's joint loss.

    Phase one of the two-phase recipe (docs/design.md): the backbone is untouched; every
    other variable of the model is trained in place, so `model` itself predicts with the
    trained head afterwards. Each epoch is shuffled by `(seed, epoch)` alone, so a run
    continued with `initial_epoch` (its weights and optimizer restored) ends where an
    uninterrupted one does.

    Args:
        model: a one-backbone keras_fg model, or a compiled `FeatureHead` of one (to keep
            its optimizer across calls, or to restore it from a checkpoint first).
        features: a `FeatureCache`, or `(N, h, w, C)` backbone features
            (`extract_features`), any float dtype.
        labels: `(N,)` integer class ids (with an array of features).
        epochs: the epoch to train up to (as `fit`'s `epochs`).
        batch_size: features per step.
        optimizer: a Keras optimizer for a model (default: AdamW, learning rate 1e-3 with
            cosine decay to 0 over the run, weight decay 1e-4).
        validation_data: optional `FeatureCache` or `(features, labels)` evaluated after
            each epoch.
        validation_freq: evaluate `validation_data` every this many epochs.
        callbacks: Keras callbacks for `fit`.
        class_weights: optional `(num_classes,)` weight of each class's samples in the loss.
        seed: the shuffling seed.
        initial_epoch: the epoch to start from (as `fit`'s `initial_epoch`).
        verbose: `fit` verbosity.

    Returns:
        The `keras.callbacks.History` of the run.

    Example:

    >>> cache = FeatureCache.build(model, train_pipeline, count=len(records))  # doctest: +SKIP
    >>> train_head(model, cache, epochs=30)                          # doctest: +SKIP
    >>> model.predict(test_images)["logits"]                         # doctest: +SKIP
    """
    if not isinstance(features, FeatureCache):
        if labels is None:
            raise ValueError("`labels` are needed with an array of `features`.")
        features = FeatureCache(np.asarray(features), labels)
    if epochs < 1 or batch_size < 1 or not 0 <= initial_epoch < epochs:
        raise ValueError(
            f"`epochs` and `batch_size` must be >= 1 and `initial_epoch` in [0, epochs). "
            f"Received: epochs={epochs}, batch_size={batch_size}, initial_epoch={initial_epoch}"
        )
    steps = -(-len(features) // batch_size)
    if isinstance(model, FeatureHead):
        head = model
    else:
        if optimizer is None:
            schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=epochs * steps)
            optimizer = keras.optimizers.AdamW(schedule, weight_decay=1e-4)
        head = FeatureHead(model)
        head.compile(optimizer=optimizer)
    validation = None
    if validation_data is not None:
        if not isinstance(validation_data, FeatureCache):
            validation_data = FeatureCache(np.asarray(validation_data[0]), validation_data[1])
        validation = validation_data.dataset(batch_size, shuffle=False)
    batches = features.dataset(batch_size, seed, epochs=(initial_epoch, epochs))
    if class_weights is not None:
        table = ops.convert_to_tensor(np.asarray(class_weights, dtype="float32"))
        batches = batches.map(lambda x, y: (x, y, ops.take(table, y)))
    return head.fit(
        batches,
        steps_per_epoch=steps,
        initial_epoch=initial_epoch,
        epochs=epochs,
        validation_data=validation,
        validation_freq=validation_freq,
        callbacks=callbacks,
        shuffle=False,  # The dataset shuffles, each epoch by (seed, epoch).
        verbose=verbose,
    )


def transfer_weights(source, target):
    """Copies every weight of `source` into the layer of the same name in `target`, where
    `target` may have grown: a weight larger in `target` gets `source`'s values in its
    leading slice and zeros elsewhere.

    This is how a head trained on cached features (`train_head`) joins a larger model that
    cannot be, such as full MA-CNN with part crops (`create_model(..., part_crop_size=S)`):
    the classifier's kernel gains zero rows for the crops' features, so `target` starts by
    predicting exactly what `source` did, and fine-tuning lets the new inputs in.

    Args:
        source: a trained Keras model.
        target: a Keras model holding a layer of the same name for each layer of `source`
            that has weights, each of them at least as large in every dimension.

    Returns:
        The names of the layers whose weights were zero-padded.

    Raises:
        ValueError: a layer of `source` is missing from `target`, or a weight shrinks or
            changes rank.

    Example:

    >>> plain = create_model("macnn", 5, backbone="tiny", image_size=64)
    >>> full = create_model("macnn", 5, backbone="tiny", image_size=64, part_crop_size=32)
    >>> transfer_weights(plain, full)
    ['classifier']
    """
    padded = []
    target_layers = {layer.name: layer for layer in target.layers}
    for layer in source.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if layer.name not in target_layers:
            raise ValueError(f"The target model {target.name} has no layer {layer.name!r}.")
        into = target_layers[layer.name].get_weights()
        grown = []
        for value, slot in zip(weights, into, strict=True):
            if value.shape == slot.shape:
                grown.append(value)
                continue
            if value.ndim != slot.ndim or any(a > b for a, b in zip(value.shape, slot.shape)):
                raise ValueError(
                    f"Layer {layer.name!r}: a weight of shape {value.shape} cannot be copied "
                    f"into one of shape {slot.shape} (it may only grow)."
                )
            zeros = np.zeros_like(slot)
            zeros[tuple(slice(0, n) for n in value.shape)] = value
            grown.append(zeros)
        if any(a.shape != b.shape for a, b in zip(weights, grown, strict=True)):
            padded.append(layer.name)
        target_layers[layer.name].set_weights(grown)
    return padded

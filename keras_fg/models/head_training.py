"""Train a model's head on backbone features computed once (phase one of fine-tuning).

With a frozen backbone, every epoch of ordinary training recomputes the same backbone
features: on a 2-core CPU that is nearly all of its cost. Computing them once and training
the head on them is 50–200× cheaper per epoch, so the head can be trained to convergence —
which a few epochs over images cannot do, and which small fine-grained datasets need before
the backbone is unfrozen (docs/design.md#training-recipe). The head's layers are the model's own: after
`train_head`, the full model predicts with the trained head and can be fine-tuned further.
"""

import keras
import numpy as np
from keras import ops

from keras_fg.models.fine_grained_model import (
    SampleMean,
    joint_loss,
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
    for batch in data:
        if isinstance(batch, (tuple, list)):
            batch, batch_labels = batch[0], batch[1]
            labels.append(ops.convert_to_numpy(batch_labels))
        if flip:
            batch = ops.flip(batch, axis=2)
        # A compiled predict step: an eager call of MobileNetV2 at 448 px, batch 32, peaks
        # at 12 GB of memory on CPU against 2.7 GB for `predict_on_batch`.
        features.append(np.asarray(backbone.predict_on_batch(batch)).astype(dtype))
    if not features:
        raise ValueError("`data` yielded no images.")
    features = np.concatenate(features)
    return (features, np.concatenate(labels)) if labels else features


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
    labels,
    epochs=30,
    batch_size=64,
    optimizer=None,
    validation_data=None,
    callbacks=None,
    seed=0,
    verbose=0,
):
    """Trains the head of `model` on cached backbone features, with the model's joint loss.

    The model's backbone is untouched; every other variable of the model is trained in
    place, so `model` itself predicts with the trained head afterwards.

    Args:
        model: a one-backbone keras_fg model.
        features: `(N, h, w, C)` backbone features (`extract_features`), any float dtype.
        labels: `(N,)` integer class ids.
        epochs: passes over the features.
        batch_size: features per step.
        optimizer: a Keras optimizer (default: AdamW, learning rate 1e-3 with cosine decay
            to 0 over the run, weight decay 1e-4).
        validation_data: optional `(features, labels)` evaluated after each epoch.
        callbacks: Keras callbacks for `fit`.
        seed: the shuffling seed.
        verbose: `fit` verbosity.

    Returns:
        The `keras.callbacks.History` of the run.

    Example:

    >>> features, labels = extract_features(model, train_pipeline)  # doctest: +SKIP
    >>> train_head(model, features, labels, epochs=40)               # doctest: +SKIP
    >>> model.predict(test_images)["logits"]                         # doctest: +SKIP
    """
    import tensorflow as tf  # The input pipeline, as in keras_fg.data.

    features = np.asarray(features)
    labels = np.asarray(labels, dtype="int32").reshape(-1)
    if len(features) != len(labels) or len(features) == 0:
        raise ValueError(
            "`features` and `labels` must be non-empty and of one length. "
            f"Received: {len(features)} features and {len(labels)} labels"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(
            f"`epochs` and `batch_size` must be >= 1. Received: epochs={epochs}, "
            f"batch_size={batch_size}"
        )
    steps = epochs * -(-len(features) // batch_size)
    if optimizer is None:
        schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=steps)
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=1e-4)

    def pipeline(x, y, shuffle):
        data = tf.data.Dataset.from_tensor_slices((x, y))
        if shuffle:
            data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        cast = lambda f, t: (tf.cast(f, "float32"), t)  # noqa: E731 (float16 caches)
        return data.batch(batch_size).map(cast).prefetch(2)

    head = FeatureHead(model)
    head.compile(optimizer=optimizer)
    validation = None
    if validation_data is not None:
        validation = pipeline(validation_data[0], validation_data[1], shuffle=False)
    return head.fit(
        pipeline(features, labels, shuffle=True),
        epochs=epochs,
        validation_data=validation,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,  # The pipeline shuffles.
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

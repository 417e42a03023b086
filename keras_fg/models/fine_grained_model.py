"""The base of every keras_fg model family: a Functional model that knows its own joint loss."""

import numbers

import keras
import numpy as np
from keras import ops

from keras_fg.models import multi_optimizer  # noqa: F401  (registers it, for loading)

PHASES = ("joint", "channel_grouping", "classification")
# The constructor arguments that hold a backbone model (serialised as nested models).
BACKBONE_ARGUMENTS = ("backbone", "second_backbone", "part_backbone")


@keras.saving.register_keras_serializable(package="keras_fg")
class FineGrainedModel(keras.Model):
    """A Functional model whose `compile(optimizer)` alone is enough to train it.

    Every model family (`GAPClassifier`, `BilinearCNN`, `MACNN`, `DASRBN`) builds its graph
    and passes it here. Its predictions are a dict with at least `"logits"`, `"probabilities"`
    and `"features"` (the vector the classifier reads, also the re-identification embedding),
    and for the attention families `"attention_maps"`. The joint objective is

        L = CE_ls(logits, y)                                  classification_loss
          + part_loss_weight · Σ_i CE_ls(part_logits_i, y)    part_loss (MA-CNN)
          + channel_grouping_weight · L_cng(attention_maps)   channel_grouping_loss (MA-CNN)
          + triplet_weight · L_metric(embedding, y)           triplet_loss or circle_loss (re-ID)
          + center_loss_weight · ‖embedding − c_y‖²            center_loss (re-ID)

    with `CE_ls` the cross-entropy with label smoothing. Each term present in the family is
    reported as its own metric, next to `loss` and `accuracy`. A `loss=` given to `compile`
    replaces the joint objective.

    Sample weights (`fit(..., sample_weight=...)`, or `class_weight=`, which Keras turns into
    sample weights) weight every term as they weight Keras' own losses: `Σ_b w_b · l_b / B`
    over the replica's batch of B samples. The total is then scaled by
    `1 / num_replicas_in_sync`, as Keras' own losses are, so one step under
    `tf.distribute.MirroredStrategy` applies the same update as on one device.

    Subclasses call `super().__init__(inputs=..., outputs=..., num_classes=..., **options)`
    and implement `get_config` with their own constructor arguments.

    Args:
        num_classes: number of classes (identities for re-identification).
        class_names: optional list of `num_classes` names, saved with the model.
        label_smoothing: label smoothing of every cross-entropy term, in [0, 1).
        triplet_weight: weight of the metric-learning loss on the embedding (0 disables it).
        triplet_margin: the batch-hard triplet loss's margin.
        metric_loss: `"triplet"` (batch-hard triplet, Hermans et al. 2017) or `"circle"`
            (Keras' Circle loss, Sun et al. CVPR 2020, with its default γ = 80, m = 0.4).
        center_loss_weight: weight of the center loss on the embedding (0 disables it). Its
            class centres `centers` are a non-trainable weight, moved after every training
            batch by Wen et al.'s rule (`keras_fg.losses.updated_centers`, α = 0.5).
    """

    def __init__(
        self,
        inputs,
        outputs,
        num_classes,
        class_names=None,
        label_smoothing=0.0,
        triplet_weight=0.0,
        triplet_margin=0.3,
        metric_loss="triplet",
        center_loss_weight=0.0,
        **kwargs,
    ):
        num_classes = check_num_classes(num_classes)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"`class_names` must have `num_classes`={num_classes} entries. "
                f"Received: {len(class_names)} names"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"`label_smoothing` must be in [0, 1). Received: label_smoothing={label_smoothing}"
            )
        if triplet_weight < 0:
            raise ValueError(
                f"`triplet_weight` must be >= 0. Received: triplet_weight={triplet_weight}"
            )
        if metric_loss not in ("triplet", "circle"):
            raise ValueError(
                f"`metric_loss` must be 'triplet' or 'circle'. Received: metric_loss={metric_loss!r}"
            )
        if center_loss_weight < 0:
            raise ValueError(
                "`center_loss_weight` must be >= 0. "
                f"Received: center_loss_weight={center_loss_weight}"
            )
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.center_loss_weight = float(center_loss_weight)
        if self.center_loss_weight > 0:
            dim = outputs.get("embedding", outputs["features"]).shape[-1]
            self.centers = self.add_weight(
                shape=(num_classes, dim),
                initializer="zeros",
                trainable=False,
                aggregation="mean",
                name="centers",
            )
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.label_smoothing = float(label_smoothing)
        self.triplet_weight = float(triplet_weight)
        self.triplet_margin = float(triplet_margin)
        self.metric_loss = metric_loss
        self._phase = "joint"
        self.loss_tracker = SampleMean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.loss_term_trackers = {
            name: keras.metrics.Mean(name=name) for name in self.loss_term_names()
        }

    # ----------------------------------------------------------------------------------------
    # The joint objective.

    def loss_term_names(self):
        """The names of the loss terms this model computes, in reporting order."""
        names = ["classification_loss"]
        if self.triplet_weight > 0:
            names.append(f"{self.metric_loss}_loss")
        if self.center_loss_weight > 0:
            names.append("center_loss")
        return names

    def cross_entropy(self, labels, logits):
        """Per-sample cross-entropy `(B,)` with label smoothing of `labels` against `logits`.

        `labels` are integer class ids `(B,)`, or soft labels `(B, num_classes)` (MixUp, CutMix).
        """
        if self._are_soft(labels):
            one_hot = ops.cast(labels, "float32")
        else:
            one_hot = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), self.num_classes)
        per_sample = keras.losses.categorical_crossentropy(
            one_hot,
            ops.cast(logits, "float32"),
            from_logits=True,
            label_smoothing=self.label_smoothing,
        )
        return per_sample

    def part_cross_entropy(self, labels, part_logits):
        """`Σ_i CE_ls(part_logits[:, i], y)`, per sample, over the parts of `(B, P, K)` logits."""
        return sum(
            self.cross_entropy(labels, part_logits[:, i]) for i in range(part_logits.shape[1])
        )

    def _are_soft(self, labels):
        return len(labels.shape) == 2 and labels.shape[-1] == self.num_classes

    def compute_loss_terms(self, y, y_pred):
        """Returns `{name: (weight, value)}` for every term of the joint objective.

        Families extend this (call `super()`, add their terms, and list each new name in
        `loss_term_names`). The contract for `value`, as for a Keras loss function:

        - per-sample values `(B,)`, float32, one per sample of the batch (the usual case:
          `cross_entropy`, the triplet loss). `compute_loss` weights them by the sample
          weights and reduces them Keras' way, `Σ_b w_b · value_b / B`;
        - or a float32 scalar, for a term defined on the batch as a whole; it is then weighted
          by the batch's mean sample weight (Keras' result for a scalar loss).

        `y` is `(B,)` integer class ids or `(B, num_classes)` soft labels; `y_pred` the
        model's output dict. The reported metric of each term is its weighted mean, before
        `weight`; `loss` is `Σ weight · term` plus any regularisation.
        """
        # A family that serves a fused score trains its main classifier on its own logits.
        logits = y_pred.get("classifier_logits", y_pred["logits"])
        terms = {"classification_loss": (1.0, self.cross_entropy(y, logits))}
        if self.triplet_weight > 0:
            from keras_fg.losses import batch_hard_triplet_loss

            embedding = ops.cast(y_pred.get("embedding", y_pred["features"]), "float32")
            if self.metric_loss == "circle":
                per_sample = keras.losses.circle(y, embedding)
            else:
                per_sample = batch_hard_triplet_loss(y, embedding, margin=self.triplet_margin)
            terms[f"{self.metric_loss}_loss"] = (self.triplet_weight, per_sample)
        if self.center_loss_weight > 0:
            from keras_fg.losses import center_loss

            embedding = ops.cast(y_pred.get("embedding", y_pred["features"]), "float32")
            labels = ops.argmax(y, axis=-1) if self._are_soft(y) else y  # MixUp: strongest.
            per_sample = center_loss(labels, embedding, self.centers)
            terms["center_loss"] = (self.center_loss_weight, per_sample)
        return terms

    def update_centers(self, y, y_pred):
        """Moves the center loss's class centres towards this batch's embeddings."""
        from keras_fg.losses import updated_centers

        embedding = y_pred.get("embedding", y_pred["features"])
        labels = ops.argmax(y, axis=-1) if self._are_soft(y) else y
        self.centers.assign(updated_centers(labels, embedding, self.centers))

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        # One train function per training state (see `set_phase`); untracked, as Keras keeps
        # its own `train_function`.
        object.__setattr__(self, "_train_functions", {})

    def compile_from_config(self, config):
        # Keras leaves a model whose `compile` is overridden uncompiled on loading; this is
        # what it would do otherwise: compile as saved, then build the optimizer so that
        # its saved state loads into it.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self.loss is not None:  # The user's own loss replaces the joint objective.
            total = super().compute_loss(x, y, y_pred, sample_weight, training=training)
            first = keras.tree.flatten(y)[0]
            count = ops.sum(sample_ones(ops.reshape(first, (ops.shape(first)[0], -1))))
            self.loss_tracker.update_state(_unscale_for_distribution(total), sample_weight=count)
            return total
        if y is None:
            raise ValueError(
                "keras_fg models compute their joint loss from integer class labels; "
                "the data gave none. Pass (images, labels) to fit/evaluate."
            )
        if not self._are_soft(y):  # Integer ids (B,) or (B, 1).
            y = ops.reshape(y, (-1,))
        terms = self.compute_loss_terms(y, y_pred)
        total = joint_loss(
            terms, y, sample_weight, self.loss_term_trackers, self.loss_tracker, self.losses
        )
        if training and self.center_loss_weight > 0:  # After the loss read the old centres.
            self.update_centers(y, y_pred)
        return total

    @property
    def metrics(self):
        # Keras' own "loss" tracker counts each batch by its shape (see `sample_ones`); the
        # model reports its own `loss_tracker` instead.
        metrics = [m for m in super().metrics if m.name != "loss" or m is self.loss_tracker]
        if getattr(self, "loss", None) is not None:  # The joint terms are not computed then.
            unused = {id(tracker) for tracker in self.loss_term_trackers.values()}
            metrics = [m for m in metrics if id(m) not in unused]
        return metrics

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        labels = y.get("logits") if isinstance(y, dict) else y
        if labels is not None:
            if self._are_soft(labels):
                labels = ops.argmax(labels, axis=-1)  # Their strongest class.
            labels = ops.reshape(labels, (-1,))
            self.accuracy_tracker.update_state(
                labels, y_pred["logits"], sample_weight=sample_ones(labels)
            )
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def predict_on_batch(self, x):
        """`keras.Model.predict_on_batch`, one row per image under a distribution strategy too
        (see `predict_batch`)."""
        return predict_batch(super(), x)

    # ----------------------------------------------------------------------------------------
    # Training phases (MA-CNN's alternating optimisation).

    @property
    def phase(self):
        """The training phase: which variables a training step updates.

        - `"joint"`: every trainable variable (the default).
        - `"channel_grouping"`: only the channel-grouping (part attention) variables.
        - `"classification"`: every trainable variable except the channel-grouping ones.
        """
        return self._phase

    def set_phase(self, phase):
        """Switches the training phase; takes effect at the next training step.

        Safe between epochs of one `fit` call (see `keras_fg.models.PhaseSchedule`): the
        train function of the new state is traced once and kept, so alternating phases swap
        between compiled functions; the optimizer keeps its state for every variable.
        """
        if phase not in PHASES:
            raise ValueError(f"Unknown phase. Expected one of {PHASES}. Received: phase={phase!r}")
        if phase == self._phase:
            return
        if phase != "joint" and not self.channel_grouping_variables():
            raise ValueError(
                f"Phase {phase!r} needs channel-grouping variables; "
                f"{type(self).__name__} has none (only MA-CNN has them)."
            )
        if phase != "joint" and keras.backend.backend() == "jax":
            # JAX's trainer differentiates `trainable_variables`, not the filtered
            # `trainable_weights` below, so a phase would silently train every variable.
            raise NotImplementedError(
                f"Training phase {phase!r} needs the TensorFlow or PyTorch backend "
                "(KERAS_BACKEND=tensorflow or torch); on JAX, train in the 'joint' phase."
            )
        before = self.training_state()
        self._phase = phase
        self._switch_train_function(before)

    def channel_grouping_variables(self):
        """The variables of the part attention; the MA-CNN family overrides this."""
        return []

    @property
    def trainable_weights(self):
        weights = super().trainable_weights
        optimizer = getattr(self, "optimizer", None)
        # Until the optimizer is built, every variable is listed, so that it learns them all
        # and keeps its state for each across phase switches.
        if getattr(self, "_phase", "joint") == "joint" or optimizer is None or not optimizer.built:
            return weights
        grouping = {id(v) for v in self.channel_grouping_variables()}
        keep_grouping = self._phase == "channel_grouping"
        return [v for v in weights if (id(v) in grouping) == keep_grouping]

    def backbones(self):
        """The model's backbones (the headless feature extractors it was built on)."""
        return [getattr(self, n) for n in BACKBONE_ARGUMENTS if getattr(self, n, None) is not None]

    def set_backbone_trainable(self, trainable):
        """Freezes or unfreezes the backbones, keeping BatchNormalization frozen if it was.

        Setting `backbone.trainable = True` directly would also unfreeze its BatchNormalization
        layers, which then leave inference mode.
        """
        before = self.training_state()
        for backbone in self.backbones():
            backbone.trainable = trainable
            if getattr(self, "freeze_batchnorm", False):
                freeze_batch_normalization(backbone)
        self._switch_train_function(before)

    def training_state(self):
        """What decides which variables a training step updates: the phase, and for every
        backbone whether it is trainable. One train function is traced per state."""
        return (self._phase,) + tuple(bool(b.trainable) for b in self.backbones())

    def _switch_train_function(self, previous_state):
        # A traced train function reads the trainable variables once, when traced: each
        # training state keeps its own, so a switch back does not retrace.
        if getattr(self, "train_function", None) is None:
            return
        functions = self.__dict__.setdefault("_train_functions", {})
        functions[previous_state] = self.train_function
        state = self.training_state()
        if state in functions:
            self.train_function = functions[state]
        else:
            self.make_train_function(force=True)

    # ----------------------------------------------------------------------------------------

    def get_config(self):
        # Functional's graph config is not used: families rebuild the graph from their
        # arguments. The ones every family shares are collected here; each family adds its own.
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "label_smoothing": self.label_smoothing,
            "triplet_weight": self.triplet_weight,
            "triplet_margin": self.triplet_margin,
            "metric_loss": self.metric_loss,
            "center_loss_weight": self.center_loss_weight,
        }
        for name in BACKBONE_ARGUMENTS:
            if hasattr(self, name):
                value = getattr(self, name)
                config[name] = None if value is None else keras.saving.serialize_keras_object(value)
        for name in ("dropout", "bnneck", "freeze_batchnorm"):
            if hasattr(self, name):
                config[name] = getattr(self, name)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in BACKBONE_ARGUMENTS:
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def predict_batch(model, x):
    """`model`'s outputs for one batch `x`, exactly one row per image on any strategy.

    Keras 3.15's `predict_on_batch` hands the whole batch to every replica of a
    `MirroredStrategy` and concatenates their outputs: R rows per image on R replicas. `predict`
    splits its batches across the replicas, so it serves a model built under such a strategy.

    Args:
        model: a Keras model (or `super()` inside one, to reach Keras' own method).
        x: one batch of inputs.
    """
    owner = getattr(model, "__self__", model)  # `super()` proxies its instance.
    replicas = _strategy_replicas(owner)
    if replicas == 1:
        return model.predict_on_batch(x)
    # A batch that does not divide across the replicas leaves some with no image, which
    # TensorFlow's CPU convolutions reject: pad with copies of the last image, then drop them.
    x = keras.tree.map_structure(np.asarray, x)
    size = len(keras.tree.flatten(x)[0])
    pad = -size % replicas
    if pad:
        x = keras.tree.map_structure(lambda t: np.concatenate([t, np.repeat(t[-1:], pad, 0)]), x)
    outputs = owner.predict(x, batch_size=size + pad, verbose=0)
    return keras.tree.map_structure(lambda t: t[:size], outputs)


def _strategy_replicas(model):
    if keras.backend.backend() != "tensorflow":
        return 1
    strategy = getattr(model, "distribute_strategy", None)
    return getattr(strategy, "num_replicas_in_sync", 1)


def sample_ones(labels):
    """Ones `(B,)`, one per sample, computed from the values of `labels` `(B,)` or `(B, C)`.

    Metric counts are weighted by these rather than by a batch size taken from a shape. On
    TensorFlow, Keras ends every epoch over a dataset of unknown length (keras_fg pipelines
    skip unreadable images, so theirs is unknown) with one more step on the exhausted
    iterator; in that step the ops that read no data still run, so a count increment of 1,
    or of a static batch size, is added once more and every per-epoch mean comes out
    diluted by one empty batch. An op that reads the labels cannot run there.
    """
    if len(labels.shape) == 2:
        labels = labels[:, 0]
    return ops.cast(ops.equal(labels, labels), "float32")


class SampleMean(keras.metrics.Mean):
    """A `keras.metrics.Mean` whose count increments read the values (see `sample_ones`)."""

    def update_state(self, values, sample_weight=None):
        values = ops.convert_to_tensor(values, self.dtype)
        # 1 for every value, NaN included, but computed from the value.
        read = ops.cast(ops.logical_or(ops.equal(values, values), ops.isnan(values)), self.dtype)
        if sample_weight is not None:
            read = read * ops.cast(sample_weight, self.dtype)
        super().update_state(values, sample_weight=read)


def joint_loss(terms, y, sample_weight, term_trackers, loss_tracker, extra_losses=()):
    """The weighted total of `terms` (see `FineGrainedModel.compute_loss_terms`).

    Each term is reduced Keras' way, `Σ_b w_b · l_b / B` (a scalar term: times the mean
    weight), its tracker updated with the result; the total `Σ weight · term` is divided by
    the replica count, like Keras' own `Loss` objects, so that summing the replicas'
    gradients gives the gradient of the global mean. `extra_losses` (regularisers,
    `add_loss`) are added as Keras adds them.

    Trackers are weighted by the batch size, as Keras weights its own loss: an epoch's figure
    is then the mean over samples, right with a smaller last batch too.
    """
    ones = sample_ones(y)
    batch_size = ops.sum(ones)
    weights = ones
    if sample_weight is not None:
        weights = ones * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
    total = ops.zeros((), "float32")
    for name, (factor, value) in terms.items():
        value = ops.cast(value, "float32")
        if len(value.shape) == 0:
            reduced = value * ops.sum(weights) / batch_size
        else:
            reduced = ops.sum(ops.reshape(value, (-1,)) * weights) / batch_size
        term_trackers[name].update_state(reduced, sample_weight=batch_size)
        total = total + factor * reduced
    for extra in extra_losses:
        total = total + ops.sum(ops.cast(extra, "float32"))
    loss_tracker.update_state(total, sample_weight=batch_size)
    return _scale_for_distribution(total)


def _replicas():
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.distribute.get_strategy().num_replicas_in_sync
    return 1


def _scale_for_distribution(value):
    """Divides by the number of replicas under a TensorFlow distribution strategy."""
    replicas = _replicas()
    return value / replicas if replicas > 1 else value


def _unscale_for_distribution(value):
    replicas = _replicas()
    return value * replicas if replicas > 1 else value


def check_num_classes(num_classes):
    """`num_classes` as a plain int (NumPy integers accepted), or a ValueError quoting it."""
    if (
        not isinstance(num_classes, numbers.Integral)
        or isinstance(num_classes, bool)
        or num_classes < 2
    ):
        raise ValueError(
            f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes}"
        )
    return int(num_classes)


def classification_head(features, num_classes, dropout=0.0, bnneck=False):
    """The outputs every family ends with, from its feature vector `(B, D)`.

    With `bnneck` (re-identification, Luo et al. "Bag of Tricks", 2019) the triplet loss reads
    the vector before a BatchNormalization ("embedding") and the classifier, without bias,
    reads it after ("features", also the embedding used at test time).

    Returns the dict `{"logits", "probabilities", "features"[, "embedding"]}`.
    """
    num_classes = check_num_classes(num_classes)
    outputs = {}
    features = keras.layers.Identity(name="features", dtype="float32")(features)
    head_input = features
    if bnneck:
        outputs["embedding"] = features
        head_input = keras.layers.BatchNormalization(center=False, name="bnneck")(features)
        features = keras.layers.Identity(name="bnneck_features", dtype="float32")(head_input)
    if dropout:
        head_input = keras.layers.Dropout(dropout, name="head_dropout")(head_input)
    logits = keras.layers.Dense(
        num_classes, use_bias=not bnneck, name="classifier", dtype="float32"
    )(head_input)
    outputs["logits"] = logits
    outputs["probabilities"] = keras.layers.Softmax(name="probabilities", dtype="float32")(logits)
    outputs["features"] = features
    return outputs


def per_part_classifiers(num_parts, num_classes, name, **options):
    """`(B, P, C) -> (B, P, K)`: one linear classifier per part, `W_i x_i + b_i`."""
    return keras.layers.EinsumDense(
        "bpc,pck->bpk",
        output_shape=(num_parts, num_classes),
        bias_axes="pk",
        name=name,
        dtype="float32",
        **options,
    )


def global_metric_embedding(outputs, pooled, bnneck, options):
    """Points the re-ID metric losses at `pooled`, GAP(F), when the model has any of them.

    The part families (MA-CNN, PCB) serve the fused vector but train the triplet and center
    losses on the global feature alone, as MGN does (see `MACNN`'s `metric_embedding`).
    """
    metric_losses = options.get("triplet_weight", 0) > 0 or options.get("center_loss_weight", 0) > 0
    if bnneck or metric_losses:
        outputs["embedding"] = keras.layers.Identity(name="embedding", dtype="float32")(pooled)


def serve_with_part_scores(outputs, *part_logits):
    """Serves `logits = z + Σ_g mean_i part_logits_g[:, i]`, keeping `z` as "classifier_logits".

    Each group of part scores `(B, P, K)` joins the main classifier's; each keeps its own loss.
    """
    outputs["classifier_logits"] = outputs["logits"]
    fused = outputs["logits"]
    for logits in part_logits:
        fused = fused + ops.mean(logits, axis=1)
    outputs["logits"] = fused
    outputs["probabilities"] = keras.layers.Softmax(name="fused_probabilities", dtype="float32")(
        fused
    )


def image_input(backbone):
    """The model input: images of the backbone's size, raw pixel values in [0, 255]."""
    return keras.Input(shape=backbone.input_shape[1:], name="images")


def run_backbone(backbone, images, freeze_batchnorm):
    """Calls the backbone, its BatchNormalization frozen when asked (docs/design.md#training-recipe).

    A frozen (`trainable=False`) BatchNormalization layer runs in inference mode in Keras 3,
    whatever `training` is; an explicit `backbone(x, training=False)` would not survive, since
    a Functional model passes its own `training` to every layer it calls.
    """
    if freeze_batchnorm:
        freeze_batch_normalization(backbone)
    return backbone(images)


def second_stream(second_backbone, images, first_stream, freeze_batchnorm):
    """The second stream's feature map, resized to the first stream's grid when they differ."""
    features = run_backbone(second_backbone, images, freeze_batchnorm)
    if tuple(features.shape[1:3]) != tuple(first_stream.shape[1:3]):
        features = keras.layers.Resizing(
            *first_stream.shape[1:3], interpolation="bilinear", name="align_stream_b"
        )(features)
    return features


def freeze_batch_normalization(model):
    """Sets every BatchNormalization layer of `model` (nested models too) to `trainable=False`."""
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        freeze_batch_normalization(layer)

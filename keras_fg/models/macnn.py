"""MA-CNN: channel grouping into part attention, part classifiers and the joint loss."""

import time
import warnings

import keras
import numpy as np
from keras import ops

from keras_fg.layers.channel_grouping import ChannelGrouping
from keras_fg.layers.part_crop import PartCrop
from keras_fg.losses.channel_grouping_loss import distance_loss, diversity_loss
from keras_fg.models.fine_grained_model import (
    FineGrainedModel,
    classification_head,
    freeze_batch_normalization,
    global_metric_embedding,
    image_input,
    per_part_classifiers,
    run_backbone,
    serve_with_part_scores,
)

METRIC_EMBEDDINGS = ("global", "fused")


@keras.saving.register_keras_serializable(package="keras_fg")
class MACNN(FineGrainedModel):
    """Multi-attention CNN: P part attention maps from grouped channels, one classifier each.

        {M_i, p_i} = ChannelGrouping(F)                     i = 1..P
        part_logits_i = W_i p_i + b_i                       one classifier per part
        z = W [GAP(F), p_1, ..., p_P] + b                   the fused classifier
        logits = z + mean_i part_logits_i                    served (`fuse_part_logits`)
        L = CE(z) + α Σ_i CE(part_logits_i) + β (Σ_i Dis(M_i) + λ Div(M_i))

    For re-identification (`bnneck`, `triplet_weight`, `center_loss_weight`) the metric
    losses read the global feature alone, and the embedding served (`"features"`) is the
    BNNeck of the fused vector, parts included:

        e = GAP(F)                                          `"embedding"` (`metric_embedding`)
        L += w_t · L_triplet(e) + w_c · ‖e − c_y‖²
        features = BN([GAP(F), p_1, ..., p_P])              the re-ID embedding

    With a `part_backbone` (full MA-CNN), each part is also cropped from the image around its
    map's peak (`PartCrop`: a box of `box_fraction` of the image side, resized by interpolation
    matrices, so it still converts to TFLite builtins), the crops go through the part backbone
    (one network shared by the parts), and their pooled features join the fused classifier;
    each crop also has a classifier of its own, trained by its own loss and served with the
    others (`crop_classifiers`), as the paper's part networks each have their softmax:

        c_i = GAP(part_backbone(crop_i(X)))       z = W [GAP(F), p_1..p_P, c_1..c_P] + b
        crop_logits_i = V_i c_i + e_i             V_i, e_i start at 0
        logits = z + mean_i part_logits_i + mean_i crop_logits_i
        L += α Σ_i CE(crop_logits_i)

    Training can alternate, as in the paper, between the `"channel_grouping"` phase (only the
    part attention learns, from L_cng and the part losses) and the `"classification"` phase
    (everything else learns): see `set_phase` and `keras_fg.models.PhaseSchedule`. The channel
    grouping is best initialised by clustering channels on training images first:
    `initialize_channel_grouping`.

    Args:
        backbone: a headless feature extractor from `keras_fg.models.create_backbone`.
        num_classes: number of classes.
        num_parts: number of parts P.
        hidden_units: width of the channel-grouping FCs (`ChannelGrouping`; default
            `max(C // 16, 8)`).
        initial_temperature, min_temperature, max_temperature: the part maps' learned
            inverse temperature `τ`, its starting value and bounds (`ChannelGrouping`).
        maps_train_backbone: let the gradients through the part maps (L_cng's and the part
            losses') reach the backbone (`ChannelGrouping(feature_gradient=...)`). Default
            `False`: as in the paper, L_cng trains only the channel grouping, and the
            backbone learns from the classifiers.
        part_loss_weight: α, weight of the summed part cross-entropies.
        fuse_part_logits: serve `logits = z + mean_i part_logits_i`, as the paper fuses the
            part networks' scores with the full network's, not `z` alone (needs α > 0; `z`
            is then the output `"classifier_logits"`). Defaults to `True`
            (docs/experiments.md#ma-cnn-on-the-cub-subset).
        channel_grouping_weight: β, weight of L_cng.
        diversity_weight: λ, weight of Div inside L_cng.
        margin: mrg of Div's hinge, as a fraction of the other part's peak (`diversity_loss`).
        part_backbone: a backbone for the part crops (its input size is the crop size), or
            `None` to leave the crops out.
        box_fraction: the crop box's side as a fraction of the image side (the release:
            128 px of 448).
        crop_classifiers: with a `part_backbone`, give each crop its own classifier and
            loss (above). Default `True`: fed only to the fused classifier, the crops learn
            nothing once it fits the training set, as it does on small fine-grained sets
            (docs/experiments.md#full-ma-cnn-part-crops).
        normalize_coordinates: measure Dis in grid coordinates scaled to [0, 1], so that its
            size does not grow with the grid (in cells, a uniform 28×28 map has Dis ≈ 131;
            scaled, ≈ 0.18).
        metric_embedding: the vector the re-identification metric losses (batch-hard
            triplet, center loss) read: `"global"` (default), `GAP(F)`, as MGN (Wang et al.,
            2018) keeps its triplet losses on global features and trains the part features
            by cross-entropy alone; or `"fused"`, `[GAP(F), p_1..p_P]`. Two images of one
            person need not put a part on the same cell, so on the fused vector a batch-hard
            triplet loss falls fastest by shrinking every feature
            (docs/reid.md#ma-cnn-and-dasrbn-for-re-identification). Read only with `bnneck`
            or a metric loss.
        dropout: dropout rate before the fused classifier.
        bnneck: add a BNNeck (re-identification).
        freeze_batchnorm: run the backbone's BatchNormalization in inference mode.
        **kwargs: the `FineGrainedModel` options.

    Reference:
        H. Zheng, J. Fu, T. Mei, J. Luo, "Learning Multi-Attention Convolutional Neural
        Network for Fine-Grained Image Recognition", ICCV 2017.
    """

    def __init__(
        self,
        backbone,
        num_classes,
        num_parts=4,
        hidden_units=None,
        initial_temperature=2.0,
        min_temperature=1.0,
        max_temperature=4.0,
        maps_train_backbone=False,
        part_loss_weight=1.0,
        fuse_part_logits=True,
        channel_grouping_weight=1.0,
        diversity_weight=1.0,
        margin=0.25,
        normalize_coordinates=True,
        part_backbone=None,
        box_fraction=128 / 448,
        crop_classifiers=True,
        metric_embedding="global",
        dropout=0.0,
        bnneck=False,
        freeze_batchnorm=True,
        **kwargs,
    ):
        if metric_embedding not in METRIC_EMBEDDINGS:
            raise ValueError(
                f"`metric_embedding` must be one of {METRIC_EMBEDDINGS}. "
                f"Received: metric_embedding={metric_embedding!r}"
            )
        for name, value in (
            ("part_loss_weight", part_loss_weight),
            ("channel_grouping_weight", channel_grouping_weight),
            ("diversity_weight", diversity_weight),
        ):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0. Received: {name}={value}")
        images = image_input(backbone)
        feature_map = run_backbone(backbone, images, freeze_batchnorm)
        grouping = ChannelGrouping(
            num_parts,
            hidden_units=hidden_units,
            initial_temperature=initial_temperature,
            max_temperature=max_temperature,
            min_temperature=min_temperature,
            feature_gradient=maps_train_backbone,
            name="channel_grouping",
        )(feature_map)
        part_features = grouping["part_features"]  # (B, P, C)
        channels = feature_map.shape[-1]
        part_logits = per_part_classifiers(num_parts, num_classes, "part_classifiers")(
            part_features
        )
        pooled = keras.layers.GlobalAveragePooling2D(name="global_pool", dtype="float32")(
            feature_map
        )
        flat_parts = keras.layers.Reshape((num_parts * channels,), name="flatten_parts")(
            part_features
        )
        fused_inputs = [pooled, flat_parts]
        crop_logits = None
        if part_backbone is not None:
            crop_features = _part_crop_features(
                images, grouping["attention_maps"], part_backbone, box_fraction, freeze_batchnorm
            )  # (B, P, C')
            fused_inputs.append(
                keras.layers.Reshape((num_parts * crop_features.shape[-1],), name="flatten_crops")(
                    crop_features
                )
            )
            if crop_classifiers:
                # Zeros: the crops start with no say in the served score, and their own
                # loss trains the part network even once the fused classifier fits.
                crop_logits = per_part_classifiers(
                    num_parts, num_classes, "crop_classifiers", kernel_initializer="zeros"
                )(crop_features)
        fused = keras.layers.Concatenate(name="fuse_parts")(fused_inputs)
        outputs = classification_head(fused, num_classes, dropout, bnneck)
        if metric_embedding == "global":
            global_metric_embedding(outputs, pooled, bnneck, kwargs)
        outputs["attention_maps"] = grouping["attention_maps"]
        outputs["part_logits"] = part_logits
        if crop_logits is not None:
            outputs["crop_logits"] = crop_logits
        if fuse_part_logits and part_loss_weight > 0:
            scores = [part_logits] + ([crop_logits] if crop_logits is not None else [])
            serve_with_part_scores(outputs, *scores)
        super().__init__(inputs=images, outputs=outputs, num_classes=num_classes, **kwargs)
        self.backbone = backbone
        self.num_parts = num_parts
        self.hidden_units = hidden_units
        self.initial_temperature = float(initial_temperature)
        self.max_temperature = float(max_temperature)
        self.min_temperature = float(min_temperature)
        self.maps_train_backbone = bool(maps_train_backbone)
        self.part_loss_weight = float(part_loss_weight)
        self.fuse_part_logits = bool(fuse_part_logits)
        self.channel_grouping_weight = float(channel_grouping_weight)
        self.diversity_weight = float(diversity_weight)
        self.margin = float(margin)
        self.normalize_coordinates = bool(normalize_coordinates)
        self.part_backbone = part_backbone
        self.box_fraction = float(box_fraction)
        self.crop_classifiers = bool(crop_classifiers)
        self.metric_embedding = metric_embedding
        self.dropout = dropout
        self.bnneck = bnneck
        self.freeze_batchnorm = freeze_batchnorm

    def loss_term_names(self):
        return super().loss_term_names() + ["part_loss", "channel_grouping_loss"]

    def compute_loss_terms(self, y, y_pred):
        terms = super().compute_loss_terms(y, y_pred)
        part_logits = y_pred["part_logits"]
        part_loss = self.part_cross_entropy(y, part_logits)
        if "crop_logits" in y_pred:
            part_loss += self.part_cross_entropy(y, y_pred["crop_logits"])
        maps = ops.cast(y_pred["attention_maps"], "float32")
        grouping_loss = distance_loss(
            maps, normalize_coordinates=self.normalize_coordinates
        ) + self.diversity_weight * diversity_loss(maps, margin=self.margin)
        terms["part_loss"] = (self.part_loss_weight, part_loss)
        terms["channel_grouping_loss"] = (self.channel_grouping_weight, grouping_loss)
        return terms

    def channel_grouping_variables(self):
        return self.get_layer("channel_grouping").trainable_weights

    def initialize_channel_grouping(
        self,
        images,
        max_images=256,
        epochs=30,
        learning_rate=3e-3,
        target_smoothing=0.1,
        seed=0,
        verbose=0,
    ):
        """MA-CNN's clustering initialisation of the channel grouping.

        For every channel c, the peak (argmax) position of its response on each of N training
        images gives a vector `[t_x¹, t_y¹, ..., t_xᴺ, t_yᴺ]` (coordinates in [0, 1]).
        k-means splits the channels into P groups by these vectors, and each part's FCs are
        then trained (binary cross-entropy, on the backbone features of the same images) to
        output its group's indicator vector, smoothed so that no sigmoid saturates:

            target_ic = 1 − s  if c ∈ group i,  s  otherwise          (s = target_smoothing)

        The optimum is a pre-activation of `±log((1 − s) / s)` (±2.2 for s = 0.1), from where
        the part losses can still move every channel weight. The clustering only means
        something on features that have learned: with pretrained backbone weights run it
        before training, from scratch after the first epochs (`ChannelGroupingInitializer`).

        Args:
            images: a NumPy array of images, or a `tf.data.Dataset` of images or
                `(images, labels)` batches, raw pixels in [0, 255].
            max_images: at most this many images are used.
            epochs: epochs of FC pre-training on the cached features.
            learning_rate: Adam learning rate of the FC pre-training.
            target_smoothing: `s` in (0, 0.5), the target of channels outside the group.
            seed: seed of the k-means initialisation.
            verbose: verbosity of the pre-training `fit`.

        Returns:
            A dict: `"groups"` `(P, C)` 0/1 indicator, `"group_sizes"`, and `"loss"`, the
            final pre-training loss.
        """
        grouping_layer = self.get_layer("channel_grouping")
        feature_model = keras.Model(self.input, grouping_layer.input)
        features = _predict_up_to(feature_model, images, max_images)
        return self.initialize_channel_grouping_from_features(
            features,
            epochs=epochs,
            learning_rate=learning_rate,
            target_smoothing=target_smoothing,
            seed=seed,
            verbose=verbose,
        )

    def initialize_channel_grouping_from_features(
        self, features, epochs=30, learning_rate=3e-3, target_smoothing=0.1, seed=0, verbose=0
    ):
        """`initialize_channel_grouping` on backbone feature maps `(N, H, W, C)` at hand."""
        if not 0 < target_smoothing < 0.5:
            raise ValueError(
                "`target_smoothing` must be in (0, 0.5). "
                f"Received: target_smoothing={target_smoothing!r}"
            )
        features = np.asarray(features, dtype="float32")
        groups = cluster_channels(features, self.num_parts, seed=seed)
        grouping_layer = self.get_layer("channel_grouping")
        feature_input = keras.Input(shape=features.shape[1:])
        weights = grouping_layer(feature_input)["channel_weights"]
        pretrain = keras.Model(feature_input, weights)
        pretrain.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="binary_crossentropy")
        soft = groups * (1 - 2 * target_smoothing) + target_smoothing
        targets = np.broadcast_to(soft, (len(features),) + groups.shape).astype("float32")
        with warnings.catch_warnings():
            # The temperature is not part of this objective, hence has no gradient here.
            warnings.filterwarnings("ignore", message="Gradients do not exist")
            history = pretrain.fit(
                features, targets, epochs=epochs, batch_size=32, verbose=verbose, shuffle=True
            )
        return {
            "groups": groups,
            "group_sizes": groups.sum(axis=1).astype(int).tolist(),
            "loss": float(history.history["loss"][-1]),
        }

    def get_config(self):
        return {
            **super().get_config(),
            "num_parts": self.num_parts,
            "hidden_units": self.hidden_units,
            "initial_temperature": self.initial_temperature,
            "max_temperature": self.max_temperature,
            "min_temperature": self.min_temperature,
            "maps_train_backbone": self.maps_train_backbone,
            "part_loss_weight": self.part_loss_weight,
            "fuse_part_logits": self.fuse_part_logits,
            "channel_grouping_weight": self.channel_grouping_weight,
            "diversity_weight": self.diversity_weight,
            "margin": self.margin,
            "normalize_coordinates": self.normalize_coordinates,
            "box_fraction": self.box_fraction,
            "crop_classifiers": self.crop_classifiers,
            "metric_embedding": self.metric_embedding,
        }


class ChannelGroupingInitializer(keras.callbacks.Callback):
    """Runs `MACNN.initialize_channel_grouping` at the start of epoch `at_epoch`.

    At epoch 0 with a pretrained backbone; after the first epochs when the backbone learns
    from scratch, so that the channels' peaks mean something. A training resumed after
    `at_epoch` does not run it again (the checkpointed weights hold it).

    Args:
        images: the images to cluster on (see `MACNN.initialize_channel_grouping`).
        at_epoch: int ≥ 0, the epoch (0-based) before which to run.
        **kwargs: passed to `initialize_channel_grouping`.
    """

    def __init__(self, images, at_epoch=0, verbose=1, **kwargs):
        super().__init__()
        if not isinstance(at_epoch, int) or at_epoch < 0:
            raise ValueError(f"`at_epoch` must be an int >= 0. Received: at_epoch={at_epoch!r}")
        self.images = images
        self.at_epoch = at_epoch
        self.verbose = verbose
        self.options = kwargs
        self.result = None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.at_epoch:
            return
        started = time.time()
        self.result = self.model.initialize_channel_grouping(self.images, **self.options)
        if self.verbose:
            print(
                f"Channel grouping initialised by clustering before epoch {epoch + 1}: groups of "
                f"{self.result['group_sizes']} channels, pre-training loss "
                f"{self.result['loss']:.3f} ({time.time() - started:.0f} s)"
            )


def _part_crop_features(images, maps, part_backbone, box_fraction, freeze_batchnorm):
    """`(B, P, C')`: the pooled part-backbone features of each part's crop."""
    crop_size = tuple(part_backbone.input_shape[1:3])
    crops = PartCrop(crop_size, box_fraction=box_fraction, name="part_crop")([images, maps])
    if freeze_batchnorm:
        freeze_batch_normalization(part_backbone)
    # One network shared by the parts, applied to each part's crop.
    features = keras.layers.TimeDistributed(part_backbone, name="part_networks")(crops)
    return keras.layers.TimeDistributed(
        keras.layers.GlobalAveragePooling2D(dtype="float32"), name="part_pool"
    )(features)


def cluster_channels(features, num_groups, seed=0, iterations=100):
    """Groups channels by where they peak: k-means on per-channel peak coordinates.

    Args:
        features: `(N, H, W, C)` feature maps of N images.
        num_groups: number of groups P.

    Returns:
        `(P, C)` float32 0/1 indicator matrix, every channel in exactly one group.
    """
    features = np.asarray(features, dtype="float32")
    n, h, w, c = features.shape
    if c < num_groups:
        raise ValueError(f"Cannot split {c} channels into {num_groups} groups.")
    flat = features.reshape(n, h * w, c)
    peak = flat.argmax(axis=1)  # (N, C)
    ys = (peak // w) / max(h - 1, 1)
    xs = (peak % w) / max(w - 1, 1)
    points = np.concatenate([xs, ys], axis=0).T  # (C, 2N): one vector per channel
    centers = _kmeans_plus_plus(points, num_groups, np.random.default_rng(seed))
    for _ in range(iterations):
        distances = ((points[:, None, :] - centers[None]) ** 2).sum(-1)
        assignment = distances.argmin(axis=1)
        new_centers = centers.copy()
        for k in range(num_groups):
            members = points[assignment == k]
            if len(members):
                new_centers[k] = members.mean(axis=0)
            else:  # An empty group takes the channel farthest from its center.
                new_centers[k] = points[distances.min(axis=1).argmax()]
        if np.allclose(new_centers, centers):
            break
        centers = new_centers
    groups = np.zeros((num_groups, c), dtype="float32")
    groups[assignment, np.arange(c)] = 1.0
    return groups


def _kmeans_plus_plus(points, k, rng):
    centers = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        distances = np.min([((points - center) ** 2).sum(-1) for center in centers], axis=0)
        probabilities = distances / distances.sum() if distances.sum() > 0 else None
        centers.append(points[rng.choice(len(points), p=probabilities)])
    return np.stack(centers).astype("float64")


def _predict_up_to(model, images, max_images):
    if isinstance(images, np.ndarray):
        return model.predict(images[:max_images], verbose=0)
    batches, count = [], 0
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        batches.append(model.predict_on_batch(batch))
        count += len(batches[-1])
        if count >= max_images:
            break
    if not batches:
        raise ValueError("`images` yielded no images for the channel-grouping initialisation.")
    return np.concatenate(batches)[:max_images]

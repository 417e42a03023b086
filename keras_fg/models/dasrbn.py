"""DASRBN: attention over per-location bilinear features of two streams, read by spatial LSTMs."""

import keras
from keras import ops

from keras_fg.layers.per_location_outer_product import PerLocationOuterProduct
from keras_fg.layers.spatial_attention_lstm import SpatialAttentionLSTM
from keras_fg.models.backbones import earlier_channels
from keras_fg.models.fine_grained_model import (
    FineGrainedModel,
    classification_head,
    image_input,
    run_backbone,
    second_stream,
)


@keras.saving.register_keras_serializable(package="keras_fg")
class DASRBN(FineGrainedModel):
    """Attention-based spatially recurrent bilinear network (Wu & Wang).

        a_hw = relu(W_a F_a,hw),  b_hw = relu(W_b F_b,hw)        two streams, r channels each
        x_hw = sign(z) √|z|,  z = vec(a_hw ⊗ b_hw)                per location, norm kept
        α = softmax_hw(w2ᵀ tanh(W1 x_hw + b1))                    attention over locations
        h^k = 2-D LSTM over HW·α ⊙ x, swept from corner k         (`SpatialAttentionLSTM`)
        s = Σ_hw α_hw x_hw                                        attended bilinear outcomes
        r = [Σ_hw α_hw h^k_hw]_k ⊕ s,  g = GAP(F_a)               recurrent and global branch
        e = Σ_hw α_hw sg(F_b,hw)                                  attended second stream
        f = [LN(r), LN(g)]                                        each branch normalised
        z = W f + b,  z_v = W_v LN(v) + b_v                       a classifier per branch
        L = CE(z) + λ Σ_{v ∈ r, g, e} CE(z_v)
        logits = z + mean_v z_v                                   the served score

    F_a is the backbone's feature map. F_b is, by default, an earlier block of the same
    backbone pooled to F_a's grid (a two-depth backbone, `create_backbone(...,
    earlier_feature_layer=...)`), or a second backbone's map; with neither, both streams
    read F_a. The outer product keeps each location's magnitude (no per-location L2
    normalisation), so the attention can tell a strong response from a weak one.
    Attention-weighted pooling of the sweeps from the four corners gives every location
    a direct path to the loss. Each branch is layer-normalised before the concatenation,
    and an auxiliary classifier on each branch (weight λ, `branch_loss_weight`) keeps
    either one from starving the other once the head fits the training set.

    The attention-pooled second stream `e` has a classifier of its own
    (`attended_classifier`), so the attention itself is taught to find the class: `e` is
    a weighted average of local features, and can name the class only if α sits where
    it is decided. Without it the sweeps and the global branch classify from anywhere
    and α is free to wander. It reads F_b, not the outer products: by default F_b is the
    earlier, more local map, while a cell of F_a (and so of x) also sees its
    neighbourhood, which lets a cell beside the part stand in for it
    (docs/design.md#dasrbn).
    The served `logits` add the mean of the branch classifiers' scores to the main
    classifier's (`fuse_branch_logits`); training is the same either way, each classifier
    with its own cross-entropy. The attention map α is a model output; the branch logits
    are `"branch_logits"` (B, branches, K), in the order recurrent, global, attended, and
    the main classifier's are `"classifier_logits"`.

    Args:
        backbone: a headless feature extractor from `keras_fg.models.create_backbone`;
            a two-depth one gives the two streams.
        num_classes: number of classes.
        second_backbone: a second stream's backbone, read as F_b; `None` for the two-depth
            backbone's earlier map (or F_a again for a one-depth backbone).
        stream_dim: r, channels of each stream before the outer product (r² per location).
            Defaults to 16.
        lstm_units: hidden units of each sweep of the spatial LSTM. Defaults to 32.
        attention_units: hidden units of the attention MLP. Defaults to 32.
        branch_loss_weight: λ, weight of the branches' auxiliary cross-entropies (0: no
            branch classifiers). Defaults to 1.0.
        fuse_branch_logits: serve `logits = z + mean_v z_v`, not `z` alone (needs λ > 0).
            Defaults to `True`: an ensemble at no training cost
            (docs/experiments.md#dasrbn-on-the-cub-subset).
        dropout: dropout rate before the classifiers. Defaults to 0.5: the head overfits
            1,500 images without it (docs/experiments.md#dasrbn-on-the-cub-subset).
        bnneck: add a BNNeck (re-identification).
        freeze_batchnorm: run the backbones' BatchNormalization in inference mode.
        **kwargs: the `FineGrainedModel` options.

    Reference:
        L. Wu, Y. Wang, "Where to Focus: Deep Attention-based Spatially Recurrent Bilinear
        Networks for Fine-Grained Visual Recognition", arXiv:1709.05769, 2017.
    """

    def __init__(
        self,
        backbone,
        num_classes,
        second_backbone=None,
        stream_dim=16,
        lstm_units=32,
        attention_units=32,
        branch_loss_weight=1.0,
        fuse_branch_logits=True,
        dropout=0.5,
        bnneck=False,
        freeze_batchnorm=True,
        **kwargs,
    ):
        if stream_dim < 1:
            raise ValueError(f"`stream_dim` must be >= 1. Received: stream_dim={stream_dim}")
        if branch_loss_weight < 0:
            raise ValueError(
                f"`branch_loss_weight` must be >= 0. Received: branch_loss_weight={branch_loss_weight}"
            )
        # === Streams ===
        images = image_input(backbone)
        feature_map = run_backbone(backbone, images, freeze_batchnorm)
        feature_a = feature_b = feature_map
        earlier = earlier_channels(backbone)
        if earlier is not None:
            feature_a, feature_b = ops.split(feature_map, [feature_map.shape[-1] - earlier], -1)
        if second_backbone is not None:
            feature_b = second_stream(second_backbone, images, feature_a, freeze_batchnorm)
        stream_a = keras.layers.Conv2D(stream_dim, 1, activation="relu", name="stream_a")(feature_a)
        stream_b = keras.layers.Conv2D(stream_dim, 1, activation="relu", name="stream_b")(feature_b)
        bilinear = PerLocationOuterProduct(l2_normalize=False, name="bilinear_outcomes")(
            [stream_a, stream_b]
        )
        # === Attention and spatial LSTM ===
        recurrent = SpatialAttentionLSTM(
            lstm_units,
            attention_units=attention_units,
            pooling="attention",
            directions=4,
            name="spatial_attention_lstm",
        )(bilinear)
        # === Branches and classifiers ===
        # Attention-weighted sums: a product and a sum, not an einsum, which TFLite cannot convert.
        alpha = ops.expand_dims(recurrent["attention_maps"], -1)
        attended = ops.sum(alpha * bilinear, axis=(1, 2))
        recurrent_features = ops.concatenate([recurrent["features"], attended], axis=-1)
        pooled = keras.layers.GlobalAveragePooling2D(name="global_pool", dtype="float32")(feature_a)
        branches = [_normalized(recurrent_features, "recurrent"), _normalized(pooled, "global")]
        features = keras.layers.Concatenate(name="fuse_branches")(branches)
        outputs = classification_head(features, num_classes, dropout, bnneck)
        outputs["attention_maps"] = recurrent["attention_maps"]
        branch_names = ["recurrent", "global", "attended"]
        if branch_loss_weight > 0:
            # The branch teaches α where to look; it must not reshape the features it reads.
            source = ops.stop_gradient(feature_b)
            branches.append(_normalized(ops.sum(alpha * source, axis=(1, 2)), "attended"))
            branch_logits = [
                _branch_classifier(branch, num_classes, dropout, name)
                for branch, name in zip(branches, branch_names)
            ]
            outputs["branch_logits"] = ops.stack(branch_logits, axis=1)
            if fuse_branch_logits:
                # An ensemble of the classifiers at no training cost: each keeps its own loss.
                outputs["classifier_logits"] = outputs["logits"]
                fused = outputs["logits"] + ops.mean(outputs["branch_logits"], axis=1)
                outputs["logits"] = fused
                outputs["probabilities"] = keras.layers.Softmax(
                    name="fused_probabilities", dtype="float32"
                )(fused)
        super().__init__(inputs=images, outputs=outputs, num_classes=num_classes, **kwargs)
        # === Config ===
        self.backbone = backbone
        self.second_backbone = second_backbone
        self.stream_dim = stream_dim
        self.lstm_units = lstm_units
        self.attention_units = attention_units
        self.branch_loss_weight = float(branch_loss_weight)
        self.fuse_branch_logits = fuse_branch_logits
        self.dropout = dropout
        self.bnneck = bnneck
        self.freeze_batchnorm = freeze_batchnorm

    def loss_term_names(self):
        # Called by the base constructor, before this one stores its arguments.
        names = super().loss_term_names()
        if "branch_logits" in self.output:
            names.append("branch_loss")
        return names

    def compute_loss_terms(self, y, y_pred):
        terms = super().compute_loss_terms(y, y_pred)
        if "branch_logits" in y_pred:
            branch_logits = y_pred["branch_logits"]
            per_sample = sum(
                self.cross_entropy(y, branch_logits[:, i]) for i in range(branch_logits.shape[1])
            )
            terms["branch_loss"] = (self.branch_loss_weight, per_sample)
        return terms

    def get_config(self):
        return {
            **super().get_config(),
            "stream_dim": self.stream_dim,
            "lstm_units": self.lstm_units,
            "attention_units": self.attention_units,
            "branch_loss_weight": self.branch_loss_weight,
            "fuse_branch_logits": self.fuse_branch_logits,
        }


def _normalized(branch, name):
    # float32: a layer norm over 1,280 features in float16 loses the small ones.
    return keras.layers.LayerNormalization(name=f"{name}_norm", dtype="float32")(branch)


def _branch_classifier(branch, num_classes, dropout, name):
    if dropout:
        branch = keras.layers.Dropout(dropout, name=f"{name}_dropout")(branch)
    return keras.layers.Dense(num_classes, name=f"{name}_classifier", dtype="float32")(branch)

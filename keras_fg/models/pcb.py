"""PCB: horizontal stripes of the feature map as parts, one classifier each."""

import keras

from keras_fg.layers.horizontal_stripe_pooling import HorizontalStripePooling
from keras_fg.layers.part_weighted_embedding import PartWeightedEmbedding
from keras_fg.models.fine_grained_model import (
    FineGrainedModel,
    classification_head,
    global_metric_embedding,
    image_input,
    per_part_classifiers,
    run_backbone,
    serve_with_part_scores,
)

DESCRIPTORS = ("stripes", "fused")


@keras.saving.register_keras_serializable(package="keras_fg")
class PCB(FineGrainedModel):
    """Part-based Convolutional Baseline: S horizontal stripes, one classifier per stripe.

        p_s = HorizontalStripePooling(S)(F)                  s = 1..S, top to bottom
        stripe_logits_s = W_s p_s + b_s                      one classifier per stripe
        z = W [GAP(F), p_1, ..., p_S] + b                    the fused classifier
        logits = z + mean_s stripe_logits_s                  served
        L = CE(z) + α Σ_s CE(stripe_logits_s)

    The parts are fixed bands of rows, where MA-CNN learns them: a pedestrian crop is
    upright, so each band holds about the same body part in every image. Sun et al. train
    the stripes' classifiers alone and serve their concatenated features; here, as in MGN
    (Wang et al., 2018) and keras_fg's MA-CNN, a global feature joins them in the classifier,
    and for re-identification (`bnneck`, `triplet_weight`, `center_loss_weight`) the metric
    losses read the global feature alone. The descriptor served is the stripes', each
    weighed by its worth (`PartWeightedEmbedding`, whose weights train.py fits on the
    training identities after training):

        e = GAP(F)                                           `"embedding"`
        L += w_t · L_triplet(e) + w_c · ‖e − c_y‖²
        features = [√w_1 p_1/‖p_1‖, ..., √w_S p_S/‖p_S‖]     `descriptor="stripes"`
        features = BN([GAP(F), p_1, ..., p_S])               `descriptor="fused"`

    Stripes suit upright subjects: where the deciding part may sit anywhere, the summed
    stripe losses dominate (docs/reid.md#pcb-and-its-fisher-weighed-stripes). The metric
    losses read the global feature, as `MACNN`'s do (`metric_embedding`).

    Args:
        backbone: a headless feature extractor from `keras_fg.models.create_backbone`
            (use `last_stride=1` for re-ID: a 16×8 map at 256×128).
        num_classes: number of classes (identities).
        num_stripes: S, at most the feature map's height. Default 6, the paper's (on a 24×8
            map).
        part_loss_weight: α, weight of the summed stripe cross-entropies.
        descriptor: the `"features"` output, the re-ID descriptor. `"stripes"` (default):
            the stripes, L2-normalised and weighed by `PartWeightedEmbedding` (equal weights
            until its `adapt`), which find more people than the fused vector
            (docs/reid.md#pcb-and-its-fisher-weighed-stripes). `"fused"`: the fused vector
            (after the BNNeck, if any).
        dropout: dropout rate before the fused classifier.
        bnneck: add a BNNeck (re-identification).
        freeze_batchnorm: run the backbone's BatchNormalization in inference mode.
        **kwargs: the `FineGrainedModel` options.

    Example:

    >>> backbone = keras_fg.models.create_backbone("tiny", image_size=(64, 32))
    >>> model = PCB(backbone, num_classes=10, num_stripes=4)
    >>> model.compile(optimizer="adam")

    Reference:
        Y. Sun, L. Zheng, Y. Yang, Q. Tian, S. Wang, "Beyond Part Models: Person Retrieval
        with Refined Part Pooling (and a Strong Convolutional Baseline)", ECCV 2018.
    """

    def __init__(
        self,
        backbone,
        num_classes,
        num_stripes=6,
        part_loss_weight=1.0,
        descriptor="stripes",
        dropout=0.0,
        bnneck=False,
        freeze_batchnorm=True,
        **kwargs,
    ):
        if part_loss_weight < 0:
            raise ValueError(
                f"`part_loss_weight` must be >= 0. Received: part_loss_weight={part_loss_weight}"
            )
        if descriptor not in DESCRIPTORS:
            raise ValueError(
                f"`descriptor` must be one of {DESCRIPTORS}. Received: descriptor={descriptor!r}"
            )
        images = image_input(backbone)
        feature_map = run_backbone(backbone, images, freeze_batchnorm)
        stripes = HorizontalStripePooling(num_stripes, name="stripe_pool", dtype="float32")(
            feature_map
        )  # (B, S, C)
        stripe_logits = per_part_classifiers(num_stripes, num_classes, "stripe_classifiers")(
            stripes
        )
        pooled = keras.layers.GlobalAveragePooling2D(name="global_pool", dtype="float32")(
            feature_map
        )
        flat_stripes = keras.layers.Reshape(
            (num_stripes * feature_map.shape[-1],), name="flatten_stripes"
        )(stripes)
        fused = keras.layers.Concatenate(name="fuse_stripes")([pooled, flat_stripes])
        outputs = classification_head(fused, num_classes, dropout, bnneck)
        global_metric_embedding(outputs, pooled, bnneck, kwargs)
        outputs["part_logits"] = stripe_logits
        if descriptor == "stripes":
            outputs["features"] = PartWeightedEmbedding(name="stripe_descriptor", dtype="float32")(
                stripes
            )
        if part_loss_weight > 0:
            serve_with_part_scores(outputs, stripe_logits)
        super().__init__(inputs=images, outputs=outputs, num_classes=num_classes, **kwargs)
        self.backbone = backbone
        self.num_stripes = num_stripes
        self.part_loss_weight = float(part_loss_weight)
        self.descriptor = descriptor
        self.dropout = dropout
        self.bnneck = bnneck
        self.freeze_batchnorm = freeze_batchnorm

    def loss_term_names(self):
        return super().loss_term_names() + ["part_loss"]

    def compute_loss_terms(self, y, y_pred):
        terms = super().compute_loss_terms(y, y_pred)
        terms["part_loss"] = (
            self.part_loss_weight,
            self.part_cross_entropy(y, y_pred["part_logits"]),
        )
        return terms

    def get_config(self):
        return {
            **super().get_config(),
            "num_stripes": self.num_stripes,
            "part_loss_weight": self.part_loss_weight,
            "descriptor": self.descriptor,
        }

"""The baseline: global average pooling and a linear classifier."""

import keras

from keras_fg.models.fine_grained_model import (
    FineGrainedModel,
    classification_head,
    image_input,
    run_backbone,
)


@keras.saving.register_keras_serializable(package="keras_fg")
class GAPClassifier(FineGrainedModel):
    """Backbone → global average pooling → classifier: the baseline every family must beat.

        f = (1/HW) Σ_{h,w} F(h, w)        logits = W f + b

    Args:
        backbone: a headless feature extractor from `keras_fg.models.create_backbone`
            (raw pixels in [0, 255] → `(B, H, W, C)`).
        num_classes: number of classes.
        dropout: dropout rate before the classifier.
        bnneck: add a BNNeck (re-identification).
        freeze_batchnorm: run the backbone's BatchNormalization in inference mode, which
            keeps pretrained features intact when fine-tuning on small data (docs/design.md#training-recipe).
        **kwargs: the `FineGrainedModel` options (`class_names`, `label_smoothing`, ...).

    Example:

    >>> backbone = keras_fg.models.create_backbone("tiny", image_size=64)
    >>> model = GAPClassifier(backbone, num_classes=10)
    >>> model.compile(optimizer="adam")
    """

    def __init__(
        self, backbone, num_classes, dropout=0.0, bnneck=False, freeze_batchnorm=True, **kwargs
    ):
        images = image_input(backbone)
        feature_map = run_backbone(backbone, images, freeze_batchnorm)
        pooled = keras.layers.GlobalAveragePooling2D(name="global_pool")(feature_map)
        outputs = classification_head(pooled, num_classes, dropout, bnneck)
        super().__init__(inputs=images, outputs=outputs, num_classes=num_classes, **kwargs)
        self.backbone = backbone
        self.dropout = dropout
        self.bnneck = bnneck
        self.freeze_batchnorm = freeze_batchnorm

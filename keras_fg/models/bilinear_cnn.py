"""Bilinear CNN: the mean outer product of two feature maps, full or compact."""

import keras

from keras_fg.layers.bilinear_pooling import BilinearPooling
from keras_fg.models.fine_grained_model import (
    FineGrainedModel,
    classification_head,
    image_input,
    run_backbone,
    second_stream,
)


@keras.saving.register_keras_serializable(package="keras_fg")
class BilinearCNN(FineGrainedModel):
    """Bilinear CNN (B-CNN): bilinear pooling of one stream with itself, or of two streams.

        A = reduce_a(F_a),  B = reduce_b(F_b)       1×1 convolutions (optional)
        z = (1/HW) Σ_{h,w} a_hw ⊗ b_hw → signed sqrt → L2    (`BilinearPooling`)
        logits = W z + b

    With `projection_dim=d` the outer product is replaced by its compact Random Maclaurin
    projection to d dimensions (Gao et al., CVPR 2016), which cuts the classifier from
    `Ca·Cb·K` to `d·K` weights.

    Args:
        backbone: the first stream's headless feature extractor.
        num_classes: number of classes.
        second_backbone: the second stream (asymmetric B-CNN); `None` uses the first
            stream twice (symmetric B-CNN). Its grid is resized to the first one's when
            they differ.
        reduction_dim: channels of the 1×1 convolution applied to each stream before the
            outer product, or `None` to use the backbone's channels as they are.
        projection_dim: `None` for the full `Ca·Cb` feature, or the compact dimension.
        dropout: dropout rate before the classifier.
        bnneck: add a BNNeck (re-identification).
        freeze_batchnorm: run the backbones' BatchNormalization in inference mode.
        **kwargs: the `FineGrainedModel` options.

    Reference:
        T.-Y. Lin, A. RoyChowdhury, S. Maji, "Bilinear CNN Models for Fine-grained Visual
        Recognition", ICCV 2015.
    """

    def __init__(
        self,
        backbone,
        num_classes,
        second_backbone=None,
        reduction_dim=256,
        projection_dim=None,
        dropout=0.0,
        bnneck=False,
        freeze_batchnorm=True,
        **kwargs,
    ):
        if reduction_dim is not None and reduction_dim < 1:
            raise ValueError(
                f"`reduction_dim` must be >= 1 or None. Received: reduction_dim={reduction_dim}"
            )
        images = image_input(backbone)
        stream_a = run_backbone(backbone, images, freeze_batchnorm)
        if second_backbone is None:
            stream_b = stream_a
        else:
            stream_b = second_stream(second_backbone, images, stream_a, freeze_batchnorm)
        if reduction_dim is not None:
            reduce = keras.layers.Conv2D(reduction_dim, 1, activation="relu", name="reduce_a")
            reduced_a = reduce(stream_a)
            if second_backbone is None:
                stream_a = stream_b = reduced_a
            else:
                stream_a = reduced_a
                stream_b = keras.layers.Conv2D(
                    reduction_dim, 1, activation="relu", name="reduce_b"
                )(stream_b)
        pooling = BilinearPooling(projection_dim=projection_dim, name="bilinear_pooling")
        bilinear = pooling(stream_a if second_backbone is None else [stream_a, stream_b])
        outputs = classification_head(bilinear, num_classes, dropout, bnneck)
        super().__init__(inputs=images, outputs=outputs, num_classes=num_classes, **kwargs)
        self.backbone = backbone
        self.second_backbone = second_backbone
        self.reduction_dim = reduction_dim
        self.projection_dim = projection_dim
        self.dropout = dropout
        self.bnneck = bnneck
        self.freeze_batchnorm = freeze_batchnorm

    def get_config(self):
        return {
            **super().get_config(),
            "reduction_dim": self.reduction_dim,
            "projection_dim": self.projection_dim,
        }

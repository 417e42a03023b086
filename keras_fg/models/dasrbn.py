"""DASRBN: attention over per-location bilinear features, read by a 2-D spatial LSTM."""

import keras

from keras_fg.layers.per_location_outer_product import PerLocationOuterProduct
from keras_fg.layers.spatial_attention_lstm import SpatialAttentionLSTM
from keras_fg.models.fine_grained_model import (
    FineGrainedModel,
    classification_head,
    image_input,
    run_backbone,
    second_stream,
)


@keras.saving.register_keras_serializable(package="keras_fg")
class DASRBN(FineGrainedModel):
    """Attention-based spatially recurrent bilinear network (Wu & Wang, DESIGN.md §1.3).

        A = relu(conv1x1_a(F_a)),  B = relu(conv1x1_b(F_b))     two streams, r channels each
        x_hw = vec(a_hw ⊗ b_hw)                                 bilinear outcome per location
        α = softmax_hw(MLP(x_hw)),  h = 2-D LSTM over α ⊙ x     (`SpatialAttentionLSTM`)
        f = [h, GAP(F_a)]  (the global route, optional)         logits = W f + b

    The two streams are two 1×1 projections of one backbone (or of two backbones, the
    second resized to the first's grid). The attention maps α are a model output.

    Args:
        backbone: a headless feature extractor from `keras_fg.models.create_backbone`.
        num_classes: number of classes.
        second_backbone: a second stream's backbone, or `None` to project one backbone twice.
        stream_dim: r, channels of each stream before the outer product (r² per location).
        lstm_units: hidden units of the spatial LSTM.
        attention_units: hidden units of the attention MLP.
        global_features: also feed the globally pooled backbone features to the classifier,
            a shortcut that keeps the pretrained features' accuracy within reach while the
            recurrent part learns.
        dropout: dropout rate before the classifier.
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
        stream_dim=32,
        lstm_units=256,
        attention_units=64,
        global_features=True,
        dropout=0.0,
        bnneck=False,
        freeze_batchnorm=True,
        **kwargs,
    ):
        if stream_dim < 1:
            raise ValueError(f"`stream_dim` must be >= 1. Received: stream_dim={stream_dim}")
        images = image_input(backbone)
        feature_a = run_backbone(backbone, images, freeze_batchnorm)
        feature_b = feature_a
        if second_backbone is not None:
            feature_b = second_stream(second_backbone, images, feature_a, freeze_batchnorm)
        stream_a = keras.layers.Conv2D(stream_dim, 1, activation="relu", name="stream_a")(feature_a)
        stream_b = keras.layers.Conv2D(stream_dim, 1, activation="relu", name="stream_b")(feature_b)
        bilinear = PerLocationOuterProduct(name="bilinear_outcomes")([stream_a, stream_b])
        recurrent = SpatialAttentionLSTM(
            lstm_units, attention_units=attention_units, name="spatial_attention_lstm"
        )(bilinear)
        features = recurrent["features"]
        if global_features:
            pooled = keras.layers.GlobalAveragePooling2D(name="global_pool", dtype="float32")(
                feature_a
            )
            features = keras.layers.Concatenate(name="fuse_global")([features, pooled])
        outputs = classification_head(features, num_classes, dropout, bnneck)
        outputs["attention_maps"] = recurrent["attention_maps"]
        super().__init__(inputs=images, outputs=outputs, num_classes=num_classes, **kwargs)
        self.backbone = backbone
        self.second_backbone = second_backbone
        self.stream_dim = stream_dim
        self.lstm_units = lstm_units
        self.attention_units = attention_units
        self.global_features = global_features
        self.dropout = dropout
        self.bnneck = bnneck
        self.freeze_batchnorm = freeze_batchnorm

    def get_config(self):
        return {
            **super().get_config(),
            "stream_dim": self.stream_dim,
            "lstm_units": self.lstm_units,
            "attention_units": self.attention_units,
            "global_features": self.global_features,
        }

"""keras_fg: fine-grained visual recognition and person re-identification for Keras 3.

Sub-packages:
    keras_fg.layers   BilinearPooling, ChannelGrouping, SpatialAttentionLSTM, ...
    keras_fg.losses   the MA-CNN channel-grouping loss, batch-hard triplet, ...
    keras_fg.models   backbones, the model families and create_model()
    keras_fg.data     datasets (CUB, folders, Cars, Aircraft, Dogs, Market-1501, synthetic)
    keras_fg.metrics  classification metrics, CMC / mAP for re-identification
    keras_fg.export   SavedModel and TFLite export with parity checks (import it explicitly)
    keras_fg.viz      attention overlays (import it explicitly)
    keras_fg.inference  one predictor for .keras, SavedModel and .tflite (import it explicitly)
    keras_fg.search   the gallery index for person search, on faiss (import it explicitly)
"""

from keras_fg import data, layers, losses, metrics, models
from keras_fg.version import __version__

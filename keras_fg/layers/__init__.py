"""Fine-grained layers, each in its own file."""

from keras_fg.layers.bilinear_pooling import BilinearPooling
from keras_fg.layers.channel_grouping import ChannelGrouping
from keras_fg.layers.horizontal_stripe_pooling import HorizontalStripePooling
from keras_fg.layers.image_preprocessing import ImagePreprocessing
from keras_fg.layers.part_crop import PartCrop
from keras_fg.layers.part_weighted_embedding import PartWeightedEmbedding
from keras_fg.layers.per_location_outer_product import PerLocationOuterProduct
from keras_fg.layers.spatial_attention_lstm import SpatialAttentionLSTM
from keras_fg.layers.token_grid import TokenGrid

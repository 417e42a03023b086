"""Backbones (a registry of headless feature extractors) and the model families built on them."""

from keras_fg.models.backbones import BACKBONES, create_backbone, list_backbones
from keras_fg.models.bilinear_cnn import BilinearCNN
from keras_fg.models.dasrbn import DASRBN
from keras_fg.models.factory import MODELS, create_model, list_models
from keras_fg.models.fine_grained_model import FineGrainedModel, predict_batch
from keras_fg.models.gap_classifier import GAPClassifier
from keras_fg.models.head_training import (
    FeatureCache,
    FeatureHead,
    extract_features,
    feature_fingerprint,
    split_at_backbone,
    train_head,
    transfer_weights,
)
from keras_fg.models.macnn import MACNN, ChannelGroupingInitializer, cluster_channels
from keras_fg.models.pcb import PCB
from keras_fg.models.phase_schedule import PhaseSchedule

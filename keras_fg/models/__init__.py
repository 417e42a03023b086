"""Backbones (a registry of headless feature extractors) and the model families built on them."""
from keras_fg.models.backbones import BACKBONES, create_backbone, list_backbones

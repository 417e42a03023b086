"""Backbones: headless feature extractors that take raw pixels, by name.

A backbone is a plain Functional `keras.Model` named `"<name>_backbone"` that maps
images of raw RGB pixel values in [0, 255], shape `(B, H, W, 3)`, to the feature map
`(B, h, w, C)` of one layer. Its input preprocessing is its first layer
(`ImagePreprocessing`), so datasets, exported models and servers feed the same pixels
whatever the backbone. The model families put their heads on it (the backbone / task
split of KerasHub) and call it as `backbone(images, training=False)` to keep its
BatchNormalization in inference mode.

The registry holds `keras.applications` networks; keras-hub presets are named
`"hub:<preset name or folder>"` and built by `keras_fg.models.hub_backbones` (ViT, DINOv2,
CLIP and SigLIP vision towers as token grids, CNN presets by pyramid level). LayerNorm
backbones (ConvNeXt, the transformers) have no BatchNormalization to freeze: see
`is_layer_normalized`. docs/backbones.md says how to choose one.
"""

import dataclasses
import functools
import numbers
import os
import warnings
from collections.abc import Callable

import keras

from keras_fg.layers.image_preprocessing import ImagePreprocessing

HUB_PREFIX = "hub:"
# The backbone's learning rate relative to the head's for LayerNorm backbones (ConvNeXt,
# keras-hub transformers): 10x lower, as B-CNN fine-tunes its pretrained layers against a
# new head; they have no BatchNormalization to keep frozen (see `is_layer_normalized`).
LAYER_NORM_LR_MULTIPLIER = 0.1


def is_hub_name(name):
    """Whether `name` names a keras-hub preset, `"hub:<preset name or folder>"`."""
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered backbone.

    Attributes:
        application: Builds the whole headless network, with the signature of the
            `keras.applications` constructors:
            `application(include_top=False, weights=..., input_tensor=..., input_shape=...)`.
        feature_layer: Name of the default layer whose output is the feature map.
        preprocessing: The `ImagePreprocessing` mode the network was trained with.
        channels: Channels `C` of the default feature map.
        stride: Input pixels per feature-map cell at the default feature layer.
        last_stride_layers: The layers of the last downsampling step (a strided
            convolution, and the padding layer before it if there is one), which
            `last_stride=1` rebuilds with stride 1; empty if the option is not offered.
        earlier_feature_layer: An earlier block's layer, one downsampling step before the
            default feature layer: the second stream of a two-depth backbone
            (`create_backbone(..., earlier_feature_layer=...)`); empty if none is registered.
        normalization: `"batch"` or `"layer"`: what normalises the network's activations.
            BatchNormalization is kept frozen when fine-tuning; LayerNorm networks have none
            to freeze and are fine-tuned at a lower rate instead (`is_layer_normalized`).
    """

    application: Callable
    feature_layer: str
    preprocessing: str
    channels: int
    stride: int
    last_stride_layers: tuple = ()
    earlier_feature_layer: str = ""
    normalization: str = "batch"


def _tiny_convnet(include_top=False, weights=None, input_tensor=None, input_shape=None):
    """Four 3×3 Conv2D + ReLU layers (32, 64, 64, 128 filters), 2×2 max pooling after the
    first three (stride 8), no BatchNormalization.

    A backbone small enough for tests and the embedded demo; it has no pretrained weights.
    The pooling between convolutions gives its last layer a receptive field wide enough to
    see where a part sits on its object, which the synthetic dataset's classes depend on.
    """
    if weights is not None:
        raise ValueError(
            "The 'tiny' backbone has no pretrained weights: pass weights=None or the path "
            f"of a weights file saved from a 'tiny' backbone. Received: weights={weights!r}"
        )
    images = keras.Input(shape=input_shape) if input_tensor is None else input_tensor
    x = images
    for index, filters in enumerate((32, 64, 64, 128), start=1):
        if index > 1:
            x = keras.layers.MaxPooling2D(name=f"pool{index - 1}")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{index}")(
            x
        )
    return keras.Model(keras.utils.get_source_inputs(images), x, name="tiny")


def _named_output(application, output_name):
    """`application`, with its output layer renamed `output_name`.

    MobileNetV3's last activation has no name of its own: Keras numbers it
    ("activation_17") by how many activations were built before, so it is renamed
    to give the default feature layer a stable name.
    """

    @functools.wraps(application)
    def build(**kwargs):
        model = application(**kwargs)
        model.layers[-1].name = output_name
        return model

    return build


_apps = keras.applications
BACKBONES = {
    "vgg16": BackboneSpec(
        _apps.VGG16, "block5_conv3", "caffe", 512, 16, earlier_feature_layer="block4_conv3"
    ),
    # MA-CNN's conv5_4 (28×28×512 at 448 px).
    "vgg19": BackboneSpec(
        _apps.VGG19, "block5_conv4", "caffe", 512, 16, earlier_feature_layer="block4_conv4"
    ),
    "resnet50": BackboneSpec(
        _apps.ResNet50,
        "conv5_block3_out",
        "caffe",
        2048,
        32,
        ("conv5_block1_1_conv", "conv5_block1_0_conv"),  # main path and shortcut
        "conv4_block6_out",
    ),
    # The last layer: the 320-channel block_16_project_BN before it is linear (no ReLU),
    # and the families reduce channels with a 1×1 convolution anyway.
    # The earlier layer: block 13's expansion (576 channels, 14×14 at 224 px), the last
    # layer before the last downsampling step.
    "mobilenetv2": BackboneSpec(
        _apps.MobileNetV2,
        "out_relu",
        "tf",
        1280,
        32,
        ("block_13_pad", "block_13_depthwise"),
        "block_13_expand_relu",
    ),
    # MobileNetV3 and EfficientNetV2 include their own preprocessing and take [0, 255].
    "mobilenetv3small": BackboneSpec(
        _named_output(_apps.MobileNetV3Small, "conv_1_activation"),
        "conv_1_activation",
        "none",
        576,
        32,
    ),
    "mobilenetv3large": BackboneSpec(
        _named_output(_apps.MobileNetV3Large, "conv_1_activation"),
        "conv_1_activation",
        "none",
        960,
        32,
    ),
    "efficientnetv2b0": BackboneSpec(_apps.EfficientNetV2B0, "top_activation", "none", 1280, 32),
    # The earlier layer: the last block before block 6's stride-2 step (14×14 at 224 px).
    "efficientnetv2s": BackboneSpec(
        _apps.EfficientNetV2S,
        "top_activation",
        "none",
        1280,
        32,
        earlier_feature_layer="block5i_add",
    ),
    "efficientnetv2m": BackboneSpec(
        _apps.EfficientNetV2M,
        "top_activation",
        "none",
        1280,
        32,
        earlier_feature_layer="block5n_add",
    ),
    # ConvNeXt (Liu et al., CVPR 2022) normalises with LayerNorm and takes [0, 255] (its
    # Normalization layer is built in). Its headless model ends in a LayerNorm that Keras
    # numbers by how many were built before, renamed here; the earlier layer is stage 3's
    # output, before the last downsampling step.
    **{
        f"convnext{size}": BackboneSpec(
            _named_output(getattr(_apps, f"ConvNeXt{size.title()}"), f"convnext_{size}_final_norm"),
            f"convnext_{size}_final_norm",
            "none",
            channels,
            32,
            earlier_feature_layer=f"convnext_{size}_stage_2_block_{blocks - 1}_identity",
            normalization="layer",
        )
        for size, channels, blocks in (("tiny", 768, 9), ("small", 768, 27), ("base", 1024, 27))
    },
    "tiny": BackboneSpec(_tiny_convnet, "conv4", "unit", 128, 8, earlier_feature_layer="conv3"),
}


def list_backbones():
    """The registered backbone names, sorted (keras-hub presets, `"hub:<preset>"`, besides)."""
    return sorted(BACKBONES)


def is_layer_normalized(name):
    """Whether backbone `name` normalises with LayerNorm rather than BatchNormalization.

    ConvNeXt and keras-hub's transformers (`"hub:..."` ViT, DINOv2, CLIP, SigLIP) have no
    BatchNormalization to keep frozen: their recipe is a lower learning rate for the
    backbone (`train.py --backbone-lr-multiplier`, 0.1 for them by default).
    """
    if is_hub_name(name):
        from keras_fg.models.hub_backbones import is_transformer_preset

        return is_transformer_preset(name)
    return name in BACKBONES and BACKBONES[name].normalization == "layer"


def offers_last_stride_1(name):
    """Whether `create_backbone(name, last_stride=1)` is offered."""
    return name in BACKBONES and bool(BACKBONES[name].last_stride_layers)


def has_earlier_feature_layer(name):
    """Whether `earlier_feature_layer="default"` names a layer of backbone `name`.

    True for every keras-hub preset (the pyramid level before the last, or a transformer's
    block at three quarters of its depth).
    """
    return is_hub_name(name) or (name in BACKBONES and bool(BACKBONES[name].earlier_feature_layer))


def backbone_label(name):
    """`name` as it goes into model names: registered names as they are, `"hub_<preset>"`."""
    if is_hub_name(name):
        from keras_fg.models.hub_backbones import hub_label

        return hub_label(name)
    return name


def create_backbone(
    name,
    weights=None,
    image_size=224,
    feature_layer=None,
    name_prefix="",
    last_stride=2,
    earlier_feature_layer=None,
):
    """Builds a registered backbone: raw [0, 255] RGB pixels in, a feature map out.

    Args:
        name: A name from `list_backbones()`, such as `"vgg19"` or `"mobilenetv2"`; or a
            keras-hub preset, `"hub:<preset name>"` (`"hub:dinov2_small"`, downloaded once
            by keras-hub) or `"hub:<folder>"` (a preset saved with `save_to_preset`, used
            offline). A preset carries its weights and its pixel scaling; see
            `keras_fg.models.hub_backbones` for the feature maps each kind gives and the
            input sizes it takes. Needs `pip install "keras-fg[hub]"`.
        weights: `None` for random initialisation; `"imagenet"` for the
            `keras.applications` ImageNet weights (downloaded, so online only); or the
            path of a local weights file saved from the whole headless application,
            e.g. `keras.applications.MobileNetV2(include_top=False).save_weights(
            "mobilenet_v2.weights.h5")` (the `.h5` files that `keras.applications`
            downloads load too). The weights do not depend on the image size. They
            are loaded before the network is cut at `feature_layer`.
        image_size: Input size in pixels: an int for square images, or a
            `(height, width)` tuple such as `(256, 128)` for person re-identification.
        feature_layer: Name of the layer whose output is the feature map; `None` for
            the registered default, `BACKBONES[name].feature_layer`. For keras-hub presets,
            a pyramid level (`"P4"`) of a CNN or a transformer block (`"block_6"`).
        name_prefix: Prepended to the model name, so that two backbones of the same
            kind can sit side by side in one model.
        last_stride: 2 (the network as published) or 1: the last downsampling step
            runs with stride 1, which halves the backbone's stride and doubles each side
            of the feature map (the re-ID "last stride 1" of Luo et al. 2019), e.g.
            16×8 instead of 8×4 at 256×128 for MobileNetV2. The weights are unchanged
            (a strided convolution has the same kernel at stride 1) and load as usual.
            Offered by the backbones whose `BACKBONES[name].last_stride_layers` is set.
        earlier_feature_layer: `None` (one feature map), `"default"` for
            `BACKBONES[name].earlier_feature_layer`, or a layer name: the backbone then
            returns two depths of the network side by side, `[F, pool(F_early)]`, the
            earlier map average-pooled (or resized) to `F`'s grid. `earlier_channels`
            tells where they split. DASRBN reads them as its two streams.

    Returns:
        A Functional `keras.Model` named `f"{name_prefix}{name}_backbone"` (for keras-hub
        presets a `HubBackbone` named `f"{name_prefix}{backbone_label(name)}_backbone"`), input
        `(B, height, width, 3)` float RGB pixels in [0, 255], output the feature map
        `(B, h, w, C)`; with the default layer `C = BACKBONES[name].channels` and
        `h = ceil(height / BACKBONES[name].stride)` for sizes the network divides evenly
        (`stride / 2` with `last_stride=1`).

    Example:

    >>> backbone = create_backbone("mobilenetv2", weights="mobilenet_v2.weights.h5")
    >>> backbone.output_shape
    (None, 7, 7, 1280)
    """
    if is_hub_name(name):
        return _create_hub_backbone(
            name,
            weights,
            image_size,
            feature_layer,
            name_prefix,
            last_stride,
            earlier_feature_layer,
        )
    if name not in BACKBONES:
        raise ValueError(
            f"Unknown backbone. Valid names: {', '.join(list_backbones())}, or "
            f"'hub:<keras-hub preset name or folder>'. Received: name={name!r}"
        )
    spec = BACKBONES[name]
    if last_stride not in (1, 2) or isinstance(last_stride, bool):
        raise ValueError(f"`last_stride` must be 1 or 2. Received: last_stride={last_stride!r}")
    if last_stride == 1 and not spec.last_stride_layers:
        offered = sorted(n for n, s in BACKBONES.items() if s.last_stride_layers)
        raise ValueError(
            f"`last_stride=1` is offered for {', '.join(offered)}, not for backbone {name!r}. "
            f"Received: last_stride={last_stride}"
        )
    input_shape = (*_height_width(image_size), 3)
    weights_file = None
    if weights is not None and weights != "imagenet":
        weights_file = os.fspath(weights)
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"Weights file of backbone {name!r} not found: {weights_file}")

    images = keras.Input(shape=input_shape, name="images")
    pixels = ImagePreprocessing(spec.preprocessing, name="image_preprocessing")(images)
    network = _build_network(name, spec, None if weights_file else weights, pixels, input_shape)

    layer_name = feature_layer or spec.feature_layer
    layer_names = [layer.name for layer in network.layers]
    if layer_name not in layer_names:
        raise ValueError(
            f"Unknown feature_layer for backbone {name!r}. Valid names include "
            f"{', '.join(layer_names[-8:])} ({len(layer_names)} layers in all, listed by "
            f"keras.Model.summary()). Received: feature_layer={layer_name!r}"
        )
    if weights_file:
        _load_weights(network, weights_file, name)
    if last_stride == 1:
        network = _with_last_stride_1(network, spec.last_stride_layers)
        images = network.inputs[0]
    features = network.get_layer(layer_name).output
    if earlier_feature_layer is not None:
        features = _two_depths(network, name, spec, features, earlier_feature_layer)
    return keras.Model(images, features, name=f"{name_prefix}{name}_backbone")


def _create_hub_backbone(
    name, weights, image_size, feature_layer, name_prefix, last_stride, earlier_feature_layer
):
    if weights is not None:
        raise ValueError(
            f"A keras-hub backbone's weights come with its preset ({name!r}): leave `weights` "
            f"out. Received: weights={weights!r}"
        )
    if last_stride != 2:
        raise ValueError(
            f"`last_stride=1` is not offered for keras-hub backbones. Received: last_stride={last_stride!r}"
        )
    from keras_fg.models.hub_backbones import create_hub_backbone

    return create_hub_backbone(
        name,
        _height_width(image_size),
        feature_layer=feature_layer,
        earlier_feature_layer=earlier_feature_layer,
        name_prefix=name_prefix,
    )


TWO_DEPTHS = "two_depths"


def earlier_channels(backbone):
    """Channels of the earlier map in a two-depth backbone's output (its last ones), or `None`.

    A backbone from `create_backbone(..., earlier_feature_layer=...)` returns
    `[F, pool(F_early)]` along channels; this is the size of the second part.
    """
    layer_names = {layer.name for layer in backbone.layers}
    if TWO_DEPTHS not in layer_names:
        return None
    return int(backbone.get_layer(TWO_DEPTHS).input[1].shape[-1])


def _two_depths(network, name, spec, features, earlier_feature_layer):
    layer_name = earlier_feature_layer
    if layer_name == "default":
        layer_name = spec.earlier_feature_layer
        if not layer_name:
            offered = sorted(n for n, s in BACKBONES.items() if s.earlier_feature_layer)
            raise ValueError(
                f"No earlier feature layer is registered for backbone {name!r} (registered for "
                f"{', '.join(offered)}); name one. Received: earlier_feature_layer='default'"
            )
    layer_names = [layer.name for layer in network.layers]
    if layer_name not in layer_names:
        raise ValueError(
            f"Unknown earlier_feature_layer for backbone {name!r} ({len(layer_names)} layers, "
            f"listed by keras.Model.summary()). Received: earlier_feature_layer={layer_name!r}"
        )
    return join_depths(features, network.get_layer(layer_name).output)


def join_depths(features, earlier, name=TWO_DEPTHS):
    """`[F, pool(F_early)]` along channels: the earlier map brought to `F`'s grid.

    Each block of cells is averaged when the grids differ by a whole factor (every earlier
    location is kept), otherwise the earlier map is resized.
    """
    grid, earlier_grid = tuple(features.shape[1:3]), tuple(earlier.shape[1:3])
    factor = earlier_grid[0] // grid[0]
    if earlier_grid == (grid[0] * factor, grid[1] * factor):
        if factor > 1:
            earlier = keras.layers.AveragePooling2D(factor, name="pool_earlier_features")(earlier)
    else:
        earlier = keras.layers.Resizing(*grid, name="resize_earlier_features")(earlier)
    return keras.layers.Concatenate(name=name)([features, earlier])


def _height_width(image_size):
    size = (image_size, image_size) if isinstance(image_size, numbers.Integral) else image_size
    if not (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(side, numbers.Integral) and side > 0 for side in size)
    ):
        raise ValueError(
            "`image_size` must be a positive int or a (height, width) tuple of positive "
            f"ints. Received: image_size={image_size!r}"
        )
    return tuple(int(side) for side in size)


def _build_network(name, spec, weights, pixels, input_shape):
    """The whole headless application on `pixels`, with the download error made clear."""
    try:
        return spec.application(
            include_top=False, weights=weights, input_tensor=pixels, input_shape=input_shape
        )
    except (ValueError, TypeError):
        raise
    except Exception as error:
        if weights != "imagenet":
            raise
        reason = " ".join(str(error).split())
        raise OSError(
            f"The ImageNet weights of backbone {name!r} could not be downloaded ({reason}). "
            "Without internet access, pass the path of a local .weights.h5 file saved from "
            f"the headless model instead: create_backbone({name!r}, weights='path/to/file.weights.h5')."
        ) from None


def _with_last_stride_1(network, layer_names):
    """A copy of `network` whose last downsampling step has stride 1, with its weights.

    A strided convolution becomes stride 1; a `ZeroPadding2D` before it (MobileNetV2 pads
    bottom/right only, for stride 2) pads every side by half the kernel, so that the
    convolution keeps the grid ("same" padding).
    """
    convolutions = {
        name: network.get_layer(name)
        for name in layer_names
        if not isinstance(network.get_layer(name), keras.layers.ZeroPadding2D)
    }

    def clone(layer):
        config = layer.get_config()
        if layer.name in convolutions:
            config["strides"] = (1, 1)
        elif layer.name in layer_names:  # The padding of the next convolution in the list.
            kernel = next(iter(convolutions.values())).kernel_size
            config["padding"] = tuple((k // 2, k // 2) for k in kernel)
        return layer.__class__.from_config(config)

    rebuilt = keras.models.clone_model(network, clone_function=clone)
    for source, target in zip(network.layers, rebuilt.layers):
        target.set_weights(source.get_weights())
    return rebuilt


def _load_weights(network, path, name):
    """Loads `path` into `network`, or says which file did not fit which backbone."""
    try:
        with warnings.catch_warnings():
            # On a mismatch Keras warns once per layer before it raises.
            warnings.simplefilter("ignore")
            network.load_weights(path)
    except Exception as error:
        # Keras' message lists every layer that failed; its first example is enough.
        detail = " ".join(str(error).split("List of objects")[0].split())
        raise ValueError(
            f"The weights file {path} does not fit backbone {name!r}: it must be saved from "
            f"the same headless keras.applications model (include_top=False). {detail}"
        ) from None

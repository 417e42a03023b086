"""Backbones from keras-hub presets: ViT, DINOv2, CLIP and SigLIP vision towers, and CNNs.

`create_backbone("hub:<preset>")` loads a keras-hub preset, by name (`"hub:dinov2_small"`,
downloaded once by keras-hub) or from a local folder (`"hub:presets/dinov2_small"`,
written by `save_to_preset` or downloaded earlier), and wraps it as a keras_fg backbone:
raw [0, 255] RGB pixels in, a feature map `(B, h, w, C)` out.

- CNN presets (ResNet, EfficientNet, ...) give the last level of their `pyramid_outputs`;
  the level before it is the second stream of a two-depth backbone (DASRBN).
- Vision transformers (ViT, DINOv2 with or without registers, the vision towers of CLIP and
  SigLIP) give the patch tokens of their last block, the class and register tokens dropped,
  on their `(H/p, W/p)` grid (`keras_fg.layers.TokenGrid`); the tokens of the block at three
  quarters of the depth (block 9 of 12) are the second stream. Every tap goes through the
  model's final LayerNorm, as DINOv2's `get_intermediate_layers(norm=True)` does.
- The preset's own pixel scaling (its `ImageConverter`'s `scale` and `offset`) is the first
  layer, so exported models take raw pixels as every keras_fg model does.

Input sizes: CNNs take any size. A transformer takes any size that is a multiple of its
patch size; DINOv2, CLIP and SigLIP only square ones (keras-hub builds them for one side).
At a size other than the preset's, the position embeddings are resampled once, when the
backbone is built (bicubic on the patch grid, the class token's kept): keras-hub's own
interpolation for DINOv2, the same resampling as timm's `resample_abs_pos_embed` for ViT,
CLIP and SigLIP. The backbone is then rebuilt at that size, so that its saved weights
reload exactly.

keras-hub is an optional dependency (`pip install "keras-fg[hub]"`), imported only here.
"""

import json
import os
import re

import keras
import numpy as np
from keras import ops

from keras_fg.layers.token_grid import TokenGrid
from keras_fg.models.backbones import HUB_PREFIX, TWO_DEPTHS, is_hub_name, join_depths

INSTALL = 'pip install "keras-fg[hub]"'
# keras-hub classes by kind; a preset whose backbone is none of these and has no
# `pyramid_outputs` is refused.
TRANSFORMERS = {
    "vit": "ViTBackbone",
    "dinov2": "DINOV2Backbone",
    "clip": "CLIPVisionEncoder",
    "siglip": "SigLIPVisionEncoder",
}
# keras-hub builds these for square images only.
SQUARE_ONLY = ("dinov2", "clip", "siglip")


def import_keras_hub():
    """keras-hub, or an ImportError that names the extra to install."""
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(
            f"Backbones 'hub:...' need keras-hub, which is not installed ({error}): {INSTALL}"
        ) from None
    return keras_hub


def is_transformer_preset(name):
    """Whether `"hub:<preset>"` names a LayerNorm transformer (ViT, DINOv2, CLIP, SigLIP).

    Decided without loading the weights: a folder by the class in its `config.json`, a name
    by the preset lists of keras-hub's classes. Other presets count as CNNs.
    """
    keras_hub = import_keras_hub()
    preset = name[len(HUB_PREFIX) :] if is_hub_name(name) else name
    classes = ("ViTBackbone", "DINOV2Backbone", "CLIPBackbone", "SigLIPBackbone")
    config_file = os.path.join(preset, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as file:
            return json.load(file).get("class_name") in classes
    return any(preset in getattr(keras_hub.models, cls).presets for cls in classes)


def hub_label(name):
    """A name for models and files from `"hub:<preset>"`: `"hub_<last path part>"`."""
    preset = name[len(HUB_PREFIX) :] if is_hub_name(name) else name
    tail = os.path.basename(os.path.normpath(preset)) or "preset"
    return "hub_" + re.sub(r"[^A-Za-z0-9_.-]", "_", tail)


def create_hub_backbone(
    name, image_size, feature_layer=None, earlier_feature_layer=None, name_prefix=""
):
    """Builds a `HubBackbone` from `"hub:<preset>"` (see `keras_fg.models.create_backbone`)."""
    preset = name[len(HUB_PREFIX) :]
    if not preset:
        raise ValueError(
            "A keras-hub backbone is named 'hub:<preset name or folder>', such as "
            f"'hub:dinov2_small' or 'hub:presets/dinov2_small'. Received: name={name!r}"
        )
    # Handles such as "kaggle://keras/dinov2/keras/dinov2_small" are keras-hub's to resolve.
    looks_like_path = "://" not in preset and (preset.startswith((".", "~")) or os.sep in preset)
    if looks_like_path and not os.path.isdir(os.path.expanduser(preset)):
        raise FileNotFoundError(f"Preset folder of backbone {name!r} not found: {preset}")
    height, width = image_size
    network, kind = load_network(os.path.expanduser(preset), (height, width))
    scale, offset = preset_scaling(os.path.expanduser(preset))
    return HubBackbone(
        network,
        image_size=(height, width),
        scale=scale,
        offset=offset,
        feature_layer=feature_layer,
        earlier_feature_layer=earlier_feature_layer,
        preset=preset,
        name=f"{name_prefix}{hub_label(name)}_backbone",
    )


def load_network(preset, image_size):
    """The preset's image network at `image_size`, and its kind (`"cnn"` or a transformer)."""
    keras_hub = import_keras_hub()
    loaded = _from_preset(keras_hub, preset)
    network = getattr(loaded, "vision_encoder", None) or loaded  # CLIP, SigLIP: the image tower.
    kind = network_kind(network, keras_hub)
    height, width = image_size
    if kind == "cnn":
        fixed = tuple(network.input_shape[1:3])
        if None not in fixed and fixed != (height, width):
            # A CNN's weights do not depend on the input size.
            network = _from_preset(keras_hub, preset, image_shape=(height, width, 3))
        return network, kind
    patch = patch_size(network, kind)
    if height % patch[0] or width % patch[1]:
        raise ValueError(
            f"The {kind} preset {preset!r} cuts images into {patch[0]}x{patch[1]} patches: "
            f"image_size must be a multiple of it. Received: image_size={image_size}"
        )
    if kind in SQUARE_ONLY and height != width:
        raise ValueError(
            f"keras-hub builds the {kind} preset {preset!r} for square images only. "
            f"Received: image_size={image_size}"
        )
    if kind == "dinov2" and tuple(network.image_shape[:2]) != (height, width):
        # keras-hub interpolates DINOv2's position embeddings to `image_shape` when loading.
        network = _from_preset(keras_hub, preset, image_shape=(height, width, 3))
    return at_size(network, kind, (height, width)), kind


def _from_preset(keras_hub, preset, **kwargs):
    try:
        return keras_hub.models.Backbone.from_preset(preset, **kwargs)
    except (ValueError, TypeError):
        raise
    except Exception as error:
        reason = " ".join(str(error).split())
        raise OSError(
            f"The keras-hub preset {preset!r} could not be loaded ({reason}). Without network "
            "access, pass the folder of a preset downloaded earlier or written by "
            "backbone.save_to_preset(folder): --backbone hub:path/to/folder."
        ) from None


def network_kind(network, keras_hub):
    """`"vit"`, `"dinov2"`, `"clip"`, `"siglip"` or `"cnn"`; anything else is refused."""
    for kind, class_name in TRANSFORMERS.items():
        if isinstance(network, getattr(keras_hub.models, class_name)):
            return kind
    if getattr(network, "pyramid_outputs", None) and all(
        len(tensor.shape) == 4 for tensor in network.pyramid_outputs.values()
    ):
        return "cnn"
    raise ValueError(
        "keras_fg reads feature maps from keras-hub's ViT, DINOv2, CLIP and SigLIP vision "
        "towers, and from CNN backbones with `pyramid_outputs` (ResNet, EfficientNet, ...). "
        f"Received: a {type(network).__name__}"
    )


def patch_size(network, kind):
    """The transformer's `(patch height, patch width)`."""
    size = network.patch_size
    return (size, size) if isinstance(size, int) else tuple(size)


def num_prefix_tokens(network, kind):
    """The tokens before the patch tokens: class token and DINOv2's register tokens."""
    if kind == "vit":
        return int(network.use_class_token)
    if kind == "dinov2":
        return 1 + network.num_register_tokens
    return {"clip": 1, "siglip": 0}[kind]


def at_size(network, kind, image_size):
    """`network` rebuilt for `image_size` images, its position embeddings resampled.

    The rebuilt network is a plain keras-hub model of that size, so that a `.keras` file
    reloads it exactly: DINOv2 gets its interpolated table as its own (keras-hub would
    otherwise resample a fine-tuned table back to the pretraining grid when saving, and
    forward again when loading, which does not give the same numbers).
    """
    height, width = image_size
    config = network.get_config()
    config["image_shape"] = (height, width, 3)
    if kind == "dinov2":
        if tuple(network.position_embedding_shape[:2]) == (height, width):
            return network
        config["position_embedding_shape"] = (height, width, 3)
    elif tuple(network.image_shape[:2]) == (height, width):
        return network
    rebuilt = type(network).from_config(config)
    # Same class and config but the size: the same variables, in the same order.
    source, target = network.weights, rebuilt.weights
    # (Unnamed variables are numbered by how many were made before: compare without it.)
    if [re.sub(r"_\d+$", "", v.name) for v in source] != [
        re.sub(r"_\d+$", "", v.name) for v in target
    ]:
        raise ValueError(
            f"Rebuilding the {kind} backbone at {image_size} did not give the preset's "
            f"variables. Received: {len(source)} variables -> {len(target)}"
        )
    if kind == "dinov2":  # The table interpolated for this size becomes the table.
        interpolated = next(v for v in source if v.name == "interpolated_position_embeddings")
        source = [interpolated if v.name == "position_embeddings" else v for v in source]
    old_grid = tuple(s // p for s, p in zip(network.image_shape[:2], patch_size(network, kind)))
    new_grid = tuple(s // p for s, p in zip(image_size, patch_size(network, kind)))
    for old, variable in zip(source, target):
        value = ops.convert_to_numpy(old)
        if value.shape != tuple(variable.shape):
            if variable.name == "position_ids":  # Positions 0..N-1, rebuilt for the new N.
                continue
            if "position_embedding" not in variable.path:
                raise ValueError(
                    f"Rebuilding the {kind} backbone at {image_size} changed the shape of "
                    f"{variable.path}. Received: {value.shape} -> {tuple(variable.shape)}"
                )
            value = resample_position_embeddings(value, old_grid, new_grid)
        variable.assign(value)
    return rebuilt


def resample_position_embeddings(table, old_grid, new_grid):
    """Resamples a position-embedding table `(..., K + h·w, C)` to another patch grid.

    The `K` leading rows (class token) are kept; the `h·w` patch rows are laid out on their
    grid, resized bicubically to `new_grid` and read back row by row.
    """
    table = np.asarray(table, dtype="float32")
    rows = old_grid[0] * old_grid[1]
    prefix = table.shape[-2] - rows
    lead = table.shape[:-2]
    flat = table.reshape(-1, table.shape[-2], table.shape[-1])
    grid = flat[:, prefix:].reshape(flat.shape[0], *old_grid, table.shape[-1])
    resized = ops.convert_to_numpy(
        ops.image.resize(grid, new_grid, interpolation="bicubic", antialias=False)
    )
    resized = resized.reshape(flat.shape[0], new_grid[0] * new_grid[1], table.shape[-1])
    return np.concatenate([flat[:, :prefix], resized], axis=1).reshape(
        *lead, prefix + new_grid[0] * new_grid[1], table.shape[-1]
    )


def preset_scaling(preset):
    """The preset's pixel scaling `x · scale + offset` from its `ImageConverter`.

    Returns `(scale, offset)`, each a float or a per-channel list.
    """
    keras_hub = import_keras_hub()
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except FileNotFoundError:
        raise ValueError(
            f"The keras-hub preset {preset!r} has no image converter, so the pixel scaling "
            "its weights expect is unknown. Save one into the folder with the backbone: "
            "keras_hub.layers.ImageConverter(scale=..., offset=...).save_to_preset(folder)."
        ) from None

    def plain(value, default):
        if value is None:
            return default
        value = np.asarray(value, dtype="float64").reshape(-1)
        return float(value[0]) if value.size == 1 else [float(v) for v in value]

    return plain(converter.scale, 1.0), plain(converter.offset, 0.0)


@keras.saving.register_keras_serializable(package="keras_fg")
class HubBackbone(keras.Model):
    """A keras-hub image network as a keras_fg backbone: raw pixels in, a feature map out.

    Built by `keras_fg.models.create_backbone("hub:<preset>", ...)`; see this module's
    docstring for what each kind of network gives. The layers, in order: the preset's pixel
    scaling (`Rescaling`, named `"image_preprocessing"`), the network cut at its taps
    (`"features_extractor"`), a `TokenGrid` per tap for transformers, and for a two-depth
    backbone the concatenation `[F, pool(F_early)]` (`"two_depths"`).

    Args:
        network: keras_hub.models.Backbone. A ViT, DINOv2, CLIP or SigLIP vision tower,
            or a CNN with `pyramid_outputs`, built for `image_size`.
        image_size: `(int, int)`. The input's `(height, width)`.
        scale: float or list of 3 floats. The preset's pixel scale.
        offset: float or list of 3 floats. The preset's pixel offset.
        feature_layer: str. The tap of the feature map: a pyramid level (`"P5"`) for a CNN,
            `"block_<i>"` (1 to the depth) for a transformer. Defaults to `None`, the last.
        earlier_feature_layer: str. `None` for one feature map, `"default"` (the level
            before the last, or block ⌈3·depth/4⌉, at most depth − 1) or a tap name: the backbone then
            returns both maps along channels, as `create_backbone` describes.
        preset: str. The preset it was loaded from, for the record. Defaults to `None`.
        **kwargs: `keras.Model` arguments, such as `name`.

    Returns:
        A Functional model, `(B, height, width, 3)` pixels in [0, 255] to `(B, h, w, C)`.

    Example:

    >>> backbone = create_backbone("hub:dinov2_small", image_size=448)
    >>> backbone.output_shape
    (None, 32, 32, 384)

    Reference:
        M. Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision",
        TMLR 2024.
    """

    def __init__(
        self,
        network,
        image_size,
        scale,
        offset,
        feature_layer=None,
        earlier_feature_layer=None,
        preset=None,
        **kwargs,
    ):
        keras_hub = import_keras_hub()
        kind = network_kind(network, keras_hub)
        height, width = (int(side) for side in image_size)
        inputs, taps = _taps(network, kind)
        layer = _check_tap(feature_layer, taps, "feature_layer") or list(taps)[-1]
        earlier = None
        if earlier_feature_layer is not None:
            names = list(taps)
            if len(names) < 2:
                raise ValueError(
                    f"This keras-hub {kind} backbone has one {'level' if kind == 'cnn' else 'block'}"
                    f", so no earlier one. Received: earlier_feature_layer={earlier_feature_layer!r}"
                )
            # A CNN's level before the last; a transformer's block ⌈3·depth/4⌉ (9 of 12).
            depth = len(names)
            default = names[-2] if kind == "cnn" else names[min(-(-3 * depth // 4), depth - 1) - 1]
            earlier = (
                default
                if earlier_feature_layer == "default"
                else _check_tap(earlier_feature_layer, taps, "earlier_feature_layer")
            )

        # === Layers ===
        self.network = network
        wanted = [layer] if earlier is None else [layer, earlier]
        self.extractor = keras.Model(
            inputs,
            [taps[name] for name in wanted],
            name="features_extractor",
        )

        # === Functional Model ===
        images = keras.Input((height, width, 3), name="images")
        # The preset's scaling in float32, like ImagePreprocessing under mixed precision.
        pixels = keras.layers.Rescaling(scale, offset, name="image_preprocessing", dtype="float32")(
            images
        )
        maps = self.extractor(pixels)
        maps = maps if isinstance(maps, (list, tuple)) else [maps]
        if kind != "cnn":
            grid = (height // patch_size(network, kind)[0], width // patch_size(network, kind)[1])
            prefix = num_prefix_tokens(network, kind)
            if kind == "siglip":
                # keras-hub 0.32's SigLIPVisionEmbedding.compute_output_shape counts one token
                # more than its call returns (it has no class token); TokenGrid reads the last
                # h·w tokens, so the symbolic count is taken as keras-hub gives it.
                prefix = maps[0].shape[1] - grid[0] * grid[1]
            maps = [
                TokenGrid(grid, prefix, name=f"token_grid_{name}")(tokens)
                for name, tokens in zip(wanted, maps)
            ]
        features = maps[0] if earlier is None else join_depths(maps[0], maps[1], TWO_DEPTHS)
        super().__init__(images, features, **kwargs)

        # === Config ===
        self.kind = kind
        self.image_size = (height, width)
        self.scale = scale
        self.offset = offset
        self.feature_layer = feature_layer
        self.earlier_feature_layer = earlier_feature_layer
        self.preset = preset

    def save_own_variables(self, store):
        # keras-hub 0.32's DINOv2 writes its position table back into the saved one only when
        # a *signed* sum of the changes exceeds 1e-7, so a fine-tuned table can be dropped on
        # saving. `at_size` built it with its table for this very size (the interpolation is
        # a copy), so the saved table is set to the live one here; the network's own saving
        # runs after this (a parent saves before its children).
        network = self.network
        if self.kind == "dinov2" and (
            tuple(network.position_embedding_shape) == tuple(network.image_shape)
        ):  # (tuples: a config read back gives lists)
            embeddings = network.embeddings
            embeddings.position_embeddings.assign(embeddings.interpolated_position_embeddings)
        super().save_own_variables(store)

    @property
    def is_transformer(self):
        """Whether the network is a vision transformer (normalised by LayerNorm, no
        BatchNormalization to freeze), not a CNN."""
        return self.kind != "cnn"

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "network": keras.saving.serialize_keras_object(self.network),
            "image_size": self.image_size,
            "scale": self.scale,
            "offset": self.offset,
            "feature_layer": self.feature_layer,
            "earlier_feature_layer": self.earlier_feature_layer,
            "preset": self.preset,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        import_keras_hub()
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)


def _check_tap(name, taps, argument):
    if name is None or name in taps:
        return name
    listed = list(taps)
    raise ValueError(
        f"Unknown {argument} for this keras-hub backbone. Valid names: {listed[0]} to "
        f"{listed[-1]} ({', '.join(listed[-4:])}, ...). Received: {argument}={name!r}"
    )


def _taps(network, kind):
    """The network's inputs, and `{name: symbolic output}` of every place a feature map can
    be read, in depth order.

    CNNs: their pyramid levels. Transformers: `"block_<i>"`, the tokens after block `i`
    through the model's final LayerNorm.
    """
    (inputs,) = network.inputs  # One image input (a dict of one for some networks).
    if kind == "cnn":
        return inputs, dict(network.pyramid_outputs)
    if kind == "dinov2":
        blocks = [network.pyramid_outputs[f"stage{i}"] for i in range(1, network.num_layers + 1)]
        norm = None if network.apply_layernorm else network.layernorm
    elif kind in ("clip", "siglip"):
        blocks = [block.output for block in network.encoder_layers]
        norm = network.layer_norm if kind == "clip" else network.post_layer_norm
    else:  # ViT: its encoder is one layer, so its blocks are called here, as it calls them.
        encoder = network.get_layer("vit_encoder")
        inputs = keras.Input(network.input_shape[1:], name="images")
        x = network.get_layer("vit_patching_and_embedding")(inputs)
        x = encoder.dropout(x)
        blocks = []
        for block in encoder.encoder_layers:
            x = block(x)
            blocks.append(x)
        norm = encoder.layer_norm
    return inputs, {
        f"block_{i}": tokens if norm is None else norm(tokens)
        for i, tokens in enumerate(blocks, start=1)
    }

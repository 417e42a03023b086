"""Small randomly initialised keras-hub presets, written to folders for the tests.

Each is built from a config (no download), saved with `save_to_preset` together with its
image converter, as keras-hub's own presets are, and loaded back by keras_fg through
`"hub:<folder>"`. Built for 32-pixel images, so that keras_fg's resizing to other sizes is
exercised.
"""

import keras

PRESET_SIZE = 32
# ImageNet's mean and standard deviation as x · scale + offset on [0, 255] pixels.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCALE = [1 / (255 * s) for s in STD]
OFFSET = [-m / s for m, s in zip(MEAN, STD)]
TRANSFORMER = {"num_layers": 2, "num_heads": 2, "hidden_dim": 32}
KINDS = ("dinov2", "vit", "clip", "siglip", "resnet")


def build_network(kind):
    """The keras-hub backbone of a preset kind, randomly initialised, and its converter."""
    import keras_hub

    models, layers = keras_hub.models, keras_hub.layers
    shape = (PRESET_SIZE, PRESET_SIZE, 3)
    converter_options = {
        "image_size": (PRESET_SIZE, PRESET_SIZE),
        "scale": SCALE,
        "offset": OFFSET,
    }
    if kind == "dinov2":  # With registers (Darcet et al. 2024): 1 + 2 leading tokens.
        network = models.DINOV2Backbone(
            patch_size=8,
            intermediate_dim=64,
            num_register_tokens=2,
            image_shape=shape,
            position_embedding_shape=shape,
            **TRANSFORMER,
        )
        return network, layers.DINOV2ImageConverter(**converter_options)
    if kind == "vit":
        network = models.ViTBackbone(image_shape=shape, patch_size=8, mlp_dim=64, **TRANSFORMER)
        return network, layers.ViTImageConverter(**converter_options)
    if kind in ("clip", "siglip"):
        vision, text = (
            (models.CLIPVisionEncoder, models.CLIPTextEncoder)
            if kind == "clip"
            else (models.SigLIPVisionEncoder, models.SigLIPTextEncoder)
        )
        options = {"intermediate_dim": 64, **TRANSFORMER}
        vision_encoder = vision(patch_size=8, image_shape=shape, **options)
        text_encoder = text(vocabulary_size=16, embedding_dim=32, max_sequence_length=8, **options)
        if kind == "clip":
            network = models.CLIPBackbone(vision_encoder, text_encoder, projection_dim=16)
            return network, layers.CLIPImageConverter(**converter_options)
        network = models.SigLIPBackbone(vision_encoder, text_encoder)
        return network, layers.SigLIPImageConverter(**converter_options)
    if kind == "resnet":  # Three stages: 64, 16 and 16 channels, strides 1, 2, 2 (P2-P4).
        network = models.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64, 16, 16],
            stackwise_num_blocks=[1, 1, 1],
            stackwise_num_strides=[1, 2, 2],
            block_type="basic_block",
            use_pre_activation=False,
            image_shape=(None, None, 3),
        )
        return network, layers.ResNetImageConverter(**converter_options)
    raise ValueError(f"Unknown preset kind. Received: kind={kind!r}")


def write_preset(kind, folder, seed=0):
    """Writes a preset of `kind` into `folder` and returns the folder as a string."""
    keras.utils.set_random_seed(seed)
    network, converter = build_network(kind)
    network.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return str(folder)

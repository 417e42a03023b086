"""Backbone registry and the ImagePreprocessing layer."""

import socket

import keras
import numpy as np
import pytest

import keras_fg.layers
from keras_fg.layers import ImagePreprocessing
from keras_fg.models import BACKBONES, create_backbone, list_backbones


def random_pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


# ---------------------------------------------------------------- ImagePreprocessing


@pytest.mark.parametrize(
    "mode, preprocess_input",
    [
        ("caffe", keras.applications.vgg16.preprocess_input),
        ("caffe", keras.applications.resnet50.preprocess_input),
        ("tf", keras.applications.mobilenet_v2.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
        ("unit", lambda x: x / 255.0),
        ("none", lambda x: x),
    ],
)
def test_preprocessing_matches_keras_applications(mode, preprocess_input):
    pixels = random_pixels((2, 5, 7, 3))
    expected = preprocess_input(pixels.copy())
    actual = keras.ops.convert_to_numpy(ImagePreprocessing(mode)(pixels))
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-5)


def test_preprocessing_runs_in_float32_under_mixed_precision():
    pixels = np.array([[[[100.3, 0.7, 254.9]]]], dtype="float32")  # not exact in float16
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = ImagePreprocessing("tf")
        outputs = layer(pixels)
    finally:
        keras.config.set_dtype_policy("float32")
    assert keras.backend.standardize_dtype(outputs.dtype) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(outputs), pixels / 127.5 - 1, atol=1e-7)


def test_preprocessing_config_shape_and_symbolic_call():
    layer = ImagePreprocessing("torch", name="prep")
    clone = ImagePreprocessing.from_config(layer.get_config())
    assert clone.mode == "torch" and clone.name == "prep"
    assert layer.compute_output_shape((None, 8, 6, 3)) == (None, 8, 6, 3)
    assert layer(keras.Input((8, 6, 3))).shape == (None, 8, 6, 3)
    pixels = random_pixels((1, 8, 6, 3))
    np.testing.assert_array_equal(clone(pixels), layer(pixels))


def test_preprocessing_rejects_bad_mode_and_channels():
    with pytest.raises(ValueError, match="Received: mode='bgr'"):
        ImagePreprocessing("bgr")
    with pytest.raises(ValueError, match="3 channels"):
        ImagePreprocessing("caffe")(keras.Input((8, 8, 1)))


def test_preprocessing_is_exported():
    assert keras_fg.layers.ImagePreprocessing is ImagePreprocessing
    assert keras.saving.get_registered_object("keras_fg>ImagePreprocessing") is ImagePreprocessing


# ---------------------------------------------------------------- registry


def test_registry_names():
    required = {
        "vgg16", "vgg19", "resnet50", "mobilenetv2", "mobilenetv3small",
        "mobilenetv3large", "efficientnetv2b0", "efficientnetv2s", "efficientnetv2m",
        "convnexttiny", "convnextsmall", "convnextbase", "tiny",
    }  # fmt: skip
    assert required <= set(BACKBONES)
    assert list_backbones() == sorted(BACKBONES)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_with_its_channels_and_stride(name):
    spec = BACKBONES[name]
    backbone = create_backbone(name, image_size=64)
    assert isinstance(backbone, keras.Model) and backbone.name == f"{name}_backbone"
    assert backbone.input_shape == (None, 64, 64, 3)
    assert backbone.output_shape == (None, 64 // spec.stride, 64 // spec.stride, spec.channels)
    assert backbone.layers[-1].name == spec.feature_layer
    # Raw pixels in: the preprocessing is the first layer, or the network's own.
    assert isinstance(backbone.layers[1], ImagePreprocessing)
    assert backbone.layers[1].mode == spec.preprocessing
    if spec.preprocessing == "none":  # Rescaling (EfficientNet, MobileNetV3), Normalization.
        own = (keras.layers.Rescaling, keras.layers.Normalization)
        assert any(isinstance(layer, own) for layer in backbone.layers)
    features = keras.ops.convert_to_numpy(backbone(random_pixels((1, 64, 64, 3)), training=False))
    assert features.shape == (1, *backbone.output_shape[1:]) and np.isfinite(features).all()


@pytest.mark.parametrize("name", sorted(n for n in BACKBONES if BACKBONES[n].earlier_feature_layer))
def test_every_registered_earlier_layer_is_one_downsampling_step_before(name):
    backbone = create_backbone(name, image_size=64, earlier_feature_layer="default")
    network = {layer.name: layer for layer in backbone.layers}
    earlier = network[BACKBONES[name].earlier_feature_layer].output
    stride = BACKBONES[name].stride
    assert tuple(earlier.shape[1:3]) == (2 * 64 // stride, 2 * 64 // stride)
    assert backbone.output_shape[-1] == BACKBONES[name].channels + earlier.shape[-1]


def test_convnext_is_layer_normalized_and_has_no_batch_normalization():
    from keras_fg.models.backbones import is_layer_normalized

    backbone = create_backbone("convnexttiny", image_size=32)
    kinds = {type(layer).__name__ for layer in backbone.layers}
    assert "LayerNormalization" in kinds and "BatchNormalization" not in kinds
    assert is_layer_normalized("convnexttiny") and not is_layer_normalized("efficientnetv2s")


def test_tiny_has_no_batch_normalization():
    backbone = create_backbone("tiny", image_size=32)
    kinds = [type(layer).__name__ for layer in backbone.layers]
    assert "BatchNormalization" not in kinds and kinds.count("Conv2D") == 4


@pytest.mark.parametrize(
    "name, image_size, feature_shape",
    [("tiny", (256, 128), (32, 16, 128)), ("mobilenetv2", (96, 64), (3, 2, 1280))],
)
def test_rectangular_images(name, image_size, feature_shape):
    backbone = create_backbone(name, image_size=image_size)
    assert backbone.input_shape == (None, *image_size, 3)
    assert backbone.output_shape == (None, *feature_shape)


def test_other_feature_layer():
    backbone = create_backbone("vgg16", image_size=64, feature_layer="block4_conv3")
    assert backbone.output_shape == (None, 8, 8, 512)


def test_name_prefix_lets_two_backbones_share_a_model():
    images = keras.Input((32, 32, 3))
    streams = [create_backbone("tiny", image_size=32, name_prefix=p)(images) for p in ("a_", "b_")]
    model = keras.Model(images, keras.layers.Concatenate()(streams))
    assert {"a_tiny_backbone", "b_tiny_backbone"} <= {layer.name for layer in model.layers}


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="vgg16.*Received: name='vgg15'") as info:
        create_backbone("vgg15")
    assert all(name in str(info.value) for name in list_backbones())


def test_unknown_feature_layer_lists_valid_layers():
    with pytest.raises(ValueError, match="block5_conv3.*Received: feature_layer='conv5_4'"):
        create_backbone("vgg19", image_size=32, feature_layer="conv5_4")


@pytest.mark.parametrize("image_size", [0, (224,), (224, -1), 22.4, "224"])
def test_bad_image_size(image_size):
    with pytest.raises(ValueError, match="Received: image_size="):
        create_backbone("tiny", image_size=image_size)


# ---------------------------------------------------------------- weights


def test_shared_mobilenet_weights_give_the_reference_features(mobilenet_weights):
    pixels = random_pixels((2, 160, 160, 3))
    reference = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(160, 160, 3)
    )
    reference.load_weights(mobilenet_weights)
    expected = reference.predict(
        keras.applications.mobilenet_v2.preprocess_input(pixels.copy()), verbose=0
    )
    backbone = create_backbone("mobilenetv2", weights=mobilenet_weights, image_size=160)
    np.testing.assert_allclose(backbone.predict(pixels, verbose=0), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected).max() > 1.0  # pretrained features, not zeros


@pytest.mark.parametrize("image_size", [224, 448])
def test_shared_mobilenet_weights_load_at_any_size(mobilenet_weights, image_size):
    backbone = create_backbone("mobilenetv2", weights=str(mobilenet_weights), image_size=image_size)
    assert backbone.output_shape == (None, image_size // 32, image_size // 32, 1280)


def test_weights_file_round_trip_and_mismatch(tmp_path):
    path = tmp_path / "tiny.weights.h5"
    trained = create_backbone("tiny", image_size=32)
    trained.save_weights(path)
    loaded = create_backbone("tiny", weights=path, image_size=32)
    pixels = random_pixels((1, 32, 32, 3))
    np.testing.assert_array_equal(loaded(pixels), trained(pixels))
    larger = create_backbone("tiny", weights=path, image_size=48)
    for expected, actual in zip(trained.weights, larger.weights):
        np.testing.assert_array_equal(actual, expected)
    with pytest.raises(ValueError, match=f"{path}.*'vgg16'"):
        create_backbone("vgg16", weights=path, image_size=32)


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "missing.weights.h5"
    with pytest.raises(FileNotFoundError, match=str(path)):
        create_backbone("mobilenetv2", weights=path, image_size=96)


def test_tiny_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="no pretrained weights.*Received: weights='imagenet'"):
        create_backbone("tiny", weights="imagenet")


def _internet_reachable():
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=2).close()
        return True
    except OSError:
        return False


def test_imagenet_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    if _internet_reachable():
        pytest.skip("online: weights='imagenet' would download instead of failing")
    # An empty Keras cache, so that a download is really attempted.
    monkeypatch.setattr(keras.src.backend.config, "_KERAS_DIR", str(tmp_path))
    with pytest.raises(OSError, match="could not be downloaded.*weights='path/to/file.weights.h5'"):
        create_backbone("vgg16", weights="imagenet", image_size=32)


# ---------------------------------------------------------------- saving


@pytest.mark.parametrize(
    "name, image_size", [("tiny", 32), ("mobilenetv2", 96), ("mobilenetv3small", 64)]
)
def test_keras_file_round_trip(tmp_path, name, image_size):
    backbone = create_backbone(name, image_size=image_size)
    images = keras.Input((image_size, image_size, 3))
    features = backbone(images, training=False)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(features))
    model = keras.Model(images, outputs)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    pixels = random_pixels((2, image_size, image_size, 3))
    np.testing.assert_array_equal(
        reloaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0)
    )
    assert reloaded.get_layer(f"{name}_backbone").layers[-1].name == BACKBONES[name].feature_layer


def test_two_depth_backbone_returns_the_earlier_block_pooled_to_the_grid():
    from keras_fg.models.backbones import earlier_channels

    backbone = create_backbone("tiny", image_size=32, earlier_feature_layer="default")
    assert backbone.output_shape == (None, 4, 4, 128 + 64)
    assert earlier_channels(backbone) == 64
    assert earlier_channels(create_backbone("tiny", image_size=32)) is None
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    both = backbone.predict(images, verbose=0)
    conv3 = keras.Model(backbone.input, backbone.get_layer("conv3").output).predict(
        images, verbose=0
    )
    pooled = conv3.reshape(2, 4, 2, 4, 2, 64).mean(axis=(2, 4))
    np.testing.assert_allclose(both[..., 128:], pooled, atol=1e-5)
    # Any named block: conv1 (32×32) is pooled by 8.
    first = create_backbone("tiny", image_size=32, earlier_feature_layer="conv1")
    assert first.output_shape == (None, 4, 4, 128 + 32)


@pytest.mark.parametrize(
    "name, layer, message",
    [
        ("tiny", "conv9", "earlier_feature_layer='conv9'"),
        ("mobilenetv3small", "default", "No earlier feature layer is registered"),
    ],
)
def test_two_depth_backbone_bad_layers_raise(name, layer, message):
    with pytest.raises(ValueError, match=message):
        create_backbone(name, image_size=32, earlier_feature_layer=layer)

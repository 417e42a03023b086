"""keras-hub backbones ("hub:<preset>"), the TokenGrid layer, ConvNeXt under the families.

Every preset here is a small randomly initialised keras-hub model built from a config,
saved with `save_to_preset` to a folder and loaded back through `"hub:<folder>"`: nothing
is downloaded (tests/hub_presets.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from hub_presets import OFFSET, PRESET_SIZE, SCALE, write_preset

from keras_fg.export import export_model, export_tflite
from keras_fg.export.errors import ExportError
from keras_fg.layers import TokenGrid
from keras_fg.models import create_backbone, create_model
from keras_fg.models.backbones import (
    backbone_label,
    earlier_channels,
    has_earlier_feature_layer,
    is_layer_normalized,
)
from keras_fg.models.hub_backbones import (
    HubBackbone,
    import_keras_hub,
    resample_position_embeddings,
)

keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is not installed (.[hub])")

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {
    "gap": ("gap", {}),
    "bcnn": ("bcnn", {"reduction_dim": 8}),
    "bcnn_compact": ("bcnn", {"reduction_dim": 8, "projection_dim": 32}),
    "macnn": ("macnn", {"num_parts": 2}),
    "macnn_crops": ("macnn", {"num_parts": 2, "part_crop_size": 32}),
    "dasrbn": ("dasrbn", {"stream_dim": 4, "lstm_units": 8, "attention_units": 8}),
    "pcb": ("pcb", {"num_stripes": 2}),
}


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return {
        kind: write_preset(kind, root / kind)
        for kind in ("dinov2", "vit", "clip", "siglip", "resnet")
    }


def pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


def scaled(images):
    return images * np.float32(SCALE) + np.float32(OFFSET)


# ------------------------------------------------------------------------------ TokenGrid


def test_token_grid_puts_each_patch_token_at_its_row_and_column():
    prefix, (height, width), channels = 3, (3, 4), 5
    tokens = np.zeros((2, prefix + height * width, channels), "float32")
    tokens[:, :prefix] = 100.0  # Class and register tokens: must not appear in the map.
    tokens[0, prefix + 2 * width + 1, :] = 1.0  # Sample 0: the patch at row 2, column 1.
    tokens[1, prefix + 0 * width + 3, 2] = 7.0  # Sample 1: row 0, column 3, channel 2.
    grid = keras.ops.convert_to_numpy(TokenGrid((height, width), prefix)(tokens))
    assert grid.shape == (2, height, width, channels)
    assert np.argwhere(grid[0].sum(-1)).tolist() == [[2, 1]]
    assert np.argwhere(grid[1]).tolist() == [[0, 3, 2]] and grid[1, 0, 3, 2] == 7.0
    assert grid.max() < 100.0


def test_token_grid_config_symbolic_call_and_keras_file(tmp_path):
    layer = TokenGrid(4, num_prefix_tokens=1, name="grid")
    again = TokenGrid.from_config(layer.get_config())
    assert (again.grid_size, again.num_prefix_tokens) == ((4, 4), 1)
    tokens = keras.Input((17, 8))
    assert layer(tokens).shape == (None, 4, 4, 8)
    assert layer.compute_output_shape((None, 17, 8)) == (None, 4, 4, 8)
    model = keras.Model(tokens, keras.layers.Dense(2)(layer(tokens)))
    model.save(tmp_path / "grid.keras")
    reloaded = keras.saving.load_model(tmp_path / "grid.keras")
    data = pixels((2, 17, 8))
    np.testing.assert_array_equal(reloaded.predict(data, verbose=0), model.predict(data, verbose=0))


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"grid_size": 0}, "grid_size=0"),
        ({"grid_size": (4,)}, r"grid_size=\(4,\)"),
        ({"grid_size": (4, 2.5)}, r"grid_size=\(4, 2.5\)"),
        ({"grid_size": 4, "num_prefix_tokens": -1}, "num_prefix_tokens=-1"),
        ({"grid_size": 4, "num_prefix_tokens": True}, "num_prefix_tokens=True"),
    ],
)
def test_token_grid_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=f"Received: {message}"):
        TokenGrid(**arguments)


def test_token_grid_rejects_a_sequence_of_another_length():
    with pytest.raises(ValueError, match=r"Received: input_shape=\(None, 16, 8\)"):
        TokenGrid(4, num_prefix_tokens=1)(keras.Input((16, 8)))


def test_position_embeddings_resample_keeps_the_class_row_and_an_even_grid():
    table = np.random.default_rng(0).normal(size=(1, 1 + 4 * 4, 3)).astype("float32")
    np.testing.assert_allclose(
        resample_position_embeddings(table, (4, 4), (4, 4)), table, atol=1e-6
    )
    constant = np.concatenate([table[:, :1], np.full((1, 16, 3), 0.5, "float32")], axis=1)
    resampled = resample_position_embeddings(constant, (4, 4), (6, 8))
    assert resampled.shape == (1, 1 + 6 * 8, 3)
    np.testing.assert_array_equal(resampled[:, :1], table[:, :1])
    np.testing.assert_allclose(resampled[:, 1:], 0.5, atol=1e-6)


# ------------------------------------------------------------------------------ presets


@pytest.mark.parametrize(
    "kind, shape, earlier",
    [
        ("dinov2", (8, 8, 32), 32),
        ("vit", (8, 8, 32), 32),
        ("clip", (8, 8, 32), 32),
        ("siglip", (8, 8, 32), 32),
        ("resnet", (4, 4, 16), 16),
    ],
)
def test_every_kind_builds_a_feature_map_at_another_size(presets, kind, shape, earlier):
    backbone = create_backbone(f"hub:{presets[kind]}", image_size=2 * PRESET_SIZE)
    assert isinstance(backbone, HubBackbone) and backbone.name == f"hub_{kind}_backbone"
    assert backbone.input_shape == (None, 64, 64, 3) and backbone.output_shape == (None, *shape)
    preprocessing = backbone.get_layer("image_preprocessing")  # The preset's converter.
    np.testing.assert_allclose(preprocessing.scale, SCALE)
    np.testing.assert_allclose(preprocessing.offset, OFFSET)
    assert backbone.is_transformer == (kind != "resnet")
    features = backbone.predict(pixels((2, 64, 64, 3)), verbose=0)
    assert np.isfinite(features).all() and features.std() > 0
    two = create_backbone(f"hub:{presets[kind]}", image_size=64, earlier_feature_layer="default")
    assert two.output_shape == (None, *shape[:2], shape[2] + earlier)
    assert earlier_channels(two) == earlier and earlier_channels(backbone) is None


@pytest.mark.parametrize("kind, leading", [("dinov2", 3), ("vit", 1), ("clip", 1)])
def test_the_map_is_the_networks_last_patch_tokens_on_their_grid(presets, kind, leading):
    backbone = create_backbone(f"hub:{presets[kind]}", image_size=PRESET_SIZE)
    network = keras_hub.models.Backbone.from_preset(presets[kind])
    network = getattr(network, "vision_encoder", network)
    images = pixels((2, PRESET_SIZE, PRESET_SIZE, 3))
    tokens = keras.ops.convert_to_numpy(network(scaled(images)))
    assert tokens.shape == (2, leading + 16, 32)
    expected = tokens[:, leading:].reshape(2, 4, 4, 32)
    np.testing.assert_allclose(backbone.predict(images, verbose=0), expected, atol=1e-4)


def test_dinov2_at_another_size_is_keras_hubs_own_interpolation(presets):
    backbone = create_backbone(f"hub:{presets['dinov2']}", image_size=64)
    network = keras_hub.models.Backbone.from_preset(presets["dinov2"], image_shape=(64, 64, 3))
    images = pixels((2, 64, 64, 3))
    tokens = keras.ops.convert_to_numpy(network(scaled(images)))
    expected = tokens[:, 3:].reshape(2, 8, 8, 32)
    np.testing.assert_allclose(backbone.predict(images, verbose=0), expected, atol=1e-4)


def test_vit_at_another_size_resamples_its_position_table(presets):
    network = keras_hub.models.Backbone.from_preset(presets["vit"])
    backbone = create_backbone(f"hub:{presets['vit']}", image_size=(64, 48))  # ViT: rectangles.
    assert backbone.output_shape == (None, 8, 6, 32)
    name = "position_embedding/embeddings"
    old = next(v for v in network.weights if v.path.endswith(name))
    new = next(v for v in backbone.network.weights if v.path.endswith(name))
    expected = resample_position_embeddings(keras.ops.convert_to_numpy(old), (4, 4), (8, 6))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(new), expected)


def test_cnn_preset_reads_its_last_pyramid_level_and_pools_the_one_before(presets):
    network = keras_hub.models.Backbone.from_preset(presets["resnet"])
    assert list(network.pyramid_outputs) == ["P2", "P3", "P4"]
    levels = keras.Model(network.inputs[0], [network.pyramid_outputs[k] for k in ("P4", "P3")])
    images = pixels((2, 64, 64, 3))
    last, before = (keras.ops.convert_to_numpy(t) for t in levels(scaled(images)))
    both = create_backbone(
        f"hub:{presets['resnet']}", image_size=64, earlier_feature_layer="default"
    )
    features = both.predict(images, verbose=0)
    np.testing.assert_allclose(features[..., :16], last, atol=1e-4)
    pooled = before.reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4))
    np.testing.assert_allclose(features[..., 16:], pooled, atol=1e-4)
    other = create_backbone(f"hub:{presets['resnet']}", image_size=64, feature_layer="P3")
    assert other.output_shape == (None, 8, 8, 16)


def test_bad_hub_arguments_raise_clear_errors(presets, tmp_path):
    dinov2, vit = f"hub:{presets['dinov2']}", f"hub:{presets['vit']}"
    cases = [
        (
            dict(name=dinov2, image_size=60),
            ValueError,
            r"multiple of it. Received: image_size=\(60, 60\)",
        ),
        (dict(name=dinov2, image_size=(64, 32)), ValueError, r"square images only. Received"),
        (dict(name=dinov2, weights="x.weights.h5"), ValueError, "Received: weights='x.weights.h5'"),
        (dict(name=dinov2, last_stride=1), ValueError, "Received: last_stride=1"),
        (dict(name=vit, feature_layer="block_9"), ValueError, "Received: feature_layer='block_9'"),
        (dict(name=vit, earlier_feature_layer="P3"), ValueError, "earlier_feature_layer='P3'"),
        (dict(name="hub:"), ValueError, "Received: name='hub:'"),
        (dict(name=f"hub:{tmp_path / 'absent'}"), FileNotFoundError, "absent"),
    ]
    for arguments, error, message in cases:
        with pytest.raises(error, match=message):
            create_backbone(**{"image_size": 64, **arguments})


def test_a_preset_without_image_converter_or_image_network_is_refused(tmp_path):
    keras.utils.set_random_seed(0)
    bare = tmp_path / "bare"  # A backbone saved alone: its pixel scaling is unknown.
    keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8
    ).save_to_preset(str(bare))
    with pytest.raises(ValueError, match="has no image converter"):
        create_backbone(f"hub:{bare}", image_size=32)
    text = tmp_path / "text"
    keras_hub.models.BertBackbone(
        vocabulary_size=10, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4
    ).save_to_preset(str(text))
    with pytest.raises(ValueError, match="Received: a BertBackbone"):
        create_backbone(f"hub:{text}", image_size=32)


def test_missing_keras_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # `import keras_hub` then fails.
    with pytest.raises(ImportError, match=r'pip install "keras-fg\[hub\]"'):
        import_keras_hub()


def test_registry_helpers_for_hub_names(presets):
    assert is_layer_normalized(f"hub:{presets['dinov2']}")
    assert not is_layer_normalized(f"hub:{presets['resnet']}")
    assert is_layer_normalized("hub:dinov2_small") and is_layer_normalized(
        "hub:clip_vit_base_patch16"
    )
    assert not is_layer_normalized("hub:resnet_50_imagenet")
    assert is_layer_normalized("convnexttiny") and not is_layer_normalized("mobilenetv2")
    assert has_earlier_feature_layer("hub:anything") and not has_earlier_feature_layer(
        "mobilenetv3small"
    )
    assert backbone_label("hub:kaggle://keras/dinov2/keras/dinov2_small") == "hub_dinov2_small"


def test_keras_hub_attributes_keras_fg_reads(presets):
    """keras_fg reads these keras-hub attributes (keras_fg/models/hub_backbones.py): the
    message names the one a keras-hub release changed."""
    needs = {
        "dinov2": ("embeddings", "pyramid_outputs", "layernorm", "apply_layernorm", "num_layers",
                   "num_register_tokens", "position_embedding_shape", "image_shape", "patch_size"),
        "vit": ("use_class_token", "image_shape", "patch_size"),
        "clip": ("encoder_layers", "layer_norm", "image_shape", "patch_size"),
        "siglip": ("encoder_layers", "post_layer_norm", "image_shape", "patch_size"),
        "resnet": ("pyramid_outputs",),
    }  # fmt: skip
    for kind, names in needs.items():
        network = keras_hub.models.Backbone.from_preset(presets[kind])
        network = getattr(network, "vision_encoder", network)
        for name in names:
            assert hasattr(network, name), f"keras-hub's {type(network).__name__}.{name} is gone"
    vit = keras_hub.models.Backbone.from_preset(presets["vit"])
    encoder = vit.get_layer("vit_encoder")
    for name in ("dropout", "encoder_layers", "layer_norm"):
        assert hasattr(encoder, name), f"keras-hub's ViTEncoder.{name} is gone"
    vit.get_layer("vit_patching_and_embedding")
    dinov2 = keras_hub.models.Backbone.from_preset(presets["dinov2"])
    for name in ("position_embeddings", "interpolated_position_embeddings"):
        assert hasattr(dinov2.embeddings, name), f"keras-hub's DINOV2Embedding.{name} is gone"


# ------------------------------------------------------------------------------ families


def fit_one_step(model, size, seed=0):
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    images = pixels((4, size, size, 3), seed)
    model.fit(images, np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
    return images


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_on_dinov2_trains_saves_and_reloads_identically(presets, family, tmp_path):
    name, options = FAMILIES[family]
    keras.utils.set_random_seed(0)
    model = create_model(name, 3, backbone=f"hub:{presets['dinov2']}", image_size=32, **options)
    assert model.name == f"{name}_hub_dinov2"
    if family == "dasrbn":  # Its second stream: block 1 of the two, through the final norm.
        assert earlier_channels(model.backbone) == 32
    before = [keras.ops.convert_to_numpy(w) for w in model.backbone.trainable_weights]
    images = fit_one_step(model, 32)
    after = [keras.ops.convert_to_numpy(w) for w in model.backbone.trainable_weights]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(after, before))  # The backbone learned.
    assert_reloads_identically(model, images, tmp_path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_on_a_keras_hub_cnn_trains_saves_and_reloads_identically(
    presets, family, tmp_path
):
    name, options = FAMILIES[family]
    keras.utils.set_random_seed(0)
    model = create_model(name, 3, backbone=f"hub:{presets['resnet']}", image_size=64, **options)
    images = fit_one_step(model, 64)
    assert_reloads_identically(model, images, tmp_path)


def assert_reloads_identically(model, images, tmp_path):
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    expected = model.predict(images, verbose=0)
    for key, value in reloaded.predict(images, verbose=0).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_split_at_backbone_gives_the_token_map_and_a_head_that_reads_it(presets):
    from keras_fg.models import split_at_backbone

    model = create_model("gap", 3, backbone=f"hub:{presets['dinov2']}", image_size=32)
    backbone, head = split_at_backbone(model)
    assert backbone is model.backbone and head.input_shape == (None, 4, 4, 32)
    images = pixels((2, 32, 32, 3))
    np.testing.assert_allclose(
        head.predict(backbone.predict(images, verbose=0), verbose=0)["probabilities"],
        model.predict(images, verbose=0)["probabilities"],
        atol=1e-6,
    )


def test_dinov2_fine_tuned_position_table_survives_saving_at_another_size(presets, tmp_path):
    # keras-hub 0.32 alone drops a fine-tuned table on saving (see HubBackbone).
    keras.utils.set_random_seed(0)
    model = create_model("gap", 3, backbone=f"hub:{presets['dinov2']}", image_size=64)
    table = model.backbone.network.embeddings.interpolated_position_embeddings
    start = keras.ops.convert_to_numpy(table)
    images = fit_one_step(model, 64)
    assert np.abs(keras.ops.convert_to_numpy(table) - start).max() > 1e-3
    model.save(tmp_path / "gap.keras")
    reloaded = keras.saving.load_model(tmp_path / "gap.keras")
    np.testing.assert_array_equal(
        reloaded.predict(images, verbose=0)["probabilities"],
        model.predict(images, verbose=0)["probabilities"],
    )
    # A resumed run: the reloaded model trains on and is saved again.
    reloaded.fit(images, np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
    reloaded.save(tmp_path / "resumed.keras")
    again = keras.saving.load_model(tmp_path / "resumed.keras")
    np.testing.assert_array_equal(
        again.predict(images, verbose=0)["probabilities"],
        reloaded.predict(images, verbose=0)["probabilities"],
    )


def exported(model, tmp_path, formats, images=None):
    files = None
    if images is not None:
        from PIL import Image

        files = []
        for index, image in enumerate(images.astype("uint8")):
            files.append(str(tmp_path / f"{index}.png"))
            Image.fromarray(image).save(files[-1])
    report = export_model(model, tmp_path / "export", formats=formats, evaluation_data=files)
    return {entry["format"]: entry for entry in report["exports"]}, report


def test_dinov2_macnn_exports_with_parity_and_int8_is_refused_with_its_reason(presets, tmp_path):
    keras.utils.set_random_seed(0)
    model = create_model(
        "macnn", 3, backbone=f"hub:{presets['dinov2']}", image_size=32, num_parts=2
    )
    fit_one_step(model, 32)
    formats = ["saved_model", "tflite_fp32", "tflite_fp16", "tflite_int8"]
    entries, report = exported(model, tmp_path, formats, pixels((8, 32, 32, 3)))
    for fmt in formats[:-1]:
        assert entries[fmt]["check"]["passed"], entries[fmt]
    assert entries["tflite_int8"]["file"] is None
    assert (
        "not offered for a vision transformer backbone (dinov2)"
        in entries["tflite_int8"]["skipped"]
    )
    assert report["passed"]
    with pytest.raises(ExportError, match="not offered: full-integer int8"):
        export_tflite(
            model, tmp_path / "m.tflite", "int8", representative_images=pixels((2, 32, 32, 3))
        )


def test_keras_hub_cnn_dasrbn_exports_int8_with_parity(presets, tmp_path):
    keras.utils.set_random_seed(0)
    model = create_model(
        "dasrbn", 3, backbone=f"hub:{presets['resnet']}", image_size=64,
        **FAMILIES["dasrbn"][1],
    )  # fmt: skip
    fit_one_step(model, 64)
    entries, report = exported(
        model, tmp_path, ["tflite_fp32", "tflite_int8"], pixels((8, 64, 64, 3))
    )
    assert report["passed"], [entries[f].get("check") for f in entries]
    assert entries["tflite_int8"]["file"].endswith("_int8.tflite")


def test_convnext_tiny_pcb_trains_saves_and_reloads_identically(tmp_path):
    # Its SavedModel and TFLite exports, every family, are bench/backbones.py's export matrix
    # (a 28 M-parameter conversion costs minutes on two cores).
    keras.utils.set_random_seed(0)
    model = create_model("pcb", 3, backbone="convnexttiny", image_size=64, num_stripes=2)
    assert model.backbone.output_shape == (None, 2, 2, 768)
    images = fit_one_step(model, 64)
    model.save(tmp_path / "pcb.keras")
    reloaded = keras.saving.load_model(tmp_path / "pcb.keras")
    np.testing.assert_array_equal(
        reloaded.predict(images, verbose=0)["features"],
        model.predict(images, verbose=0)["features"],
    )


# ------------------------------------------------------------------------------ train.py


def test_train_py_runs_offline_on_a_preset_folder(presets, tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        # Any network access fails at once: the preset folder must be enough.
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        sys.executable, str(ROOT / "train.py"), "--backbone", f"hub:{presets['dinov2']}",
        "--model", "gap", "--image-size", "32", "--synthetic-train", "32", "--synthetic-test",
        "16", "--synthetic-classes", "4", "--epochs", "1", "--batch-size", "16", "--verbose",
        "0", "--output", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == f"hub:{presets['dinov2']}"
    assert config["backbone_lr_multiplier"] == 0.1  # The LayerNorm recipe's default.
    assert (out / "model.keras").is_file() and (out / "evaluation.json").is_file()
    bad = subprocess.run(
        command[:2] + ["--backbone", "hub:", "--output", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and "hub:<keras-hub preset name or folder>" in bad.stderr

"""The re-ID recipe: last stride 1 gives the stated grid; each switch changes what it says."""

import numpy as np
import pytest

from keras_fg.cli.optimizers import make_optimizer
from keras_fg.cli.train import family_options
from keras_fg.cli.train_config import parse_args
from keras_fg.data.pipeline import ERASE_FILL
from keras_fg.models import create_backbone, create_model

# --------------------------------------------------------------------------- last stride 1


@pytest.mark.parametrize("image_size, grid", [((256, 128), (16, 8))])
def test_mobilenetv2_last_stride_1_doubles_the_grid(image_size, grid):
    assert create_backbone("mobilenetv2", image_size=image_size).output_shape[1:3] == tuple(
        g // 2 for g in grid
    )
    assert create_backbone("mobilenetv2", image_size=image_size, last_stride=1).output_shape == (
        None,
        *grid,
        1280,
    )


def test_resnet50_last_stride_1_grid():
    assert create_backbone("resnet50", image_size=(64, 32), last_stride=1).output_shape == (
        None,
        4,
        2,
        2048,
    )


def test_last_stride_1_keeps_the_weights_and_every_strided_response(mobilenet_weights):
    # Stride 1 computes the same convolution at every position, stride 2 at every other one:
    # the stride-2 map is the stride-1 map subsampled (MobileNetV2 pads bottom/right for
    # stride 2, so its outputs sit at the odd positions of the stride-1 map).
    kwargs = dict(
        weights=mobilenet_weights, image_size=(64, 32), feature_layer="block_13_depthwise"
    )
    strided = create_backbone("mobilenetv2", **kwargs)
    dense = create_backbone("mobilenetv2", last_stride=1, **kwargs)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 32, 3)).astype("float32")
    a, b = strided.predict(x, verbose=0), dense.predict(x, verbose=0)
    assert a.shape == (2, 2, 1, 576) and b.shape == (2, 4, 2, 576)
    np.testing.assert_allclose(b[:, 1::2, 1::2], a, atol=1e-5)
    for layer in strided.layers:
        for u, v in zip(layer.get_weights(), dense.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(u, v)


def test_last_stride_bad_values():
    with pytest.raises(ValueError, match="last_stride=3"):
        create_backbone("mobilenetv2", image_size=32, last_stride=3)
    with pytest.raises(ValueError, match="not for backbone 'tiny'"):
        create_backbone("tiny", image_size=32, last_stride=1)
    with pytest.raises(ValueError, match="not offered for --backbone tiny"):
        parse_args(
            [
                "--task",
                "reid",
                "--data",
                "x",
                "--format",
                "market1501",
                "--backbone",
                "tiny",
                "--last-stride",
                "1",
            ]
        )


# --------------------------------------------------------------------------- the switches

SWITCHES = {  # flag(s) that switch one trick off -> the one resolved setting it changes
    "warmup": (["--warmup-epochs", "0"], "warmup_epochs", 0.0),
    "random_erasing": (["--no-random-erasing"], "random_erasing", False),
    "label_smoothing": (["--label-smoothing", "0"], "label_smoothing", 0.0),
    "last_stride": (["--last-stride", "2"], "last_stride", 2),
    "bnneck": (["--no-bnneck"], "bnneck", False),
    "center_loss": (["--center-loss-weight", "0"], "center_loss_weight", 0.0),
    "triplet": (["--triplet-weight", "0"], "triplet_weight", 0.0),
    "part_weights": (["--part-weights", "equal"], "part_weights", "equal"),
}


def reid_args(*flags, data="mini_mars"):
    return parse_args(
        [
            "--task",
            "reid",
            "--data",
            str(data),
            "--format",
            "market1501",
            "--image-size",
            "64",
            "32",
            "--epochs",
            "2",
            *flags,
        ]
    )


def test_reid_defaults_are_the_full_recipe():
    args = reid_args()
    assert args.model == "pcb" and args.learning_rate == 3.5e-4 and args.warmup_epochs == 1.0
    assert args.num_stripes == 6 and args.descriptor == "stripes" and args.part_weights == "fisher"
    assert args.random_erasing and args.bnneck and args.label_smoothing == 0.1
    assert args.last_stride == 1 and args.center_loss_weight == 5e-4 and args.triplet_weight == 1
    classify = parse_args([])
    assert classify.model == "macnn" and classify.label_smoothing == 0.0
    assert classify.learning_rate == 3e-3 and not classify.random_erasing
    # DASRBN classifies at 1e-3 (3e-3 killed its backbone at 96 px), unless told otherwise.
    assert parse_args(["--model", "dasrbn"]).learning_rate == 1e-3
    assert parse_args(["--model", "dasrbn", "--learning-rate", "3e-3"]).learning_rate == 3e-3
    assert reid_args("--model", "dasrbn").learning_rate == 3.5e-4


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_each_switch_changes_its_setting_and_nothing_else(switch):
    flags, key, value = SWITCHES[switch]
    full, off = vars(reid_args()), vars(reid_args(*flags))
    assert {k for k in full if full[k] != off[k]} == {key}
    assert off[key] == value


def build(args, num_classes=4):
    return create_model(
        args.model,
        num_classes,
        backbone=args.backbone,
        weights=None,
        image_size=tuple(args.image_size),
        label_smoothing=args.label_smoothing,
        **family_options(args),
    )


def model_summary(model):
    return {
        "grid": tuple(model.backbone.output_shape[1:3]),
        "outputs": sorted(model.output),
        "terms": model.loss_term_names(),
        "label_smoothing": model.label_smoothing,
        "parameters": model.count_params(),
    }


def test_each_model_switch_changes_what_it_says_and_nothing_else():
    # On GAP, whose parameters the sums below count (the default PCB's 6 stripes need a
    # taller grid than these 64x32 images give).
    full = model_summary(build(reid_args("--model", "gap")))
    assert full["grid"] == (4, 2)
    assert full["terms"] == ["classification_loss", "triplet_loss", "center_loss"]
    expected = {
        "last_stride": {"grid": (2, 1)},
        "bnneck": {
            "outputs": [k for k in full["outputs"] if k != "embedding"],
            # BatchNormalization(center=False): 1280 scales and 2 x 1280 statistics,
            # and the classifier gains its bias.
            "parameters": full["parameters"] - 3 * 1280 + 4,
        },
        "center_loss": {
            "terms": ["classification_loss", "triplet_loss"],
            "parameters": full["parameters"] - 4 * 1280,
        },
        "label_smoothing": {"label_smoothing": 0.0},
        "triplet": {"terms": ["classification_loss", "center_loss"]},
    }
    for switch, changes in expected.items():
        summary = model_summary(build(reid_args("--model", "gap", *SWITCHES[switch][0])))
        assert summary == {**full, **changes}, switch


def test_warmup_switch_changes_only_the_first_learning_rates():
    def rates(args):
        optimizer = make_optimizer(args, None, steps_per_epoch=10)
        values = []
        for step in (0, 5, 10, 15):
            optimizer.iterations.assign(step)
            values.append(float(optimizer.learning_rate))
        return np.array(values)

    with_warmup, without = rates(reid_args()), rates(reid_args("--warmup-epochs", "0"))
    assert with_warmup[0] == 0.0 and without[0] == pytest.approx(3.5e-4)
    assert with_warmup[1] == pytest.approx(3.5e-4 / 2)
    assert with_warmup[2] == pytest.approx(3.5e-4)
    assert without[3] < with_warmup[3] < 3.5e-4  # Both decay; the warmed-up one starts later.


def test_random_erasing_switch_only_erases(mars_dir):
    from keras_fg.cli.train_data import DataSettings, ReidData

    def first_batch(*flags):
        args = reid_args(*flags, data=mars_dir)
        data = ReidData(DataSettings.from_args(args))
        images, labels = next(iter(data.training_dataset(0, 1)))
        return images.numpy(), labels.numpy()

    erased, labels = first_batch()
    plain, same_labels = first_batch("--no-random-erasing")
    np.testing.assert_array_equal(labels, same_labels)
    differs = np.any(erased != plain, axis=-1)  # (B, H, W): pixels the switch changed
    assert differs.any(axis=(1, 2)).sum() >= 4  # p = 0.5 over 32 images
    np.testing.assert_allclose(erased[differs], np.broadcast_to(ERASE_FILL, erased[differs].shape))


def test_gpu_recipe_file_is_the_full_recipe(market_dir):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "configs" / "bot_reid_market1501.yaml"
    args = parse_args(["--config", str(recipe), "--data", str(market_dir)])
    assert args.task == "reid" and args.backbone == "resnet50" and args.image_size == [256, 128]
    assert args.random_erasing and args.bnneck and args.last_stride == 1
    assert args.label_smoothing == 0.1 and args.center_loss_weight == 5e-4
    assert args.warmup_epochs == 10 and args.batch_size == 64 and args.train_batchnorm


def test_dropout_flag_keeps_each_familys_default_unless_given():
    assert "dropout" not in family_options(parse_args(["--model", "dasrbn"]))
    assert family_options(parse_args(["--model", "dasrbn", "--dropout", "0"]))["dropout"] == 0.0
    model = build(
        parse_args(["--model", "dasrbn", "--image-size", "64", "64", "--backbone", "tiny"])
    )
    assert model.dropout == 0.5


def test_pcb_flags_build_the_stripes_asked_for_with_the_full_recipe():
    model = build(reid_args("--backbone", "tiny", "--model", "pcb", "--num-stripes", "3"))
    assert model.num_stripes == 3
    assert model.get_layer("stripe_pool").output.shape[1:] == (3, model.backbone.output_shape[-1])
    assert model.bnneck and model.triplet_weight == 1.0 and model.center_loss_weight == 5e-4
    assert model.loss_term_names() == [
        "classification_loss",
        "triplet_loss",
        "center_loss",
        "part_loss",
    ]
    assert model.descriptor == "stripes"
    assert model.output["features"].shape[-1] == 3 * model.backbone.output_shape[-1]
    fused = build(reid_args("--backbone", "tiny", "--model", "pcb", "--descriptor", "fused"))
    assert fused.descriptor == "fused"
    assert fused.output["features"].shape[-1] == 7 * fused.backbone.output_shape[-1]
    options = family_options(reid_args("--backbone", "tiny", "--model", "gap"))
    assert "num_stripes" not in options and "descriptor" not in options

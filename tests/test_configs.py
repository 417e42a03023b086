"""Every recipe in configs/ parses and trains one epoch of two steps on the tiny backbone."""

from pathlib import Path

import pytest
import yaml

from keras_fg.cli.train import run
from keras_fg.cli.train_config import parse_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# What makes a recipe small: its settings otherwise, as written.
SMALL = [
    "--backbone",
    "tiny",
    "--weights",
    "none",
    "--epochs",
    "1",
    "--head-epochs",
    "0",
    "--warmup-epochs",
    "0",
    "--verbose",
    "0",
    "--no-determinism",
    "--macnn-init",
    "none",
]


def test_there_are_recipes():
    names = {path.stem for path in CONFIGS}
    assert {"macnn_vgg19_cub_448", "bcnn_vgg16_cub_448", "cub_gap", "cub_macnn"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_recipe_runs_one_step_on_tiny(config, tmp_path, request):
    recipe = yaml.safe_load(config.read_text())
    argv = ["--config", str(config), *SMALL, "--output", str(tmp_path / "run")]
    if recipe.get("task") == "reid":
        market = request.getfixturevalue("market_dir")  # Skips when ../shared is absent.
        argv += [
            "--data",
            str(market),
            "--image-size",
            "32",
            "16",
            "--num-identities",
            "2",
            "--num-instances",
            "2",
            # `tiny` has no stride to remove; the recipe's last stride 1 is tested on
            # MobileNetV2 and ResNet-50 in test_reid_recipe.py.
            "--last-stride",
            "2",
            # PCB's six stripes need six rows; the tiny backbone gives 4 at this size.
            "--num-stripes",
            "2",
        ]
    else:
        argv += [
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--synthetic-train",
            "16",
            "--synthetic-test",
            "8",
            "--synthetic-classes",
            "4",
        ]
    if recipe.get("part_crop_size"):
        argv += ["--part-crop-size", "16"]
    args = parse_args(argv)
    for key, value in recipe.items():  # The recipe's settings, but for the small ones.
        if f"--{key.replace('_', '-')}" not in argv:
            assert getattr(args, key.replace("-", "_")) == value, key
    evaluation = run(args)
    assert evaluation["skipped_images"] == 0
    assert (tmp_path / "run" / "model.keras").is_file()

"""Shared fixtures: the real data and weights in ../shared, skipped with a reason when absent."""

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KERAS_FG_SHARED", ROOT.parent / "shared"))


def _shared_path(relative):
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path} does not exist (../shared is absent)")
    return path


@pytest.fixture(scope="session")
def cub_dir():
    """The 50-species CUB-200-2011 subset in its published folder layout."""
    return _shared_path("data/cub200_subset/CUB_200_2011")


@pytest.fixture(scope="session")
def mars_dir():
    """mini_mars: real MARS crops in the Market-1501 layout (trainable)."""
    return _shared_path("data/reid/mini_mars")


@pytest.fixture(scope="session")
def market_dir():
    """mini_market1501: 32 images per split of Market-1501 as published."""
    return _shared_path("data/reid/mini_market1501")


@pytest.fixture(scope="session")
def mobilenet_weights():
    """Pretrained MobileNetV2 (alpha=1.0, include_top=False) weights."""
    return _shared_path("weights/mobilenet_v2_1.0.weights.h5")


@pytest.fixture(scope="session")
def real_jpegs():
    """A few real JPEG files: CUB birds when ../shared exists, else skip."""
    images = _shared_path("data/cub200_subset/CUB_200_2011/images")
    return sorted(images.glob("*/*.jpg"))[:8]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state and the float32 policy.

    train.py's `run()` sets a global mixed-precision policy when a recipe asks for one (the
    re-ID GPU recipe says `mixed_precision: auto`); tests that call it in-process must not
    leave it to the tests after them.
    """
    import keras

    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")

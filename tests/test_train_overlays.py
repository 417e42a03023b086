"""train.py's attention overlays: attention.png and the same figure as a TensorBoard image."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from keras_fg.cli.train import write_attention_overlays
from keras_fg.models import create_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
EPOCHS = 1


@pytest.fixture(scope="module")
def dasrbn_run(tmp_path_factory):
    """A one-epoch DASRBN run on synthetic data (its single spatial attention map)."""
    output = tmp_path_factory.mktemp("overlays") / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--model",
            "dasrbn",
            "--stream-dim",
            "8",
            "--lstm-units",
            "16",
            "--synthetic-train",
            "64",
            "--synthetic-test",
            "16",
            "--synthetic-classes",
            "4",
            "--epochs",
            str(EPOCHS),
            "--batch-size",
            "16",
            "--verbose",
            "0",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return output


def image_summaries(folder):
    """(tag, step, plugin, [width, height, png...]) of every summary value under `folder`."""
    found = []
    for path in sorted(folder.rglob("events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found.append(
                    (
                        value.tag,
                        event.step,
                        value.metadata.plugin_data.plugin_name,
                        list(value.tensor.string_val),
                    )
                )
    return found


def test_tensorboard_holds_the_attention_figure_as_an_image(dasrbn_run):
    summaries = [s for s in image_summaries(dasrbn_run / "tensorboard") if s[2] == "images"]
    assert [(tag, step) for tag, step, _, _ in summaries] == [("attention_overlays", EPOCHS)]
    width, height, encoded = summaries[0][3]
    image = tf.io.decode_png(encoded).numpy()
    assert image.shape == (int(height), int(width), 3)

    # It is the figure of attention.png (the two renderings differ only in anti-aliasing).
    png = tf.io.decode_png(tf.io.read_file(str(dasrbn_run / "attention.png"))).numpy()[..., :3]
    assert png.shape == image.shape
    assert np.abs(png.astype(float) - image).mean() < 8.0
    # Eight rows of (image, attention overlay): taller than wide, and not blank.
    assert image.shape[0] > 3 * image.shape[1]
    assert image.std() > 20


def test_a_family_without_attention_maps_writes_no_overlays(tmp_path):
    model = create_model("gap", 3, backbone="tiny", image_size=32)
    write_attention_overlays(model, data=None, args=None, output=tmp_path)
    assert list(tmp_path.iterdir()) == []

"""train.py --task reid on real people: P x K batches, BNNeck + triplet, CMC and mAP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from keras_fg.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]


def chance_rank1(query, gallery):
    """Expected rank-1 of a random ranking under the same-person-same-camera rule."""
    rates = []
    for person, camera in zip(query.labels, query.cameras):
        candidates = ~((gallery.labels == person) & (gallery.cameras == camera))
        matches = (gallery.labels == person) & candidates
        if matches.any():
            rates.append(matches.sum() / candidates.sum())
    return float(np.mean(rates))


def train_reid(mars_dir, out, *flags):
    """Runs train.py --task reid on `mars_dir` into `out`; returns its evaluation.json."""
    command = [
        sys.executable, str(ROOT / "train.py"), "--task", "reid", "--data", str(mars_dir),
        "--backbone", "tiny", "--image-size", "128", "64", "--verbose", "0",
        "--output", str(out), *flags,
    ]  # fmt: skip
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "evaluation.json").read_text())


def test_short_reid_run_on_mini_mars_ranks_above_chance(mars_dir, tmp_path):
    out = tmp_path / "reid"
    evaluation = train_reid(
        mars_dir, out, "--model", "gap", "--epochs", "2", "--num-identities", "8",
        "--num-instances", "4",
    )  # fmt: skip
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert evaluation["num_query_images"] == 32 and evaluation["num_gallery_images"] == 529
    assert sorted(evaluation["variants"]) == [
        "flip",
        "flip_re_ranking",
        "plain",
        "plain_re_ranking",
    ]
    assert evaluation["rank1"] == evaluation["variants"]["plain"]["rank1"]
    assert evaluation["variants"]["plain"]["num_valid_queries"] == 23
    chance = chance_rank1(
        load_dataset("market1501", mars_dir, "query"),
        load_dataset("market1501", mars_dir, "gallery"),
    )
    assert evaluation["rank1"] > 2 * chance, (evaluation["rank1"], chance)
    history = (out / "history.csv").read_text()
    assert "triplet_loss" in history and "classification_loss" in history


def train_pcb(mars_dir, out, *flags):
    return train_reid(
        mars_dir, out, "--model", "pcb", "--epochs", "1", "--max-train-images", "300", *flags
    )


def test_pcb_run_fits_its_stripe_weights_on_the_training_identities(mars_dir, tmp_path):
    import keras

    evaluation = train_pcb(mars_dir, tmp_path / "fisher")
    found = evaluation["part_weights"]
    weights, scores = np.array(found["part_weights"]), np.array(found["fisher_scores"])
    assert weights.shape == (6,) and np.isclose(weights.sum(), 1.0)
    np.testing.assert_allclose(weights, scores / scores.sum())
    assert weights.max() > 2 * weights.min()  # Stripes differ in worth: not all equal.
    model = keras.saving.load_model(tmp_path / "fisher" / "model.keras")
    descriptor = model.get_layer("stripe_descriptor")
    np.testing.assert_allclose(descriptor.part_weights, weights, rtol=1e-6)

    # The switch off keeps equal weights and changes nothing else.
    evaluation = train_pcb(mars_dir, tmp_path / "equal", "--part-weights", "equal")
    assert "part_weights" not in evaluation
    equal = keras.saving.load_model(tmp_path / "equal" / "model.keras")
    np.testing.assert_array_equal(
        equal.get_layer("stripe_descriptor").part_weights, np.full(6, 1 / 6, "float32")
    )
    for layer in model.layers:
        if layer.name != "stripe_descriptor":
            for u, v in zip(layer.get_weights(), equal.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(u, v)


def test_pcb_run_on_one_camera_keeps_equal_weights_and_finishes(mars_dir, tmp_path):
    import re
    import shutil

    import keras

    data = tmp_path / "one_camera"
    for split in ("query", "bounding_box_test"):
        shutil.copytree(mars_dir / split, data / split)
    (data / "bounding_box_train").mkdir()
    for path in sorted((mars_dir / "bounding_box_train").glob("*.jpg"))[::4]:
        renamed = data / "bounding_box_train" / re.sub(r"_c\d", "_c1", path.name, count=1)
        if not renamed.exists():
            shutil.copy(path, renamed)
    evaluation = train_pcb(data, tmp_path / "run")
    assert "part_weights" not in evaluation
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    np.testing.assert_array_equal(
        model.get_layer("stripe_descriptor").part_weights, np.full(6, 1 / 6, "float32")
    )

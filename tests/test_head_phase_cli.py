"""train.py's head phase on cached features: exact resume in either phase, the progress bar's
steps, no "ran out of data" warning, and a cache that goes to disk under a memory budget."""

import json

import numpy as np
import pytest
from train_runs import kill_after_epoch, train

# 6 epochs: 3 of the head on cached features (train + flips: 2 x 300 maps, batch 64: 10
# steps), then 3 of every layer on images (300 // 32 = 9 steps).
RUN = [
    "--model", "macnn", "--num-parts", "2", "--synthetic-train", "300", "--synthetic-test", "40",
    "--synthetic-classes", "4", "--image-size", "48", "--epochs", "6", "--head-epochs", "3",
    "--head-batch-size", "64", "--head-learning-rate", "3e-3", "--batch-size", "32",
    "--macnn-init", "clustering", "--verbose", "2",
]  # fmt: skip


def weights(run_dir):
    import keras

    import keras_fg  # noqa: F401  (registers the model classes for loading)

    return keras.saving.load_model(run_dir / "model.keras").get_weights()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("head_phase") / "straight"
    return run_dir, train(*RUN, "--output", run_dir)


def test_the_log_counts_the_real_steps_and_never_runs_out_of_data(straight):
    run_dir, result = straight
    log = result.stdout + result.stderr
    assert "ran out of data" not in log
    epochs = [line for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert epochs == [f"Epoch {i}/6" for i in range(1, 7)], result.stdout[-3000:]
    steps = [line.split()[0] for line in result.stdout.splitlines() if "/step" in line]
    assert steps == ["10/10"] * 3 + ["9/9"] * 3, result.stdout[-3000:]
    # The cache's size is reported before it is computed.
    assert "Feature cache: 2 x 300 maps of 6x6x128, 0.01 GiB, in memory" in result.stdout
    assert "Channel grouping initialised by clustering" in result.stdout
    history = (run_dir / "history.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == [str(i) for i in range(6)]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["head_phase_features"] == "cached"
    assert len(evaluation["epoch_seconds"]) == 6


@pytest.mark.parametrize("phase, kill_after", [("head", 1), ("image", 4)])
def test_a_run_killed_in_either_phase_resumes_to_identical_weights(
    straight, tmp_path, phase, kill_after
):
    run_dir = tmp_path / "resumed"
    record = kill_after_epoch(RUN, run_dir, kill_after)
    assert record["phase"] == phase and record["epoch"] < 6

    result = train("--resume", run_dir)
    assert f"Resuming {run_dir} after epoch {record['epoch']}" in result.stdout
    assert ("Feature cache:" in result.stdout) == (phase == "head")  # Not needed any more.
    for a, b in zip(weights(straight[0]), weights(run_dir), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_cache_over_the_memory_budget_goes_to_disk_and_trains_the_same(straight, tmp_path):
    run_dir = tmp_path / "on_disk"
    result = train(*RUN, "--feature-cache-memory", "0.001", "--output", run_dir)
    assert f"on disk in {run_dir / 'feature_cache'}" in result.stdout
    assert not (run_dir / "feature_cache").exists()  # Removed with the run complete.
    for a, b in zip(weights(straight[0]), weights(run_dir), strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_cache_trains_the_head_phase_on_images(tmp_path):
    run_dir = tmp_path / "images"
    small = ["--synthetic-train", "64", "--epochs", "2", "--head-epochs", "1", "--verbose", "0"]
    train(*RUN, *small, "--no-cache-features", "--output", run_dir)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["head_phase_features"] == "images"


def test_cache_flag_errors_are_one_line(tmp_path, mars_dir):
    result = train(
        "--task", "reid", "--data", mars_dir, "--model", "gap", "--backbone", "tiny",
        "--image-size", "32", "16",
        "--epochs", "2", "--head-epochs", "1", "--cache-features", "--output", tmp_path / "r",
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "train.py: error: --cache-features cannot serve this run: --task reid" in result.stderr
    bad = train("--feature-cache-memory", "lots", "--output", tmp_path / "b", check=False)
    assert bad.returncode == 2 and "--feature-cache-memory takes a size in GiB" in bad.stderr

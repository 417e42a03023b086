"""train.py end to end: run directory, real data, corrupt images, resume, multi-worker, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_runs import kill_after_epoch, run_two_workers, train

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--synthetic-train",
    "96",
    "--synthetic-test",
    "32",
    "--synthetic-classes",
    "4",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--verbose",
    "0",
    "--macnn-init",
    "none",
]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def one_line_error(result):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def test_synthetic_run_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "run"
    result = train(*QUICK, "--model", "macnn", "--num-parts", "2", "--output", out)
    for name in ("config.json", "model.keras", "history.csv", "evaluation.json", "attention.png"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))
    evaluation = json.loads((out / "evaluation.json").read_text())
    for key in ("top1", "top5", "mean_per_class_accuracy"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert evaluation["skipped_images"] == 0
    attention = evaluation["attention"]
    for key in ("pointing_game", "mass_in_box", "chance", "peak_mass", "uniform_peak_mass"):
        assert 0.0 <= attention[key] <= 1.0
    assert len(attention["per_part"]["pointing_game"]) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "macnn" and config["backbone"] == "tiny"
    assert "Evaluation: top1=" in result.stdout
    # The same command again finds the run complete and does not train again.
    again = train(*QUICK, "--model", "macnn", "--num-parts", "2", "--output", out)
    assert "already complete" in again.stdout


def test_config_file_sets_defaults_that_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: gap\nepochs: 1\nlearning-rate: 0.01\n")
    out = tmp_path / "run"
    train(*QUICK, "--config", config, "--learning-rate", "0.02", "--output", out)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["model"] == "gap"
    assert resolved["learning_rate"] == 0.02


def test_real_birds_in_cub_format(cub_dir, tmp_path):
    out = tmp_path / "cub"
    train(
        "--data",
        cub_dir,
        "--model",
        "bcnn",
        "--backbone",
        "tiny",
        "--image-size",
        "64",
        "--reduction-dim",
        "8",
        "--max-train-images",
        "64",
        "--max-test-images",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--verbose",
        "0",
        "--output",
        out,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "cub"  # Detected from the folder.
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["num_images"] == 32


def _folder_with_a_corrupt_image(root, real_jpegs):
    for split in ("train", "test"):
        for index, path in enumerate(real_jpegs[:8]):
            target = root / split / f"class_{index % 2}" / f"{index}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    broken = root / "train" / "class_0" / "broken.jpg"
    broken.write_bytes(Path(real_jpegs[0]).read_bytes()[:200])  # A truncated JPEG.
    return broken


def test_corrupt_image_is_skipped_and_counted_or_stops_a_strict_run(real_jpegs, tmp_path):
    broken = _folder_with_a_corrupt_image(tmp_path / "data", real_jpegs)
    common = [
        "--data",
        tmp_path / "data",
        "--model",
        "gap",
        "--backbone",
        "tiny",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--verbose",
        "0",
    ]
    result = train(*common, "--output", tmp_path / "lenient")
    evaluation = json.loads((tmp_path / "lenient" / "evaluation.json").read_text())
    assert evaluation["skipped_images"] >= 1
    assert "Skipped unreadable images: " in result.stdout

    strict = train(*common, "--strict-data", "--output", tmp_path / "strict", check=False)
    assert str(broken) in one_line_error(strict)


def test_bad_input_gives_one_line_errors(tmp_path):
    missing = one_line_error(
        train("--data", tmp_path / "nowhere", "--output", tmp_path / "a", check=False)
    )
    assert "nowhere" in missing
    (tmp_path / "folder" / "train" / "a").mkdir(parents=True)
    mismatch = one_line_error(
        train(
            "--data",
            tmp_path / "folder",
            "--format",
            "cub",
            "--output",
            tmp_path / "b",
            check=False,
        )
    )
    assert "images.txt" in mismatch or "CUB" in mismatch

    unknown = train("--model", "resnet", check=False)
    assert unknown.returncode == 2 and "invalid choice: 'resnet'" in unknown.stderr
    assert "gap" in unknown.stderr

    out = tmp_path / "run"
    train(*QUICK, "--model", "gap", "--output", out)
    different = one_line_error(
        train(*QUICK, "--model", "gap", "--seed", "7", "--output", out, check=False)
    )
    assert "holds a different run" in different and "seed" in different


def test_batch_size_must_divide_across_replicas(tmp_path):
    script = (
        "import sys, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from keras_fg.cli.train import main\n"
        "main(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            *QUICK,
            "--strategy",
            "mirrored",
            "--batch-size",
            "15",
            "--output",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert "does not divide across 2 replicas" in one_line_error(result)


def test_interrupted_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    args = [*QUICK, "--model", "gap", "--epochs", "4", "--synthetic-train", "480"]
    train(*args, "--output", tmp_path / "straight")
    expected = json.loads((tmp_path / "straight" / "evaluation.json").read_text())

    out = tmp_path / "resumed"
    interrupted_at = kill_after_epoch(args, out, 1, timeout=240)["epoch"]
    assert not (out / "evaluation.json").exists()
    assert 1 <= interrupted_at < 4

    # Resuming is explicit: the same command again is refused, and so is a changed flag.
    assert "--resume" in one_line_error(train(*args, "--output", out, check=False))
    changed = one_line_error(train("--resume", out, "--seed", "7", check=False))
    assert "cannot resume" in changed and "seed" in changed
    result = train("--resume", out)  # The run's own configuration, from its directory.
    assert f"Resuming {out} after epoch {interrupted_at}" in result.stdout
    resumed = json.loads((out / "evaluation.json").read_text())
    for key in ("top1", "top5", "mean_per_class_accuracy"):
        assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key
    import keras

    import keras_fg  # noqa: F401  (registers the model classes for loading)

    straight = keras.saving.load_model(tmp_path / "straight" / "model.keras")
    again = keras.saving.load_model(out / "model.keras")
    for a, b in zip(straight.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    history = (out / "history.csv").read_text().strip().splitlines()
    assert len(history) >= 1 + 4  # Header, then every epoch at least once.
    assert not (out / "checkpoint").exists()


def test_two_runs_back_to_back_get_their_own_directories_and_one_progress_bar(tmp_path):
    first = train(
        *QUICK,
        "--model",
        "gap",
        "--image-size",
        "32",
        "--epochs",
        "3",
        "--head-epochs",
        "1",
        "--class-weight",
        "balanced",
        "--verbose",
        "2",
        cwd=tmp_path,
    )
    # One fit over all epochs: Keras' own epoch counter, one line per epoch.
    counters = [line.split()[1] for line in first.stdout.splitlines() if line.startswith("Epoch ")]
    assert counters == ["1/3", "2/3", "3/3"], first.stdout[-2000:]
    second = train(
        *QUICK, "--model", "bcnn", "--reduction-dim", "4", "--image-size", "32", cwd=tmp_path
    )
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert [p.name.split("-")[:2] for p in runs] == [["bcnn", "synthetic"], ["gap", "synthetic"]]
    for run in runs:
        assert (run / "evaluation.json").is_file()
    history = (runs[1] / "history.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1", "2"]
    latest = tmp_path / "runs" / "latest"
    assert latest.resolve() == runs[0].resolve()
    assert f"Run directory: runs/{runs[0].name}" in second.stdout
    config = json.loads((runs[1] / "config.json").read_text())
    assert config["class_weight"] == "balanced"
    # The newest run is complete: resuming it finds nothing to do.
    assert "already complete" in train("--resume", "latest", cwd=tmp_path).stdout


def test_macnn_clusters_its_channels_by_default_only_on_pretrained_features():
    from keras_fg.cli.train_config import parse_args

    from_scratch = parse_args([])
    assert (from_scratch.model, from_scratch.macnn_init) == ("macnn", "none")
    pretrained = parse_args(["--weights", "mobilenet_v2.weights.h5"])
    assert (pretrained.macnn_init, pretrained.macnn_init_epoch) == ("clustering", 0)
    # Asked for from scratch, it waits until the backbone has learned: a tenth of the epochs.
    asked = parse_args(["--macnn-init", "clustering", "--epochs", "20"])
    assert (asked.macnn_init, asked.macnn_init_epoch) == ("clustering", 2)
    assert parse_args(["--weights", "w.h5", "--macnn-init", "none"]).macnn_init == "none"


def test_warmup_is_longer_only_for_macnn_from_scratch():
    from keras_fg.cli.train_config import parse_args

    assert parse_args([]).warmup_epochs == 3.0  # 30 synthetic epochs
    assert parse_args(["--epochs", "5"]).warmup_epochs == 1.0
    assert parse_args(["--weights", "w.h5"]).warmup_epochs == 1.0
    assert parse_args(["--model", "gap"]).warmup_epochs == 1.0
    assert parse_args(["--warmup-epochs", "0"]).warmup_epochs == 0.0
    with pytest.raises(ValueError, match="--warmup-epochs must be >= 0"):
        parse_args(["--warmup-epochs", "-1"])


def test_balanced_class_weights():
    from keras_fg.cli.train import balanced_class_weights

    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    weights = balanced_class_weights(labels, 3, "balanced")
    np.testing.assert_allclose(weights, [9 / (3 * 6), 9 / (3 * 2), 9 / (3 * 1)])
    np.testing.assert_allclose((weights[labels]).mean(), 1.0)  # The mean weight per image is 1.
    assert balanced_class_weights(labels, 3, "none") is None


def test_two_workers_on_loopback_finish_with_identical_weights(tmp_path):
    import keras

    import keras_fg  # noqa: F401  (registers the model classes for loading)

    out = tmp_path / "run"
    run_two_workers([*QUICK, "--model", "gap", "--epochs", "2"], out, timeout=300)
    chief = keras.saving.load_model(out / "model.keras")
    worker = keras.saving.load_model(out / "workers" / "worker-1" / "model.keras")
    start = keras_fg.models.create_model("gap", 4, backbone="tiny", image_size=64)
    moved = False
    for a, b, s in zip(chief.get_weights(), worker.get_weights(), start.get_weights()):
        np.testing.assert_array_equal(a, b)
        moved = moved or not np.array_equal(a, s)
    assert moved

"""train.py to the end under tf.distribute: every family and both tasks on 2 replicas
(two logical CPU devices stand in for two GPUs), and two worker processes on loopback.

Each run must write its evaluation.json, and its figures must equal a single-device
evaluation of the saved model.keras on the same images.
"""

import json
import subprocess
import sys

import pytest
from train_runs import ENV, ROOT, run_two_workers

# Small and fast: 32 px, the tiny backbone, one cached head epoch and one image epoch.
SMALL = [
    "--synthetic-train", "64", "--synthetic-test", "24", "--synthetic-classes", "4",
    "--image-size", "32", "--epochs", "2", "--head-epochs", "1", "--batch-size", "16",
    "--verbose", "2", "--macnn-init", "none",
]  # fmt: skip
FAMILIES = {
    "gap": [],
    "bcnn": ["--reduction-dim", "8", "--projection-dim", "64"],
    "macnn": ["--num-parts", "2"],
    "macnn_part_crops": ["--model", "macnn", "--num-parts", "2", "--part-crop-size", "16"],
    "dasrbn": ["--stream-dim", "4", "--lstm-units", "8"],
    "pcb": ["--num-stripes", "2"],
}
# train.py's main() in a process with two CPU devices. One run a process, as users run it:
# collectives of strategies made one after another in a process can clash.
TWO_DEVICES = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_fg.cli.train import main
main(sys.argv[1:])
"""


def run_on_two_devices(arguments, timeout=600):
    result = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES, *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def single_device_evaluation(run_dir):
    """The run's own evaluation code, here on one device, on its saved model.keras."""
    import keras

    import keras_fg  # noqa: F401  (registers the model classes for loading)
    from keras_fg.cli.train import load_data
    from keras_fg.cli.train_config import parse_args

    args = parse_args(["--resume", str(run_dir)])
    model = keras.saving.load_model(run_dir / "model.keras")
    return load_data(args).evaluate(model)


@pytest.fixture(scope="module")
def mirrored_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirrored")
    logs = {}
    for name, options in FAMILIES.items():
        model = [] if "--model" in options else ["--model", name]
        result = run_on_two_devices(
            [*SMALL, *model, *options, "--strategy", "mirrored", "--output", root / name]
        )
        logs[name] = result.stdout + result.stderr
    return root, logs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mirrored_run_trains_evaluates_and_saves(mirrored_runs, family):
    root, logs = mirrored_runs
    assert "ran out of data" not in logs[family]
    run_dir = root / family
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["num_images"] == 24
    # The head phase read cached features, except where the head reads the images.
    assert evaluation["head_phase_features"] == "cached"
    again = single_device_evaluation(run_dir)
    for key in ("top1", "top5", "mean_per_class_accuracy"):
        assert evaluation[key] == pytest.approx(again[key], abs=1e-9), key
    if family.startswith("macnn"):
        assert "attention" in evaluation and (run_dir / "attention.png").is_file()


def test_a_mirrored_run_directory_exports(mirrored_runs, tmp_path):
    root, _ = mirrored_runs
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "export.py"),
            str(root / "macnn"),
            "--output",
            str(tmp_path / "exports"),
            "--formats",
            "saved_model,tflite_fp32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "exports" / "saved_model").is_dir()
    assert list((tmp_path / "exports").rglob("*.tflite"))


def reid_arguments(mars_dir):
    return [
        "--task", "reid", "--data", mars_dir, "--image-size", "64", "32", "--backbone", "tiny",
        "--epochs", "1", "--num-identities", "4", "--num-instances", "4",
        "--max-train-images", "160", "--num-stripes", "2", "--verbose", "2",
    ]  # fmt: skip


def test_mirrored_reid_run_evaluates_like_one_device(mars_dir, tmp_path):
    run_dir = tmp_path / "reid"
    result = run_on_two_devices(
        [*reid_arguments(mars_dir), "--strategy", "mirrored", "--output", run_dir]
    )
    assert "ran out of data" not in result.stdout + result.stderr
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    again = single_device_evaluation(run_dir)
    assert evaluation["num_query_images"] == again["num_query_images"] == 32
    for key in ("rank1", "mAP"):
        assert evaluation[key] == pytest.approx(again[key], abs=1e-9), key


def test_two_workers_train_macnn_through_both_phases(tmp_path):
    run_dir = tmp_path / "run"
    run_two_workers([*SMALL, "--model", "macnn", "--num-parts", "2"], run_dir)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["head_phase_features"] == "cached"
    again = single_device_evaluation(run_dir)
    for key in ("top1", "top5", "mean_per_class_accuracy"):
        assert evaluation[key] == pytest.approx(again[key], abs=1e-9), key
    worker = json.loads((run_dir / "workers" / "worker-1" / "evaluation.json").read_text())
    assert worker["top1"] == evaluation["top1"]


def test_two_workers_train_reid(mars_dir, tmp_path):
    run_dir = tmp_path / "reid"
    run_two_workers(reid_arguments(mars_dir), run_dir)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    again = single_device_evaluation(run_dir)
    for key in ("rank1", "mAP"):
        assert evaluation[key] == pytest.approx(again[key], abs=1e-9), key

"""keras_fg on JAX and PyTorch: the same numbers as on TensorFlow, and `.keras` files that travel.

Keras fixes its backend at import and this process runs TensorFlow, so each other backend runs
`tests/backend_worker.py` in a subprocess with `KERAS_BACKEND` set. TensorFlow writes every
layer's and loss's inputs and weights, and a `.keras` file of each model family; the worker
computes outputs and gradients, predicts with the loaded files and saves its own.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import backend_worker as worker
import keras
import numpy as np
import pytest

BACKENDS = ("jax", "torch")
TOLERANCE = 1e-5
WORKER_TIMEOUT = 600


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """TensorFlow's results, then both workers run side by side; `{backend: outputs}`."""
    work = tmp_path_factory.mktemp("backends")
    arrays = worker.make_inputs()
    np.savez(work / "inputs.npz", **arrays)
    expected = worker.run_cases(arrays)
    for family in worker.FAMILIES:
        model = worker.build_family(family)
        model.save(work / f"{family}_tensorflow.keras")
        for key, value in worker.predictions(model).items():
            expected[f"tensorflow/{family}/{key}"] = value
    processes = {}
    for backend in BACKENDS:
        if importlib.util.find_spec(backend) is None:
            continue
        env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
        log = open(work / f"{backend}.log", "w")
        processes[backend] = subprocess.Popen(
            [
                sys.executable,
                str(Path(worker.__file__)),
                str(work / "inputs.npz"),
                str(work / f"{backend}.npz"),
                str(work),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    results = {"tensorflow": expected, "work": work}
    for backend, process in processes.items():
        code = process.wait(timeout=WORKER_TIMEOUT)
        log = (work / f"{backend}.log").read_text()
        results[backend] = (
            RuntimeError(f"{backend} worker exited {code}:\n{log[-4000:]}")
            if code
            else {
                "arrays": dict(np.load(work / f"{backend}.npz")),
                "report": json.loads((work / f"{backend}.npz.json").read_text()),
            }
        )
    return results


def outputs_of(runs, backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(
            f"the {backend} backend is not installed (pip install -r requirements-{backend}.txt)"
        )
    result = runs[backend]
    if isinstance(result, Exception):
        raise result
    return result


def mismatches(expected, actual, keys):
    """The keys whose arrays differ beyond TOLERANCE, with the largest difference."""
    bad = []
    for key in keys:
        if key not in actual:
            bad.append(f"{key}: missing")
            continue
        want, got = np.asarray(expected[key], "float64"), np.asarray(actual[key], "float64")
        if want.shape != got.shape:
            bad.append(f"{key}: shape {got.shape} != {want.shape}")
        elif not np.allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE):
            bad.append(f"{key}: max |diff| {np.max(np.abs(got - want)):.3g}")
    return bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_layer_and_loss_gives_tensorflows_outputs_and_gradients(runs, backend):
    actual = outputs_of(runs, backend)["arrays"]
    keys = [k for k in runs["tensorflow"] if not k.startswith("tensorflow/")]
    cases = {k.split("/")[0] for k in keys}
    assert cases == set(worker.CASES)
    # Every case has outputs; every case with weights or float inputs has gradients.
    assert all(any(k.startswith(f"{c}/output") for k in keys) for c in cases)
    assert all(any(k.startswith(f"{c}/grad_") for k in keys) for c in cases)
    assert all(np.all(np.isfinite(runs["tensorflow"][k])) for k in keys)
    assert mismatches(runs["tensorflow"], actual, keys) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_files_saved_on_tensorflow_predict_the_same_on(runs, backend):
    actual = outputs_of(runs, backend)["arrays"]
    expected = {
        k.replace("tensorflow/", "loaded/", 1): v
        for k, v in runs["tensorflow"].items()
        if k.startswith("tensorflow/")
    }
    assert {k.split("/")[1] for k in expected} == set(worker.FAMILIES)
    assert mismatches(expected, actual, sorted(expected)) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_files_saved_on_backend_predict_the_same_on_tensorflow(runs, backend):
    actual = outputs_of(runs, backend)["arrays"]
    loaded = {}
    for family in worker.FAMILIES:
        model = keras.saving.load_model(runs["work"] / f"{family}_{backend}.keras")
        for key, value in worker.predictions(model).items():
            loaded[f"own/{family}/{key}"] = value
    assert mismatches(actual, loaded, sorted(k for k in actual if k.startswith("own/"))) == []


def test_macnn_fit_on_jax_lowers_the_joint_loss(runs):
    before, after = outputs_of(runs, "jax")["report"]["macnn_loss"]
    assert np.isfinite(after) and after < before - 0.05, (before, after)


def test_channel_grouping_phase_trains_only_the_grouping_on_torch(runs):
    report = outputs_of(runs, "torch")["report"]
    assert report.get("phase_error") is None
    assert report["phase_changes"] == {"grouping": True, "other": False}


def test_channel_grouping_phase_on_jax_names_the_backends_it_needs(runs):
    # Keras' JAX trainer differentiates every trainable variable, whatever the phase.
    error = outputs_of(runs, "jax")["report"]["phase_error"]
    assert error.startswith("NotImplementedError") and "KERAS_BACKEND=tensorflow" in error, error


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_names_the_tensorflow_backend(runs, backend):
    error = outputs_of(runs, backend)["report"]["export_error"]
    assert error is not None and "KERAS_BACKEND=tensorflow" in error, error

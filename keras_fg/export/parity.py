"""Parity of an exported file with the Keras model: probabilities, top-1, size and latency."""

import os
import time

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from keras_fg.export.preprocess import decode_and_resize
from keras_fg.export.tflite import QUANTIZATIONS, run_tflite

# The bound each exported variant must meet, against the Keras model's probabilities:
# float32 files reproduce Keras, float16 weights round at about 5e-4 per layer, and for
# the int8 files what matters is whether the predicted class survives (docs/deployment.md#parity).
CHECKS = {
    "saved_model": ("max_abs_diff", 1e-4),
    "tflite_fp32": ("max_abs_diff", 1e-4),
    "tflite_fp16": ("max_abs_diff", 5e-2),
    "tflite_dynamic": ("top1_agreement", 0.98),
    "tflite_int8": ("top1_agreement", 0.98),
    "tflite_int16x8": ("top1_agreement", 0.98),
}


def check_parity(model, path, images, variant=None, latency_runs=10, batch_size=32, reference=None):
    """Measures how closely an exported SavedModel or `.tflite` file reproduces `model`.

    The Keras model and the exported file see the same pixels: encoded images are decoded
    and resized by `decode_and_resize` for Keras and TFLite, and by the SavedModel's own
    `serving_default` signature (so its whole serving path is checked).

    Args:
        model: the Keras model the file was exported from.
        path: a SavedModel directory (from `export_saved_model`) or a `.tflite` file (from
            `export_tflite`).
        images: a list of encoded images (bytes), or float32 images `(N, height, width, 3)`
            in [0, 255] (then the SavedModel is run through its `predict_images` signature).
        variant: the key of `CHECKS` whose bound applies; by default `"saved_model"` for a
            directory and `"tflite_<quantization>"` from a file name ending in
            `_<quantization>.tflite`.
        latency_runs: the latency is the median over this many runs on one image.
        batch_size: images per SavedModel call.
        reference: the Keras model's outputs on `images` (a dict with `probabilities` and
            `features`), when already computed; default: computed here.

    Returns:
        A dict: `variant`, `size_bytes`, `latency_ms` (median, one image, after a warm-up;
        `latency_of` says through which entry point),
        `max_abs_diff` (largest |p_export - p_keras| over images and classes; `None` if the
        file produced NaN or infinite probabilities), `features_max_abs_diff` (the same for
        the `"features"` embedding), `top1_agreement` (fraction of images whose
        predicted class is the same), and `check`: `{"metric", "bound", "value", "passed",
        "shortfall"}` (`shortfall`: by how much the value misses its bound, 0 if it passes).
        A TFLite file that fails at run time gets `"error"` and `None` measurements.

    Example:

    >>> result = check_parity(model, "exports/birds_int8.tflite", images)
    >>> result["check"]
    {'metric': 'top1_agreement', 'bound': 0.98, 'value': 0.99, 'passed': True, 'shortfall': 0.0}
    """
    path = os.fspath(path)
    variant = variant or _variant_of(path)
    if variant not in CHECKS:
        raise ValueError(
            f"Unknown variant. Valid: {', '.join(CHECKS)}. Received: variant={variant!r}"
        )
    encoded = None if isinstance(images, np.ndarray) else list(images)
    if encoded is not None:
        size = model.input_shape[1:3]
        images = np.stack([decode_and_resize(data, size).numpy() for data in encoded])
    if not len(images):
        raise ValueError("`images` is empty: parity needs at least one image.")
    if reference is None:
        reference = model_outputs(model, images, batch_size)

    if variant == "saved_model":
        served = tf.saved_model.load(path)
        if encoded is not None:
            signature, key, inputs = served.signatures["serving_default"], "image_bytes", encoded
            as_tensor = lambda batch: tf.constant(batch, tf.string)  # noqa: E731
        else:
            signature, key, inputs = served.signatures["predict_images"], "images", images
            as_tensor = lambda batch: tf.constant(np.asarray(batch, "float32"))  # noqa: E731
        batches = [
            signature(**{key: as_tensor(inputs[i : i + batch_size])})
            for i in range(0, len(inputs), batch_size)
        ]
        outputs = {name: np.concatenate([b[name].numpy() for b in batches]) for name in batches[0]}
        latency_ms = _median_ms(lambda: signature(**{key: as_tensor(inputs[:1])}), latency_runs)
        latency_of = (
            "one encoded image through serving_default (decoding and resizing included)"
            if encoded is not None
            else "one float32 image through predict_images"
        )
        size_bytes = sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(path)
            for name in names
        )
    else:
        size_bytes = os.path.getsize(path)
        try:
            outputs = run_tflite(path, images)
        except RuntimeError as error:  # A kernel that fails on some input, e.g. an int8 DIV.
            reason = next(iter(str(error).splitlines()), type(error).__name__)
            return {
                "variant": variant,
                "size_bytes": int(size_bytes),
                "latency_ms": None,
                "max_abs_diff": None,
                "features_max_abs_diff": None,
                "top1_agreement": None,
                "images": int(len(images)),
                "error": f"fails at run time: {reason}",
                "check": evaluate_check(variant, None, None),
            }
        latency_ms = _tflite_latency_ms(path, images[:1], latency_runs)
        latency_of = "one float32 image (1, height, width, 3) through the interpreter"

    probabilities = outputs["probabilities"]
    agreement = np.mean(probabilities.argmax(-1) == reference["probabilities"].argmax(-1))
    max_abs_diff = _max_abs_diff(probabilities, reference["probabilities"])
    result = {
        "variant": variant,
        "size_bytes": int(size_bytes),
        "latency_ms": round(latency_ms, 3),
        "latency_of": latency_of,
        "max_abs_diff": max_abs_diff,
        "features_max_abs_diff": _max_abs_diff(outputs["features"], reference["features"]),
        "top1_agreement": float(agreement),
        "images": int(len(images)),
    }
    result["check"] = evaluate_check(variant, max_abs_diff, result["top1_agreement"])
    return result


def model_outputs(model, images, batch_size=32):
    """The Keras model's `probabilities` and `features` on float32 images, as NumPy arrays."""
    outputs = model.predict(images, batch_size=batch_size, verbose=0)
    return {name: np.asarray(outputs[name]) for name in ("probabilities", "features")}


def evaluate_check(variant, max_abs_diff, top1_agreement):
    """Applies the bound of `CHECKS[variant]`: `{metric, bound, value, passed, shortfall}`.

    `max_abs_diff` passes at or below its bound, `top1_agreement` at or above it;
    `shortfall` is the distance to the bound when the check fails (0 when it passes), and
    a `None` value (non-finite probabilities) fails with a `None` shortfall.
    """
    metric, bound = CHECKS[variant]
    value = max_abs_diff if metric == "max_abs_diff" else top1_agreement
    if value is None:
        return {"metric": metric, "bound": bound, "value": None, "passed": False, "shortfall": None}
    missing = value - bound if metric == "max_abs_diff" else bound - value
    return {
        "metric": metric,
        "bound": bound,
        "value": value,
        "passed": bool(missing <= 0),
        "shortfall": float(max(missing, 0.0)),
    }


def _variant_of(path):
    if os.path.isdir(path):
        return "saved_model"
    for quantization in QUANTIZATIONS:
        if path.endswith(f"_{quantization}.tflite"):
            return f"tflite_{quantization}"
    raise ValueError(
        f"Cannot tell the variant of {path} from its name; "
        f"pass `variant=` (one of {', '.join(CHECKS)})."
    )


def _max_abs_diff(values, reference):
    if not np.all(np.isfinite(values)):
        return None
    return float(np.max(np.abs(values.astype("float64") - reference)))


def _median_ms(run, runs):
    run()  # Warm-up: the first call traces, allocates and plans.
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _tflite_latency_ms(path, image, runs):
    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    return _median_ms(lambda: runner(images=np.asarray(image, "float32")), runs)

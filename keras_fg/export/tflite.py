"""TFLite (LiteRT) export with builtin ops only: float32, float16, dynamic range, int8, 16x8."""

import os
import re
import tempfile
import warnings
import zipfile

import flatbuffers
import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from keras_fg.export.errors import ExportError, require_tensorflow_backend
from keras_fg.models.keras_internals import call_site_input, producing_layer

QUANTIZATIONS = ("fp32", "fp16", "dynamic", "int8", "int16x8")
LABELS_FILE = "labels.txt"
TFLITE_OUTPUTS = ("probabilities", "features", "attention_maps")
# Full-integer int8 quantizes these ops, which hold nearly all of a model's weights and
# compute (convolutions, dense layers, matrix products); every other op of the heads
# (signed square roots, normalisations, divisions, softmaxes, LSTM gates) stays float32.
# Measured on MobileNetV2 models of the four families at 224 px (10 CUB species, 100 test
# images): with every op quantized, the int8 file kept the Keras top-1 class of 10 % of the
# images for B-CNN (int8 loses the small values its signed square root magnifies) and
# 90–93 % for the others; with this split, 94–97 %. An int8 DIV also fails at run time
# whenever its divisor quantizes to zero (the norm of all-zero features: a black frame).
INT8_OPS = frozenset(
    {
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "FULLY_CONNECTED",
        "BATCH_MATMUL",
        "ADD",
        "MEAN",
        "AVERAGE_POOL_2D",
        "MAX_POOL_2D",
        "PAD",
        "RESHAPE",
        "CONCATENATION",
    }
)
# Full-integer int8 keeps in float the layer that writes the logits, the network's stem
# (its first INT8_FLOAT_STEM dense or convolution layers, which read the raw image) and
# the INT8_FLOAT_LAYERS others whose int8 weights, after bias correction, move the logits
# most (`_float_layers`), measured on DEBUG_IMAGES calibration images. On MobileNetV2
# heads trained on 50 CUB species, the int8 weights, not the activations, cost most of the
# agreement with Keras (16x8 lost as much as int8), mostly as shifts of the layers' output
# means that the layers after them amplify. The stem's layers have the fewest weights per
# output (27 in Conv1, 9 in the first depthwise convolution), two of the three layers
# that move the logits most, and hold 5 % of the compute; in float they join the float
# input, so the file gains one QUANTIZE and no island of float in the int8 graph. The third,
# MobileNetV2's first projection (32 to 16 channels at 112 x 112), ends the stem: the
# QUANTIZE then converts 16 channels instead of 32, and XNNPACK's int8 kernels ran that
# few-channel layer slower than float on x86. With a stem of 3 layers the int8 files of
# GAP, B-CNN and MA-CNN ran 3-5 % faster than with 2, and faster than with 0, 6, 9 or 12
# (GAP: 2.83 ms; 2.97, 3.21 and 3.00 with 2, 0 and 6 layers; `bench/int8_stages.py`,
# files timed in turns): int8 gains little at 112 x 112, most at 14 x 14 and 7 x 7,
# where float32 reads more weights than activations. It kept slightly fewer of the
# Keras top-1 classes (GAP 99.0 % against 99.2 %, four calibration draws). The head
# (INT8_FLOAT_HEAD: every op after the backbone) stays float too: in int8, its float-only
# math (square roots, divisions, softmaxes) cuts it into islands, each behind its own
# QUANTIZE and DEQUANTIZE. On GAP, B-CNN and MA-CNN heads, logits, stem and head in float
# (all weights float) kept the Keras top-1 class of 98.6 %, 98.4 % and 97.2 % of the CUB
# test images at 1.86x, 1.73x and 1.91x float32's speed; with the head in int8, 98.6 %,
# 98.3 % and 97.0 % at 1.89x, 1.53x and 1.83x; six sensitivity-ranked layers instead of
# stem and head, 98.1 %, 98.7 % and 97.7 % at 1.73x, 1.45x and 1.81x, and a slower export
# (every layer is measured). These are the run of 2026-12-03; on a later, faster CPU int8's
# speed-up was smaller (1.59x, 1.74x, 1.61x for the default). See the README (*Exporting*).
INT8_FLOAT_STEM = 3
INT8_FLOAT_LAYERS = 0
INT8_FLOAT_HEAD = True
# In the float head, the dense and convolution layers (the logits' too) and the matrix
# products with constant weights (Keras einsums: MA-CNN's channel grouping and part
# classifiers) with at least INT8_HEAD_WEIGHTS_MIN_SIZE weights keep int8 weights
# (INT8_HEAD_WEIGHTS): TFLite runs them as hybrid kernels, which quantize their float
# input on the fly, as the "dynamic" file does.
# A batch-1 dense layer reads each weight once per image, so its speed is its weights' bytes:
# B-CNN's head reads 13 MB of float32 weights (its 65,536 x 50 classifier), and with int8
# weights its file ran 1.99x float32's speed against 1.73x, agreed with Keras on 98.3 % of
# the CUB test images against 98.4 %, and shrank from 16.4 to 6.1 MiB; MA-CNN's, 1.96x
# against 1.91x, 97.2 % either way. But a hybrid kernel runs outside XNNPACK's graph, and
# on GAP's 64,000-weight classifier, which the cache holds anyway, that cost 0.46 ms
# (1.70x against 1.86x): smaller layers keep float weights. See the README (*Exporting*).
INT8_HEAD_WEIGHTS = True
INT8_HEAD_WEIGHTS_MIN_SIZE = 2**17
# `export_tflite`'s options for "int8" that export.py and `export_model` pass through.
INT8_OPTIONS = ("int8_float_layers", "int8_float_stem", "int8_float_head", "int8_head_weights")
_STEM = "the stem: reads the image"
_HEAD = "the head: after the backbone"
_RANKED = "its int8 weights move the logits"
# The float ops that TFLite runs as hybrid kernels when their weights are int8.
_HYBRID_OPS = ("CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")
DEBUG_IMAGES = 32
# Bias correction for int8 weights (`_bias_corrections`) measures each layer's shift on
# this many calibration images.
BIAS_CORRECTION_IMAGES = 64
_BUILTIN_NAMES = {
    code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")
}


def export_tflite(
    model,
    path,
    quantization="fp32",
    representative_images=None,
    class_names=None,
    int8_float_layers=None,
    int8_float_stem=None,
    int8_float_head=None,
    int8_head_weights=None,
    bias_correction=True,
    return_details=False,
):
    """Converts `model` to a `.tflite` file that uses TFLite builtin ops only.

    The TFLite model has one signature, `serving_default`: input `images`, float32
    `(1, height, width, 3)` raw pixels in [0, 255] (prepare them with
    `keras_fg.export.preprocess.decode_and_resize`); outputs `probabilities`, `features`
    and, for the attention families, `attention_maps`. Inputs and outputs stay float32
    for every quantization:

    - `"fp32"`: float32 weights and compute;
    - `"fp16"`: float16 weights (half the size), dequantized to float32 at load;
    - `"dynamic"`: int8 weights, activations quantized on the fly (dynamic range);
    - `"int8"`: int8 weights and activations of the convolutions, dense layers, matrix
      products, adds and pooling (`INT8_OPS`), calibrated on `representative_images`; the
      heads' other math stays float32 (see `INT8_OPS` for why), and so do the layer that
      writes the logits, the stem (the first `int8_float_stem` layers), the head (every op
      after the backbone) and the `int8_float_layers` others whose int8 weights move the
      logits most (`_float_layers`); the float head's dense and convolution layers and
      constant matrix products keep int8 weights (hybrid kernels, `int8_head_weights`);
    - `"int16x8"`: int16 activations and int8 weights (TFLite's 16x8 mode), calibrated on
      `representative_images`; ops without a 16x8 kernel stay float32.

    For `"int8"` and `"int16x8"`, the biases are corrected for the int8 weights
    (`_bias_corrections`): each layer's output mean, measured on the representative
    images, stays where the float model has it.

    The class names, when given (default `model.class_names`), are stored inside the file
    as its associated file `labels.txt` (`write_labels`; read them with `read_labels`).

    The variables are frozen into constants (through a SavedModel and
    `TFLiteConverter.from_saved_model`), and `target_spec.supported_ops` is
    `[TFLITE_BUILTINS]` (plus `TFLITE_BUILTINS_INT8` for `"int8"`): no Flex (Select TF) op
    can slip in.

    Args:
        model: a keras_fg model (a dict of outputs with at least `"probabilities"`).
        path: the `.tflite` file to write.
        quantization: one of `"fp32"`, `"fp16"`, `"dynamic"`, `"int8"`, `"int16x8"`.
        representative_images: for `"int8"` and `"int16x8"`, float32 images
            `(N, height, width, 3)` in [0, 255] from the training distribution (300 or
            more, every class present).
        class_names: the class names to store in the file; default `model.class_names`.
        int8_float_layers: for `"int8"`, how many of the most sensitive layers stay float32
            besides the one that writes the logits and the stem; default `INT8_FLOAT_LAYERS`.
        int8_float_stem: for `"int8"`, how many of the first dense or convolution layers
            (in call order: the stem, which reads the image) stay float32; default
            `INT8_FLOAT_STEM`.
        int8_float_head: for `"int8"`, keep in float32 every op after the model's backbones
            (`_backbones`: the backbone, a second stream's, MA-CNN's part networks): the
            head, which reads the feature maps; default `INT8_FLOAT_HEAD`. A model without
            a nested model has no head to keep.
        int8_head_weights: for `"int8"` with the head in float, give the head's dense and
            convolution layers (the logits' too) and constant matrix products int8 weights,
            which TFLite runs as hybrid kernels (`_with_int8_weights`); default
            `INT8_HEAD_WEIGHTS`. The layers chosen by `int8_float_layers` keep float weights.
        bias_correction: for `"int8"` and `"int16x8"`, correct the biases for the int8
            weights (default). The model itself is left as it was.
        return_details: return a dict instead of the op names.

    Returns:
        The sorted names of the ops in the written model (`tflite_ops`); with
        `return_details`, a dict: `ops`, and for `"int8"` `bias_correction`,
        `float_op_types` (the op types kept in float) and `float_layers` (the layers kept
        in float, each with its Keras `layer` name and `class`, `why`, its `output_error`
        from `_weight_sensitivity` and the TFLite `tensors` it writes; the first stem
        layer's also hold those of the ops before it; the head's, its `int8_weights`: the
        outputs of its ops on int8 weights).

    Raises:
        ExportError: when the conversion fails, the model holds an op that is not a
            TFLite builtin, or the file does not run in the LiteRT interpreter (one image:
            the first representative image, else a grey frame).

    Example:

    >>> export_tflite(model, "birds_int8.tflite", "int8", representative_images=images[:200])
    ['ADD', 'CONV_2D', 'DEQUANTIZE', 'FULLY_CONNECTED', 'MEAN', 'QUANTIZE', 'SOFTMAX']
    """
    require_tensorflow_backend()
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"Unknown quantization. Valid: {', '.join(QUANTIZATIONS)}. "
            f"Received: quantization={quantization!r}"
        )
    refusal = int8_refusal(model) if quantization == "int8" else None
    if refusal:
        raise ExportError(f"TFLite conversion (int8) of {path} is not offered: {refusal}")
    calibrated = quantization in ("int8", "int16x8")
    if calibrated and (representative_images is None or not len(representative_images)):
        raise ValueError(f"Quantization {quantization!r} needs `representative_images`.")
    if int8_float_layers is None:
        int8_float_layers = INT8_FLOAT_LAYERS
    if int8_float_stem is None:
        int8_float_stem = INT8_FLOAT_STEM
    if int8_float_head is None:
        int8_float_head = INT8_FLOAT_HEAD
    if int8_head_weights is None:
        int8_head_weights = INT8_HEAD_WEIGHTS
    for name, value in (("int8_float_head", int8_float_head),
                        ("int8_head_weights", int8_head_weights)):  # fmt: skip
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    for name, value in (("int8_float_layers", int8_float_layers),
                        ("int8_float_stem", int8_float_stem)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be an integer >= 0. Received: {name}={value!r}")
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    height, width = model.input_shape[1:3]

    def predict(images):
        predictions = model(images, training=False)
        return {name: predictions[name] for name in TFLITE_OUTPUTS if name in predictions}

    with tempfile.TemporaryDirectory() as saved_model_dir:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serving_default",
            predict,
            input_signature=[tf.TensorSpec((1, height, width, 3), tf.float32, name="images")],
        )
        calibration = None
        if calibrated:
            calibration = np.asarray(representative_images, dtype="float32")
        # Selective quantization: the layers that stay float are chosen on the Keras model
        # (`_weight_sensitivity`), and the others' int8 biases are corrected around them.
        float_layers, float_weights = [], set()
        backbones = _backbones(model) if int8_float_head else {}
        if quantization == "int8":
            float_layers = _float_layers(model, calibration, int8_float_layers, int8_float_stem)
            # The layers whose weights stay float are not corrected for int8 weights.
            float_weights = {layer["layer"] for layer in float_layers} | _head_layers(
                model, backbones
            )
            if int8_head_weights:
                ranked = {layer["layer"] for layer in float_layers if layer["why"] == _RANKED}
                float_weights -= _head_layers(model, backbones, INT8_HEAD_WEIGHTS_MIN_SIZE) - ranked
        corrections = []
        if calibrated and bias_correction:
            corrections = _bias_corrections(
                model, _spread(calibration, BIAS_CORRECTION_IMAGES), keep_float=float_weights
            )
        originals = [
            (variable, keras.ops.convert_to_numpy(variable)) for variable, _ in corrections
        ]
        try:
            for variable, value in corrections:
                variable.assign(value)
            archive.write_out(saved_model_dir, verbose=False)
        finally:
            for variable, value in originals:
                variable.assign(value)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization != "fp32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        if calibrated:
            converter.representative_dataset = lambda: ([image[None]] for image in calibration)
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8
                if quantization == "int8"
                else tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
                tf.lite.OpsSet.TFLITE_BUILTINS,
            ]
        details = {}
        try:
            if quantization == "int8":
                layers = [layer.name for layer in _quantizable_layers(model)]
                flatbuffer, details = _quantize_int8(
                    converter,
                    float_layers,
                    list(backbones),
                    int8_head_weights,
                    after_stem=layers[int8_float_stem] if int8_float_stem < len(layers) else None,
                )
                details["bias_correction"] = bool(bias_correction)
                details["debug_images"] = len(_spread(calibration, DEBUG_IMAGES))
            else:
                flatbuffer = converter.convert()
        except Exception as error:  # The converter raises ConverterError, ValueError, ...
            raise ExportError(
                f"TFLite conversion ({quantization}) of {path} failed: {_conversion_failure(error)}"
            ) from error
    ops = tflite_ops(flatbuffer)
    foreign = [op for op in ops if op not in _BUILTIN_NAMES.values() or op == "CUSTOM"]
    if foreign:
        raise ExportError(
            f"TFLite model {path} ({quantization}) holds ops that are not TFLite builtins: "
            f"{', '.join(foreign)}"
        )
    probe = calibration[:1] if calibration is not None else np.full((1, height, width, 3), 127.5)
    _require_runs(flatbuffer, probe, f"{path} ({quantization})")
    with open(path, "wb") as file:
        file.write(flatbuffer)
    if class_names:
        write_labels(path, class_names)
    return {"ops": ops, **details} if return_details else ops


def _int8_weights(kernel, depthwise):
    """`kernel` rounded as the converter rounds it: int8 per output channel, symmetric.

    The scale of each output channel is its largest absolute weight over 127 (the last axis
    of a dense or convolution kernel; input channel x multiplier for a depthwise one).
    A batch normalization folded into the kernel later scales whole output channels, so it
    leaves these integers unchanged.
    """
    axes = tuple(range(kernel.ndim - (2 if depthwise else 1)))
    scale = np.max(np.abs(kernel), axis=axes, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(kernel / scale), -127, 127) * scale).astype(kernel.dtype)


def _quantizable_layers(model, with_container=False):
    """The model's dense and convolution layers, nested models included, in call order.

    With `with_container`, `(container, layer)` pairs: the model whose `layers` hold it.
    """
    kinds = (
        keras.layers.Dense,
        keras.layers.Conv1D,
        keras.layers.Conv2D,
        keras.layers.DepthwiseConv2D,
    )
    found, seen = [], set()
    for layer in getattr(model, "layers", []):
        if isinstance(layer, kinds) and keras.backend.is_float_dtype(layer.kernel.dtype):
            if id(layer) not in seen:
                seen.add(id(layer))
                found.append((model, layer))
        for pair in _quantizable_layers(layer, with_container=True):
            if id(pair[1]) not in seen:
                seen.add(id(pair[1]))
                found.append(pair)
    return found if with_container else [layer for _, layer in found]


def _bias_corrections(model, images, keep_float=()):
    """Bias correction for int8 weights: each layer's output mean moved back where it was.

    Rounding a kernel to int8 (`_int8_weights`) shifts the mean of its output: on inputs
    with a large mean (ReLU6 channels near 6), E[(W_q − W) x] is far from zero, and the
    layers after it amplify the shift. Layer by layer, in call order, with the layers
    before it already in int8 and corrected, each dense or convolution layer's shift

        δ = E[W_q x] − E[W x]         (mean over the images and positions, per channel)

    is measured on `images` and taken off its output (`_round_and_correct`). Nagel et al.,
    "Data-Free Quantization Through Weight Equalization and Bias Correction" (ICCV 2019),
    the empirical variant. The layers named in `keep_float` stay float and uncorrected.

    Returns:
        A list of `(variable, corrected value)`. The model is left as it was: assign them
        for the conversion (the converter rounds the float kernels to the same int8 values)
        and put the originals back afterwards.
    """
    undo, corrected = [], []
    try:
        for container, layer in _quantizable_layers(model, with_container=True):
            if layer.name not in keep_float:
                changed = _round_and_correct(model, container, layer, images)
                undo.extend(changed)
                corrected.extend(variable for variable, _ in changed[1:])
        values = [(variable, keras.ops.convert_to_numpy(variable)) for variable in corrected]
    finally:
        for variable, original in reversed(undo):
            variable.assign(original)
    return values


def _round_and_correct(model, container, layer, images):
    """Rounds `layer`'s kernel to int8 and takes the shift δ off its output, in place.

    The shift goes into the layer's bias, or, for a layer without bias whose only reader
    is a BatchNormalization, into that layer's moving mean (the converter folds both into
    the int8 layer's bias). A layer with a nonlinear activation, several calls or several
    inputs only has its kernel rounded.

    Returns:
        The `(variable, original value)` pairs to put back, the kernel's first.
    """
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    undo = [(layer.kernel, kernel)]
    target = _bias_target(container, layer)
    inputs = _layer_inputs(model, container, layer, images) if target else None
    if inputs is None:
        layer.kernel.assign(_int8_weights(kernel, depthwise))
        return undo
    reference = keras.ops.convert_to_numpy(layer(inputs))
    layer.kernel.assign(_int8_weights(kernel, depthwise))
    shifted = keras.ops.convert_to_numpy(layer(inputs))
    shift = (shifted - reference).reshape(-1, reference.shape[-1]).mean(axis=0)
    variable, sign = target
    original = keras.ops.convert_to_numpy(variable)
    variable.assign(original + sign * shift)
    return undo + [(variable, original)]


def _bias_target(container, layer):
    """`(variable, sign)` that takes a shift off `layer`'s output, or `None` (see above)."""
    if getattr(layer, "activation", None) not in (None, keras.activations.linear):
        return None
    if layer.use_bias:
        return layer.bias, -1.0
    readers = []
    for other in container.layers:
        try:
            tensors = keras.tree.flatten(other.input)
        except (AttributeError, ValueError):  # An input layer, or a layer called twice.
            continue
        if any(tensor is layer.output for tensor in tensors):
            readers.append(other)
    if len(readers) == 1 and isinstance(readers[0], keras.layers.BatchNormalization):
        if readers[0].axis in (-1, len(layer.output.shape) - 1):
            return readers[0].moving_mean, 1.0
    return None


def _layer_inputs(model, container, layer, images):
    """`layer`'s input when `model` runs on `images`, or `None` when it has no single one."""
    try:
        tensor = layer.input
        if isinstance(tensor, (list, tuple, dict)):
            return None
        if container is not model:
            images = _run(keras.Model(model.input, call_site_input(container)), images)
        return _run(keras.Model(container.input, tensor), images)
    except (AttributeError, ValueError):  # Called more than once: several inputs.
        return None


def _run(model, images, batch_size=16):
    """`model` on `images` in inference mode, by batches (one sub-model per layer: no
    `predict`, whose function would be traced again for each)."""
    outputs = [
        keras.ops.convert_to_numpy(model(images[start : start + batch_size], training=False))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


def _weight_sensitivity(model, images, names=None):
    """How much each layer's int8 weights alone move the model's logits, after correction.

    For each dense or convolution layer in turn, its kernel is rounded to int8 and its
    bias corrected (`_round_and_correct`), the model runs on `images`, and the layer's
    error is

        e = RMS(z_q − z) / std(z)

    with z the float logits (the probabilities for a model without logits) and z_q the
    logits with that one layer in int8. The layer is restored afterwards. With `names`,
    only the layers of those names are measured.

    Returns:
        A list of dicts, `layer` (its name), `class` and `output_error`, worst first.
    """
    images = np.asarray(images, "float32")
    output = "logits" if "logits" in model(images[:1], training=False) else "probabilities"
    run = tf.function(lambda x: model(x, training=False)[output], autograph=False)
    reference = run(images).numpy()
    spread = max(float(np.std(reference)), 1e-12)
    rows = []
    for container, layer in _quantizable_layers(model, with_container=True):
        if names is not None and layer.name not in names:
            continue
        undo = _round_and_correct(model, container, layer, images)
        try:
            error = np.sqrt(np.mean(np.square(run(images).numpy() - reference))) / spread
        finally:
            for variable, original in reversed(undo):
                variable.assign(original)
        rows.append(
            {"layer": layer.name, "class": type(layer).__name__, "output_error": float(error)}
        )
    return sorted(rows, key=lambda row: -row["output_error"])


def _layer_tensors(layer_name, tensor_names):
    """The TFLite tensors that a Keras layer's op writes (its name is a path segment in them).

    TensorFlow names a layer's ops `<model>/<layer>_<n>/<op>`; a fused op joins the names
    of the ops it replaced with `;`.
    """
    pattern = re.compile(rf"(^|[/;]){re.escape(layer_name)}(_\d+)?/")
    return sorted(name for name in tensor_names if pattern.search(name))


def _float_layers(model, calibration, count, stem=0):
    """The layers that full-integer int8 keeps in float, as rows of `_weight_sensitivity`.

    - The layer that writes the logits: an int8 tensor has 256 levels over its range, and
      on a trained 50-class head that step (about 0.15 in logits) is larger than the
      margin between the top two classes of 2–5 % of images, which then change class.
    - The stem: the first `stem` dense or convolution layers in call order (see
      `INT8_FLOAT_STEM` for why).
    - The `count` other layers whose int8 weights, after bias correction, move the
      logits most (`_weight_sensitivity` on `DEBUG_IMAGES` calibration images).
    """
    logits = _logits_layer(model)
    first = [layer.name for layer in _quantizable_layers(model)][:stem]
    named = {logits, *first} - {None}
    rows = []
    if count or named:
        # Without others to choose, only the kept layers are measured (for the report).
        rows = _weight_sensitivity(
            model, _spread(calibration, DEBUG_IMAGES), None if count else named
        )
    by_name = {row["layer"]: row for row in rows}
    kept = [{**by_name[logits], "why": "writes the logits"}] if logits in by_name else []
    kept += [{**by_name[name], "why": _STEM} for name in first if name != logits]
    others = [row for row in rows if row["layer"] not in named][:count]
    return kept + [{**row, "why": _RANKED} for row in others]


def int8_refusal(model):
    """Why full-integer int8 is not offered for `model`, or `None` when it is.

    A vision transformer backbone (keras-hub ViT, DINOv2, CLIP, SigLIP): its LayerNorm,
    softmax and GELU in int8 did not keep the model's outputs. Measured on a small random
    DINOv2 at 32 px, one training step, calibrated and checked on 8 images
    (`bench/backbones.py --sections int8_transformer`): the conversion failed for B-CNN and
    DASRBN; GAP's, MA-CNN's and PCB's probabilities moved by up to 0.25, 0.74 and 0.85 and
    MA-CNN and PCB changed the top class of 2 and 1 of the 8 images (fp16: at most 4.5e-4,
    no change).
    """
    backbones = model.backbones() if hasattr(model, "backbones") else []
    kinds = [b.kind for b in backbones if getattr(b, "is_transformer", False)]
    if not kinds:
        return None
    return (
        f"full-integer int8 is not offered for a vision transformer backbone ({kinds[0]}): "
        "its LayerNorm, softmax and GELU do not keep the model's decisions in int8; "
        "tflite_dynamic (int8 weights) and tflite_fp16 are the smaller files"
    )


def _backbones(model):
    """`{name: network}` of the networks nested in `model`, directly or in a TimeDistributed.

    The name is the layer's that calls the network, the one its TFLite tensors carry: the
    backbone, a second stream's backbone, MA-CNN's part networks (`part_networks`, which
    run on the part crops).
    """
    found = {}
    for layer in getattr(model, "layers", []):
        inner = layer.layer if isinstance(layer, keras.layers.TimeDistributed) else layer
        if isinstance(inner, keras.Model):
            found[layer.name] = inner
    return found


def _head_layers(model, backbones, min_size=0):
    """The names of `model`'s dense and convolution layers outside `backbones` (none without
    backbones) with at least `min_size` weights in their kernel."""
    if not backbones:
        return set()
    inside = {id(layer) for network in backbones.values() for layer in _quantizable_layers(network)}
    return {
        layer.name
        for layer in _quantizable_layers(model)
        if id(layer) not in inside and np.prod(layer.kernel.shape) >= min_size
    }


def _logits_layer(model):
    """The name of the dense or convolution layer that writes `model`'s logits, or `None`.

    For a model that serves a fused score (DASRBN), its main classifier's: the branch
    classifiers are float with the head (`int8_float_head`, the default)."""
    try:
        outputs = model.output
        layer = producing_layer(outputs.get("classifier_logits", outputs["logits"]))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    quantizable = {id(layer) for layer in _quantizable_layers(model)}
    return layer.name if id(layer) in quantizable else None


def _spread(images, count):
    """At most `count` of `images`, spread evenly over them (every class of a sorted set)."""
    return images[:: max(1, len(images) // count)][:count]


def _quantize_int8(converter, float_layers, head_after=None, head_weights=False, after_stem=None):
    """Full-integer quantization, with the ops outside `INT8_OPS` and `float_layers` in float.

    TensorFlow's selective quantization (`tf.lite.experimental.QuantizationDebugger`): the
    converter calibrates once, and the debugger quantizes every op but those of the types
    outside `INT8_OPS` and the TFLite tensors that the layers of `float_layers` (rows of
    `_weight_sensitivity`) write, through its `denylisted_ops` and `denylisted_nodes`.
    With a stem among them, every op before the stem's last one (the input's scaling, say)
    stays float too: the int8 graph then starts after the stem, behind one QUANTIZE. The
    stem's first run ends where the layer `after_stem` (the next dense or convolution layer)
    starts: a backbone that runs again later (MA-CNN's on its part crops) must not stretch
    the prefix over its first run.
    With `head_after` (the names of the backbones), every op after the last one of them
    stays float: the int8 graph then ends at the feature maps the head reads, behind one
    DEQUANTIZE each. With `head_weights` too, the head's dense and convolution ops, the
    logits' among them, get int8 weights (`_with_int8_weights`), but for those of the layers
    ranked for their weights (`_float_layers`).

    Returns:
        `(flatbuffer, details)`, `details` as `export_tflite` describes.
    """
    # The debugger inspects the model with the deprecated tf.lite.Interpreter, which warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: iter(())
        )
        float_ops = [op for op in tflite_ops(debugger.calibrated_model) if op not in INT8_OPS]
        interpreter = Interpreter(model_content=debugger.calibrated_model)
        names = {tensor["index"]: tensor["name"] for tensor in interpreter.get_tensor_details()}
        layers = []
        for row in float_layers:
            tensors = _layer_tensors(row["layer"], names.values())
            if tensors:  # A layer outside the exported graph has none.
                layers.append({**row, "output_error": round(row["output_error"], 5),
                               "tensors": tensors})  # fmt: skip
        # The ops run in graph order: the stem's are a prefix of them, the head's a suffix.
        outputs = [
            [names[index] for index in op["outputs"]] for op in interpreter._get_ops_details()
        ]
        head, hybrid = [], set()
        backbone_tensors = {
            t for name in head_after or () for t in _layer_tensors(name, names.values())
        }
        if backbone_tensors:
            last = max(i for i, written in enumerate(outputs) if backbone_tensors & set(written))
            kept = {tensor for layer in layers for tensor in layer["tensors"]}
            after = {t for written in outputs[last + 1 :] for t in written}
            label = f"after {' and '.join(head_after)}"
            head = [{"layer": label, "why": _HEAD, "tensors": sorted(after - kept)}]
            if head_weights:
                ranked = [layer for layer in layers if layer["why"] == _RANKED]
                hybrid = after - {tensor for layer in ranked for tensor in layer["tensors"]}
        stem = [layer for layer in layers if layer["why"] == _STEM]
        if stem:
            stem_tensors = {tensor for layer in stem for tensor in layer["tensors"]}
            following = set(_layer_tensors(after_stem, names.values())) if after_stem else set()
            end = min([i for i, w in enumerate(outputs) if following & set(w)] or [None])
            last = max(i for i, written in enumerate(outputs[:end]) if stem_tensors & set(written))
            prefix = [t for written in outputs[: last + 1] for t in written]
            stem[0]["tensors"] = sorted(set(stem[0]["tensors"]) | (set(prefix) - stem_tensors))
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=float_ops,
            denylisted_nodes=[tensor for layer in layers + head for tensor in layer["tensors"]],
        )
        flatbuffer = debugger.get_nondebug_quantized_model()
    if hybrid:
        flatbuffer, head[0]["int8_weights"] = _with_int8_weights(
            flatbuffer, hybrid, INT8_HEAD_WEIGHTS_MIN_SIZE
        )
    return flatbuffer, {
        "float_op_types": sorted(float_ops),
        "float_layers": layers + head,
    }


def _with_int8_weights(flatbuffer, tensors, min_size=0):
    """`flatbuffer` with int8 weights in the float dense, convolution and matrix-product ops
    that write `tensors` and have at least `min_size` weights.

    A FULLY_CONNECTED, CONV_2D or BATCH_MATMUL op with float input and output and int8
    weights is a hybrid kernel in TFLite (dynamic range): it quantizes its input on the fly
    (per image; asymmetrically for FULLY_CONNECTED), multiplies in integers and rescales to
    float,

        y = s_x · s_w[c] · Σ_i q_x,i · q_w[c, i] + b[c]       (q_x = round(x / s_x) − z_x)

    The weights of a dense or convolution op are rounded as `_int8_weights` rounds them,
    and as the converter rounds a full-integer op's: per output channel (axis 0 of a TFLite
    kernel), symmetric, with scale `max |w[c]| / 127`. So the bias correction measured for
    them on the Keras model holds. A BATCH_MATMUL's constant right-hand side (MA-CNN's
    channel grouping and part classifiers, einsums in Keras) has one scale for the whole
    tensor, `max |w| / 127`: TFLite's hybrid matrix product reads no other. A weight buffer
    that another tensor also reads is left as it is.

    Returns:
        `(flatbuffer, changed)`: the new model, and the output tensors of the ops changed.
    """
    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    readers = {}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            readers[tensor.buffer] = readers.get(tensor.buffer, 0) + 1
    changed = []
    graph = model.subgraphs[0]
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        op_name = _BUILTIN_NAMES[max(code.builtinCode, code.deprecatedBuiltinCode)]
        if op_name not in _HYBRID_OPS:
            continue
        output = graph.tensors[op.outputs[0]]
        weights = graph.tensors[op.inputs[1]]
        data = model.buffers[weights.buffer].data
        if (
            output.name.decode() not in tensors
            or output.type != schema.TensorType.FLOAT32
            or weights.type != schema.TensorType.FLOAT32
            or data is None
            or np.prod(weights.shape) < min_size
            or readers[weights.buffer] != 1
        ):
            continue
        kernel = np.frombuffer(np.asarray(data, np.uint8).tobytes(), "<f4").reshape(weights.shape)
        channels = kernel.reshape(1 if op_name == "BATCH_MATMUL" else len(kernel), -1)
        scale = np.max(np.abs(channels), axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        rounded = np.round(channels / scale[:, None]).reshape(kernel.shape)
        model.buffers[weights.buffer].data = (
            np.clip(rounded, -127, 127).astype(np.int8).view(np.uint8).ravel()
        )
        weights.type = schema.TensorType.INT8
        weights.quantization = schema.QuantizationParametersT()
        weights.quantization.scale = scale.tolist()
        weights.quantization.zeroPoint = [0] * len(scale)
        weights.quantization.quantizedDimension = 0
        if isinstance(op.builtinOptions, schema.FullyConnectedOptionsT):
            op.builtinOptions.asymmetricQuantizeInputs = True
        changed.append(output.name.decode())
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), sorted(changed)


def _require_runs(flatbuffer, image, what):
    """Runs the converted model once: the converter can write an op its runtime lacks.

    For example, TensorFlow's `(a − b)²` becomes SQUARED_DIFFERENCE, which the 16x8 converter
    quantizes to int16 but TFLite runs in float32 and int32 only.
    """
    try:
        runner = Interpreter(model_content=flatbuffer).get_signature_runner("serving_default")
        runner(images=np.asarray(image, "float32"))
    except (RuntimeError, ValueError) as error:
        message = " ".join(str(error).split())
        raise ExportError(f"TFLite model {what} converted but does not run: {message}") from error


def write_labels(path, class_names):
    """Appends the class names to a `.tflite` file as the associated file `labels.txt`.

    The way TFLite metadata stores associated files: a zip archive appended to the
    flatbuffer. The interpreter reads the flatbuffer and ignores the bytes after it; any
    zip reader (Python's `zipfile`, `java.util.zip.ZipFile`, TFLite Support's
    `MetadataExtractor.getAssociatedFile`) reads `labels.txt` from the same file: UTF-8,
    one class name per line, line i the name of class index i.

    Args:
        path: a `.tflite` file without associated files.
        class_names: one name per class, in class-index order; no line breaks.

    Example:

    >>> write_labels("birds_int8.tflite", ["Black footed Albatross", "Laysan Albatross"])
    >>> read_labels("birds_int8.tflite")
    ['Black footed Albatross', 'Laysan Albatross']
    """
    names = [str(name) for name in class_names]
    broken = [name for name in names if "\n" in name or "\r" in name]
    if broken:
        raise ValueError(f"Class names cannot hold line breaks. Received: {broken[0]!r}")
    # Mode "a" on a file that is not a zip appends a new archive at its end, with offsets
    # counted from the start of the file, as zip readers on every platform expect.
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(LABELS_FILE, "".join(f"{name}\n" for name in names))


def read_labels(path):
    """The class names stored in a `.tflite` file by `write_labels`, or `None` if it has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read(LABELS_FILE).decode("utf-8")
    except (zipfile.BadZipFile, KeyError):
        return None
    return text.splitlines()


def tflite_ops(model):
    """The sorted names of the operators a TFLite model uses, in all its subgraphs.

    Read from the model's operator-code table: a builtin op by its `BuiltinOperator` name
    (e.g. `"CONV_2D"`), any other op by its custom code (e.g. `"FlexBitwiseAnd"`).

    Args:
        model: the path of a `.tflite` file, or its bytes.
    """
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as file:
            model = file.read()
    parsed = schema.Model.GetRootAsModel(model, 0)
    names = set()
    for index in range(parsed.OperatorCodesLength()):
        code = parsed.OperatorCodes(index)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            names.add(code.CustomCode().decode("utf-8"))
        else:
            names.add(_BUILTIN_NAMES.get(builtin, f"UNKNOWN_{builtin}"))
    return sorted(names)


def run_tflite(path, images):
    """Runs a `.tflite` model from `export_tflite` on images, one at a time.

    Args:
        path: the `.tflite` file.
        images: float32 `(N, height, width, 3)` raw pixels in [0, 255].

    Returns:
        A dict of NumPy arrays, one per model output, stacked over the N images.
    """
    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    results = [runner(images=np.asarray(image, "float32")[None]) for image in images]
    return {name: np.concatenate([r[name] for r in results]) for name in results[0]}


def _conversion_failure(error):
    """The gist of a converter error: the TensorFlow ops without a builtin, else its first line."""
    message = str(error)
    pattern = r"'tf\.(\w+)' op is neither a custom op nor a flex op"
    missing = sorted(set(re.findall(pattern, message)))
    if missing:
        return f"TensorFlow ops with no TFLite builtin: {', '.join(missing)}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__

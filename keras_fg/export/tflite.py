"""TFLite (LiteRT) export with builtin ops only: float32, float16, dynamic-range and full int8."""

import os
import re
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from keras_fg.export.errors import ExportError, require_tensorflow_backend

QUANTIZATIONS = ("fp32", "fp16", "dynamic", "int8")
TFLITE_OUTPUTS = ("probabilities", "features", "attention_maps")
# Full-integer int8 quantizes these ops, which hold nearly all of a model's weights and
# compute (convolutions, dense layers, matrix products); every other op of the heads
# (signed square roots, normalisations, divisions, softmaxes, LSTM gates) stays float32.
# Measured on MobileNetV2 models of the four families at 224 px (10 CUB species, 100 test
# images): with every op quantized, the int8 file kept the Keras top-1 class of 10 % of the
# images for B-CNN (int8 loses the small values its signed square root magnifies) and
# 90–93 % for the others; with this split, 94–97 %. An int8 DIV also fails at run time
# whenever its divisor quantizes to zero (the norm of all-zero features: a black frame).
INT8_OPS = frozenset({
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "ADD", "MEAN",
    "AVERAGE_POOL_2D", "MAX_POOL_2D", "PAD", "RESHAPE", "CONCATENATION",
})
_BUILTIN_NAMES = {
    code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")
}


def export_tflite(model, path, quantization="fp32", representative_images=None):
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
      heads' other math stays float32 (see `INT8_OPS` for why).

    The variables are frozen into constants (through a SavedModel and
    `TFLiteConverter.from_saved_model`), and `target_spec.supported_ops` is
    `[TFLITE_BUILTINS]` (plus `TFLITE_BUILTINS_INT8` for `"int8"`): no Flex (Select TF) op
    can slip in.

    Args:
        model: a keras_fg model (a dict of outputs with at least `"probabilities"`).
        path: the `.tflite` file to write.
        quantization: one of `"fp32"`, `"fp16"`, `"dynamic"`, `"int8"`.
        representative_images: for `"int8"`, float32 images `(N, height, width, 3)` in
            [0, 255] from the training distribution (100–500 are typical).

    Returns:
        The sorted names of the ops in the written model (`tflite_ops`).

    Raises:
        ExportError: when the conversion fails or the model holds an op that is not a
            TFLite builtin.

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
    if quantization == "int8" and (representative_images is None or not len(representative_images)):
        raise ValueError("Full-integer quantization ('int8') needs `representative_images`.")
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
        archive.write_out(saved_model_dir, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization != "fp32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        if quantization == "int8":
            calibration = np.asarray(representative_images, dtype="float32")
            converter.representative_dataset = lambda: ([image[None]] for image in calibration)
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                tf.lite.OpsSet.TFLITE_BUILTINS,
            ]
        try:
            if quantization == "int8":
                flatbuffer = _quantize_int8(converter, calibration)
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
    with open(path, "wb") as file:
        file.write(flatbuffer)
    return ops


def _quantize_int8(converter, calibration):
    """Full-integer quantization of the ops in `INT8_OPS`; the others are left in float32.

    Uses TensorFlow's selective quantization (`tf.lite.experimental.QuantizationDebugger`,
    `denylisted_ops`): the converter calibrates once, then quantizes the allowed ops.
    """
    # The debugger inspects the model with the deprecated tf.lite.Interpreter, which warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter,
            debug_dataset=lambda: ([image[None]] for image in calibration[:1]),
        )
        float_ops = [op for op in tflite_ops(debugger.calibrated_model) if op not in INT8_OPS]
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=float_ops)
        return debugger.get_nondebug_quantized_model()


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

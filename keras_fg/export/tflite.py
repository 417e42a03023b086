"""TFLite (LiteRT) export with builtin ops only: float32, float16, dynamic range, int8, 16x8."""

import csv
import io
import os
import re
import tempfile
import warnings
import zipfile

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from keras_fg.export.errors import ExportError, require_tensorflow_backend

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
# Full-integer int8 keeps in float the layers that the quantization debugger ranks worst:
# INT8_FLOAT_LAYERS of them, ranked by the error of each quantized layer on its own
# (its inputs taken from the quantized model), relative to the spread of its float output,
# over DEBUG_IMAGES calibration images. See `_quantize_int8` and the README for the measurement.
INT8_FLOAT_LAYERS = 0
DEBUG_IMAGES = 32
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
      heads' other math stays float32 (see `INT8_OPS` for why), and so do the
      `int8_float_layers` layers that TensorFlow's quantization debugger ranks worst;
    - `"int16x8"`: int16 activations and int8 weights (TFLite's 16x8 mode), calibrated on
      `representative_images`; ops without a 16x8 kernel stay float32.

    The class names, when given (default `model.class_names`), are stored inside the file
    as its associated file `labels.txt` (`write_labels`; read them with `read_labels`).

    The variables are frozen into constants (through a SavedModel and
    `TFLiteConverter.from_saved_model`), and `target_spec.supported_ops` is
    `[TFLITE_BUILTINS]` (plus `TFLITE_BUILTINS_INT8` for `"int8"`): no Flex (Select TF) op
    can slip in.

    Args:
        model: a keras_fg model (a dict of outputs with at least `"probabilities"`).
        path: the `.tflite` file to write.
        quantization: one of `"fp32"`, `"fp16"`, `"dynamic"`, `"int8"`.
        representative_images: for `"int8"` and `"int16x8"`, float32 images
            `(N, height, width, 3)` in [0, 255] from the training distribution (300 or
            more, every class present).
        class_names: the class names to store in the file; default `model.class_names`.
        int8_float_layers: for `"int8"`, how many of the worst-ranked layers stay float32;
            default `INT8_FLOAT_LAYERS`.
        return_details: return a dict instead of the op names.

    Returns:
        The sorted names of the ops in the written model (`tflite_ops`); with
        `return_details`, a dict: `ops`, and for `"int8"` `float_op_types` (the op types
        kept in float) and `float_layers` (the layers kept in float, each with its op, its
        tensor name and the debugger's error, worst first).

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
    calibrated = quantization in ("int8", "int16x8")
    if calibrated and (representative_images is None or not len(representative_images)):
        raise ValueError(f"Quantization {quantization!r} needs `representative_images`.")
    if int8_float_layers is None:
        int8_float_layers = INT8_FLOAT_LAYERS
    if (
        isinstance(int8_float_layers, bool)
        or not isinstance(int8_float_layers, int)
        or (int8_float_layers < 0)
    ):
        raise ValueError(
            f"`int8_float_layers` must be an integer >= 0. "
            f"Received: int8_float_layers={int8_float_layers!r}"
        )
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
        archive.write_out(saved_model_dir, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization != "fp32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        if calibrated:
            calibration = np.asarray(representative_images, dtype="float32")
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
                flatbuffer, details = _quantize_int8(converter, calibration, int8_float_layers)
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
    if class_names:
        write_labels(path, class_names)
    return {"ops": ops, **details} if return_details else ops


def _relative_error(float_output, quantized_output, scale, zero_point):
    """RMS error of a quantized layer's output over the standard deviation of its float output."""
    dequantized = (quantized_output.astype("float32") - zero_point) * scale
    error = np.sqrt(np.mean(np.square(dequantized - float_output)))
    return float(error / max(float(np.std(float_output)), 1e-12))


def _quantize_int8(converter, calibration, float_layers):
    """Full-integer quantization, with the ops outside `INT8_OPS` and the worst layers in float.

    TensorFlow's selective quantization (`tf.lite.experimental.QuantizationDebugger`): the
    converter calibrates once; the debugger quantizes every op of `INT8_OPS`, runs the
    quantized model beside a float copy of each layer on `DEBUG_IMAGES` calibration images
    and ranks the layers by `_relative_error`; the `float_layers` worst are then left in
    float through the debugger's `denylisted_nodes`.

    Returns:
        `(flatbuffer, details)`, `details` as `export_tflite` describes.
    """
    debug_images = calibration[:: max(1, len(calibration) // DEBUG_IMAGES)][:DEBUG_IMAGES]
    # The debugger inspects the model with the deprecated tf.lite.Interpreter, which warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter,
            debug_dataset=lambda: ([image[None]] for image in debug_images),
        )
        float_ops = [op for op in tflite_ops(debugger.calibrated_model) if op not in INT8_OPS]
        layers = []
        if float_layers:
            debugger.options = tf.lite.experimental.QuantizationDebugOptions(
                denylisted_ops=float_ops,
                layer_direct_compare_metrics={"relative_error": _relative_error},
            )
            debugger.run()
            dump = io.StringIO()
            debugger.layer_statistics_dump(dump)
            dump.seek(0)
            rows = sorted(csv.DictReader(dump), key=lambda r: -float(r["relative_error"]))
            layers = [
                {
                    "op": row["op_name"],
                    "tensor": row["tensor_name"],
                    "relative_error": round(float(row["relative_error"]), 5),
                    "rmse_over_scale": round(
                        float(np.sqrt(float(row["mean_squared_error"])) / float(row["scale"])), 4
                    ),
                }
                for row in rows[:float_layers]
            ]
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=float_ops, denylisted_nodes=[layer["tensor"] for layer in layers]
        )
        flatbuffer = debugger.get_nondebug_quantized_model()
    return flatbuffer, {
        "float_op_types": sorted(float_ops),
        "float_layers": layers,
        "debug_images": int(len(debug_images)),
    }


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

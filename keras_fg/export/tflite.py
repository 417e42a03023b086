"""TFLite (LiteRT) export with builtin ops only: float32, float16, dynamic range, int8, 16x8."""

import re
import tempfile
import zipfile

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from keras_fg.export import int8
from keras_fg.export.errors import ExportError, require_tensorflow_backend
from keras_fg.export.flatbuffer import BUILTIN_NAMES, tflite_ops

QUANTIZATIONS = ("fp32", "fp16", "dynamic", "int8", "int16x8")
LABELS_FILE = "labels.txt"
TFLITE_OUTPUTS = ("probabilities", "features", "attention_maps")


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
      products, adds and pooling (`int8.INT8_OPS`), calibrated on `representative_images`; the
      heads' other math stays float32 (see `int8.INT8_OPS` for why), and so do the layer that
      writes the logits, the stem (the first `int8_float_stem` layers), the head (every op
      after the backbone) and the `int8_float_layers` others whose int8 weights move the
      logits most (`int8.float_plan`); the float head's dense and convolution layers and
      constant matrix products keep int8 weights (hybrid kernels, `int8_head_weights`);
    - `"int16x8"`: int16 activations and int8 weights (TFLite's 16x8 mode), calibrated on
      `representative_images`; ops without a 16x8 kernel stay float32.

    For `"int8"` and `"int16x8"`, the biases are corrected for the int8 weights
    (`int8.bias_corrections`): each layer's output mean, measured on the representative
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
            besides the one that writes the logits and the stem; default `int8.INT8_FLOAT_LAYERS`.
        int8_float_stem: for `"int8"`, how many of the first dense or convolution layers
            (in call order: the stem, which reads the image) stay float32; default
            `int8.INT8_FLOAT_STEM`.
        int8_float_head: for `"int8"`, keep in float32 every op after the model's backbones
            (the backbone, a second stream's, MA-CNN's part networks): the
            head, which reads the feature maps; default `int8.INT8_FLOAT_HEAD`. A model without
            a nested model has no head to keep.
        int8_head_weights: for `"int8"` with the head in float, give the head's dense and
            convolution layers (the logits' too) and constant matrix products int8 weights,
            which TFLite runs as hybrid kernels (`int8.quantize`); default
            `int8.INT8_HEAD_WEIGHTS`. The layers chosen by `int8_float_layers` keep float weights.
        bias_correction: for `"int8"` and `"int16x8"`, correct the biases for the int8
            weights (default). The model itself is left as it was.
        return_details: return a dict instead of the op names.

    Returns:
        The sorted names of the ops in the written model (`tflite_ops`); with
        `return_details`, a dict: `ops`, and for `"int8"` `bias_correction`,
        `float_op_types` (the op types kept in float) and `float_layers` (the layers kept
        in float, each with its Keras `layer` name and `class`, `why`, its `output_error`
        from `int8._weight_sensitivity` and the TFLite `tensors` it writes; the first stem
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
    refusal = int8.int8_refusal(model) if quantization == "int8" else None
    if refusal:
        raise ExportError(f"TFLite conversion (int8) of {path} is not offered: {refusal}")
    calibrated = quantization in ("int8", "int16x8")
    if calibrated and (representative_images is None or not len(representative_images)):
        raise ValueError(f"Quantization {quantization!r} needs `representative_images`.")
    options = int8.resolve_options(
        int8_float_layers, int8_float_stem, int8_float_head, int8_head_weights
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
        calibration = None
        if calibrated:
            calibration = np.asarray(representative_images, dtype="float32")
        # Selective quantization: what stays float is chosen on the Keras model, and the
        # other layers' biases are corrected for their int8 weights around it.
        plan = int8.float_plan(model, calibration, options, quantization) if calibrated else None
        corrections = []
        if calibrated and bias_correction:
            corrections = int8.bias_corrections(
                model,
                int8.spread(calibration, int8.BIAS_CORRECTION_IMAGES),
                keep_float=plan["float_weights"],
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
                flatbuffer, details = int8.quantize(converter, plan, calibration)
                details["bias_correction"] = bool(bias_correction)
            else:
                flatbuffer = converter.convert()
        except Exception as error:  # The converter raises ConverterError, ValueError, ...
            raise ExportError(
                f"TFLite conversion ({quantization}) of {path} failed: {_conversion_failure(error)}"
            ) from error
    ops = tflite_ops(flatbuffer)
    foreign = [op for op in ops if op not in BUILTIN_NAMES.values() or op == "CUSTOM"]
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

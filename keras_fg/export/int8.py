"""Full-integer int8 for TFLite: which layers stay float, bias correction, int8 head weights.

`keras_fg.export.tflite.export_tflite(..., "int8")` calls this module in three steps:
`float_plan` chooses on the Keras model what stays float, `bias_corrections` moves each int8
layer's output mean back where the float model has it, and `quantize` converts with
TensorFlow's selective quantization and rewrites the float head's large layers to int8
weights. Why each default is what it is, with the figures: docs/deployment.md#int8.
"""

import re
import warnings

import flatbuffers
import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from keras_fg.export.flatbuffer import BUILTIN_NAMES, tflite_ops
from keras_fg.export.litert_internals import op_outputs
from keras_fg.models.keras_internals import call_site_input, producing_layer

# The op types full-integer int8 quantizes: they hold nearly all weights and compute; the
# heads' other math (square roots, divisions, softmaxes, LSTM gates) loses too much in int8,
# and an int8 DIV fails whenever its divisor rounds to zero (docs/deployment.md#which-ops-are-int8).
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
# The first dense or convolution layers, which read the image, stay float: they have the
# fewest weights per output and move the logits most in int8 (docs/deployment.md#the-stem-stays-float).
INT8_FLOAT_STEM = 3
# More float layers, ranked by how much their int8 weights move the logits: none by default,
# the stem and head cost less speed for as much agreement (docs/deployment.md#ranked-float-layers).
INT8_FLOAT_LAYERS = 0
# Every op after the backbone stays float: in int8 its float-only math cuts it into islands,
# each behind a QUANTIZE and a DEQUANTIZE (docs/deployment.md#the-head-stays-float).
INT8_FLOAT_HEAD = True
# The float head's large dense, convolution and constant matrix-product layers get int8
# weights, run as hybrid kernels: a batch-1 dense layer's time is its weights' bytes, but a
# hybrid kernel runs outside XNNPACK's graph, so small layers keep float weights
# (docs/deployment.md#the-heads-large-layers-on-int8-weights).
INT8_HEAD_WEIGHTS = True
INT8_HEAD_WEIGHTS_MIN_SIZE = 2**17
# `export_tflite`'s options for "int8" that export.py and `export_model` pass through.
INT8_OPTIONS = ("int8_float_layers", "int8_float_stem", "int8_float_head", "int8_head_weights")
# The float ops that TFLite runs as hybrid kernels when their weights are int8.
HYBRID_OPS = ("CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")
# Calibration images on which each layer's sensitivity (`_weight_sensitivity`) is measured.
DEBUG_IMAGES = 32
# Calibration images on which each layer's shift (`bias_corrections`) is measured.
BIAS_CORRECTION_IMAGES = 64
_STEM = "the stem: reads the image"
_HEAD = "the head: after the backbone"
_RANKED = "its int8 weights move the logits"


def resolve_options(
    int8_float_layers=None, int8_float_stem=None, int8_float_head=None, int8_head_weights=None
):
    """The int8 options, their defaults filled in and their values checked.

    Args:
        int8_float_layers: int >= 0, or `None` for `INT8_FLOAT_LAYERS`.
        int8_float_stem: int >= 0, or `None` for `INT8_FLOAT_STEM`.
        int8_float_head: bool, or `None` for `INT8_FLOAT_HEAD`.
        int8_head_weights: bool, or `None` for `INT8_HEAD_WEIGHTS`.

    Returns:
        A dict of the four options (the names of `INT8_OPTIONS`).

    Raises:
        ValueError: a count that is not an integer >= 0, or a flag that is not a bool.

    Example:

    >>> resolve_options(int8_float_stem=2)["int8_float_head"]
    True
    """
    options = {
        "int8_float_layers": INT8_FLOAT_LAYERS if int8_float_layers is None else int8_float_layers,
        "int8_float_stem": INT8_FLOAT_STEM if int8_float_stem is None else int8_float_stem,
        "int8_float_head": INT8_FLOAT_HEAD if int8_float_head is None else int8_float_head,
        "int8_head_weights": INT8_HEAD_WEIGHTS if int8_head_weights is None else int8_head_weights,
    }
    for name in ("int8_float_head", "int8_head_weights"):
        if not isinstance(options[name], bool):
            raise ValueError(f"`{name}` must be True or False. Received: {name}={options[name]!r}")
    for name in ("int8_float_layers", "int8_float_stem"):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be an integer >= 0. Received: {name}={value!r}")
    return options


def float_plan(model, calibration, options, quantization="int8"):
    """What full-integer int8 keeps in float, chosen on the Keras model.

    Args:
        model: the keras_fg model to convert.
        calibration: float32 calibration images `(N, height, width, 3)` in [0, 255].
        options: the dict of `resolve_options`.
        quantization: `"int8"`, or `"int16x8"`, whose quantizer takes no denylist (every
            layer then gets int8 weights and is corrected).

    Returns:
        A dict: `float_layers` (rows of `_weight_sensitivity` with their `why`: the logits'
        layer, the stem, the ranked layers), `float_weights` (the names of the layers whose
        weights stay float and uncorrected), `backbones` (the names of the nested networks,
        when the head stays float), `after_stem` (the first layer after the stem, or `None`)
        and `head_weights`.
    """
    if quantization != "int8":
        return {"float_layers": [], "float_weights": set(), "backbones": [], "after_stem": None,
                "head_weights": False}  # fmt: skip
    stem = options["int8_float_stem"]
    backbones = _backbones(model) if options["int8_float_head"] else {}
    rows = _float_layers(model, calibration, options["int8_float_layers"], stem)
    float_weights = {row["layer"] for row in rows} | _head_layers(model, backbones)
    if options["int8_head_weights"]:
        ranked = {row["layer"] for row in rows if row["why"] == _RANKED}
        float_weights -= _head_layers(model, backbones, INT8_HEAD_WEIGHTS_MIN_SIZE) - ranked
    layers = [layer.name for layer in _quantizable_layers(model)]
    return {
        "float_layers": rows,
        "float_weights": float_weights,
        "backbones": list(backbones),
        "after_stem": layers[stem] if stem < len(layers) else None,
        "head_weights": options["int8_head_weights"],
    }


def quantize(converter, plan, calibration):
    """Full-integer quantization of `converter`'s model as `plan` (`float_plan`) says.

    Args:
        converter: a `tf.lite.TFLiteConverter` set up for int8 (representative dataset,
            `TFLITE_BUILTINS_INT8`).
        plan: the dict of `float_plan`.
        calibration: the calibration images (to record how many the ranking used).

    Returns:
        `(flatbuffer, details)`: the model's bytes, and `float_op_types`, `float_layers`
        and `debug_images` for the export report.
    """
    flatbuffer, details = _quantize_int8(
        converter,
        plan["float_layers"],
        plan["backbones"],
        plan["head_weights"],
        after_stem=plan["after_stem"],
    )
    details["debug_images"] = len(spread(calibration, DEBUG_IMAGES))
    return flatbuffer, details


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


def bias_corrections(model, images, keep_float=()):
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
            model, spread(calibration, DEBUG_IMAGES), None if count else named
        )
    by_name = {row["layer"]: row for row in rows}
    kept = [{**by_name[logits], "why": "writes the logits"}] if logits in by_name else []
    kept += [{**by_name[name], "why": _STEM} for name in first if name != logits]
    others = [row for row in rows if row["layer"] not in named][:count]
    return kept + [{**row, "why": _RANKED} for row in others]


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


def spread(images, count):
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
    With `head_after` (the names of the backbones), every op after the first backbone op
    that belongs to none of them stays float: the int8 graph then ends at the feature maps
    the head reads, behind one DEQUANTIZE each. A backbone that runs on what the head
    computed (MA-CNN's part networks on the crops) is int8 again, but the head between the
    runs is not: int8 part maps and crop matrices would move the crops themselves. With `head_weights` too, the head's dense and convolution ops, the
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
        outputs = [[names[index] for index in op] for op in op_outputs(interpreter)]
        head, hybrid = [], set()
        backbone_tensors = {
            t for name in head_after or () for t in _layer_tensors(name, names.values())
        }
        if backbone_tensors:
            inside = [bool(backbone_tensors & set(written)) for written in outputs]
            first = inside.index(True)
            kept = {tensor for layer in layers for tensor in layer["tensors"]}
            after = {t for i, w in enumerate(outputs[first:], first) if not inside[i] for t in w}
            label = f"after {head_after[0]}" + "".join(f", outside {n}" for n in head_after[1:])
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
        op_name = BUILTIN_NAMES[max(code.builtinCode, code.deprecatedBuiltinCode)]
        if op_name not in HYBRID_OPS:
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


def int8_refusal(model):
    """Why full-integer int8 is not offered for `model`, or `None` when it is.

    A vision transformer backbone (keras-hub ViT, DINOv2, CLIP, SigLIP): its LayerNorm,
    softmax and GELU in int8 do not keep the model's decisions (docs/backbones.md).
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

"""What a TFLite flatbuffer holds: the names of its operators."""

import os

from ai_edge_litert import schema_py_generated as schema

BUILTIN_NAMES = {
    code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")
}


def tflite_ops(model):
    """The sorted names of the operators a TFLite model uses, in all its subgraphs.

    Read from the model's operator-code table: a builtin op by its `BuiltinOperator` name
    (e.g. `"CONV_2D"`), any other op by its custom code (e.g. `"FlexBitwiseAnd"`).

    Args:
        model: the path of a `.tflite` file, or its bytes.

    Returns:
        A sorted list of op names.

    Example:

    >>> tflite_ops("birds_fp32.tflite")
    ['ADD', 'CONV_2D', 'DEPTHWISE_CONV_2D', 'FULLY_CONNECTED', 'MEAN', 'SOFTMAX']
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
            names.add(BUILTIN_NAMES.get(builtin, f"UNKNOWN_{builtin}"))
    return sorted(names)

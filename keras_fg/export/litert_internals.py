"""The only place where keras_fg reads LiteRT internals: what LiteRT has no public API for.

Each function names what it needs and why no public API gives it;
tests/test_litert_internals.py fails with a message naming the function if a LiteRT release
changes what it relies on.
"""


def op_outputs(interpreter):
    """The output tensor indices of each op of `interpreter`'s model, in execution order.

    `Interpreter.get_tensor_details` lists tensors, not ops; which op writes which tensor
    (to find where a stem ends and a head begins) is only in `_get_ops_details`.

    Args:
        interpreter: an `ai_edge_litert.interpreter.Interpreter`.

    Returns:
        A list with one list of tensor indices per op.
    """
    return [list(op["outputs"]) for op in interpreter._get_ops_details()]

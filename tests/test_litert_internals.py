"""The LiteRT internals keras_fg relies on (keras_fg/export/litert_internals.py) still work.

If one of these fails after a LiteRT upgrade, the named helper must be rewritten for it.
"""

import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from keras_fg.export.litert_internals import op_outputs


def small_model():
    """A float TFLite model of three ops: FULLY_CONNECTED, RELU (fused or not), SOFTMAX."""

    @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32)])
    def forward(x):
        kernel = tf.constant(np.arange(12, dtype="float32").reshape(4, 3) / 10.0)
        return tf.nn.softmax(tf.nn.relu(tf.matmul(x, kernel)) - 1.0)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [forward.get_concrete_function()], forward
    )
    return converter.convert()


def test_op_outputs_lists_each_ops_output_tensors_in_execution_order():
    flatbuffer = small_model()
    interpreter = Interpreter(model_content=flatbuffer)
    outputs = op_outputs(interpreter)
    # The same lists, read from the flatbuffer's operators through the public schema.
    graph = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0).subgraphs[0]
    expected = [[int(index) for index in op.outputs] for op in graph.operators]
    assert outputs == expected, "op_outputs: LiteRT changed `_get_ops_details`"
    assert len(outputs) >= 2
    # The last op writes the model's output.
    assert outputs[-1] == [interpreter.get_output_details()[0]["index"]]

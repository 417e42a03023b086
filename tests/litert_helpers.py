"""Converting a Keras model to TFLite with builtin ops only, and running it in LiteRT."""

import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter


def export_builtins_only(model, path):
    """Writes `model` as a builtins-only `.tflite` file; returns a function that runs it.

    The function takes one input array and returns the output array (or the dict of outputs
    when the model has several), computed by the LiteRT interpreter.
    """
    model.export(
        str(path),
        format="litert",
        verbose=False,
        target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]},
    )
    interpreter = Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner()
    (input_name,) = interpreter.get_signature_list()["serving_default"]["inputs"]

    def run(x):
        outputs = runner(**{input_name: x})
        return next(iter(outputs.values())) if len(outputs) == 1 else outputs

    return run

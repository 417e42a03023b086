"""The only place where keras_fg reads Keras internals: what Keras 3 has no public API for.

Each function names what it needs and why no public API gives it; tests/test_keras_internals.py
fails with a message naming the function if a Keras release changes what it relies on.
"""


def call_site_output(layer):
    """The symbolic output of the most recent call of `layer` inside another model's graph.

    `layer.output` is its own graph's output when `layer` is a Functional model (a backbone),
    not the tensor that the enclosing model computed by calling it.
    """
    return layer._inbound_nodes[-1].output_tensors[0]


def detach_from_distribution_strategy(model):
    """Leaves `model` without a distribution strategy, so that predict/evaluate run locally.

    `MultiWorkerMirroredStrategy` with Keras 3's `fit` fails (keras-team/keras#20585); train.py
    trains such runs with its own loop and needs the model's own predict afterwards, and a
    model keeps the strategy that was current when it was built (`model.distribute_strategy`
    is read-only).
    """
    model._distribute_strategy = None


def call_site_input(layer):
    """The symbolic input of the most recent call of `layer` inside another model's graph."""
    return layer._inbound_nodes[-1].input_tensors[0]


def producing_layer(tensor):
    """The layer whose call wrote a symbolic tensor of a Functional model's graph."""
    return tensor._keras_history.operation

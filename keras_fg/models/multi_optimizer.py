"""A MultiOptimizer whose steps may update only some of its variables."""

import keras


@keras.saving.register_keras_serializable(package="keras_fg")
class PartialMultiOptimizer(keras.optimizers.MultiOptimizer):
    """`keras.optimizers.MultiOptimizer` that also applies gradients of a subset of its variables.

    Keras' MultiOptimizer needs a gradient for every variable it was built for; a keras_fg
    model with a frozen backbone (`set_backbone_trainable(False)`) or in an MA-CNN phase
    (`set_phase`) computes gradients of only some of them. Each gradient goes to the
    optimizer the map names for its variable, and only the optimizers that received any
    take a step, as in Keras' MultiOptimizer; an optimizer's own `iterations` (and so its
    learning-rate schedule) advance only with its steps.

    Args:
        optimizer_map: a `keras.optimizers.OptimizerMap`, or a callable `variable ->
            optimizer`.
        **kwargs: `keras.optimizers.MultiOptimizer` arguments.

    Example:

    >>> slow, fast = keras.optimizers.AdamW(1e-5), keras.optimizers.AdamW(1e-3)
    >>> mapping = keras.optimizers.OptimizerMap(fast, {v.path: slow for v in backbone.weights})
    >>> model.compile(optimizer=PartialMultiOptimizer(mapping))  # doctest: +SKIP
    """

    def __init__(self, optimizer_map, **kwargs):
        super().__init__(optimizer_map, **kwargs)
        self.optimizer_for = optimizer_map

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            return super().apply(grads, trainable_variables)
        groups = {}
        for grad, variable in zip(grads, trainable_variables):
            optimizer = self.optimizer_for(variable)
            group = groups.setdefault(id(optimizer), (optimizer, [], []))
            group[1].append(grad)
            group[2].append(variable)
        for optimizer, sub_grads, sub_variables in groups.values():
            optimizer.apply(sub_grads, sub_variables)
        self.iterations.assign_add(1)

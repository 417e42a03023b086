"""Runs keras_fg's layers, losses and model families on the backend that KERAS_BACKEND names.

`tests/test_backends.py` imports this module on TensorFlow and runs it as a script on JAX and
PyTorch (Keras fixes its backend at import):

    KERAS_BACKEND=jax python tests/backend_worker.py INPUTS.npz OUTPUTS.npz WORK_DIR

INPUTS.npz holds every case's inputs and weights, written by the TensorFlow side; the script
writes every output and gradient to OUTPUTS.npz, loads and predicts with the `.keras` files
that TensorFlow saved in WORK_DIR, saves its own there, and trains MA-CNN for a few steps.
"""

import json
import os
import sys

import keras
import numpy as np

import keras_fg
from keras_fg import layers, losses

IMAGE_SIZE = 32
FAMILIES = {
    "gap": {},
    "bcnn": {"reduction_dim": 8, "projection_dim": 32},
    "macnn": {"num_parts": 2},
    "dasrbn": {"stream_dim": 4, "lstm_units": 8, "attention_units": 4},
}


def _maps(rng, shape):
    """Attention maps `(B, H, W, P)` that sum to one over positions, with distinct peaks."""
    logits = rng.normal(size=shape) * 3.0
    flat = logits.reshape(shape[0], -1, shape[-1])
    maps = np.exp(flat) / np.exp(flat).sum(axis=1, keepdims=True)
    return maps.reshape(shape).astype("float32")


def _normal(rng, shape):
    return rng.normal(size=shape).astype("float32")


# name -> (builder, make_inputs(rng), indices of integer inputs that take no gradient).
# A builder returns (callable on the list of inputs, the layer holding its weights or None).
def _layer(factory):
    def build():
        layer = factory()
        return (lambda xs: layer(xs if len(xs) > 1 else xs[0])), layer

    return build


def _loss(function):
    return lambda: ((lambda xs: function(*xs)), None)


LABELS = np.array([0, 1, 0, 2, 1, 2], dtype="int32")
CASES = {
    "bilinear_pooling": (
        _layer(lambda: layers.BilinearPooling()),
        lambda r: [_normal(r, (2, 3, 3, 5))],
        (),
    ),
    "bilinear_pooling_two_streams": (
        _layer(lambda: layers.BilinearPooling()),
        lambda r: [_normal(r, (2, 3, 3, 4)), _normal(r, (2, 3, 3, 3))],
        (),
    ),
    "bilinear_pooling_compact": (
        _layer(lambda: layers.BilinearPooling(projection_dim=16, seed=3)),
        lambda r: [_normal(r, (2, 3, 3, 5))],
        (),
    ),
    "channel_grouping": (
        _layer(lambda: layers.ChannelGrouping(2, hidden_units=3)),
        lambda r: [np.abs(_normal(r, (2, 4, 4, 6)))],
        (),
    ),
    "channel_grouping_sharp": (
        _layer(lambda: layers.ChannelGrouping(3, initial_temperature=3.0)),
        lambda r: [np.abs(_normal(r, (2, 4, 4, 6)))],
        (),
    ),
    **{
        f"image_preprocessing_{mode}": (
            _layer(lambda mode=mode: layers.ImagePreprocessing(mode)),
            lambda r: [r.uniform(0, 255, (2, 4, 4, 3)).astype("float32")],
            (),
        )
        for mode in layers.ImagePreprocessing.MODES
    },
    "part_crop": (
        _layer(lambda: layers.PartCrop(5, box_fraction=0.5)),
        lambda r: [_normal(r, (2, 16, 16, 3)), _maps(r, (2, 4, 4, 2))],
        (),
    ),
    "per_location_outer_product": (
        _layer(lambda: layers.PerLocationOuterProduct()),
        lambda r: [_normal(r, (2, 3, 3, 4)), _normal(r, (2, 3, 3, 3))],
        (),
    ),
    "per_location_outer_product_unnormalized": (
        _layer(lambda: layers.PerLocationOuterProduct(l2_normalize=False)),
        lambda r: [_normal(r, (2, 3, 3, 4)), _normal(r, (2, 3, 3, 3))],
        (),
    ),
    **{
        f"spatial_attention_lstm_{pooling}": (
            _layer(
                lambda pooling=pooling: layers.SpatialAttentionLSTM(
                    4, attention_units=3, pooling=pooling
                )
            ),
            lambda r: [_normal(r, (2, 3, 4, 5))],
            (),
        )
        for pooling in ("last", "attention", "mean")
    },
    "spatial_attention_lstm_four_sweeps": (
        _layer(
            lambda: layers.SpatialAttentionLSTM(
                4, attention_units=3, pooling="attention", directions=4
            )
        ),
        lambda r: [_normal(r, (2, 3, 4, 5))],
        (),
    ),
    "distance_loss": (
        _loss(lambda m: losses.distance_loss(m)),
        lambda r: [_maps(r, (2, 5, 4, 3))],
        (),
    ),
    "distance_loss_normalized": (
        _loss(lambda m: losses.distance_loss(m, normalize_coordinates=True)),
        lambda r: [_maps(r, (2, 5, 4, 3))],
        (),
    ),
    "diversity_loss": (
        _loss(lambda m: losses.diversity_loss(m, margin=0.02)),
        lambda r: [_maps(r, (2, 5, 4, 3))],
        (),
    ),
    "channel_grouping_loss": (
        _loss(losses.ChannelGroupingLoss(margin=0.02, diversity_weight=2.0)),
        lambda r: [_maps(r, (2, 5, 4, 3))],
        (),
    ),
    **{
        f"triplet_{metric}_{'soft' if soft else 'hinge'}": (
            _loss(
                lambda y, e, metric=metric, soft=soft: losses.batch_hard_triplet_loss(
                    y, e, margin=0.3, soft=soft, metric=metric
                )
            ),
            lambda r: [LABELS, _normal(r, (6, 4))],
            (0,),
        )
        for metric in losses.triplet_loss.METRICS
        for soft in (False, True)
    },
    "batch_hard_triplet_loss_object": (
        _loss(losses.BatchHardTripletLoss(margin=0.3)),
        lambda r: [LABELS, _normal(r, (6, 4))],
        (0,),
    ),
}


def make_inputs():
    """Every case's inputs and perturbed weights, as a flat dict for an `.npz`."""
    arrays = {}
    for index, (name, (build, make, _)) in enumerate(sorted(CASES.items())):
        rng = np.random.default_rng(index)
        inputs = make(rng)
        for k, x in enumerate(inputs):
            arrays[f"{name}/input{k}"] = x
        _, layer = build()
        if layer is not None:
            layer(inputs if len(inputs) > 1 else inputs[0])  # Builds its weights.
            # Random biases too, so that every weight reaches the outputs.
            for k, w in enumerate(layer.get_weights()):
                arrays[f"{name}/weight{k}"] = (w + 0.3 * rng.normal(size=w.shape)).astype(w.dtype)
    return arrays


def _objective_weights(outputs):
    """Fixed random weights r_k: the gradient is that of Σ_k Σ r_k ⊙ output_k."""
    rng = np.random.default_rng(1234)
    return [rng.normal(size=tuple(o.shape)).astype("float32") for o in outputs]


def _flat(outputs):
    return keras.tree.flatten(outputs)  # Dicts in key order.


def run_case(name, arrays):
    """`{name/output_k, name/grad_input_k, name/grad_weight_k}` on the current backend."""
    build, _, integer_inputs = CASES[name]
    fn, layer = build()
    inputs = [arrays[f"{name}/input{k}"] for k in range(_count(arrays, f"{name}/input"))]
    if layer is not None:
        layer(inputs if len(inputs) > 1 else inputs[0])
        layer.set_weights(
            [arrays[f"{name}/weight{k}"] for k in range(_count(arrays, f"{name}/weight"))]
        )
    tensors = [keras.ops.convert_to_tensor(x) for x in inputs]
    outputs = [keras.ops.convert_to_numpy(o) for o in _flat(fn(tensors))]
    result = {f"{name}/output{k}": o for k, o in enumerate(outputs)}
    gradients = _gradients(fn, layer, inputs, set(integer_inputs), _objective_weights(outputs))
    result.update({f"{name}/{key}": g for key, g in gradients.items()})
    return result


def _count(arrays, prefix):
    return sum(1 for key in arrays if key.startswith(prefix))


def _objective(outputs, weights):
    return sum(
        keras.ops.sum(o * keras.ops.convert_to_tensor(w)) for o, w in zip(_flat(outputs), weights)
    )


def _gradients(fn, layer, inputs, integer_inputs, weights):
    """Gradients of the objective with respect to the float inputs and the trainable weights."""
    backend = keras.backend.backend()
    differentiable = [k for k in range(len(inputs)) if k not in integer_inputs]
    variables = list(layer.trainable_variables) if layer is not None else []
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch([tensors[k] for k in differentiable])
            value = _objective(fn(tensors), weights)
        grads = tape.gradient(
            value,
            [tensors[k] for k in differentiable] + variables,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
    elif backend == "torch":
        import torch

        tensors = [torch.tensor(x, requires_grad=k in differentiable) for k, x in enumerate(inputs)]
        value = _objective(fn(tensors), weights)
        sources = [tensors[k] for k in differentiable] + [v.value for v in variables]
        grads = torch.autograd.grad(value, sources, allow_unused=True)
        grads = [torch.zeros_like(s) if g is None else g for g, s in zip(grads, sources)]
    elif backend == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables] if layer else []

        def objective(trainable, float_inputs):
            tensors = list(inputs)
            for k, x in zip(differentiable, float_inputs):
                tensors[k] = x
            if layer is None:
                return _objective(fn(tensors), weights)
            outputs, _ = layer.stateless_call(
                trainable, non_trainable, tensors if len(tensors) > 1 else tensors[0]
            )
            return _objective(outputs, weights)

        input_grads_and_weight_grads = jax.grad(objective, argnums=(0, 1))(
            [v.value for v in variables], [inputs[k] for k in differentiable]
        )
        grads = list(input_grads_and_weight_grads[1]) + list(input_grads_and_weight_grads[0])
    else:
        raise ValueError(f"Unknown backend {backend!r}")
    grads = [np.array(keras.ops.convert_to_numpy(g)) for g in grads]
    named = {f"grad_input{k}": g for k, g in zip(differentiable, grads)}
    named.update({f"grad_weight{k}": g for k, g in enumerate(grads[len(differentiable) :])})
    return named


def run_cases(arrays):
    results = {}
    for name in sorted(CASES):
        results.update(run_case(name, arrays))
    return results


def family_images():
    shape = (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    return np.random.default_rng(7).uniform(0, 255, shape).astype("float32")


def build_family(family):
    keras.utils.set_random_seed(11)
    return keras_fg.models.create_model(
        family, 3, backbone="tiny", image_size=IMAGE_SIZE, **FAMILIES[family]
    )


def predictions(model):
    outputs = model.predict(family_images(), verbose=0)
    return {key: np.asarray(value) for key, value in outputs.items()}


def train_macnn(steps=20):
    """MA-CNN's joint loss before and after a few `fit` steps on one fixed batch."""
    model = build_family("macnn")
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 255, (12, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    labels = np.arange(12, dtype="int32") % 3
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3)
    )  # train.py's rate: at 1e-2 L_cng stalls the first steps
    before = model.evaluate(images, labels, verbose=0, return_dict=True)["loss"]
    model.fit(images, labels, epochs=steps, batch_size=12, verbose=0, shuffle=False)
    after = model.evaluate(images, labels, verbose=0, return_dict=True)["loss"]
    return before, after


def phase_changes():
    """Which variables a `fit` step in the `"channel_grouping"` phase changes."""
    model = build_family("macnn")
    images = family_images()
    labels = np.array([0, 1], dtype="int32")
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(images, labels, epochs=1, verbose=0)  # Builds the optimizer for every variable.
    grouping = {id(v) for v in model.channel_grouping_variables()}
    model.set_phase("channel_grouping")
    before = {id(v): np.array(v.numpy()) for v in model.variables}
    model.fit(images, labels, epochs=1, verbose=0)
    changed = {"grouping": False, "other": False}
    for v in model.variables:
        if v.trainable and not np.array_equal(np.array(v.numpy()), before[id(v)]):
            changed["grouping" if id(v) in grouping else "other"] = True
    return changed


def main(inputs_path, outputs_path, work_dir):
    backend = keras.backend.backend()
    arrays = dict(np.load(inputs_path))
    results = run_cases(arrays)
    for family in FAMILIES:
        loaded = keras.saving.load_model(os.path.join(work_dir, f"{family}_tensorflow.keras"))
        for key, value in predictions(loaded).items():
            results[f"loaded/{family}/{key}"] = value
        own = build_family(family)
        own.save(os.path.join(work_dir, f"{family}_{backend}.keras"))
        for key, value in predictions(own).items():
            results[f"own/{family}/{key}"] = value
    report = {}
    if backend == "jax":
        report["macnn_loss"] = train_macnn()
    try:
        report["phase_changes"] = phase_changes()
    except Exception as error:  # Reported to the test, which names it.
        report["phase_error"] = f"{type(error).__name__}: {error}"
    try:
        from keras_fg.export import export_tflite

        export_tflite(build_family("gap"), os.path.join(work_dir, f"{backend}.tflite"))
        report["export_error"] = None
    except Exception as error:
        report["export_error"] = f"{type(error).__name__}: {error}"
    np.savez(outputs_path, **results)
    with open(outputs_path + ".json", "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main(*sys.argv[1:])

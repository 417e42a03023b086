"""train.py's devices: the tf.distribute strategy, mixed precision, and the multi-worker loop."""

import os

from keras_fg.cli.run_directory import RunError


def make_strategy(name):
    """The `tf.distribute` strategy `--strategy` names ("auto": mirrored over 2+ GPUs)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise RunError("--strategy multi_worker needs the TF_CONFIG environment variable")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise RunError(f"unknown strategy {name!r}")


def set_mixed_precision(choice):
    """`--mixed-precision`: off, or Keras' mixed policy (auto: float16 on GPU, else bfloat16)."""
    import keras
    import tensorflow as tf

    if choice == "off":
        return
    if choice == "auto":
        choice = "float16" if tf.config.list_physical_devices("GPU") else "bfloat16"
    keras.mixed_precision.set_global_policy(f"mixed_{choice}")


def fit_multi_worker(trainer, strategy, epoch_dataset, first, end, callbacks, verbose=2):
    """`fit`'s epochs `first .. end - 1` of `trainer.train_step` on every replica of a
    multi-worker strategy.

    Keras 3.15's `fit` fails under `MultiWorkerMirroredStrategy` (keras-team/keras#20585).
    This is the same step without the result reduction that fails; the metrics are read once
    at the end of each epoch, aggregated over all workers. One step function is traced per
    training state (phase, backbone frozen or not), as `fit` does.

    Args:
        trainer: the model `fit` would train (a keras_fg model, or a `FeatureHead`).
        strategy: the `MultiWorkerMirroredStrategy`.
        epoch_dataset: `epoch -> tf.data.Dataset` of that epoch's batches; the strategy shards
            it across the workers.
        first, end: the epochs to run, as `fit`'s `initial_epoch` and `epochs`.
        callbacks: Keras callbacks.
    """
    import keras
    import tensorflow as tf

    callback_list = keras.callbacks.CallbackList(callbacks, model=trainer)
    steps = {}
    logs = {}
    callback_list.on_train_begin()
    for epoch in range(first, end):
        trainer.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        state = trainer.training_state() if hasattr(trainer, "training_state") else None
        if state not in steps:
            steps[state] = tf.function(
                lambda batch: strategy.run(trainer.train_step, args=(batch,))
            )
        for batch in strategy.experimental_distribute_dataset(epoch_dataset(epoch)):
            steps[state](batch)
        logs = {metric.name: float(metric.result()) for metric in trainer.metrics}
        callback_list.on_epoch_end(epoch, logs)
        if verbose:
            print(
                f"Epoch {epoch + 1}/{end}: " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
            )
    callback_list.on_train_end(logs)

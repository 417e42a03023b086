"""train.py: train and evaluate any keras_fg model on any dataset, from one CPU to many machines.

Every run gets its own directory, `runs/<model>-<data>-<time>` unless `--output` names one;
`runs/latest` links to the newest. `--resume DIR` (or `--resume latest`) continues an
interrupted run from its last completed epoch, to the same weights as an uninterrupted run.

The run directory holds:
    config.json          the resolved configuration (every flag, after the config file)
    model.keras          the trained model
    history.csv          per-epoch metrics (training and validation)
    tensorboard/         TensorBoard logs, with the attention overlays as images
    evaluation.json      the final evaluation (top1, top5, mean_per_class_accuracy, ...;
                         rank1, mAP, ... for re-identification)
    attention.png        attention overlays of a few test images (attention families)
    checkpoint/          the last completed epoch (weights, optimizer state), for resuming
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from keras_fg.cli.train_config import RUNS, comparable, parse_args


class RunError(Exception):
    """A problem with the user's input, reported as one line."""


def main(argv=None):
    try:
        args = parse_args(argv)
        run(args)
    except (RunError, ValueError, FileNotFoundError, NotADirectoryError) as error:
        if getattr(error, "_during_training", False):
            raise
        fail(error)
    except Exception as error:
        # --strict-data: the pipeline stops at the first unreadable file, naming it.
        message = str(error)
        if type(error).__name__ == "InvalidArgumentError" and "Unreadable image file" in message:
            fail(next(line for line in message.splitlines() if "Unreadable image file" in line))
        raise


def fail(message):
    print(f"train.py: error: {message}".strip(), file=sys.stderr)
    sys.exit(2)


def run(args):
    """Trains and evaluates as `args` say; returns the evaluation dict."""
    import keras
    import tensorflow as tf

    backend = keras.backend.backend()
    if backend != "tensorflow" and args.strategy != "auto":
        raise RunError(
            f"--strategy {args.strategy} uses tf.distribute and needs KERAS_BACKEND=tensorflow; "
            f"Keras runs on {backend!r}"
        )
    strategy = make_strategy(args.strategy)  # First: multi-worker must start before other TF ops.
    if args.output is None:
        if args.strategy == "multi_worker":
            raise RunError("--strategy multi_worker needs --output DIR, the same on every worker")
        args.output = str(new_run_directory(args))
    output = run_directory(args, strategy)
    config = {k: v for k, v in vars(args).items()}
    complete = check_run_directory(output, config, resuming=bool(args.resume))
    if complete is not None:
        return complete
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "config.json", config)

    keras.utils.set_random_seed(args.seed)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    set_mixed_precision(args.mixed_precision)
    replicas = strategy.num_replicas_in_sync
    if args.batch_size % replicas:
        raise RunError(
            f"--batch-size {args.batch_size} does not divide across {replicas} replicas; "
            f"use a multiple of {replicas}"
        )

    data = load_data(args)
    print(
        f"Data: {args.format}, {len(data.train_labels)} training images, "
        f"{data.num_classes} classes; {data.evaluation_size} evaluation images"
    )

    from keras_fg.cli.run_checkpoint import RunCheckpoint
    from keras_fg.models import PhaseSchedule, create_model
    from keras_fg.models.keras_internals import detach_from_distribution_strategy
    from keras_fg.models.phase_schedule import BackboneSchedule

    with strategy.scope():
        model = create_model(
            args.model,
            data.num_classes,
            backbone=args.backbone,
            weights=args.weights,
            image_size=tuple(args.image_size) if len(args.image_size) == 2 else args.image_size[0],
            class_names=data.class_names,
            label_smoothing=args.label_smoothing,
            **family_options(args),
        )
        steps_per_epoch = data.steps_per_epoch(args.batch_size)
        model.compile(optimizer=make_optimizer(args, model, steps_per_epoch))
        # Every variable gets its optimizer slots now, before any phase or freeze hides some.
        model.optimizer.build(model.trainable_variables)
    multi_worker = args.strategy == "multi_worker"
    if multi_worker:
        # Keras 3.15's fit() fails under MultiWorkerMirroredStrategy (keras-team/keras#20585):
        # the epochs run in `fit_multi_worker`, and the model itself is left without a
        # strategy so that predict/evaluate stay local (every worker holds the same weights).
        detach_from_distribution_strategy(model)

    checkpoint = RunCheckpoint(output / "checkpoint")
    start_epoch = checkpoint.restore(model)
    if start_epoch:
        print(f"Resuming {output} after epoch {start_epoch}")

    # Phase switches and the backbone's unfreezing first: they set what the epoch trains.
    callbacks = []
    if args.model == "macnn":
        callbacks.append(
            PhaseSchedule([p.strip() for p in args.macnn_phases.split(",") if p.strip()])
        )
    if args.head_epochs:
        callbacks.append(BackboneSchedule(args.head_epochs))
    callbacks += [
        keras.callbacks.CSVLogger(str(output / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(output / "tensorboard"), write_graph=False),
        checkpoint,
    ]
    if args.model == "macnn" and args.macnn_init == "clustering":
        from keras_fg.models import ChannelGroupingInitializer

        # First: the clustering sets the grouping weights that the epoch then trains.
        callbacks.insert(
            0,
            ChannelGroupingInitializer(
                data.pipeline(args, training=False, limit=256),
                at_epoch=args.macnn_init_epoch,
                seed=args.seed,
            ),
        )
    class_weights = balanced_class_weights(data.train_labels, data.num_classes, args.class_weight)
    started = time.time()
    try:
        if multi_worker:
            fit_multi_worker(model, strategy, data, args, class_weights, start_epoch, callbacks)
        else:
            model.fit(
                training_batches(data, args, class_weights, start_epoch, steps_per_epoch),
                steps_per_epoch=steps_per_epoch,
                initial_epoch=start_epoch,
                epochs=args.epochs,
                validation_data=data.validation_pipeline(args),
                callbacks=callbacks,
                shuffle=False,  # Each epoch's pipeline shuffles, seeded by (seed, epoch).
                verbose=args.verbose,
            )
    except (ValueError, FileNotFoundError) as error:
        error._during_training = True
        raise
    training_seconds = time.time() - started

    part_weights = data.fit_part_weights(model, args) if args.task == "reid" else None
    atomic_save(model, output / "model.keras")
    evaluation = data.evaluate(model, args)
    if part_weights:
        evaluation["part_weights"] = part_weights
    evaluation["training_seconds"] = round(training_seconds, 1)
    evaluation["skipped_images"] = data.skipped_images()
    write_json(output / "evaluation.json", evaluation)
    shutil.rmtree(checkpoint.folder, ignore_errors=True)
    write_attention_overlays(model, data, args, output)
    summary = ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in evaluation.items()
        if not isinstance(v, (dict, list))
    )
    print(f"Evaluation: {summary}")
    print(f"Skipped unreadable images: {evaluation['skipped_images']}")
    print(f"Run directory: {output}")
    return evaluation


# --------------------------------------------------------------------------------------------
# Pieces of the run.


def make_strategy(name):
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


def fit_multi_worker(model, strategy, data, args, class_weights, start_epoch, callbacks):
    """`fit`'s epochs of `model.train_step` on every replica of a multi-worker strategy.

    The same step `fit` runs, without the result reduction that fails in Keras 3.15; the
    metrics are read once at the end of each epoch, aggregated over all workers. One step
    function is traced per training state (phase, backbone frozen or not), as `fit` does.
    """
    import keras
    import tensorflow as tf

    callback_list = keras.callbacks.CallbackList(callbacks, model=model)
    steps = {}
    logs = {}
    callback_list.on_train_begin()
    for epoch in range(start_epoch, args.epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        state = model.training_state()
        if state not in steps:
            steps[state] = tf.function(lambda batch: strategy.run(model.train_step, args=(batch,)))
        dataset = with_class_weights(data.pipeline(args, training=True, epoch=epoch), class_weights)
        for batch in strategy.experimental_distribute_dataset(dataset):
            steps[state](batch)
        logs = {metric.name: float(metric.result()) for metric in model.metrics}
        callback_list.on_epoch_end(epoch, logs)
        print(
            f"Epoch {epoch + 1}/{args.epochs}: "
            + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
        )
    callback_list.on_train_end(logs)


def training_batches(data, args, class_weights, start_epoch, steps_per_epoch):
    """The batches of every remaining epoch, one epoch after another, each exactly
    `steps_per_epoch` long, for one `fit` call.

    Each epoch's pipeline is seeded by (seed, epoch) and built when the epoch starts, so a
    resumed run sees the same batches as an uninterrupted one. An epoch shortened by
    unreadable images repeats its own first batches, so that no epoch borrows from the next.
    """
    for epoch in range(start_epoch, args.epochs):
        pipeline = data.pipeline(args, training=True, epoch=epoch)
        yield from with_class_weights(pipeline.repeat().take(steps_per_epoch), class_weights)


def balanced_class_weights(labels, num_classes, choice):
    """`--class-weight balanced`: N / (classes · count_c) for every class c (sklearn's rule)."""
    if choice == "none":
        return None
    counts = np.bincount(np.asarray(labels, dtype="int64"), minlength=num_classes)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return weights.astype("float32")


def with_class_weights(dataset, class_weights):
    """(images, labels) batches -> (images, labels, weights), as Keras' `class_weight` does."""
    if class_weights is None:
        return dataset
    import tensorflow as tf

    table = tf.constant(class_weights)

    def add_weights(images, labels):
        ids = tf.argmax(labels, axis=-1) if labels.shape.rank == 2 else labels  # Soft labels.
        return images, labels, tf.gather(table, tf.cast(tf.reshape(ids, [-1]), tf.int32))

    return dataset.map(add_weights)


def new_run_directory(args):
    """runs/<model>-<data>-<time>, new, with runs/latest pointing to it."""
    data = "synthetic" if args.data is None else Path(args.data).resolve().name
    name = f"{args.model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, suffix = RUNS / name, 1
    while folder.exists():
        suffix += 1
        folder = RUNS / f"{name}-{suffix}"
    folder.mkdir(parents=True)
    update_latest(folder)
    return folder


def update_latest(folder):
    """Points runs/latest at `folder`: a relative symbolic link, or a text file naming it."""
    latest = RUNS / "latest"
    if latest.is_dir() and not latest.is_symlink():  # A run directory of an older version.
        print(f"{latest} is a run directory, left as it is")
        return
    temporary = RUNS / ".latest.tmp"
    temporary.unlink(missing_ok=True)
    try:
        temporary.symlink_to(folder.name, target_is_directory=True)
    except OSError:  # No symbolic links here.
        temporary.write_text(folder.name + "\n")
    os.replace(temporary, latest)


def check_run_directory(output, config, resuming):
    """Refuses a directory that holds another run; returns the evaluation of a complete one."""
    previous = output / "config.json"
    if not previous.exists():
        if output.is_dir() and any(
            entry.name != "workers"
            for entry in output.iterdir()  # Other workers' folders.
        ):
            raise RunError(f"output directory {output} is not empty and holds no keras_fg run")
        return None
    stored = json.loads(previous.read_text())
    different = sorted(
        k
        for k in set(comparable(stored)) | set(comparable(config))
        if stored.get(k) != config.get(k)
    )
    if different:
        if resuming:
            raise RunError(
                f"cannot resume {output}: the flags change its configuration (they change: "
                f"{', '.join(different)}); resume without them, or start a new run"
            )
        raise RunError(
            f"output directory {output} holds a different run (it differs in: "
            f"{', '.join(different)}); choose another --output, or omit it for a new directory"
        )
    if (output / "evaluation.json").exists():
        print(f"{output} holds this run, already complete: {output / 'evaluation.json'}")
        return json.loads((output / "evaluation.json").read_text())
    if not resuming:
        raise RunError(
            f"output directory {output} holds an interrupted run of this configuration; "
            f"continue it with --resume {output}"
        )
    return None


def run_directory(args, strategy):
    """The chief writes to --output; other workers of a multi-worker run to a sub-folder."""
    output = Path(args.output)
    resolver = getattr(strategy, "cluster_resolver", None)
    if (
        resolver is not None
        and resolver.task_type not in (None, "chief")
        and not (
            resolver.task_type == "worker"
            and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict()
        )
    ):
        output = output / "workers" / f"{resolver.task_type}-{resolver.task_id}"
    return output


def set_mixed_precision(choice):
    import keras
    import tensorflow as tf

    if choice == "off":
        return
    if choice == "auto":
        choice = "float16" if tf.config.list_physical_devices("GPU") else "bfloat16"
    keras.mixed_precision.set_global_policy(f"mixed_{choice}")


def family_options(args):
    options = {"freeze_batchnorm": not args.train_batchnorm}
    if args.dropout is not None:  # Otherwise the family's default (DASRBN's is 0.5).
        options["dropout"] = args.dropout
    if args.model == "macnn":
        options.update(
            num_parts=args.num_parts,
            channel_grouping_weight=args.channel_grouping_weight,
            part_crop_size=args.part_crop_size,
            diversity_weight=args.diversity_weight,
            initial_temperature=args.initial_temperature,
            min_temperature=args.min_temperature,
            signed_channel_weights=not args.unsigned_channel_weights,
            maps_train_backbone=args.maps_train_backbone,
        )
    elif args.model == "pcb":
        options.update(num_stripes=args.num_stripes, descriptor=args.descriptor)
    elif args.model == "bcnn":
        options.update(projection_dim=args.projection_dim, reduction_dim=args.reduction_dim)
    elif args.model == "dasrbn":
        options.update(stream_dim=args.stream_dim, lstm_units=args.lstm_units)
    if args.task == "reid":
        options.update(
            bnneck=args.bnneck,
            triplet_weight=args.triplet_weight,
            triplet_margin=args.triplet_margin,
            metric_loss=args.metric_loss,
            center_loss_weight=args.center_loss_weight,
            last_stride=args.last_stride,
        )
    return options


def make_optimizer(args, model, steps_per_epoch):
    import keras

    from keras_fg.models.multi_optimizer import PartialMultiOptimizer

    def learning_rate(base):
        if args.schedule == "constant":
            return base
        total = max(1, args.epochs * steps_per_epoch)
        warmup = min(int(args.warmup_epochs * steps_per_epoch), total - 1)
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else base,
            decay_steps=total - warmup,
            warmup_target=base if warmup else None,
            warmup_steps=warmup,
        )

    def optimizer(base):
        if args.optimizer == "sgd":
            return keras.optimizers.SGD(
                learning_rate(base),
                momentum=args.momentum,
                nesterov=True,
                weight_decay=args.weight_decay or None,
            )
        return keras.optimizers.AdamW(learning_rate(base), weight_decay=args.weight_decay)

    if args.backbone_lr_multiplier == 1.0:
        return optimizer(args.learning_rate)
    backbone_optimizer = optimizer(args.learning_rate * args.backbone_lr_multiplier)
    mapping = keras.optimizers.OptimizerMap(
        optimizer(args.learning_rate),
        {v.path: backbone_optimizer for b in model.backbones() for v in b.trainable_weights},
    )
    # Frozen backbones and MA-CNN phases train a subset of the variables.
    return PartialMultiOptimizer(mapping)


def atomic_save(model, path):
    temporary = path.with_name(path.stem + ".tmp.keras")
    model.save(temporary)
    os.replace(temporary, path)


def write_json(path, value):
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, default=_json_default) + "\n")
    os.replace(temporary, path)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_attention_overlays(model, data, args, output, count=8):
    """attention.png and a TensorBoard image of the attention maps of a few test images."""
    if "attention_maps" not in model.output:
        return
    import tensorflow as tf

    from keras_fg import viz

    images, labels = data.sample_images(args, count)
    outputs = model.predict(images, verbose=0)
    figure = viz.attention_grid(
        images,
        outputs["attention_maps"],
        predicted=None if labels is None else outputs["probabilities"].argmax(axis=1),
        true=labels,
        class_names=data.class_names,
        path=output / "attention.png",
    )
    with tf.summary.create_file_writer(str(output / "tensorboard" / "attention")).as_default():
        tf.summary.image("attention_overlays", viz.to_image_array(figure)[None], step=args.epochs)


def load_data(args):
    from keras_fg.cli.train_data import ClassificationData, ReidData

    if args.task == "reid":
        return ReidData(args)
    return ClassificationData(args)

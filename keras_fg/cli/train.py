"""train.py: train and evaluate any keras_fg model on any dataset, from one CPU to many machines.

Every run gets its own directory, `runs/<model>-<data>-<time>` unless `--output` names one;
`runs/latest` links to the newest. `--resume DIR` (or `--resume latest`) continues an
interrupted run from its last completed epoch, to the same weights as an uninterrupted run.

Training has up to two phases (docs/design.md, "The training recipe"):

1. `--head-epochs N`: the head alone, the backbone frozen. By default (`--cache-features`)
   the backbone's features of the training images and of their flips are computed once and
   the head trains on them, with the family's own joint loss and its own optimizer
   (`--head-learning-rate`, `--head-batch-size`); otherwise every epoch reads the images.
2. The remaining epochs: every layer, on augmented images, at `--learning-rate`.

The run directory holds:
    config.json          the resolved configuration (every flag, after the config file)
    model.keras          the trained model
    history.csv          per-epoch metrics (training and validation) of both phases
    tensorboard/         TensorBoard logs, with the attention overlays as images
    evaluation.json      the final evaluation (top1, top5, mean_per_class_accuracy, ...;
                         rank1, mAP, ... for re-identification) and the training times
    attention.png        attention overlays of a few test images (attention families)
    checkpoint/          the last completed epoch (weights, optimizer state), for resuming
    feature_cache/       the head phase's features, when they exceed the memory budget
"""

import os
import shutil
import sys
import time

import numpy as np

from keras_fg.cli.run_directory import (
    RunError,
    atomic_save,
    check_run_directory,
    new_run_directory,
    run_directory,
    write_json,
)
from keras_fg.cli.strategies import fit_multi_worker, make_strategy, set_mixed_precision
from keras_fg.cli.train_config import parse_args


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
    for flag, size in (
        ("--batch-size", args.batch_size),
        ("--head-batch-size", args.head_batch_size),
    ):
        if size % replicas:
            raise RunError(
                f"{flag} {size} does not divide across {replicas} replicas; "
                f"use a multiple of {replicas}"
            )

    data = load_data(args)
    print(
        f"Data: {args.format}, {len(data.train_labels)} training images, "
        f"{data.num_classes} classes; {data.evaluation_size} evaluation images"
    )
    with strategy.scope():
        model = build_model(args, data)
    if args.strategy == "multi_worker":
        from keras_fg.models.keras_internals import detach_from_distribution_strategy

        # The epochs run in `fit_multi_worker`; the model itself is left without a strategy
        # so that predict/evaluate stay local (every worker holds the same weights).
        detach_from_distribution_strategy(model)

    try:
        timings = Training(args, model, data, strategy, output).run()
    except (ValueError, FileNotFoundError) as error:
        error._during_training = True
        raise

    part_weights = data.fit_part_weights(model) if args.task == "reid" else None
    atomic_save(model, output / "model.keras")
    evaluation = data.evaluate(model)
    if part_weights:
        evaluation["part_weights"] = part_weights
    evaluation.update(timings)
    evaluation["skipped_images"] = data.skipped_images()
    write_json(output / "evaluation.json", evaluation)
    shutil.rmtree(output / "checkpoint", ignore_errors=True)
    shutil.rmtree(output / "feature_cache", ignore_errors=True)
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


def build_model(args, data, **overrides):
    from keras_fg.models import create_model

    options = {**family_options(args), **overrides}
    return create_model(
        args.model,
        data.num_classes,
        backbone=args.backbone,
        weights=args.weights,
        image_size=tuple(args.image_size) if len(args.image_size) == 2 else args.image_size[0],
        class_names=data.class_names,
        label_smoothing=args.label_smoothing,
        **options,
    )


class Training:
    """The two phases of a run (see the module docstring), resumable after any epoch.

    The checkpoint of an epoch records its phase: a head-phase checkpoint holds the head's
    weights and the head optimizer's state, an image-phase one the whole model's and its
    optimizer's. Resuming restores it into the same phase's trainer and carries on.
    """

    def __init__(self, args, model, data, strategy, output):
        import keras

        from keras_fg.cli.run_checkpoint import RunCheckpoint

        self.args, self.model, self.data = args, model, data
        self.strategy, self.output = strategy, output
        self.multi_worker = args.strategy == "multi_worker"
        self.checkpoint = RunCheckpoint(output / "checkpoint")
        self.class_weights = balanced_class_weights(
            data.train_labels, data.num_classes, args.class_weight
        )
        self.logging = [
            keras.callbacks.CSVLogger(str(output / "history.csv"), append=True),
            keras.callbacks.TensorBoard(str(output / "tensorboard"), write_graph=False),
        ]
        self.timings = {}
        self._cached = None

    def run(self):
        """Trains; returns the training times, in seconds."""
        state = self.checkpoint.state()
        start = state["epoch"] if state else 0
        if start:
            print(f"Resuming {self.output} after epoch {start}")
        started = time.time()
        head_epochs = self.args.head_epochs
        if head_epochs and (start < head_epochs or state.get("phase") == "head"):
            self.head_phase(start, state)
        self.image_phase(max(start, head_epochs), state)
        self.timings["training_seconds"] = round(time.time() - started, 1)
        return self.timings

    # ----------------------------------------------------------------------------------------

    def head_phase(self, start, state):
        """Epochs [0, --head-epochs): the head alone, on cached features or on images."""
        from keras_fg.cli.optimizers import make_optimizer
        from keras_fg.models import FeatureHead, split_at_backbone, train_head, transfer_weights

        args, model = self.args, self.model
        started = time.time()
        cached = self.uses_feature_cache()
        with self.strategy.scope():
            if cached:
                # Full MA-CNN's head reads the images (its part crops): its head without the
                # crops trains here and joins the full model after (`transfer_weights`).
                head_model = model
                if getattr(model, "part_backbone", None) is not None:
                    head_model = build_model(args, self.data, part_crop_size=None)
                trainer = FeatureHead(head_model)
                # Built now, so that a head-phase checkpoint can load into it.
                trainer.build((None, *split_at_backbone(head_model)[0].output.shape[1:]))
            else:
                head_model = trainer = model
                model.set_backbone_trainable(False)
            cache, validation, steps = None, None, None
            if start < args.head_epochs:
                cache, validation = self.feature_caches(head_model) if cached else (None, None)
            steps = self.head_steps(cache)
            trainer.compile(
                optimizer=make_optimizer(args, None, steps, args.head_epochs, head=True)
            )
            trainer.optimizer.build(trainer.trainable_variables)
        if state and state.get("phase") == "head":
            self.checkpoint.restore(trainer)
        if start < args.head_epochs and cached:
            self.cluster_channels_on(head_model, cache, start)
            if self.multi_worker:
                epochs = lambda first, end: cache.dataset(
                    args.head_batch_size, args.seed, epochs=(first, end)
                )
                self.fit(trainer, epochs, steps, start, args.head_epochs, [], None, "head")
            else:
                train_head(
                    trainer,
                    cache,
                    epochs=args.head_epochs,
                    batch_size=args.head_batch_size,
                    validation_data=validation,
                    validation_freq=max(1, args.validation_freq),
                    callbacks=self.callbacks([], "head"),
                    class_weights=self.class_weights,
                    seed=args.seed,
                    initial_epoch=start,
                    verbose=args.verbose,
                )
        elif start < args.head_epochs:
            self.fit(
                trainer,
                lambda first, end: self.data.training_dataset(first, end),
                steps,
                start,
                args.head_epochs,
                self.image_callbacks(start),
                self.validation_images(),
                "head",
            )
        if head_model is not model:
            transfer_weights(head_model, model)
        self.timings["head_phase_seconds"] = round(time.time() - started, 1)
        self.timings["head_phase_features"] = "cached" if cached else "images"

    def image_phase(self, start, state):
        """Epochs [--head-epochs, --epochs): every layer, on augmented images."""
        from keras_fg.cli.optimizers import make_optimizer

        args, model = self.args, self.model
        started = time.time()
        steps = self.data.steps_per_epoch(args.batch_size)
        with self.strategy.scope():
            model.set_backbone_trainable(True)
            epochs = args.epochs - args.head_epochs
            model.compile(optimizer=make_optimizer(args, model, steps, epochs))
            # Every variable gets its optimizer slots now, before any phase hides some.
            model.optimizer.build(model.trainable_variables)
        if state and state.get("phase", "image") == "image":
            self.checkpoint.restore(model)
        self.fit(
            model,
            lambda first, end: self.data.training_dataset(first, end),
            steps,
            start,
            args.epochs,
            self.image_callbacks(start),
            self.validation_images(),
            "image",
        )
        self.timings["image_phase_seconds"] = round(time.time() - started, 1)

    # ----------------------------------------------------------------------------------------

    def fit(self, trainer, epochs, steps, first, end, callbacks, validation, phase):
        """`fit` over epochs [first, end), or train.py's own loop under multi-worker."""
        callbacks = self.callbacks(callbacks, phase)
        weigh = lambda dataset: with_class_weights(dataset, self.class_weights)
        if self.multi_worker:
            fit_multi_worker(
                trainer,
                self.strategy,
                lambda epoch: weigh(epochs(epoch, epoch + 1)),
                first,
                end,
                callbacks,
                verbose=self.args.verbose,
            )
            return
        frequency = self.args.validation_freq
        validation_steps = None
        if validation is not None and validation.cardinality() < 0:
            # A pipeline that skips unreadable files cannot know its length, and Keras warns
            # that such a dataset "ran out of data" whenever it ends: validation reads one
            # pass of an endless repetition instead. (A skipped file makes that pass end one
            # batch into the next; evaluation.json comes from a separate, exact pass.)
            batch = self.args.batch_size
            validation_steps = -(-self.data.evaluation_size // batch)
            validation = validation.repeat()
        trainer.fit(
            weigh(epochs(first, end)),
            steps_per_epoch=steps,
            initial_epoch=first,
            epochs=end,
            validation_data=validation if frequency else None,
            validation_steps=validation_steps,
            validation_freq=max(1, frequency),
            callbacks=callbacks,
            shuffle=False,  # The datasets shuffle, each epoch by (seed, epoch).
            verbose=self.args.verbose,
        )

    def callbacks(self, callbacks, phase):
        """`callbacks` and the run's own: logs, the checkpoint of `phase`, progress, timing."""
        self.checkpoint.phase = phase
        return [
            *callbacks,
            *self.logging,
            self.checkpoint,
            run_progress(self.args.epochs),
            epoch_timer(self.timings.setdefault("epoch_seconds", [])),
        ]

    def uses_feature_cache(self):
        """`--cache-features`, resolved: on where the head phase can read cached features."""
        if self._cached is None:
            self._cached = self._resolve_feature_cache()
        return self._cached

    def _resolve_feature_cache(self):
        from keras_fg.models import split_at_backbone

        args = self.args
        reasons = []
        if args.task == "reid":
            reasons.append("--task reid trains on P x K batches of images")
        if args.macnn_phases != "joint":
            reasons.append("--macnn-phases alternates what the model trains")
        if (
            args.model == "macnn"
            and args.macnn_init == "clustering"
            and args.macnn_init_epoch >= args.head_epochs
        ):
            reasons.append("--macnn-init-epoch clusters after the head phase")
        if not reasons and getattr(self.model, "part_backbone", None) is None:
            try:
                split_at_backbone(self.model)
            except ValueError as error:
                reasons.append(str(error))
        if args.cache_features is False:
            return False
        if reasons and args.cache_features:
            raise RunError(f"--cache-features cannot serve this run: {reasons[0]}")
        if reasons:
            print(f"Head phase on images, not cached features: {reasons[0]}")
        return not reasons

    def feature_caches(self, head_model):
        """The training images' features (and their flips'), and the validation images' when
        the head phase validates."""
        from keras_fg.models import FeatureCache, feature_fingerprint, split_at_backbone

        args, data = self.args, self.data
        backbone = split_at_backbone(head_model)[0]
        budget = feature_cache_budget(args.feature_cache_memory)
        verbose = 1 if args.verbose == 1 else 2 if args.verbose else 0

        def build(pipeline, count, source, flips):
            return FeatureCache.build(
                backbone,
                pipeline,
                count,
                flips=flips,
                directory=self.output / "feature_cache",
                memory_budget=budget,
                fingerprint=feature_fingerprint(backbone, source, args.image_size, flips),
                verbose=verbose,
            )

        started = time.time()
        cache = build(*data.cache_source(), flips=True)
        print(f"Feature cache built in {time.time() - started:.0f} s")
        self.timings["feature_cache_seconds"] = round(time.time() - started, 1)
        self.timings["feature_cache_bytes"] = cache.nbytes
        validation = None
        if args.validation_freq and data.validation_pipeline() is not None:
            validation = build(*data.cache_source(split="evaluation"), flips=False)
        return cache, validation

    def head_steps(self, cache):
        if cache is not None:
            return -(-len(cache) // self.args.head_batch_size)
        if self.uses_feature_cache():  # Restoring a finished head phase: steps of any value.
            return 2 * -(-len(self.data.train_labels) // self.args.head_batch_size)
        return self.data.steps_per_epoch(self.args.batch_size)

    def cluster_channels_on(self, head_model, cache, start):
        """MA-CNN's clustering initialisation, on 512 cached maps, before the head phase."""
        args = self.args
        if args.model != "macnn" or args.macnn_init != "clustering" or start > 0:
            return
        count = len(cache) // 2  # The unflipped images.
        sample = np.random.default_rng(args.seed).permutation(count)[:512]
        started = time.time()
        result = head_model.initialize_channel_grouping_from_features(
            np.asarray(cache.features[np.sort(sample)]), seed=args.seed
        )
        print(
            f"Channel grouping initialised by clustering: groups of {result['group_sizes']} "
            f"channels, pre-training loss {result['loss']:.3f} ({time.time() - started:.0f} s)"
        )

    def image_callbacks(self, start):
        from keras_fg.models import ChannelGroupingInitializer, PhaseSchedule

        args, callbacks = self.args, []
        if args.model == "macnn":
            phases = [p.strip() for p in args.macnn_phases.split(",") if p.strip()]
            callbacks.append(PhaseSchedule(phases))
            if args.macnn_init == "clustering" and not (
                args.head_epochs and self.uses_feature_cache()
            ):
                # First: the clustering sets the grouping weights that the epoch then trains.
                callbacks.insert(
                    0,
                    ChannelGroupingInitializer(
                        self.data.pipeline(training=False, limit=256),
                        at_epoch=args.macnn_init_epoch,
                        seed=args.seed,
                    ),
                )
        return callbacks

    def validation_images(self):
        return self.data.validation_pipeline() if self.args.validation_freq else None


def run_progress(epochs):
    """Keras' progress bar, counting the run's epochs (`Epoch 31/38`) in every phase's `fit`."""
    import keras

    class RunProgress(keras.callbacks.ProgbarLogger):
        def set_params(self, params):
            super().set_params(params)
            self.epochs = epochs

    return RunProgress()


def epoch_timer(seconds):
    """A callback that appends each epoch's wall time to the list `seconds`."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(round(time.perf_counter() - self.started, 2))

    return EpochTimer()


def feature_cache_budget(gib):
    """`--feature-cache-memory` in bytes ("auto": half of this machine's memory)."""
    if gib != "auto":
        return int(float(gib) * 2**30)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):  # No sysconf: no limit.
        return None


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


def family_options(args):
    """The `create_model` options of the family and task `args` name."""
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


def write_attention_overlays(model, data, args, output, count=8):
    """attention.png and a TensorBoard image of the attention maps of a few test images."""
    if "attention_maps" not in model.output:
        return
    import tensorflow as tf

    from keras_fg import viz

    images, labels = data.sample_images(count)
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
    """The run's training and evaluation data, read with the settings its flags give."""
    from keras_fg.cli.train_data import ClassificationData, DataSettings, ReidData

    settings = DataSettings.from_args(args)
    return ReidData(settings) if args.task == "reid" else ClassificationData(settings)

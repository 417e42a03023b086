"""train.py's optimizers: one for the head phase, one for the image phase, each with its own
warm-up and cosine decay over its own steps."""


def make_optimizer(args, model, steps_per_epoch, epochs=None, head=False):
    """The optimizer of one training phase.

    The image phase (`head=False`) learns at `--learning-rate`, the backbone at that times
    `--backbone-lr-multiplier`, with `--warmup-epochs` of linear warm-up; the head phase
    (`head=True`) at `--head-learning-rate` with no warm-up (a head on fixed features does
    not need one). Either decays by cosine to 0 over its `epochs` (`--schedule cosine`).

    Args:
        args: the resolved train.py configuration.
        model: the model whose backbones get the multiplier (None: no multiplier).
        steps_per_epoch: optimizer steps per epoch of the phase.
        epochs: epochs of the phase (default: all of `--epochs`).
        head: the head phase's optimizer.
    """
    import keras

    from keras_fg.models.multi_optimizer import PartialMultiOptimizer

    epochs = args.epochs if epochs is None else epochs
    warmup_epochs = 0 if head else args.warmup_epochs

    def learning_rate(base):
        if args.schedule == "constant":
            return base
        total = max(1, epochs * steps_per_epoch)
        warmup = min(int(warmup_epochs * steps_per_epoch), total - 1)
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

    if head:
        return optimizer(args.head_learning_rate)
    if args.backbone_lr_multiplier == 1.0 or model is None:
        return optimizer(args.learning_rate)
    backbone_optimizer = optimizer(args.learning_rate * args.backbone_lr_multiplier)
    mapping = keras.optimizers.OptimizerMap(
        optimizer(args.learning_rate),
        {v.path: backbone_optimizer for b in model.backbones() for v in b.trainable_weights},
    )
    # MA-CNN phases train a subset of the variables.
    return PartialMultiOptimizer(mapping)

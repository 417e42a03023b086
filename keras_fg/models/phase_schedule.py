"""A callback that alternates MA-CNN's training phases between epochs."""

import keras


class PhaseSchedule(keras.callbacks.Callback):
    """Sets the model's training phase at the start of each epoch.

    MA-CNN alternates two phases until both converge: the channel grouping learns with the
    convolutions fixed, then the convolutions and classifiers learn with the grouping fixed.

    Args:
        schedule: a list of phase names, one per epoch, repeated cyclically; or a callable
            `epoch -> phase`. Phases: `"joint"`, `"channel_grouping"`, `"classification"`.
        verbose: print the phase when it changes.

    Example:

    >>> callback = PhaseSchedule(["channel_grouping", "classification", "classification"])
    >>> model.fit(data, epochs=9, callbacks=[callback])  # doctest: +SKIP
    """

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule) and not schedule:
            raise ValueError(
                f"`schedule` must be a non-empty list or a callable. Received: {schedule!r}"
            )
        self.schedule = schedule
        self.verbose = verbose

    def phase_for_epoch(self, epoch):
        if callable(self.schedule):
            return self.schedule(epoch)
        return self.schedule[epoch % len(self.schedule)]

    def on_epoch_begin(self, epoch, logs=None):
        phase = self.phase_for_epoch(epoch)
        if phase != self.model.phase and self.verbose:
            print(f"Epoch {epoch + 1}: training phase {phase!r}")
        self.model.set_phase(phase)


class BackboneSchedule(keras.callbacks.Callback):
    """Trains the head alone for the first `head_epochs` epochs, then the whole model.

    The two-phase fine-tuning recipe of small fine-grained datasets (docs/design.md#training-recipe): at the
    start of each epoch the model's backbones are frozen (epoch < `head_epochs`) or trainable,
    through `model.set_backbone_trainable`, which keeps a frozen BatchNormalization frozen.
    Each state's train function is traced once; a resumed run gets the state of its epoch.

    Args:
        head_epochs: epochs with the backbones frozen.
        verbose: print when the backbones are unfrozen.

    Example:

    >>> model.fit(data, epochs=12, callbacks=[BackboneSchedule(3)])  # doctest: +SKIP
    """

    def __init__(self, head_epochs, verbose=0):
        super().__init__()
        if head_epochs < 0:
            raise ValueError(f"`head_epochs` must be >= 0. Received: head_epochs={head_epochs}")
        self.head_epochs = head_epochs
        self.verbose = verbose

    def on_epoch_begin(self, epoch, logs=None):
        trainable = epoch >= self.head_epochs
        if self.verbose and trainable and epoch == self.head_epochs:
            print(f"Epoch {epoch + 1}: backbone unfrozen")
        if any(b.trainable != trainable for b in self.model.backbones()):
            self.model.set_backbone_trainable(trainable)

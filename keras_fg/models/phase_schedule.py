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
            raise ValueError(f"`schedule` must be a non-empty list or a callable. Received: {schedule!r}")
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

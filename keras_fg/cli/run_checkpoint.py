"""train.py's checkpoint: the weights and optimizer state of the last completed epoch."""

import json
import os
from pathlib import Path

import keras


class RunCheckpoint(keras.callbacks.Callback):
    """Saves the weights and optimizer state at the end of every epoch; restores the last.

    `state.json` is the commit record: it names the epoch and its weights file, and is
    replaced atomically once that file is complete, so a kill at any moment leaves either the
    previous epoch's checkpoint or the new one, never a mixture.

    The record also names the training phase the epoch belonged to (`phase`, set before each
    phase's `fit`): the weights of a head-phase epoch are its trainer's (the head and the head
    optimizer), and load back into that phase's trainer.

    Args:
        folder: the checkpoint folder (created when the first epoch ends).
    """

    def __init__(self, folder):
        super().__init__()
        self.folder = Path(folder)
        self.phase = "image"

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch + 1:04d}.weights.h5"
        temporary = self.folder / f"{name[: -len('.weights.h5')]}.tmp.weights.h5"
        self.model.save_weights(temporary)  # The optimizer's state too.
        os.replace(temporary, self.folder / name)
        _write_json(
            self.folder / "state.json", {"epoch": epoch + 1, "weights": name, "phase": self.phase}
        )
        for old in self.folder.glob("epoch-*.weights.h5"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def state(self):
        """The record of the last completed epoch, `{"epoch", "weights", "phase"}`, or None."""
        state = self.folder / "state.json"
        return json.loads(state.read_text()) if state.exists() else None

    def restore(self, model):
        """Loads the last completed epoch into `model` (its phase's trainer); returns its
        number (0: none)."""
        state = self.state()
        if state is None:
            return 0
        model.load_weights(self.folder / state["weights"])
        return state["epoch"]


def _write_json(path, value):
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value) + "\n")
    os.replace(temporary, path)

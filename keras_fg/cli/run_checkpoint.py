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

    Args:
        folder: the checkpoint folder (created when the first epoch ends).
    """

    def __init__(self, folder):
        super().__init__()
        self.folder = Path(folder)

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch + 1:04d}.weights.h5"
        temporary = self.folder / f"{name[: -len('.weights.h5')]}.tmp.weights.h5"
        self.model.save_weights(temporary)  # The optimizer's state too.
        os.replace(temporary, self.folder / name)
        _write_json(self.folder / "state.json", {"epoch": epoch + 1, "weights": name})
        for old in self.folder.glob("epoch-*.weights.h5"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def restore(self, model):
        """Loads the last completed epoch into `model`; returns its number (0: none)."""
        state = self.folder / "state.json"
        if not state.exists():
            return 0
        state = json.loads(state.read_text())
        model.load_weights(self.folder / state["weights"])
        return state["epoch"]


def _write_json(path, value):
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value) + "\n")
    os.replace(temporary, path)

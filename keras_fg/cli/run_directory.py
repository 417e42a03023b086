"""train.py's run directories: one per run, `runs/latest`, refusing another run's folder,
and files written so that a kill leaves the previous version whole."""

import json
import os
import time
from pathlib import Path

import numpy as np

from keras_fg.cli.train_config import RUNS, comparable


class RunError(Exception):
    """A problem with the user's input, reported as one line."""


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

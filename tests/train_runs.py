"""Helpers of the tests that run train.py in processes: one run, two workers on loopback, and
a run killed once its checkpoint reaches an epoch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def train(*args, timeout=600, check=True, cwd=ROOT):
    """train.py `args` in a process; asserts it succeeded unless `check=False`."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=cwd,
    )
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_two_workers(arguments, run_dir, timeout=600):
    """train.py `arguments` as two workers of `--strategy multi_worker` on loopback."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        command = [sys.executable, str(ROOT / "train.py"), *map(str, arguments)]
        command += ["--strategy", "multi_worker", "--output", str(run_dir)]
        processes.append(
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=dict(ENV, TF_CONFIG=json.dumps(task)),
                cwd=ROOT,
            )
        )
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        assert process.returncode == 0, stderr[-4000:]


def kill_after_epoch(arguments, run_dir, epoch, timeout=300):
    """Starts train.py `arguments` and kills it (SIGKILL) once its checkpoint holds `epoch`;
    returns the checkpoint's record."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, arguments), "--output", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        cwd=ROOT,
    )
    state = Path(run_dir) / "checkpoint" / "state.json"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= epoch:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    return json.loads(state.read_text())

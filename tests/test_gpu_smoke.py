"""bench/gpu_smoke.sh runs where there is no GPU: it says so and prints its table."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_runs_on_the_cpu_and_prints_one_row_per_family_and_precision():
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        # A small run: the script's own settings for a GPU take minutes there, hours here.
        "KERAS_FG_SMOKE_IMAGES": "32",
        "KERAS_FG_SMOKE_SIZE": "48",  # The tiny backbone's grid is then 6 rows: PCB's 6 stripes.
        "KERAS_FG_SMOKE_BACKBONE": "tiny",
        "KERAS_FG_SMOKE_WRITE": "0",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_smoke.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("Devices: ") and "CPU" in line for line in lines)
    assert any("no GPU found" in line for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("family"))
    rows = [line.split() for line in lines[header + 1 :] if line.strip()]
    families = ["gap", "bcnn", "bcnn_compact", "macnn", "dasrbn", "pcb"]
    assert [r[0] for r in rows] == [f for f in families for _ in range(2)]
    assert [r[1] for r in rows] == ["float32", "mixed"] * len(families)
    for row in rows:
        assert float(row[2]) > 0  # Training images/s.
        assert " ".join(row[3:]) == "n/a (CPU)"

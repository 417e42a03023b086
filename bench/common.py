"""What every benchmark shares: paths, machine information, JSON output, peak memory."""

import json
import os
import platform
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KERAS_FG_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "bench" / "results"
CUB_ROOT = SHARED / "data" / "cub200_subset" / "CUB_200_2011"
MARS_ROOT = SHARED / "data" / "reid" / "mini_mars"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0.weights.h5"

# Result name -> (create_model name, options): the configurations every benchmark measures.
FAMILIES = {
    "gap": ("gap", {}),
    "bcnn": ("bcnn", {"reduction_dim": 256}),
    # 128² = 16,384 outer-product terms projected to 4,096: the projection costs 2·128·4,096
    # multiply-adds per location, which on 2 cores is the head's whole training time.
    "bcnn_compact": ("bcnn", {"reduction_dim": 128, "projection_dim": 4096}),
    "macnn": ("macnn", {"num_parts": 4}),
    "dasrbn": ("dasrbn", {}),
    # Dropout before the classifiers, measured against the default (docs/experiments.md).
    "dasrbn_dropout": ("dasrbn", {"dropout": 0.5}),
}


# The CPU features that decide which kernels XNNPACK and oneDNN run, so a speed figure says
# what it ran on (the two CPUs of the export table differ in AMX, not in their model name).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")


def cpu_flags():
    """Which of `CPU_FLAGS` this CPU reports (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as file:
            line = next((line for line in file if line.startswith("flags")), "")
    except OSError:
        return []
    reported = set(line.split(":", 1)[-1].split())
    return [flag for flag in CPU_FLAGS if flag in reported]


def machine_info():
    """Platform, CPU count, load and library versions: the context of every figure."""
    import keras
    import numpy
    import tensorflow as tf

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "numpy": numpy.__version__,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "2 cores shared with other jobs: absolute timings are noisy, ratios within "
        "one run and medians are the figures to trust.",
    }


def peak_rss_mb():
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(name, payload):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine_info(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)  # Never a half-written result.
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def require_shared(*paths):
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise SystemExit(f"shared data not found (set KERAS_FG_SHARED): {', '.join(missing)}")

"""train.py --task reid on real people: P x K batches, BNNeck + triplet, CMC and mAP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from keras_fg.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]


def chance_rank1(query, gallery):
    """Expected rank-1 of a random ranking under the same-person-same-camera rule."""
    rates = []
    for person, camera in zip(query.labels, query.cameras):
        candidates = ~((gallery.labels == person) & (gallery.cameras == camera))
        matches = (gallery.labels == person) & candidates
        if matches.any():
            rates.append(matches.sum() / candidates.sum())
    return float(np.mean(rates))


def test_short_reid_run_on_mini_mars_ranks_above_chance(mars_dir, tmp_path):
    out = tmp_path / "reid"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--task",
            "reid",
            "--data",
            str(mars_dir),
            "--model",
            "gap",
            "--backbone",
            "tiny",
            "--image-size",
            "128",
            "64",
            "--epochs",
            "2",
            "--num-identities",
            "8",
            "--num-instances",
            "4",
            "--verbose",
            "0",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    evaluation = json.loads((out / "evaluation.json").read_text())
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert evaluation["num_query_images"] == 32 and evaluation["num_gallery_images"] == 529
    assert sorted(evaluation["variants"]) == [
        "flip",
        "flip_re_ranking",
        "plain",
        "plain_re_ranking",
    ]
    assert evaluation["rank1"] == evaluation["variants"]["plain"]["rank1"]
    assert evaluation["variants"]["plain"]["num_valid_queries"] == 23
    chance = chance_rank1(
        load_dataset("market1501", mars_dir, "query"),
        load_dataset("market1501", mars_dir, "gallery"),
    )
    assert evaluation["rank1"] > 2 * chance, (evaluation["rank1"], chance)
    history = (out / "history.csv").read_text()
    assert "triplet_loss" in history and "classification_loss" in history

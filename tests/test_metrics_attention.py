"""Attention measures against a direct transcription of their definitions, on planted maps."""

import numpy as np
import pytest

from keras_fg.metrics import attention_measures, attention_report, dilated_box_cells


def reference_measures(maps, boxes, image_size):
    """Cell by cell, as the definitions read (one map (H, W) and one box at a time)."""
    height, width = maps.shape
    cell_h, cell_w = image_size[0] / height, image_size[1] / width
    x, y, w, h = boxes
    maps = maps / maps.sum()
    inside = np.zeros((height, width), bool)
    for i in range(height):
        for j in range(width):
            cx, cy = (j + 0.5) * cell_w, (i + 0.5) * cell_h
            inside[i, j] = (x - cell_w <= cx <= x + w + cell_w) and (
                y - cell_h <= cy <= y + h + cell_h
            )
    peak = np.unravel_index(np.argmax(maps), maps.shape)
    return {
        "peak_mass": maps.max(),
        "pointing_hit": float(inside[peak]),
        "mass_in_box": float((maps * inside).sum()),
        "chance": inside.mean(),
    }


def test_measures_match_the_definitions_on_random_maps():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 7, 5, 3)) ** 4  # non-square grid, peaky maps
    boxes = np.column_stack(
        [rng.uniform(0, 80, 6), rng.uniform(0, 60, 6), rng.uniform(2, 30, 6), rng.uniform(2, 30, 6)]
    )
    got = attention_measures(maps, boxes, (96, 112))
    for n in range(6):
        for p in range(3):
            want = reference_measures(maps[n, :, :, p], boxes[n], (96, 112))
            for key in ("peak_mass", "pointing_hit", "mass_in_box"):
                assert got[key][n, p] == pytest.approx(want[key])
            assert got["chance"][n] == pytest.approx(want["chance"])


def test_planted_maps():
    # 64-px image, 8x8 grid (8-px cells), a 6-px part at x 20..26, y 36..42. Dilated by one cell
    # the box is x 12..34, y 28..50: cell centres x 12, 20, 28 (columns 1-3) and y 28, 36, 44
    # (rows 3-5) lie in it.
    boxes = np.array([[20.0, 36.0, 6.0, 6.0]] * 3)
    on_part = np.full((8, 8), 1e-3)
    on_part[4, 3] = 1.0
    off_part = np.full((8, 8), 1e-3)
    off_part[0, 7] = 1.0
    uniform = np.ones((8, 8))
    report = attention_report(np.stack([on_part, off_part, uniform]), boxes, 64)
    measures = attention_measures(np.stack([on_part, off_part, uniform]), boxes, 64)
    inside = dilated_box_cells(boxes[:1], (8, 8), 64)[0]
    assert inside.sum() == 9
    np.testing.assert_array_equal(np.argwhere(inside)[:, 0], [3, 3, 3, 4, 4, 4, 5, 5, 5])
    np.testing.assert_array_equal(np.argwhere(inside)[:, 1], [1, 2, 3] * 3)
    np.testing.assert_array_equal(measures["pointing_hit"][:2, 0], [1.0, 0.0])
    assert measures["mass_in_box"][0, 0] > 0.9
    assert measures["mass_in_box"][2, 0] == pytest.approx(9 / 64)  # uniform map = chance
    assert report["chance"] == pytest.approx(9 / 64)
    assert report["uniform_peak_mass"] == pytest.approx(1 / 64)
    assert measures["peak_mass"][2, 0] == pytest.approx(1 / 64)


def test_report_names_the_best_part():
    boxes = np.array([[0.0, 0.0, 8.0, 8.0]] * 4)
    maps = np.full((4, 8, 8, 2), 1e-3)
    maps[:, 7, 7, 0] = 1.0  # part 0 always far from the box
    maps[:, 0, 0, 1] = 1.0  # part 1 always on it
    report = attention_report(maps, boxes, 64)
    assert report["best_part"] == 1
    assert report["pointing_game"] == 1.0
    assert report["per_part"]["pointing_game"] == [0.0, 1.0]
    assert report["mass_in_box"] > 0.9


def test_bad_inputs():
    maps = np.ones((2, 4, 4))
    boxes = np.zeros((2, 4))
    with pytest.raises(ValueError, match="attention_maps.shape"):
        attention_report(np.ones((2, 4)), boxes, 32)
    with pytest.raises(ValueError, match="boxes.shape"):
        attention_report(maps, np.zeros((3, 4)), 32)
    with pytest.raises(ValueError, match="non-negative"):
        attention_report(-maps, boxes, 32)
    with pytest.raises(ValueError, match="positive sum"):
        attention_report(np.zeros((2, 4, 4)), boxes, 32)
    with pytest.raises(ValueError, match="image_size"):
        attention_report(maps, boxes, (32, 0))

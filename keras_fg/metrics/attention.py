"""Attention measured, not admired: peak mass, pointing game and mass inside the true region.

An attention map `M` over an `H×W` grid sums to one. Against a ground-truth box `(x, y, w, h)` in
image pixels, on an image of `image_height × image_width` pixels, each grid cell `(i, j)` covers
`cell_h = image_height / H` by `cell_w = image_width / W` pixels and has its centre at

    c_ij = ((j + 0.5) · cell_w, (i + 0.5) · cell_h)                     (x, y) in pixels

The box is dilated by one grid cell on every side, since a 7×7 or 8×8 grid cannot resolve a part
smaller than a cell:

    D = [x − cell_w, x + w + cell_w] × [y − cell_h, y + h + cell_h]
    inside_ij = 1[c_ij ∈ D]

and the measures of one map are

    peak_mass     = max_ij M_ij                        uniform map: 1 / (H·W)
    pointing_hit  = inside at argmax_ij M_ij            chance: mean_ij inside_ij
    mass_in_box   = Σ_ij M_ij · inside_ij               chance: mean_ij inside_ij

The chance level of the pointing game and of the mass is the same number: the share of cells
inside the dilated box, which a peak drawn uniformly at random hits, and which a uniform map puts
inside. Everything is computed in NumPy, on maps that models return as `(N, H, W)` (one map, as
DASRBN's) or `(N, H, W, P)` (P part maps, as MA-CNN's).
"""

import numpy as np


def _as_maps(attention_maps):
    maps = np.asarray(attention_maps, dtype=np.float64)
    if maps.ndim == 3:
        maps = maps[..., None]
    if maps.ndim != 4:
        raise ValueError(
            "`attention_maps` must have shape (N, H, W) or (N, H, W, P). "
            f"Received: attention_maps.shape={maps.shape}"
        )
    if not np.all(np.isfinite(maps)) or np.any(maps < 0):
        raise ValueError("`attention_maps` must be finite and non-negative.")
    sums = maps.sum(axis=(1, 2), keepdims=True)
    if np.any(sums <= 0):
        raise ValueError("Every attention map must have a positive sum.")
    return maps / sums


def _as_boxes(boxes, count):
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape != (count, 4):
        raise ValueError(
            f"`boxes` must have shape ({count}, 4), one (x, y, w, h) box per map. "
            f"Received: boxes.shape={boxes.shape}"
        )
    return boxes


def _as_image_size(image_size):
    size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    if len(size) != 2 or not all(np.isscalar(s) and s > 0 for s in size):
        raise ValueError(
            "`image_size` must be a positive side or (height, width). "
            f"Received: image_size={image_size!r}"
        )
    return float(size[0]), float(size[1])


def dilated_box_cells(boxes, grid_size, image_size):
    """`(N, H, W)` booleans: the grid cells whose centres lie in each box dilated by one cell.

    Args:
        boxes: `(N, 4)` boxes `(x, y, w, h)` in image pixels.
        grid_size: `(H, W)`, the attention grid.
        image_size: the image side in pixels, or `(height, width)`.
    """
    height, width = int(grid_size[0]), int(grid_size[1])
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    image_height, image_width = _as_image_size(image_size)
    cell_h, cell_w = image_height / height, image_width / width
    rows = (np.arange(height) + 0.5) * cell_h  # cell centres, y
    cols = (np.arange(width) + 0.5) * cell_w  # cell centres, x
    x, y, w, h = (boxes[:, k, None] for k in range(4))
    inside_rows = (rows >= y - cell_h) & (rows <= y + h + cell_h)  # (N, H)
    inside_cols = (cols >= x - cell_w) & (cols <= x + w + cell_w)  # (N, W)
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def attention_measures(attention_maps, boxes, image_size):
    """Per-image measures of every map against the ground-truth boxes.

    Args:
        attention_maps: `(N, H, W)` or `(N, H, W, P)` non-negative maps; each is divided by its sum.
        boxes: `(N, 4)` ground-truth boxes `(x, y, w, h)` in image pixels.
        image_size: the image side in pixels, or `(height, width)`.

    Returns:
        A dict of float arrays: `"peak_mass"`, `"pointing_hit"` (0 or 1) and `"mass_in_box"`,
        each `(N, P)`, and `"chance"` `(N,)`, the share of cells inside the dilated box.
    """
    maps = _as_maps(attention_maps)
    count, height, width, parts = maps.shape
    boxes = _as_boxes(boxes, count)
    inside = dilated_box_cells(boxes, (height, width), image_size)  # (N, H, W)
    flat = maps.reshape(count, height * width, parts)
    inside_flat = inside.reshape(count, height * width)
    peak = flat.argmax(axis=1)  # (N, P)
    return {
        "peak_mass": flat.max(axis=1),
        "pointing_hit": np.take_along_axis(inside_flat, peak, axis=1).astype(np.float64),
        "mass_in_box": np.einsum("nkp,nk->np", flat, inside_flat.astype(np.float64)),
        "chance": inside_flat.mean(axis=1),
    }


def attention_report(attention_maps, boxes, image_size):
    """Summary of `attention_measures` over a test set, beside each chance level.

    With several part maps the report names the best part, the one with the highest pointing
    rate over the whole set (ties: the larger mass in the box), and gives its figures; every
    part's figures are listed too.

    Args:
        attention_maps: `(N, H, W)` or `(N, H, W, P)` maps.
        boxes: `(N, 4)` ground-truth boxes `(x, y, w, h)` in image pixels.
        image_size: the image side in pixels, or `(height, width)`.

    Returns:
        A dict of floats: `pointing_game`, `mass_in_box` (the best part's means),
        `chance` (the share of cells inside the dilated box, the chance level of both),
        `peak_mass` (the best part's mean), `uniform_peak_mass` (`1 / (H·W)`), `best_part`, and
        `per_part`: lists of each part's `pointing_game`, `mass_in_box` and `peak_mass`.

    Example:

    ```python
    maps = model.predict(images)["attention_maps"]          # (N, H, W, P)
    report = attention_report(maps, boxes, image_size=224)
    report["pointing_game"], report["chance"]
    ```
    """
    measures = attention_measures(attention_maps, boxes, image_size)
    pointing = measures["pointing_hit"].mean(axis=0)
    mass = measures["mass_in_box"].mean(axis=0)
    peak = measures["peak_mass"].mean(axis=0)
    best = int(np.lexsort((-mass, -pointing))[0])
    height, width = np.asarray(attention_maps).shape[1:3]
    return {
        "pointing_game": float(pointing[best]),
        "mass_in_box": float(mass[best]),
        "chance": float(measures["chance"].mean()),
        "peak_mass": float(peak[best]),
        "uniform_peak_mass": 1.0 / (height * width),
        "best_part": best,
        "per_part": {
            "pointing_game": pointing.tolist(),
            "mass_in_box": mass.tolist(),
            "peak_mass": peak.tolist(),
        },
    }

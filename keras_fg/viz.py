"""Attention overlays and re-identification rankings as matplotlib figures.

Figures are built with `matplotlib.figure.Figure` on an Agg canvas, never
through `pyplot`: nothing here opens a window or changes the user's
matplotlib backend, and it all runs on headless training machines.

Images are `(H, W, 3)` arrays (or `(H, W)` / `(H, W, 1)` grey) of uint8, or
of floats in [0, 255]. Attention maps are on any grid `(h, w)`; they are
upsampled to the image with pixel centres aligned (`(i + ½)·H/h − ½`),
the convention of `tf.image.resize`.

Example:

```python
from keras_fg import viz

figure = viz.attention_grid(images, part_maps, predicted=pred, true=labels,
                            class_names=names, path="attention.png")
tf.summary.image("attention", viz.to_image_array(figure)[None], step=epoch)
```
"""

import numbers

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CORRECT_COLOR = "tab:green"
WRONG_COLOR = "tab:red"
PEAK_MARKER = dict(marker="+", markersize=14, markeredgewidth=2.5, linestyle="none", color="white")
PART_MARKER = dict(
    marker="o", markersize=8, markeredgewidth=1.5, linestyle="none", markeredgecolor="white"
)


def _as_rgb_image(image, name="image"):
    """`image` as an `(H, W, 3)` uint8 array; floats are taken in [0, 255]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(
            f"`{name}` must have shape (H, W, 3), (H, W, 1) or (H, W). "
            f"Received: {name}.shape={image.shape}"
        )
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0, 255)).astype(np.uint8)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _bilinear_matrix(source_size, target_size):
    """`(target, source)` bilinear weights, pixel centres aligned, edges clamped."""
    positions = (np.arange(target_size) + 0.5) * source_size / target_size - 0.5
    positions = np.clip(positions, 0, source_size - 1)
    return np.maximum(0.0, 1.0 - np.abs(positions[:, None] - np.arange(source_size)))


def upsample_map(attention_map, size, vmax=None):
    """Bilinearly upsamples an attention map and divides it by `vmax`.

    `up = A_y · M · A_xᵀ` with bilinear interpolation matrices `A_y (H, h)`
    and `A_x (W, w)`, then `clip(up / vmax, 0, 1)`. The scale starts at 0,
    not at the map's minimum: a uniform map stays uniform (one colour), and
    a map that is barely above uniform stays barely brighter. The peak stays
    in the image region of the peak cell.

    Args:
        attention_map: non-negative array of shape `(h, w)`.
        size: `(H, W)`, the output size.
        vmax: positive number, the value drawn at full heat. Default: the
            map's own maximum. Pass the same `vmax` to compare several maps,
            or `1.0` for the share of a map that sums to one.

    Returns:
        A float32 array of shape `(H, W)` with values in [0, 1].
    """
    attention_map = np.asarray(attention_map, dtype=np.float64)
    if attention_map.ndim != 2:
        raise ValueError(
            "`attention_map` must have shape (h, w). "
            f"Received: attention_map.shape={attention_map.shape}"
        )
    if (
        len(size) != 2
        or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in size)
        or min(size) <= 0
    ):
        raise ValueError(f"`size` must be two positive ints (H, W). Received: size={size!r}")
    if vmax is None:
        vmax = attention_map.max()
    elif not isinstance(vmax, numbers.Real) or isinstance(vmax, bool) or not vmax > 0:
        raise ValueError(f"`vmax` must be a positive number. Received: vmax={vmax!r}")
    if not vmax > 0:
        return np.zeros(size, dtype=np.float32)
    upsampled = (
        _bilinear_matrix(attention_map.shape[0], size[0])
        @ attention_map
        @ _bilinear_matrix(attention_map.shape[1], size[1]).T
    )
    return np.clip(upsampled / vmax, 0.0, 1.0).astype(np.float32)


def overlay(image, attention_map, alpha=0.5, colormap="jet", vmax=None):
    """Blends a colour-mapped attention map over an image.

        out = (1 − alpha) · image + alpha · 255 · colormap(upsample_map(M, vmax))

    With the default "jet" the attended places turn red and the rest blue.

    Args:
        image: `(H, W, 3)` uint8, or floats in [0, 255].
        attention_map: `(h, w)` array on any grid.
        alpha: Float in [0, 1], the weight of the heat map.
        colormap: Name of a matplotlib colormap.
        vmax: the map value drawn at full heat (`upsample_map`); default the
            map's maximum.

    Returns:
        An `(H, W, 3)` uint8 array.
    """
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must be a number in [0, 1]. Received: alpha={alpha!r}")
    image = _as_rgb_image(image)
    heat = matplotlib.colormaps[colormap](upsample_map(attention_map, image.shape[:2], vmax))
    heat = heat[..., :3]
    blended = (1 - alpha) * image + alpha * 255.0 * heat
    return np.round(blended).astype(np.uint8)


def _peak_xy(attention_map, image_size):
    """Image coordinates `(x, y)` of the centre of the map's argmax cell."""
    map_height, map_width = attention_map.shape
    row, col = np.unravel_index(np.argmax(attention_map), attention_map.shape)
    return (
        (col + 0.5) * image_size[1] / map_width - 0.5,
        (row + 0.5) * image_size[0] / map_height - 0.5,
    )


def _new_figure(rows, cols, cell_size, dpi):
    figsize = (cols * cell_size, rows * (cell_size + 0.5))
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def _check_labels(name, labels, count):
    if labels is not None and len(labels) != count:
        raise ValueError(
            f"`{name}` must have one entry per image ({count}). Received: len({name})={len(labels)}"
        )


def attention_grid(
    images,
    attention_maps,
    predicted=None,
    true=None,
    class_names=None,
    mark_peaks=True,
    path=None,
    part_names=None,
    alpha=0.5,
    colormap="jet",
    vmax=None,
    cell_size=2.0,
    dpi=100,
):
    """Draws each image beside the overlays of its attention maps.

    One row per image: the image, then one overlay per part map (MA-CNN's P
    part maps) or the single spatial attention map (DASRBN). The image's
    title gives the predicted and true classes, green when they agree and
    red when not. With `mark_peaks`, a white "+" marks the peak (the centre
    of the argmax cell, in image coordinates) of each map on its overlay, and
    a dot in the part's colour (that of its column title) marks it on the image.

    Every overlay shares one colour scale, from 0 to `vmax`, and is labelled
    with its peak mass, `max M / Σ M` (a uniform `h×w` map has `1 / (h·w)`):
    a flat map looks flat beside a peaked one.

    Args:
        images: `(N, H, W, 3)` images, uint8 or floats in [0, 255].
        attention_maps: `(N, h, w)` single maps or `(N, h, w, P)` part maps.
        predicted: Optional `N` predicted class indices.
        true: Optional `N` true class indices.
        class_names: Optional sequence (or dict) mapping an index to its name.
        mark_peaks: Whether to mark the peak of each map.
        path: Optional path; the figure is saved there as PNG.
        part_names: Optional `P` column titles; "part 1", ... by default.
        alpha: Weight of the heat map in each overlay.
        colormap: Name of a matplotlib colormap.
        vmax: the share of a map's mass drawn at full heat. Default: the
            largest share of any cell of the maps drawn.
        cell_size: Width of one image in inches.
        dpi: Resolution of the figure and of the PNG.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    images = np.asarray(images)
    attention_maps = np.asarray(attention_maps, dtype=np.float32)
    if attention_maps.ndim not in (3, 4):
        raise ValueError(
            "`attention_maps` must have shape (N, h, w) or (N, h, w, P). "
            f"Received: attention_maps.shape={attention_maps.shape}"
        )
    if images.ndim not in (3, 4) or len(images) != len(attention_maps):
        raise ValueError(
            "`images` must be a batch of N images, one per attention map. Received: "
            f"images.shape={images.shape}, attention_maps.shape={attention_maps.shape}"
        )
    if attention_maps.ndim == 3:
        attention_maps = attention_maps[..., None]
    if not np.all(np.isfinite(attention_maps)) or np.any(attention_maps < 0):
        raise ValueError("`attention_maps` must be finite and non-negative.")
    totals = attention_maps.sum(axis=(1, 2), keepdims=True)
    shares = attention_maps / np.where(totals > 0, totals, 1.0)  # Each map sums to one.
    if vmax is None:
        vmax = float(shares.max()) or 1.0
    count, parts = len(images), attention_maps.shape[-1]
    _check_labels("predicted", predicted, count)
    _check_labels("true", true, count)
    if part_names is None:
        part_names = ["attention"] if parts == 1 else [f"part {p + 1}" for p in range(parts)]
    _check_labels("part_names", part_names, parts)

    def name(index):
        return str(index) if class_names is None else str(class_names[int(index)])

    figure, axes = _new_figure(count, parts + 1, cell_size, dpi)
    part_colors = matplotlib.colormaps["tab10"].colors
    for n in range(count):
        image = _as_rgb_image(images[n], "images[n]")
        lines = []
        if predicted is not None:
            lines.append(f"pred: {name(predicted[n])}")
        if true is not None:
            lines.append(f"true: {name(true[n])}")
        color = "black"
        if predicted is not None and true is not None:
            color = CORRECT_COLOR if int(predicted[n]) == int(true[n]) else WRONG_COLOR
        axes[n, 0].imshow(image)
        axes[n, 0].set_title("\n".join(lines), color=color, fontsize=9)
        for p in range(parts):
            ax = axes[n, p + 1]
            ax.imshow(overlay(image, shares[n, :, :, p], alpha, colormap, vmax))
            part_color = part_colors[p % len(part_colors)]
            peak = f"peak {shares[n, :, :, p].max():.2f}"
            title = f"{part_names[p]}\n{peak}" if n == 0 else peak
            ax.set_title(title, color=part_color, fontsize=9)
            if mark_peaks:
                x, y = _peak_xy(attention_maps[n, :, :, p], image.shape[:2])
                ax.plot([x], [y], gid="peak", **PEAK_MARKER)
                axes[n, 0].plot([x], [y], markerfacecolor=part_color, gid="peak", **PART_MARKER)
        for ax in axes[n]:
            ax.set_axis_off()
    if path is not None:
        figure.savefig(path, format="png")
    return figure


def to_image_array(figure):
    """Renders a figure to an `(H, W, 3)` uint8 RGB array.

    For `tf.summary.image` (add a batch axis) or any image writer. Figures
    from pyplot keep their canvas when it is Agg-based.
    """
    canvas = figure.canvas
    if not isinstance(canvas, FigureCanvasAgg):
        canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def reid_ranking_figure(
    query_image,
    gallery_images,
    matches=None,
    path=None,
    distances=None,
    cell_size=1.5,
    dpi=100,
):
    """Draws a query beside its top-k gallery images, framed by correctness.

    Each gallery image is framed green when its person id matches the
    query's, red when it does not, and left unframed when unknown.

    Args:
        query_image: `(H, W, 3)` image, uint8 or floats in [0, 255].
        gallery_images: The `k` ranked gallery images, best first.
        matches: Optional `k` booleans (or None for unknown), whether each
            gallery image shows the query's person.
        path: Optional path; the figure is saved there as PNG.
        distances: Optional `k` distances, printed under the ranks.
        cell_size: Width of one image in inches.
        dpi: Resolution of the figure and of the PNG.

    Returns:
        The `matplotlib.figure.Figure`.
    """
    count = len(gallery_images)
    _check_labels("matches", matches, count)
    _check_labels("distances", distances, count)
    figure, axes = _new_figure(1, count + 1, cell_size, dpi)
    axes = axes[0]
    axes[0].imshow(_as_rgb_image(query_image, "query_image"))
    axes[0].set_title("query", fontsize=9)
    axes[0].set_axis_off()
    for k in range(count):
        ax = axes[k + 1]
        ax.imshow(_as_rgb_image(gallery_images[k], "gallery_images[k]"))
        title = f"rank {k + 1}"
        if distances is not None:
            title += f"\n{float(distances[k]):.3f}"
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        match = None if matches is None else matches[k]
        for spine in ax.spines.values():
            if match is None:
                spine.set_visible(False)
            else:
                spine.set_color(CORRECT_COLOR if match else WRONG_COLOR)
                spine.set_linewidth(4)
    if path is not None:
        figure.savefig(path, format="png")
    return figure

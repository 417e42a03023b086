"""Tests for keras_fg.viz: upsampling, overlays, attention grids, re-ID rankings."""

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import tensorflow as tf
from matplotlib.colors import to_rgb

from keras_fg import viz


def planted_map(shape, row, col):
    attention_map = np.zeros(shape, "float32")
    attention_map[row, col] = 1.0
    return attention_map


def random_image(height=48, width=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype("uint8")


def test_upsample_map_matches_tf_resize_divided_by_vmax():
    attention_map = np.random.default_rng(1).uniform(size=(5, 7)).astype("float32")
    expected = tf.image.resize(attention_map[..., None], (20, 21), method="bilinear")
    expected = expected.numpy()[..., 0]
    upsampled = viz.upsample_map(attention_map, (20, 21))
    assert upsampled.shape == (20, 21) and upsampled.dtype == np.float32
    np.testing.assert_allclose(upsampled, expected / attention_map.max(), atol=1e-5)
    np.testing.assert_allclose(
        viz.upsample_map(attention_map, (20, 21), vmax=2.0), expected / 2.0, atol=1e-5
    )
    np.testing.assert_array_equal(viz.upsample_map(attention_map, (4, 4), vmax=1e-3), 1.0)


def test_upsample_map_keeps_the_peak_in_its_cell_and_a_flat_map_flat():
    upsampled = viz.upsample_map(planted_map((6, 8), 4, 2), (48, 64))
    row, col = np.unravel_index(np.argmax(upsampled), upsampled.shape)
    assert 32 <= row < 40 and 16 <= col < 24  # the 8×8 block of cell (4, 2)
    # Min-max rescaling would draw a 1 % ripple as a full-range peak; this draws it flat.
    ripple = np.full((6, 8), 1 / 48) * (1 + 0.01 * np.random.default_rng(0).uniform(size=(6, 8)))
    assert viz.upsample_map(ripple, (12, 16)).min() > 0.98
    np.testing.assert_array_equal(viz.upsample_map(np.zeros((3, 3)), (6, 6)), np.zeros((6, 6)))


@pytest.mark.parametrize("vmax", [0, -1.0, "1"])
def test_upsample_map_rejects_a_bad_vmax(vmax):
    with pytest.raises(ValueError, match=f"Received: vmax={vmax!r}"):
        viz.upsample_map(np.ones((2, 2)), (4, 4), vmax=vmax)


def test_overlay_shape_and_dtype():
    attention_map = np.random.rand(6, 8)
    for image in (random_image(), random_image().astype("float32"), random_image()[..., 0]):
        blended = viz.overlay(image, attention_map)
        assert blended.shape == (48, 64, 3) and blended.dtype == np.uint8


def test_overlay_is_the_documented_blend():
    image, attention_map = random_image(), np.random.rand(6, 8)
    heat = 255 * matplotlib.colormaps["viridis"](viz.upsample_map(attention_map, (48, 64)))[..., :3]
    np.testing.assert_array_equal(viz.overlay(image, attention_map, alpha=0.0), image)
    np.testing.assert_array_equal(
        viz.overlay(image, attention_map, alpha=1.0, colormap="viridis"), np.round(heat)
    )
    np.testing.assert_allclose(
        viz.overlay(image, attention_map, alpha=0.3, colormap="viridis"),
        0.7 * image + 0.3 * heat,
        atol=0.5 + 1e-6,
    )


def test_overlay_heat_is_largest_at_the_planted_peak():
    image = random_image()
    blended = viz.overlay(image, planted_map((6, 8), 4, 2), alpha=0.5)
    # Recover the heat colour, then the map value whose jet colour is nearest to it.
    heat = (blended.astype(float) - 0.5 * image) / (0.5 * 255)
    lut = matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3]
    value = np.argmin(((heat[..., None, :] - lut) ** 2).sum(-1), axis=-1)
    row, col = np.unravel_index(np.argmax(value), value.shape)
    assert 32 <= row < 40 and 16 <= col < 24
    # Pixel centres sit 1/16 of a cell off the cell centre: (15/16)² of full heat at most.
    assert value[row, col] > 0.87 * 255 and value[0, 63] < 5


def bird_batch(parts=None, count=2):
    """Images with one planted peak per map: map p of image n peaks at cell (n + p, 5 − p)."""
    images = np.stack([random_image(56, 56, seed=n) for n in range(count)])
    shape = (7, 7) if parts is None else (7, 7, parts)
    maps = np.zeros((count, *shape), "float32")
    for n in range(count):
        for p in range(parts or 1):
            maps[(n, n + p, 5 - p) + (() if parts is None else (p,))] = 1.0
    return images, maps


@pytest.mark.parametrize("parts", [None, 3])
def test_attention_grid_writes_a_png(tmp_path, parts):
    images, maps = bird_batch(parts)
    path = tmp_path / "grid.png"
    figure = viz.attention_grid(images, maps, predicted=[0, 1], true=[0, 2], path=path, dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = matplotlib.image.imread(path)
    columns = 1 + (parts or 1)
    # Two rows of cells 2.0 in wide and 2.5 in tall, at 50 dpi.
    assert png.shape == (250, 100 * columns, 4)
    assert png[..., :3].std() > 0.1  # not a blank page
    assert len(figure.axes) == 2 * columns


@pytest.mark.parametrize("parts", [None, 3])
def test_attention_grid_marks_each_peak_at_its_image_coordinates(parts):
    images, maps = bird_batch(parts)
    figure = viz.attention_grid(images, maps)
    columns = 1 + (parts or 1)
    for n in range(2):
        row = figure.axes[n * columns : (n + 1) * columns]
        expected = [((5 - p + 0.5) * 8 - 0.5, (n + p + 0.5) * 8 - 0.5) for p in range(parts or 1)]
        on_overlays = [
            (line.get_xdata()[0], line.get_ydata()[0]) for ax in row[1:] for line in ax.lines
        ]
        on_image = [(line.get_xdata()[0], line.get_ydata()[0]) for line in row[0].lines]
        assert on_overlays == expected and on_image == expected
    unmarked = viz.attention_grid(images, maps, mark_peaks=False)
    assert not any(ax.lines for ax in unmarked.axes)


def test_attention_grid_titles_are_green_when_right_and_red_when_wrong():
    images, maps = bird_batch(parts=2)
    figure = viz.attention_grid(
        images, maps, predicted=[0, 1], true=[0, 2], class_names=["tern", "gull", "auk"]
    )
    right, wrong = figure.axes[0].title, figure.axes[3].title
    assert right.get_text() == "pred: tern\ntrue: tern"
    assert wrong.get_text() == "pred: gull\ntrue: auk"
    assert to_rgb(right.get_color()) == to_rgb(viz.CORRECT_COLOR)
    assert to_rgb(wrong.get_color()) == to_rgb(viz.WRONG_COLOR)


def test_attention_grid_shares_one_scale_and_labels_each_peak_mass():
    images, _ = bird_batch()
    peaked = np.full((7, 7), 0.2 / 48)
    peaked[3, 3] = 0.8
    flat = np.full((7, 7), 1 / 49)
    maps = np.stack([np.stack([peaked, flat], -1)] * 2)
    figure = viz.attention_grid(images, maps, mark_peaks=False)
    assert [ax.get_title() for ax in figure.axes[1:3]] == ["part 1\npeak 0.80", "part 2\npeak 0.02"]
    assert [ax.get_title() for ax in figure.axes[4:6]] == ["peak 0.80", "peak 0.02"]
    # The flat map is drawn at 0.02 / 0.8 of full heat everywhere: dark, with no peak.
    flat_overlay = figure.axes[2].images[0].get_array()
    np.testing.assert_array_equal(flat_overlay, viz.overlay(images[0], flat, vmax=0.8))
    heat = flat_overlay.astype(float) - 0.5 * images[0]
    assert np.ptp(heat.reshape(-1, 3), axis=0).max() <= 1.0  # one colour, up to rounding


def test_to_image_array_renders_the_whole_figure():
    images, maps = bird_batch(parts=2)
    figure = viz.attention_grid(images, maps, dpi=40)
    array = viz.to_image_array(figure)
    assert array.dtype == np.uint8 and array.shape == (200, 240, 3)
    assert array.std() > 20


def test_figures_leave_the_global_backend_alone():
    backend = dict.__getitem__(matplotlib.rcParams, "backend")
    images, maps = bird_batch()
    viz.to_image_array(viz.attention_grid(images, maps, dpi=20))
    viz.reid_ranking_figure(images[0], images, [True, False], dpi=20)
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend


def test_reid_ranking_figure_frames_matches_green_and_mismatches_red(tmp_path):
    gallery = np.full((3, 64, 32, 3), 128, "uint8")
    path = tmp_path / "ranking.png"
    figure = viz.reid_ranking_figure(gallery[0], gallery, [True, False, None], path=path, dpi=60)
    png = np.round(matplotlib.image.imread(path)[..., :3] * 255)
    height = png.shape[0]

    def left_frame_colour(ax):
        box = ax.get_window_extent()
        row, col = int(height - (box.y0 + box.y1) / 2), int(round(box.x0))
        return png[row - 1 : row + 2, col - 1 : col + 2].reshape(-1, 3).mean(0)

    green, red = (255 * np.array(to_rgb(c)) for c in (viz.CORRECT_COLOR, viz.WRONG_COLOR))
    np.testing.assert_allclose(left_frame_colour(figure.axes[1]), green, atol=3)
    np.testing.assert_allclose(left_frame_colour(figure.axes[2]), red, atol=3)
    unframed = left_frame_colour(figure.axes[3])
    assert np.abs(unframed - green).max() > 60 and np.abs(unframed - red).max() > 60
    assert [ax.get_title() for ax in figure.axes] == ["query", "rank 1", "rank 2", "rank 3"]


def test_bad_arguments():
    images, maps = bird_batch()
    with pytest.raises(ValueError, match=r"attention_map.shape=\(2, 3, 4\)"):
        viz.upsample_map(np.zeros((2, 3, 4)), (8, 8))
    with pytest.raises(ValueError, match="size="):
        viz.upsample_map(np.zeros((2, 3)), (8, 0))
    with pytest.raises(ValueError, match="alpha=1.5"):
        viz.overlay(images[0], maps[0], alpha=1.5)
    with pytest.raises(ValueError, match=r"image.shape=\(56, 56, 4\)"):
        viz.overlay(np.zeros((56, 56, 4)), maps[0])
    with pytest.raises(ValueError, match=r"attention_maps.shape=\(2, 7\)"):
        viz.attention_grid(images, maps[:, 0])
    with pytest.raises(ValueError, match=r"one per attention map.*images.shape=\(1, 56, 56, 3\)"):
        viz.attention_grid(images[:1], maps)
    with pytest.raises(ValueError, match=r"len\(true\)=3"):
        viz.attention_grid(images, maps, true=[0, 1, 2])
    with pytest.raises(ValueError, match=r"len\(matches\)=1"):
        viz.reid_ranking_figure(images[0], images, matches=[True])

import io

import numpy as np
import pytest
from PIL import Image

from padim_core.viz import (
    CONTOUR_COLOR,
    heatmap_overlay,
    roc_curve_figure,
    save_png,
    score_histogram_figure,
)


@pytest.fixture
def image() -> np.ndarray:
    return np.full((48, 64, 3), 128, np.uint8)


def _is_contour(overlay: np.ndarray) -> np.ndarray:
    return (overlay == CONTOUR_COLOR).all(axis=-1)


def test_overlay_shape_dtype_and_colour_scale(image):
    anomaly_map = np.zeros((48, 64), np.float32)
    anomaly_map[:, 32:] = 1.0
    overlay = heatmap_overlay(image, anomaly_map)
    assert overlay.shape == (48, 64, 3) and overlay.dtype == np.uint8
    low, high = overlay[0, 0], overlay[0, -1]
    assert low[2] > low[0]  # jet: low values blue
    assert high[0] > high[2]  # high values red
    # with a wider shared range the same map is cooler, and the scale is clipped, not wrapped
    shared = heatmap_overlay(image, anomaly_map, vmin=0.0, vmax=10.0)
    assert shared[0, -1, 0] < high[0]
    assert (heatmap_overlay(image, anomaly_map, alpha=0.0) == image).all()


def test_overlay_of_a_flat_map_does_not_divide_by_zero(image):
    overlay = heatmap_overlay(image, np.full((48, 64), 3.0))
    assert overlay.dtype == np.uint8 and np.ptp(overlay.reshape(-1, 3), axis=0).max() == 0


def test_mask_contour_is_drawn_on_the_mask_boundary(image):
    mask = np.zeros((48, 64), bool)
    mask[10:30, 20:40] = True
    contour = _is_contour(heatmap_overlay(image, np.zeros((48, 64)), mask))
    assert contour[10, 20:40].all() and contour[29, 20:40].all()  # top and bottom edges of the mask
    assert contour[10:30, 20].all() and contour[10:30, 39].all()  # left and right edges
    assert not contour[15:25, 25:35].any()  # interior untouched
    assert not contour[:5].any() and not contour[:, :15].any()  # far from the mask untouched
    assert not _is_contour(heatmap_overlay(image, np.zeros((48, 64)))).any()


def test_overlay_shape_mismatch_names_both_shapes(image):
    with pytest.raises(ValueError, match=r"\(32, 32\).*\(48, 64, 3\)"):
        heatmap_overlay(image, np.zeros((32, 32)))
    with pytest.raises(ValueError, match=r"mask shape \(48, 63\).*\(48, 64, 3\)"):
        heatmap_overlay(image, np.zeros((48, 64)), np.zeros((48, 63), bool))
    with pytest.raises(ValueError, match="uint8"):
        heatmap_overlay(image.astype(np.float32), np.zeros((48, 64)))


def test_save_png_is_atomic_and_round_trips(tmp_path, image):
    path = save_png(tmp_path / "nested" / "overlay.png", image)
    assert path == tmp_path / "nested" / "overlay.png"
    assert (np.asarray(Image.open(path)) == image).all()
    save_png(path, np.zeros((4, 4), np.uint8))  # replaces the existing file
    assert np.asarray(Image.open(path)).shape == (4, 4)
    assert [p.name for p in path.parent.iterdir()] == ["overlay.png"]  # no temporary files left


def test_save_png_rejects_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "a.png", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="not a PNG"):
        save_png(tmp_path / "b.png", b"GIF89a")
    assert list(tmp_path.iterdir()) == []


def _open_png(data: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "PNG"
    picture.load()
    return picture


def test_roc_curve_figure_is_png_and_saves(tmp_path):
    data = roc_curve_figure(np.array([0.0, 0.2, 1.0]), np.array([0.0, 0.9, 1.0]), 0.85, "bottle")
    assert _open_png(data).size[0] > 100
    assert save_png(tmp_path / "roc.png", data).read_bytes() == data


def test_score_histogram_figure_is_png():
    rng = np.random.default_rng(0)
    groups = {"good": rng.normal(0, 1, 50), "crack": rng.normal(3, 1, 20), "empty": np.array([np.nan])}
    _open_png(score_histogram_figure(groups, threshold=1.5, title="bottle"))
    _open_png(score_histogram_figure({"good": np.ones(3)}, threshold=None, title="flat"))
    with pytest.raises(ValueError, match="no finite scores"):
        score_histogram_figure({"good": np.array([])}, threshold=None, title="x")

"""Pictures for people: heatmap overlays, ROC curves and score histograms as PNG.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot, so nothing
global is left behind in long-lived Ray workers and no display backend is needed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from skimage.segmentation import find_boundaries

from padim_core.safe_write import write_file

CONTOUR_COLOR = (255, 0, 255)  # magenta: not a colour of the jet map, so the outline stays visible
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def heatmap_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a jet-coloured anomaly map over an RGB image, outlining the ground-truth mask.

    Pass the model's score range as `vmin`/`vmax` so that overlays of different images share
    one colour scale; the defaults (the map's own min and max) make every map look alarming.
    """
    image = np.asarray(image)
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if anomaly_map.shape != image.shape[:2]:
        raise ValueError(f"anomaly_map shape {anomaly_map.shape} does not match image shape {image.shape}")
    if mask is not None and np.shape(mask) != image.shape[:2]:
        raise ValueError(f"mask shape {np.shape(mask)} does not match image shape {image.shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    norm = Normalize(
        vmin=float(anomaly_map.min()) if vmin is None else vmin,
        vmax=float(anomaly_map.max()) if vmax is None else vmax,
        clip=True,
    )
    colored = colormaps["jet"](norm(anomaly_map), bytes=True)[..., :3]
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colored.astype(np.float32)
    overlay = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if mask is not None:
        overlay[find_boundaries(np.asarray(mask, dtype=bool), mode="thick")] = CONTOUR_COLOR
    return overlay


def save_png(path: str | Path, array: np.ndarray | bytes) -> Path:
    """Write an image array (uint8 [H, W], [H, W, 3] or [H, W, 4]) or PNG bytes, atomically.

    The file is written next to its destination and renamed into place, so a reader (or a
    crashed worker) never leaves a half-written PNG under the final name.
    """
    path = Path(path)
    if isinstance(array, bytes):
        if not array.startswith(_PNG_SIGNATURE):
            raise ValueError(f"bytes for {path} are not a PNG (no PNG signature)")
        data = array
    else:
        array = np.asarray(array)
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise ValueError(
                f"array for {path} must be uint8 [H, W], [H, W, 3] or [H, W, 4], got {array.dtype} {array.shape}"
            )
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        data = buffer.getvalue()
    return write_file(path, data)


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def roc_curve_figure(fpr: np.ndarray, tpr: np.ndarray, auroc: float, title: str) -> bytes:
    """The ROC curve with its AUROC in the legend, as PNG bytes."""
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    if fpr.shape != tpr.shape or fpr.ndim != 1:
        raise ValueError(f"fpr and tpr must be 1-D of equal length, got {fpr.shape} and {tpr.shape}")
    figure = Figure(figsize=(4.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(fpr, tpr, color="tab:blue", label=f"AUROC = {auroc:.3f}")
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="chance")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate", title=title)
    axes.legend(loc="lower right")
    return _png_bytes(figure)


def score_histogram_figure(scores_by_group: dict[str, np.ndarray], threshold: float | None, title: str) -> bytes:
    """Overlaid histograms of image scores per group (e.g. good vs each defect), as PNG bytes.

    All groups share one set of bins so their bars compare. NaN scores (images that could
    not be scored) are left out; the legend gives each group's count of plotted scores.
    """
    groups = {name: np.asarray(scores, dtype=np.float64).ravel() for name, scores in scores_by_group.items()}
    groups = {name: scores[np.isfinite(scores)] for name, scores in groups.items()}
    everything = np.concatenate([np.empty(0), *groups.values()])
    if everything.size == 0:
        raise ValueError(f"no finite scores to plot in groups {list(scores_by_group)}")
    bins = np.histogram_bin_edges(everything, bins=min(50, max(10, everything.size // 5)))
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    for name, scores in groups.items():
        axes.hist(scores, bins=bins, alpha=0.5, label=f"{name} (n={scores.size})")
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold = {threshold:.3g}")
    axes.set(xlabel="Image score", ylabel="Images", title=title)
    axes.legend()
    return _png_bytes(figure)


def severity_figure(panels: dict[str, dict[str, tuple[list[int], list[float | None]]]], title: str) -> bytes:
    """Figures against shift severity, as PNG bytes: one panel per figure (e.g. image AUROC),
    one line per shift. None (a figure the data cannot give) leaves a gap in its line."""
    if not panels:
        raise ValueError("no panels to plot")
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5.5 * columns, 4 * rows), layout="constrained")
    figure.suptitle(title)
    for index, (name, lines) in enumerate(panels.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        for shift, (severities, values) in lines.items():
            plotted = [np.nan if value is None else value for value in values]
            axes.plot(severities, plotted, marker="o", label=shift)
        axes.set(xlabel="Severity (0: unshifted)", ylabel=name, title=name)
        axes.set_xticks(sorted({s for severities, _ in lines.values() for s in severities}))
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize="small")
    return _png_bytes(figure)


def comparison_figure(rows: list[dict], titles: dict[str, str]) -> bytes:
    """Grouped bars, as PNG bytes: one panel per figure in `titles`, categories along the axis, one
    bar per detector. `rows` hold `category`, `detector` and the figures (None leaves a gap)."""
    if not rows:
        raise ValueError("no rows to plot")
    categories = list(dict.fromkeys(row["category"] for row in rows))
    detectors = list(dict.fromkeys(row["detector"] for row in rows))
    values = {(row["category"], row["detector"]): row for row in rows}
    columns = min(3, len(titles))
    figure = Figure(figsize=(4.5 * columns, 3.2 * -(-len(titles) // columns)), layout="constrained")
    width = 0.8 / len(detectors)
    for index, (key, title) in enumerate(titles.items()):
        axes = figure.add_subplot(-(-len(titles) // columns), columns, index + 1)
        for offset, detector in enumerate(detectors):
            heights = [np.nan if (values.get((c, detector)) or {}).get(key) is None else values[c, detector][key]
                       for c in categories]
            axes.bar(np.arange(len(categories)) + (offset - (len(detectors) - 1) / 2) * width, heights, width, label=detector)
        axes.set_xticks(np.arange(len(categories)), categories, rotation=30, ha="right")
        axes.set_title(title)
        axes.grid(axis="y", alpha=0.3)
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=len(detectors))
    return _png_bytes(figure)

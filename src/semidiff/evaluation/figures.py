"""Overlay figures: image, reference and prediction side by side, one row per case.

matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend
switch), so figures render on headless machines and inside a training loop without side effects.
Colours are fixed per class id, so the same structure has the same colour in every figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from semidiff.data.record import IGNORE_INDEX

__all__ = [
    "CLASS_COLOURS",
    "DPI",
    "PANEL_INCHES",
    "label_to_rgb",
    "overlay_figure_tensor",
    "overlay_panel",
    "overlay_rgb",
    "pick_slice",
]

#: RGB colour per class id (index 0 = background, never drawn). Okabe-Ito-like, distinguishable by
#: most colour-blind readers; cycles for more classes.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # green
    (240, 228, 66),  # yellow
    (213, 94, 0),  # vermillion
    (204, 121, 167),  # pink
    (0, 114, 178),  # blue
    (255, 255, 255),  # white
)

#: Size of one image panel in inches, and the resolution; a figure is ``3 * PANEL_INCHES * DPI``
#: pixels wide and ``rows * PANEL_INCHES * DPI`` plus a fixed header/legend band high.
PANEL_INCHES = 2.6
DPI = 100
_HEADER_INCHES = 0.45
_LEGEND_INCHES = 0.45
_ALPHA = 0.45


def class_colour(c: int) -> tuple[int, int, int]:
    return CLASS_COLOURS[0] if c == 0 else CLASS_COLOURS[1 + (c - 1) % (len(CLASS_COLOURS) - 1)]


def pick_slice(label_or_pred_3d: np.ndarray, axis: int = 0) -> int:
    """Index of the slice along ``axis`` with the most foreground (non-zero) voxels.

    Ties go to the first such slice; a volume without foreground gives the middle slice.
    """
    vol = np.asarray(label_or_pred_3d) != 0
    other = tuple(a for a in range(vol.ndim) if a != axis % vol.ndim)
    counts = vol.sum(axis=other)
    if counts.max(initial=0) == 0:
        return int(vol.shape[axis] // 2)
    return int(np.argmax(counts))


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Image to ``(H, W, 3)`` floats in [0, 1], contrast from the 1st-99th percentiles.

    Accepts ``(H, W)`` (grey), ``(H, W, 3)`` or ``(3, H, W)`` (colour, e.g. endoscopy) and
    ``(1, H, W)``; other channel-first stacks show their first channel.
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return image.astype(np.float64) / 255.0  # already a display image (display_colour)
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        if img.shape[-1] in (3, 4) and img.shape[0] not in (1, 3):
            img = img[..., :3]
        elif img.shape[0] == 3:
            img = np.moveaxis(img, 0, -1)
        else:
            img = img[0]
    if img.ndim != 2 and not (img.ndim == 3 and img.shape[-1] == 3):
        raise ValueError(f"cannot show an image of shape {np.shape(image)} (expected 2D, or 2D with 3 channels)")
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
    return img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)


def display_colour(image: np.ndarray, max_side: int = 480) -> np.ndarray:
    """A ``(3, H, W)`` colour frame as a ``(h, w, 3)`` uint8 display image, its longest side at most ``max_side``.

    The overlays of colour frames (endoscopy) keep this instead of the float frame: a panel shows a
    frame about 220 pixels wide, and three 854x480 float frames would make every bench record 3 MB.
    Contrast from the 1st-99th percentiles, then an integer area-average down-sampling.
    """
    rgb = _to_rgb(image)
    k = max(1, -(-max(rgb.shape[:2]) // max_side))
    if k > 1:
        h, w = rgb.shape[0] // k * k, rgb.shape[1] // k * k
        rgb = rgb[:h, :w].reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3))
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _resize_nearest(rgb: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    rows = np.minimum((np.arange(shape[0]) + 0.5) * rgb.shape[0] / shape[0], rgb.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * rgb.shape[1] / shape[1], rgb.shape[1] - 1).astype(int)
    return rgb[rows][:, cols]


def label_to_rgb(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` label map to ``(H, W, 3)`` uint8 colours (background black)."""
    mask = np.asarray(mask).astype(np.int64)
    lut = np.array([class_colour(c) for c in range(int(mask.max(initial=0)) + 1)], dtype=np.uint8)
    return lut[np.clip(mask, 0, None)]


def overlay_rgb(image: np.ndarray, mask: np.ndarray | None, alpha: float = _ALPHA) -> np.ndarray:
    """Blend class colours over a grey image; returns ``(H, W, 3)`` uint8.

    Args:
        image: ``(H, W)`` intensities (any range) or a colour image, see ``_to_rgb``.
        mask: ``(H, W)`` label map, or None for the plain grey image.
        alpha: opacity of the class colours.
    """
    rgb = _to_rgb(image)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != rgb.shape[:2]:
            # A down-sampled display image (display_colour) of the same frame: shown at the mask's size.
            ratio = np.array(mask.shape, float) / np.array(rgb.shape[:2], float) if mask.ndim == 2 else None
            if ratio is None or abs(ratio[0] - ratio[1]) > 0.02 * ratio.max() or ratio.min() < 1:
                raise ValueError(f"mask shape {mask.shape} differs from image shape {rgb.shape[:2]}")
            rgb = _resize_nearest(rgb, mask.shape)
        fg = (mask != 0) & (mask != IGNORE_INDEX)  # not-annotated pixels stay uncoloured, not a class colour
        colours = label_to_rgb(mask).astype(np.float64) / 255.0
        rgb[fg] = (1.0 - alpha) * rgb[fg] + alpha * colours[fg]
    return (rgb * 255.0 + 0.5).astype(np.uint8)


Row = tuple[str, np.ndarray, "np.ndarray | None", np.ndarray]


def _build_figure(rows: Sequence[Row], class_names: Sequence[str] | None, title: str | None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("overlay figure needs at least one row")
    n = len(rows)
    height = n * PANEL_INCHES + _HEADER_INCHES + _LEGEND_INCHES
    fig = Figure(figsize=(3 * PANEL_INCHES, height), dpi=DPI)
    FigureCanvasAgg(fig)
    # Fixed margins (no tight bbox) so the pixel size depends only on the number of rows.
    fig.subplots_adjust(
        left=0.02, right=0.98, wspace=0.04, hspace=0.14,
        top=1 - _HEADER_INCHES / height, bottom=_LEGEND_INCHES / height,
    )
    axes = fig.subplots(n, 3, squeeze=False)
    present: set[int] = set()
    for r, (case_id, image, truth, pred) in enumerate(rows):
        panels = [
            (overlay_rgb(image, None), "image"),
            (overlay_rgb(image, truth) if truth is not None else None, "reference"),
            (overlay_rgb(image, pred), "prediction"),
        ]
        for c, (rgb, name) in enumerate(panels):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if rgb is None:  # same extent as the image so the rows stay aligned
                ax.imshow(np.full(panels[0][0].shape, 217, np.uint8))
                ax.text(0.5, 0.5, "no reference", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            else:
                ax.imshow(rgb, interpolation="nearest")
            ax.set_title(f"{case_id}: {name}" if c == 0 else name, fontsize=9)
        for m in (truth, pred):
            if m is not None:
                present.update(int(v) for v in np.unique(m) if v != 0)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / height)
    # Legend: every named foreground class, plus any other class that appears.
    ids = set(range(1, len(class_names))) if class_names else set()
    handles = []
    for c in sorted(ids | present):
        name = str(class_names[c]) if class_names and c < len(class_names) else f"class {c}"
        handles.append(Patch(facecolor=np.array(class_colour(c)) / 255.0, edgecolor="0.3", label=name))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))
    return fig


def overlay_panel(
    rows: Sequence[Row],
    out_path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG grid: one row per case, columns image / reference overlay / prediction overlay.

    Args:
        rows: ``(case_id, image, truth or None, prediction)`` with 2D ``(H, W)`` arrays (for a 3D
            case pass one slice, e.g. :func:`pick_slice` of the reference).
        out_path: PNG path (folders are created).
        class_names: names indexed by class id (background first) for the legend.
        title: figure title (say which method, checkpoint and split).

    Returns:
        ``out_path`` as a Path. The image is ``3 * PANEL_INCHES * DPI`` pixels wide and
        ``(len(rows) * PANEL_INCHES + 0.9) * DPI`` high.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = _build_figure(rows, class_names, title)
    fig.savefig(out, dpi=DPI)
    return out


def overlay_figure_tensor(
    rows: Sequence[Row],
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> np.ndarray:
    """The :func:`overlay_panel` figure as an ``(H, W, 3)`` uint8 array (TensorBoard ``HWC``)."""
    fig = _build_figure(rows, class_names, title)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()

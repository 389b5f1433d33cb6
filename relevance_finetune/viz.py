"""Relevance pictures: heat-map overlays and the paper's before/after grid (Fig. 3), as PNG.

Figures are drawn on matplotlib's Agg canvas without ``pyplot``, so nothing here needs a display
or touches the global backend. Images are (3, H, W) tensors in [0, 1] or H x W x 3 uint8 arrays;
relevance maps are (H, W) in [0, 1], as returned by ``GAEHandle.explain``. The heat map is
blended pixel by pixel, its opacity growing with the relevance, so the image stays visible under
it, and a colour bar gives the scale.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ._files import atomic_path

__all__ = [
    "before_after_grid",
    "denormalize",
    "overlay",
    "prediction_title",
    "save_figure",
    "save_overlay",
]

ArrayLike = torch.Tensor | np.ndarray
_CELL_INCHES = 2.4
_TITLE_WIDTH = 26  # characters per title line
_RANGE_TOLERANCE = 1e-3


def denormalize(images: torch.Tensor, data_config: Mapping[str, Sequence[float]]) -> torch.Tensor:
    """Undo a timm data config's normalisation: (..., 3, H, W) model input -> [0, 1].

    ``data_config`` is e.g. ``timm.data.resolve_model_data_config(model)``; only its ``mean``
    and ``std`` are read.
    """
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"expected images of shape (..., 3, H, W), got {tuple(images.shape)}")
    shape = (3, 1, 1)
    mean = torch.as_tensor(data_config["mean"], dtype=images.dtype, device=images.device).view(shape)
    std = torch.as_tensor(data_config["std"], dtype=images.dtype, device=images.device).view(shape)
    return (images * std + mean).clamp(0, 1)


def prediction_title(label: str, probability: float, prefix: str = "Pred", true_label: str | None = None) -> str:
    """``"Pred: tabby cat (87%)"``: the caption of an overlay (``<1%`` below one percent), with
    ``", true: tiger cat"`` when the true class is known."""
    title = f"{prefix}: {label} ({probability:.0%})" if probability >= 0.01 else f"{prefix}: {label} (<1%)"
    return title if true_label is None else f"{title}, true: {true_label}"


def _as_numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _as_rgb(image: ArrayLike) -> np.ndarray:
    """A displayable H x W x 3 float array in [0, 1] from (3, H, W) or H x W x 3 input."""
    array = _as_numpy(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an image of shape (3, H, W) or (H, W, 3), got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"expected a float image in [0, 1] or uint8, got dtype {array.dtype}")
    _check_unit_range(array, "image", "un-normalise model inputs with viz.denormalize(images, data_config)")
    return array.clip(0, 1).astype(np.float32)


def _as_relevance(relevance: ArrayLike, size: tuple[int, int]) -> np.ndarray:
    array = _as_numpy(relevance)
    if array.shape != size:
        raise ValueError(f"expected a relevance map of shape {size} (the image's H, W), got {array.shape}")
    _check_unit_range(array, "relevance", "use GAEHandle.explain(images) or gae.normalize_relevance")
    return array.clip(0, 1).astype(np.float32)


def _check_unit_range(array: np.ndarray, what: str, hint: str) -> None:
    if np.isnan(array).any():
        raise ValueError(f"the {what} contains NaN")
    low, high = float(array.min()), float(array.max())
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"expected the {what} in [0, 1], got values in [{low:.3g}, {high:.3g}]: {hint}")


def _new_axes(rows: int, columns: int) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(_CELL_INCHES * columns, _CELL_INCHES * rows + 0.3 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, np.asarray(figure.subplots(rows, columns, squeeze=False))


def _show(ax: Axes, rgb: np.ndarray, title: str | None) -> None:
    ax.imshow(rgb, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(textwrap.fill(title, _TITLE_WIDTH), fontsize=9)


def _colorbar(figure: Figure, axes: Axes | list[Axes], cmap: str) -> None:
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=axes, fraction=0.046, pad=0.02, shrink=0.9)
    bar.set_label("relevance", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def overlay(
        image: ArrayLike,
        relevance: ArrayLike,
        title: str | None = None,
        cmap: str = "jet",
        alpha: float = 0.6,
        ax: Axes | None = None,
        colorbar: bool = True,
) -> Axes:
    """Draw ``relevance`` (H, W) in [0, 1] as a heat map blended over ``image`` on ``ax``.

    Each pixel's colour has opacity ``alpha * relevance``: irrelevant regions show the image
    unchanged, the most relevant ones keep ``1 - alpha`` of it. ``image`` is a (3, H, W)
    tensor/array in [0, 1] or an H x W x 3 uint8 array. Without ``ax`` a new Agg figure is made
    (``ax.figure``). ``colorbar`` adds the relevance scale beside ``ax``. Returns the axes.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = _as_rgb(image)
    heat = _as_relevance(relevance, rgb.shape[:2])
    if ax is None:
        ax = _new_axes(1, 1)[1][0, 0]
    _show(ax, rgb, title)
    ax.imshow(heat, cmap=cmap, alpha=alpha * heat, vmin=0, vmax=1, interpolation="bilinear")
    if colorbar:
        _colorbar(ax.figure, ax, cmap)
    return ax


def save_figure(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``figure`` as PNG atomically (temporary file in the same folder, then ``os.replace``).

    The file gets the permissions of any file the user creates (the umask applies).
    """
    path = Path(path)
    with atomic_path(path) as temporary, temporary.open("wb") as stream:
        figure.savefig(stream, format="png", dpi=dpi)
    return path


def save_overlay(
        path: str | Path,
        image: ArrayLike,
        relevance: ArrayLike,
        title: str | None = None,
        cmap: str = "jet",
        alpha: float = 0.6,
) -> Path:
    """Save one :func:`overlay` (with its colour bar) as a PNG at ``path``; returns the path."""
    ax = overlay(image, relevance, title=title, cmap=cmap, alpha=alpha)
    return save_figure(ax.figure, path)


def before_after_grid(
        images: Sequence[ArrayLike] | torch.Tensor,
        relevance_before: Sequence[ArrayLike] | torch.Tensor,
        relevance_after: Sequence[ArrayLike] | torch.Tensor,
        titles_before: Sequence[str],
        titles_after: Sequence[str],
        path: str | Path,
        row_labels: Sequence[str] = ("original", "finetuned"),
        cmap: str = "jet",
        alpha: float = 0.6,
) -> Path:
    """The paper's Fig. 3 layout, saved as a PNG at ``path``; returns the path.

    One column per image; rows: the input, the original model's relevance overlay titled with
    its prediction (e.g. :func:`prediction_title`), the finetuned model's overlay and title; one
    colour bar for both overlay rows. ``images`` as in :func:`overlay` (or a (B, 3, H, W)
    tensor), maps (B, H, W) in [0, 1].
    """
    columns = len(images)
    lengths = {len(relevance_before), len(relevance_after), len(titles_before), len(titles_after)}
    if columns == 0 or lengths != {columns}:
        raise ValueError(
            f"expected the same non-zero number of images, maps and titles, got {columns} images, "
            f"{len(relevance_before)}/{len(relevance_after)} maps, "
            f"{len(titles_before)}/{len(titles_after)} titles")
    if len(row_labels) != 2:
        raise ValueError(f"row_labels names the two overlay rows, got {list(row_labels)}")
    figure, axes = _new_axes(3, columns)
    for column in range(columns):
        _show(axes[0, column], _as_rgb(images[column]), None)
        overlay(images[column], relevance_before[column], titles_before[column], cmap, alpha, axes[1, column], False)
        overlay(images[column], relevance_after[column], titles_after[column], cmap, alpha, axes[2, column], False)
    for row, label in enumerate(("input", *row_labels)):
        axes[row, 0].set_ylabel(label, fontsize=11)
    _colorbar(figure, list(axes[1:].ravel()), cmap)
    return save_figure(figure, path)

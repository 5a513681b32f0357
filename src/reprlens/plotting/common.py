"""Shared figure helpers: optional matplotlib import, PNG saving, logging figures to Lightning loggers."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from reprlens.utils import require

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["figure_to_png", "image_grid", "log_figure", "require_matplotlib", "save_figure", "to_display_image"]


def require_matplotlib() -> Any:
    """Import matplotlib with the non-interactive Agg backend, or raise an ImportError naming the extra.

    Example:
        >>> plt = require_matplotlib()
        >>> fig = plt.figure(); plt.close(fig)
    """
    mpl = require("matplotlib", extra="plots", purpose="Plotting")
    if mpl.get_backend().lower() not in {"agg", "module://matplotlib_inline.backend_inline"}:
        try:
            mpl.use("Agg", force=False)
        except Exception:  # pragma: no cover - backend already fixed by the user
            pass
    import matplotlib.pyplot as plt

    return plt


def to_display_image(img: Tensor | np.ndarray) -> np.ndarray:
    """Turn a ``(C, H, W)`` / ``(H, W)`` tensor into an ``(H, W[, 3])`` float array in [0, 1] for imshow.

    Example:
        >>> to_display_image(torch.zeros(3, 4, 5)).shape
        (4, 5, 3)
    """
    if isinstance(img, Tensor):
        img = img.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if lo < 0.0 or hi > 1.0:
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return arr


def image_grid(
    rows: Sequence[Sequence[Tensor | np.ndarray]],
    *,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    cmaps: Sequence[str | None] | None = None,
    cell_size: float = 1.6,
    suptitle: str | None = None,
) -> Figure:
    """A grid of images: ``rows[i][j]`` is shown in row i, column j (colour images or heat maps).

    Args:
        rows: images per row; each image ``(C, H, W)``, ``(H, W)`` tensor or array.
        row_titles: one label per row (shown on the left).
        col_titles: one title per column.
        cmaps: colour map per row for single-channel images (default ``"viridis"``).
        cell_size: inches per cell.
        suptitle: figure title.

    Example:
        >>> fig = image_grid([[torch.rand(3, 8, 8), torch.rand(8, 8)]], row_titles=["x"])
        >>> len(fig.axes)
        2
    """
    plt = require_matplotlib()
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("image_grid needs at least one image, but got an empty grid.")
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_size * n_cols, cell_size * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        cmap = (cmaps[i] if cmaps is not None else None) or "viridis"
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.axis("off")
                continue
            arr = to_display_image(row[j])
            ax.imshow(arr, cmap=None if arr.ndim == 3 else cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            if i == 0 and col_titles is not None and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=8)
        if row_titles is not None and i < len(row_titles):
            axes[i][0].set_ylabel(row_titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def figure_to_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes (deterministic metadata, so reruns give identical files)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 100, close: bool = True) -> Path:
    """Save ``fig`` as a PNG at ``path`` (parents created), written atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(figure_to_png(fig, dpi=dpi))
    os.replace(tmp, path)
    if close:
        require_matplotlib().close(fig)
    return path


def _safe_name(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tag).strip("_") or "figure"


def log_figure(
    trainer: Any,
    tag: str,
    fig: Figure,
    *,
    step: int | None = None,
    dirpath: str | os.PathLike[str] | None = None,
    close: bool = True,
) -> Path | None:
    """Log a figure to every logger of ``trainer`` that takes images, and save it as a PNG.

    TensorBoard loggers get ``add_figure``; loggers with a ``log_image(key, images)`` method (W&B, Neptune,
    ...) get the rendered image. The PNG goes to ``dirpath`` (default ``<trainer.log_dir or
    default_root_dir>/figures``) as ``<tag>_step<step>.png``. Only global rank 0 writes.

    Returns:
        The PNG path written, or ``None`` on non-zero ranks.
    """
    plt = require_matplotlib()
    step = int(trainer.global_step if step is None else step)
    path: Path | None = None
    if getattr(trainer, "is_global_zero", True):
        for logger in getattr(trainer, "loggers", []) or []:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure(tag, fig, global_step=step, close=False)
            elif hasattr(logger, "log_image"):
                png = figure_to_png(fig)
                from PIL import Image

                try:
                    logger.log_image(key=tag, images=[Image.open(io.BytesIO(png))], step=step)
                except TypeError:  # pragma: no cover - loggers with another signature
                    pass
        if dirpath is None:
            base = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", ".")
            dirpath = Path(base) / "figures"
        path = save_figure(fig, Path(dirpath) / f"{_safe_name(tag)}_step{step}.png", close=False)
    if close:
        plt.close(fig)
    return path

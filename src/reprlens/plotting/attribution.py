"""Plotting helpers (attribution). Matplotlib is optional: `pip install 'reprlens[plots]'`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from reprlens.plotting.common import image_grid

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["plot_attribution_maps"]


def plot_attribution_maps(
    images: Tensor,
    maps: Tensor,
    *,
    dims: Sequence[int] | None = None,
    max_samples: int = 4,
    normalize: bool = True,
    dim_names: Sequence[str] | None = None,
    cmap: str = "viridis",
    suptitle: str | None = None,
) -> Figure:
    """Grid of input images and their per-dim attribution maps: one row per sample.

    Args:
        images: ``(N, C, H, W)`` inputs in [0, 1] (or ``(N, H, W)``).
        maps: ``(N, K, h, w)`` channel-aggregated maps (e.g. ``layer_attributions(..., transform="abs")``).
        dims: which dims to show (default: all, at most 8).
        max_samples: rows to show.
        normalize: min-max normalise each map to [0, 1] (:func:`reprlens.attribution.normalize_maps`);
            otherwise maps must already lie in [0, 1].
        dim_names: column titles for the shown dims (default ``"dim k"``).
        cmap: colour map of the heat maps.
        suptitle: figure title.

    Returns:
        The matplotlib figure (log it with :func:`reprlens.plotting.common.log_figure`).

    Example:
        >>> import torch
        >>> fig = plot_attribution_maps(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 4, 4))
        >>> len(fig.axes)
        8
    """
    from reprlens.attribution import normalize_maps

    if not isinstance(images, Tensor) or not isinstance(maps, Tensor):
        raise TypeError("Expected `images` and `maps` to be torch.Tensors.")
    if maps.ndim != 4:
        raise ValueError(
            f"Expected channel-aggregated `maps` of shape (N, K, H, W), but got shape {tuple(maps.shape)}; "
            "compute them with a transform ('abs', 'lin' or 'sqrt')."
        )
    if images.ndim not in (3, 4) or images.shape[0] != maps.shape[0]:
        raise ValueError(
            f"Expected `images` of shape (N, C, H, W) or (N, H, W) with N={maps.shape[0]}, but got {tuple(images.shape)}."
        )
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"Expected argument `max_samples` to be an integer >= 1, but got {max_samples!r}.")
    k = maps.shape[1]
    shown = list(range(min(k, 8))) if dims is None else list(dims)
    bad = [d for d in shown if not 0 <= d < k]
    if bad or not shown:
        raise ValueError(f"Expected `dims` to be a non-empty list of ints in [0, {k}), but got {list(dims or [])}.")
    if dim_names is not None and len(dim_names) != len(shown):
        raise ValueError(f"Expected {len(shown)} `dim_names`, but got {len(dim_names)}.")
    n = min(max_samples, maps.shape[0])
    sel = maps[:n, shown].detach().float().cpu()
    if normalize:
        sel = normalize_maps(sel)
    else:
        sel = sel.clamp(0, 1)
    imgs = images[:n].detach().float().cpu()
    rows = [[imgs[i], *[sel[i, j] for j in range(len(shown))]] for i in range(n)]
    titles = ["input", *(dim_names or [f"dim {d}" for d in shown])]
    cmaps = [cmap] * n
    return image_grid(rows, col_titles=titles, row_titles=[f"sample {i}" for i in range(n)], cmaps=cmaps, suptitle=suptitle)

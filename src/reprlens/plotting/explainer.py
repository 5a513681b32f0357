"""Plotting helpers (explainer network). Matplotlib is optional: `pip install 'reprlens[plots]'`.

* :func:`plot_part_maps`: per filter, the top images with the masked map upsampled over the image, the
  receptive-field box at the peak and the landmarks.
* :func:`plot_p_rel_err`: the ``p`` / ``rel_err`` trajectory over explainer epochs (shown together, as the
  p-collapse guard asks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reprlens.plotting.common import require_matplotlib, to_display_image

__all__ = ["plot_p_rel_err", "plot_part_maps"]


def plot_part_maps(
    images: Tensor,
    maps: Tensor,
    rf: Any,
    *,
    filters: Sequence[int] | None = None,
    top: int = 4,
    landmarks: Tensor | None = None,
    title: str | None = None,
    cell_size: float = 1.5,
) -> Any:
    """Grid: one row per filter, its ``top`` most strongly firing images with the map upsampled over the
    image (alpha overlay), the receptive-field box at the peak (red) and the landmarks (white crosses).

    Args:
        images: ``(N, C, H_img, W_img)`` images as fed to the model.
        maps: ``(N, F, H, W)`` maps on the grid of ``rf`` (explainer interpretable maps or performer maps).
        rf: :class:`reprlens.explainer_net.ReceptiveField` of the grid.
        filters: which filters (default: the first 6).
        top: images per filter.
        landmarks: ``(N, K, 2)`` (row, col) pixels, optional.

    Example:
        >>> from reprlens.explainer_net import ReceptiveField
        >>> fig = plot_part_maps(torch.rand(5, 1, 16, 16), torch.rand(5, 2, 4, 4), ReceptiveField((1.5, 1.5), (4., 4.), (10., 10.)))
        >>> len(fig.axes)
        8
    """
    plt = require_matplotlib()
    from matplotlib.patches import Rectangle

    maps = maps.detach().float().cpu()
    images = images.detach().float().cpu()
    n, f_count, h, w = maps.shape
    filters = list(range(min(6, f_count))) if filters is None else list(filters)
    top = min(top, n)
    fig, axes = plt.subplots(len(filters), top, figsize=(cell_size * top, cell_size * len(filters)), squeeze=False)
    hi, wi = images.shape[-2:]
    for r, f in enumerate(filters):
        peak_vals = maps[:, f].flatten(1).amax(1)
        order = torch.argsort(peak_vals, descending=True, stable=True)[:top]
        vmax = float(peak_vals.max()) or 1.0
        for c, b in enumerate(order.tolist()):
            ax = axes[r][c]
            ax.imshow(to_display_image(images[b]), cmap="gray")
            up = F.interpolate(maps[b, f][None, None], size=(hi, wi), mode="bilinear", align_corners=False)[0, 0]
            ax.imshow(up.numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=vmax)
            idx = int(maps[b, f].flatten().argmax())
            ci = rf.start[0] + (idx // w) * rf.jump[0]
            cj = rf.start[1] + (idx % w) * rf.jump[1]
            sy, sx = rf.size
            ax.add_patch(Rectangle((cj - sx / 2, ci - sy / 2), sx, sy, fill=False, ec="red", lw=1.2))
            if landmarks is not None:
                lm = landmarks[b].detach().cpu().numpy()
                ok = np.isfinite(lm).all(1)
                ax.scatter(lm[ok, 1], lm[ok, 0], marker="x", c="white", s=14, linewidths=1)
            ax.set_xlim(-0.5, wi - 0.5)
            ax.set_ylim(hi - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"filter {f}", fontsize=8)
            ax.set_title(f"#{b} peak {float(peak_vals[b]):.2g}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_p_rel_err(history: Sequence[Mapping[str, float]], *, ax: Any = None, title: str | None = None) -> Any:
    """``p_mean`` (with the 5-95 % band when available) and ``rel_err`` over evaluations, on twin axes.

    Example:
        >>> fig = plot_p_rel_err([{"p_mean": 0.5, "rel_err": 0.6}, {"p_mean": 0.8, "rel_err": 0.3}])
        >>> len(fig.axes)
        2
    """
    plt = require_matplotlib()
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 3))
    else:
        fig = ax.figure
    ep = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    p = [h["p_mean"] for h in history]
    ax.plot(ep, p, "o-", color="tab:blue", label="p_mean")
    if all("p_q05" in h and "p_q95" in h for h in history):
        ax.fill_between(ep, [h["p_q05"] for h in history], [h["p_q95"] for h in history], color="tab:blue", alpha=0.2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("explainer epoch")
    ax.set_ylabel("p", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(ep, [h["rel_err"] for h in history], "s--", color="tab:red", label="rel_err")
    ax2.set_ylabel("rel_err", color="tab:red")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig

"""Trace figures: per-class ridge plot of contribution cosines and a grid of the most influential examples.

matplotlib is optional (``pip install 'reprlens[plots]'``).

Example:
    >>> import torch
    >>> from reprlens.trace.reader import ClassContributions
    >>> pts = [[(torch.tensor([0.1, 0.5]), torch.tensor([1.0, 2.0])), (torch.tensor([-0.2]), torch.tensor([1.0]))]]
    >>> cc = ClassContributions(torch.tensor([0, 1]), torch.tensor([[1.0, -0.2]]), torch.tensor([[3.0, 1.0]]),
    ...                         torch.tensor([[0.3, -0.2]]), pts)
    >>> fig = plot_class_ridges(cc, layer="fc")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from reprlens.trace.functional import weighted_gaussian_kde

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from reprlens.trace.reader import ClassContributions, TopK

__all__ = ["plot_class_ridges", "plot_top_examples"]


def plot_class_ridges(
    class_contribs: ClassContributions,
    *,
    layer: str | None = None,
    index: int = 0,
    highlight: int | None = None,
    bw: float = 0.05,
    top_classes: int | None = None,
    row_scale: str = "density",
    class_names: Sequence[str] | None = None,
    ax: Any = None,
) -> Figure:
    """Ridge plot: per class, the KDE of the cosines between contributions and Δz, weighted by ‖c_k‖.

    Args:
        class_contribs: from :meth:`TraceReader.class_contributions`.
        layer: title.
        index: which test input (row of the result).
        highlight: class drawn in orange (default: the class with the largest ``S_c``).
        bw: KDE bandwidth factor (``scipy.stats.gaussian_kde(bw_method=bw)``).
        top_classes: only the classes with the largest ``S_c`` (the reference shows 10).
        row_scale: ``"density"`` (each row integrates to 1) or ``"mass"`` (× Σ‖c_k‖).
        class_names: names for the class ids.
        ax: an existing axes.
    """
    if row_scale not in ("density", "mass"):
        raise ValueError(f"Expected row_scale in ('density', 'mass'), got {row_scale!r}.")
    from reprlens.plotting.common import require_matplotlib  # lazy: reprlens.plotting re-exports this module

    plt = require_matplotlib()
    cc = class_contribs
    score = cc.score[index].double()
    order = torch.argsort(score, descending=True)
    if top_classes is not None:
        order = order[:top_classes]
    pts = cc.points[index]
    all_cos = torch.cat([pts[j][0].reshape(-1).double() for j in order.tolist()]) if len(order) else torch.zeros(1)
    finite = all_cos[torch.isfinite(all_cos)]
    span = 1.25 * float(finite.abs().max()) if finite.numel() and float(finite.abs().max()) > 0 else 1.0
    grid = torch.linspace(-span, span, 400, dtype=torch.float64)
    if highlight is None:
        highlight = int(cc.classes[order[0]]) if len(order) else None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 0.6 * max(len(order), 1) + 1.2))
    else:
        fig = ax.figure
    curves = []
    for j in order.tolist():
        cos, w = pts[j][0].double().reshape(-1), pts[j][1].double().reshape(-1)
        keep = torch.isfinite(cos) & torch.isfinite(w)
        dens = weighted_gaussian_kde(cos[keep], w[keep], grid, bw=bw)
        if row_scale == "mass":
            dens = dens * float(w[keep].sum())
        curves.append(dens)
    peak = max([float(c.max()) for c in curves] + [1e-12])
    for row, (j, dens) in enumerate(zip(order.tolist(), curves)):
        c = int(cc.classes[j])
        base = -row * 0.8
        y = base + dens.numpy() / peak * 1.4
        color = "tab:orange" if c == highlight else "0.6"
        ax.fill_between(grid.numpy(), base, y, color=color, alpha=0.7, zorder=len(order) - row, lw=0)
        ax.plot(grid.numpy(), y, color="k", lw=0.6, zorder=len(order) - row)
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
        ax.text(-span, base + 0.1, f"{name}  S={float(score[j]):.3g}", fontsize=8, va="bottom", zorder=100)
    ax.axvline(0, color="k", lw=0.5, ls=":")
    ax.set_yticks([])
    ax.set_xlim(-span, span)
    ax.set_xlabel("cosine(contribution, Δz)")
    ax.set_title(f"class contributions{f' — {layer}' if layer else ''}")
    fig.tight_layout()
    return fig


def plot_top_examples(
    topk: TopK | tuple[TopK, TopK],
    example_fn: Callable[[int], Tensor | np.ndarray],
    *,
    index: int = 0,
    ncols: int = 8,
    test_image: Tensor | np.ndarray | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Grid of the most influential training examples of one test input (proponents, then opponents).

    Args:
        topk: a :class:`TopK` or a ``(proponents, opponents)`` pair from :meth:`TraceReader.top_k`.
        example_fn: ``id -> (C, H, W) or (H, W)`` image of a training example.
        index: which test input.
        ncols: images per row.
        test_image: shown in the first column when given.
        mean, std: de-normalise images (otherwise min-max scaled into [0, 1]).
        class_names: names for labels in titles.
        title: figure title.
    """
    from reprlens.plotting.common import require_matplotlib, to_display_image

    plt = require_matplotlib()
    groups = list(topk) if isinstance(topk, tuple) else [topk]
    rows = []
    for tk in groups:
        ids = tk.ids[index].tolist()
        vals = tk.values[index].tolist()
        labs = tk.labels[index].tolist() if tk.labels is not None else [None] * len(ids)
        items = list(zip(ids, vals, labs))
        for s in range(0, len(items), ncols):
            rows.append(("proponents" if tk.proponents else "opponents", items[s : s + ncols]))
    extra = 1 if test_image is not None else 0
    ncol = min(ncols, max((len(r[1]) for r in rows), default=1)) + extra
    fig, axes = plt.subplots(len(rows) or 1, ncol, figsize=(1.5 * ncol, 2.1 * max(len(rows), 1)), squeeze=False)

    def show(ax, img):
        img = torch.as_tensor(np.asarray(img)).float() if not isinstance(img, Tensor) else img.detach().float().cpu()
        if mean is not None and std is not None and img.dim() == 3:
            img = img * torch.tensor(std).reshape(-1, 1, 1) + torch.tensor(mean).reshape(-1, 1, 1)
            img = img.clamp(0, 1)
        arr = to_display_image(img)
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1)

    for r, (kind, items) in enumerate(rows):
        for c in range(ncol):
            axes[r][c].axis("off")
        if extra:
            if r == 0:
                show(axes[r][0], test_image)
                axes[r][0].set_title("test", fontsize=8)
        for c, (i, v, lab) in enumerate(items):
            ax = axes[r][c + extra]
            show(ax, example_fn(int(i)))
            name = "" if lab is None else (class_names[lab] if class_names is not None and 0 <= lab < len(class_names)
                                            else str(lab))
            ax.set_title(f"{kind[:3]} #{i}\n{name} {v:.3g}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig

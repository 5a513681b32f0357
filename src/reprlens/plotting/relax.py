"""RELAX figures: overlay grids (uint8, used by :class:`reprlens.callbacks.RelaxMonitor`) and a matplotlib figure.

Matplotlib is optional: :func:`relax_overlays` falls back to a built-in colour ramp without it;
:func:`plot_relax` needs it (`pip install 'reprlens[plots]'`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from reprlens.relax import RelaxResult

__all__ = ["colorize", "display_images", "plot_relax", "relax_overlays"]

Denormalize = tuple[Sequence[float], Sequence[float]] | Callable[[Tensor], Tensor] | None


def _ramp(name: str) -> Tensor:
    """``(256, 3)`` float colour table: matplotlib's ``name`` when installed, else a built-in ramp."""
    try:
        import matplotlib

        cmap = matplotlib.colormaps[name]
        return torch.tensor(cmap(torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32)
    except Exception:  # matplotlib missing or unknown name: dark blue -> green -> yellow
        t = torch.linspace(0, 1, 256)[:, None]
        lo = torch.tensor([[0.27, 0.0, 0.33]])
        mid = torch.tensor([[0.13, 0.57, 0.55]])
        hi = torch.tensor([[0.99, 0.91, 0.14]])
        return torch.where(t < 0.5, lo + (mid - lo) * (2 * t), mid + (hi - mid) * (2 * t - 1))


def _minmax(maps: Tensor) -> Tensor:
    """Per-image min-max scaling to [0, 1] over finite pixels; non-finite pixels become 0."""
    flat = maps.flatten(1).double()
    finite = torch.isfinite(flat)
    lo = torch.where(finite, flat, torch.inf).amin(1, keepdim=True)
    hi = torch.where(finite, flat, -torch.inf).amax(1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    out = torch.where(finite, (flat - lo) / span, torch.zeros_like(flat)).clamp(0, 1)
    out = torch.where(torch.isfinite(lo), out, torch.zeros_like(out))
    return out.view(maps.shape).float()


def colorize(maps: Tensor, cmap: str = "viridis") -> Tensor:
    """Min-max scale each ``(H, W)`` map of ``(N, H, W)`` and colour it: ``(N, 3, H, W)`` float in [0, 1].

    Example:
        >>> colorize(torch.rand(2, 5, 6)).shape
        torch.Size([2, 3, 5, 6])
    """
    if maps.ndim != 3:
        raise ValueError(f"Expected maps of shape (N, H, W), but got {tuple(maps.shape)}.")
    table = _ramp(cmap)
    idx = (_minmax(maps.detach().cpu()) * 255).round().long()
    return table[idx].permute(0, 3, 1, 2).contiguous()


def display_images(images: Tensor, denormalize: Denormalize = None) -> Tensor:
    """Images ``(N, C, H, W)`` -> displayable RGB ``(N, 3, H, W)`` in [0, 1].

    ``denormalize`` is ``(mean, std)`` per channel or a callable; without it each image is min-max scaled.
    One channel becomes grey RGB; more than three channels show the first three.

    Example:
        >>> display_images(torch.randn(2, 1, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"Expected images of shape (N, C, H, W), but got {tuple(images.shape)}.")
    x = images.detach().cpu().float()
    if callable(denormalize):
        x = denormalize(x).float().clamp(0, 1)
    elif denormalize is not None:
        mean, std = denormalize
        c = x.shape[1]
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.shape[1] not in (1, c) or std_t.shape[1] not in (1, c):
            raise ValueError(f"Expected `denormalize` mean/std with 1 or {c} values, but got {tuple(mean)}, {tuple(std)}.")
        x = (x * std_t + mean_t).clamp(0, 1)
    else:
        x = _minmax_images(x)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 2:
        x = torch.cat([x, x[:, :1]], 1)
    return x[:, :3].contiguous()


def _minmax_images(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return ((flat - lo) / span).view(x.shape)


def relax_overlays(
    images: Tensor,
    result: RelaxResult,
    *,
    denormalize: Denormalize = None,
    alpha: float = 0.5,
    nrow: int | None = None,
) -> dict[str, Tensor]:
    """Overlay grids of importance, uncertainty and U-RELAX on the inputs: ``{kind: (3, H', W') uint8}``.

    Each tile is ``(1 - alpha) * input + alpha * colormap(map)`` with the map min-max scaled per image
    (viridis for importance, magma for uncertainty); U-RELAX colours only the kept pixels and shows the
    rest as the greyed input. Keys: ``"importance"``, ``"uncertainty"``, ``"u_relax"``.

    Example:
        >>> from reprlens.relax import relax
        >>> x = torch.rand(2, 3, 8, 8)
        >>> res = relax(lambda z: z.mean((2, 3)) + 1, x, num_masks=50, num_cells=3, seed=0)
        >>> relax_overlays(x, res)["importance"].dtype
        torch.uint8
    """
    from torchvision.utils import make_grid

    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"Expected `alpha` in (0, 1], but got {alpha!r}.")
    if images.ndim == 3:
        images = images[None]
    if images.shape[0] != result.importance.shape[0] or images.shape[2:] != result.importance.shape[1:]:
        raise ValueError(
            f"Expected images (N, C, H, W) matching the result maps {tuple(result.importance.shape)}, but got "
            f"{tuple(images.shape)}."
        )
    base = display_images(images, denormalize)
    grey = base.mean(1, keepdim=True).expand_as(base)
    a = float(alpha)
    imp = colorize(result.importance.cpu(), "viridis")
    unc = colorize(result.uncertainty.cpu(), "magma")
    keep = result.u_relax_mask.cpu()[:, None]
    ur_maps = torch.where(result.u_relax_mask, result.importance, torch.nan).cpu()
    ur = colorize(ur_maps, "viridis")
    tiles = {
        "importance": (1 - a) * base + a * imp,
        "uncertainty": (1 - a) * base + a * unc,
        "u_relax": torch.where(keep, (1 - a) * base + a * ur, 0.5 * grey),
    }
    nrow = nrow or min(8, images.shape[0])
    out = {}
    for kind, t in tiles.items():
        grid = make_grid(t.clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
        out[kind] = (grid * 255).round().to(torch.uint8)
    return out


def plot_relax(
    images: Tensor,
    result: RelaxResult,
    *,
    denormalize: Denormalize = None,
    max_images: int = 8,
    cell_size: float = 1.8,
    title: str | None = None,
    scale: str = "shared",
) -> Figure:
    """Matplotlib figure: one row per image, columns input / importance / uncertainty / U-RELAX.

    ``scale="shared"``: maps are shown raw with one colour scale per column (shared colour bars), so values
    are comparable across images. ``scale="per_image"``: each map is min-max scaled on its own (importance
    often sits in a narrow band that differs between images; this shows where each map peaks). Pixels
    removed by U-RELAX are shown transparent over the grey input.

    Example:
        >>> from reprlens.relax import relax
        >>> x = torch.rand(2, 3, 8, 8)
        >>> res = relax(lambda z: z.mean((2, 3)) + 1, x, num_masks=50, num_cells=3, seed=0)
        >>> len(plot_relax(x, res).axes) >= 4
        True
    """
    from reprlens.plotting.common import require_matplotlib

    if scale not in ("shared", "per_image"):
        raise ValueError(f"Expected `scale` to be 'shared' or 'per_image', but got {scale!r}.")
    plt = require_matplotlib()
    if images.ndim == 3:
        images = images[None]
    n = min(int(max_images), images.shape[0])
    base = display_images(images[:n], denormalize).permute(0, 2, 3, 1).numpy()
    imp = result.importance[:n].detach().cpu().double()
    unc = result.uncertainty[:n].detach().cpu().double()
    keep = result.u_relax_mask[:n].cpu()
    ur = torch.where(keep, imp, torch.nan)

    def _lim(t: Tensor) -> tuple[float, float]:
        f = t[torch.isfinite(t)]
        return (float(f.min()), float(f.max())) if f.numel() else (0.0, 1.0)

    fig, axes = plt.subplots(n, 4, figsize=(cell_size * 4.6, cell_size * n), squeeze=False)
    cols = [("input", None, None), ("importance", imp, "viridis"), (f"uncertainty ({result.uncertainty_kind})", unc, "magma"), ("U-RELAX", ur, "viridis")]
    lims = {1: _lim(imp), 2: _lim(unc), 3: _lim(imp)}
    handles: dict[int, Any] = {}
    for i in range(n):
        for j, (name, maps, cmap) in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if maps is None:
                ax.imshow(base[i], interpolation="nearest")
                continue
            if j == 3:
                ax.imshow(base[i].mean(-1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            lo, hi = lims[j] if scale == "shared" else _lim(imp[i] if j == 3 else maps[i])
            handles[j] = ax.imshow(maps[i].numpy(), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    for j, h in handles.items() if scale == "shared" else ():
        fig.colorbar(h, ax=[axes[i][j] for i in range(n)], fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig

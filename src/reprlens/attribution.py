"""Layer-to-layer attribution maps: every unit of a target layer attributed to a source feature map.

The functions here are plain torch (no Lightning). All K target units are attributed in batched
vector-Jacobian products (``torch.func.vjp`` + ``torch.func.vmap``, chunked), never in a Python loop over
samples. See ``/work/shared/spec/attribution_and_scores.md`` sections 2 and 4 for the exact semantics.

Shapes: samples ``N``, target units ``K``, source ``S = (C, H, W)`` for conv layers, positions
``P = (H, W)``. Raw attributions are ``(N, K, *S)``; channel-aggregated maps are ``(N, K, *P)``.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "aggregate_channels",
    "normalize_maps",
]

log = logging.getLogger(__name__)

Transform = Literal["abs", "lin", "sqrt", "none"]
_TRANSFORMS = ("abs", "lin", "sqrt", "none")
_NORMALIZATIONS = ("minmax", "max", "none")


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"Expected argument `eps` to be a finite float >= 0, but got {eps!r}.")
    return float(eps)


def normalize_maps(maps: Tensor, *, eps: float = 1e-6, mode: str = "minmax", start_dim: int = 2) -> Tensor:
    """Normalise every map to [0, 1] over its positions, with a NaN-free zero map for flat maps.

    A map is the slice ``maps[n, k]`` (all dims from ``start_dim`` on are positions). With
    ``lo = min_p A``, ``hi = max_p A``, ``r = hi - lo`` and ``s = max_p |A|``, a map is *valid* iff
    ``r > eps * s`` (so an all-zero map is invalid). ``"minmax"`` returns ``(A - lo) / r`` for valid maps and
    the zero map otherwise; ``"max"`` (reference training path) returns ``A / hi`` where ``hi > eps * s``, else
    zero (not bounded below for signed maps); ``"none"`` returns ``maps`` unchanged. Both cases are selected
    with a double ``torch.where``, so invalid maps get a zero gradient and never NaN. The result is
    exactly invariant to ``A -> c * A`` for ``c > 0`` (the validity test scales too); for ``c < 0`` and
    ``"minmax"``, ``N(cA) = 1 - N(A)``.

    Args:
        maps: tensor ``(N, K, *P)`` (or any tensor; positions are the dims from ``start_dim`` on). If
            ``start_dim >= maps.ndim`` every element is a single-position map (and thus the zero map).
        eps: relative flatness threshold, finite and >= 0.
        mode: ``"minmax"`` (default), ``"max"`` or ``"none"``.
        start_dim: first position dim (2 for ``(N, K, *P)``, 1 for ``(N, *P)``).

    Returns:
        Tensor of the same shape and dtype as ``maps``.

    Example:
        >>> import torch
        >>> normalize_maps(torch.tensor([[[2.0, 1.0, 0.0], [3.0, 3.0, 3.0]]]))
        tensor([[[1.0000, 0.5000, 0.0000],
                 [0.0000, 0.0000, 0.0000]]])
    """
    if not isinstance(maps, Tensor):
        raise TypeError(f"Expected argument `maps` to be a torch.Tensor, but got {type(maps).__name__}.")
    eps = _check_eps(eps)
    if mode not in _NORMALIZATIONS:
        raise ValueError(f"Expected argument `mode` to be one of {_NORMALIZATIONS}, but got {mode!r}.")
    if isinstance(start_dim, bool) or not isinstance(start_dim, int) or start_dim < 0:
        raise ValueError(f"Expected argument `start_dim` to be an int >= 0, but got {start_dim!r}.")
    if mode == "none":
        return maps
    if not maps.is_floating_point():
        raise TypeError(f"Expected floating-point `maps`, but got dtype {maps.dtype}; convert with `.float()`.")
    shape = maps.shape
    flat = maps.flatten(start_dim) if start_dim < maps.ndim else maps.unsqueeze(-1)
    if flat.ndim == 0 or flat.shape[-1] == 0:
        return maps
    hi = flat.amax(dim=-1, keepdim=True)
    scale = flat.abs().amax(dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
    one = torch.ones((), dtype=flat.dtype, device=flat.device)
    if mode == "minmax":
        lo = flat.amin(dim=-1, keepdim=True)
        rng = hi - lo
        valid = rng > eps * scale
        out = torch.where(valid, (flat - lo) / torch.where(valid, rng, one), zero)
    else:  # "max"
        valid = hi > eps * scale
        out = torch.where(valid, flat / torch.where(valid, hi, one), zero)
    return out.reshape(shape)


def _safe_sqrt_abs(x: Tensor) -> Tensor:
    """sqrt(|x|) with value 0 and gradient 0 where x == 0 (double ``where``)."""
    a = x.abs()
    nz = a > 0
    return torch.where(nz, torch.sqrt(torch.where(nz, a, torch.ones_like(a))), torch.zeros_like(a))


def _default_channel_dim(ndim: int, channel_dim: int | None) -> int | None:
    if channel_dim is not None:
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int) or not -ndim <= channel_dim < ndim:
            raise ValueError(
                f"Expected argument `channel_dim` to be an int indexing the {ndim}-dim attributions, "
                f"but got {channel_dim!r}."
            )
        return channel_dim % ndim
    if ndim >= 5:
        return 2
    if ndim == 3:
        return None
    raise ValueError(
        f"Cannot infer the channel axis of {ndim}-dim attributions: expected (N, K, C, H, W) (channel axis 2) "
        "or (N, K, D) (no channel axis), but got "
        f"ndim={ndim}. Pass `channel_dim=` explicitly (e.g. 2 for (N, K, C, L) sequence sources) or use "
        "transform='none'."
    )


def aggregate_channels(phi: Tensor, transform: Transform = "abs", channel_dim: int | None = None) -> Tensor:
    """Reduce raw attributions ``(N, K, *S)`` over the channel axis into maps ``(N, K, *P)``.

    ``"abs"``: ``sum_c |phi|``; ``"lin"``: ``sum_c phi`` (signed); ``"sqrt"``: ``sum_c sqrt(|phi|)`` with a safe
    square root (value 0 and gradient 0 where phi == 0; the gradient is unbounded near 0, so it is not
    recommended for training); ``"none"``: ``phi`` unchanged.

    Args:
        phi: raw attributions, at least 3-dim ``(N, K, ...)``.
        transform: one of ``"abs"``, ``"lin"``, ``"sqrt"``, ``"none"``.
        channel_dim: index of the channel axis in ``phi``. Default: 2 when ``phi.ndim >= 5`` (conv sources),
            no channel reduction (every feature is a position) when ``phi.ndim == 3``; required for
            ``phi.ndim == 4``.

    Example:
        >>> import torch
        >>> phi = torch.tensor([[[[[1.0]], [[-2.0]]]]])  # (N=1, K=1, C=2, H=1, W=1)
        >>> aggregate_channels(phi, "abs").flatten().tolist(), aggregate_channels(phi, "lin").flatten().tolist()
        ([3.0], [-1.0])
    """
    if not isinstance(phi, Tensor):
        raise TypeError(f"Expected argument `phi` to be a torch.Tensor, but got {type(phi).__name__}.")
    if transform not in _TRANSFORMS:
        raise ValueError(f"Expected argument `transform` to be one of {_TRANSFORMS}, but got {transform!r}.")
    if transform == "none":
        return phi
    if phi.ndim < 3:
        raise ValueError(
            f"Expected attributions of shape (N, K, *S) with at least 3 dims, but got shape {tuple(phi.shape)}."
        )
    cdim = _default_channel_dim(phi.ndim, channel_dim)
    if transform == "lin":
        vals = phi
    elif transform == "abs":
        vals = phi.abs()
    else:
        vals = _safe_sqrt_abs(phi)
    return vals if cdim is None else vals.sum(dim=cdim)

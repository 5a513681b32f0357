"""Functional core of the explainer network (plain torch): templates, masks, filter loss, location
instability and receptive fields.

Implements spec ``explainer_network.md`` sections 2.2-2.5, 2.9 and 2.10 (Zhang et al., "Interpretable
CNN" templates, mask and mutual-information filter loss; location-instability metric).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from reprlens.utils import get_module

__all__ = [
    "LocationInstabilityResult",
    "ReceptiveField",
    "filter_loss",
    "filter_mutual_information",
    "location_instability",
    "part_mask",
    "part_templates",
    "peak_positions",
    "receptive_field",
]


# ----------------------------------------------------------------------------------------- helpers
def _check_maps(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}.")
    if x.ndim != 4:
        raise ValueError(
            f"Expected `{name}` to be a conv feature map (N, C, H, W), but got shape {tuple(x.shape)}; "
            "pick a convolutional layer (4-D output) as the target layer."
        )
    if not x.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating-point tensor, but got {x.dtype}.")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------- templates
@functools.lru_cache(maxsize=64)
def _templates_cached(
    height: int, width: int, beta: float, tau: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    s = height * width
    ii = torch.arange(height, dtype=torch.float64, device=device)
    jj = torch.arange(width, dtype=torch.float64, device=device)
    mu_i = ii.repeat_interleave(width)  # (S,) row-major positions
    mu_j = jj.repeat(height)
    dist = (ii[None, :, None] - mu_i[:, None, None]).abs() / height + (
        jj[None, None, :] - mu_j[:, None, None]
    ).abs() / width  # (S, H, W)
    pos = tau * torch.clamp(1.0 - beta * dist, min=-1.0)
    neg = torch.full((1, height, width), -tau, dtype=torch.float64, device=device)
    templates = torch.cat([pos, neg], 0).to(dtype)
    log_prior = torch.full((s + 1,), -math.log(s + 1), dtype=dtype, device=device)
    return templates, log_prior


def part_templates(
    height: int,
    width: int,
    *,
    beta: float = 4.0,
    tau: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Positive part templates (one per position, row-major) plus the negative template, and log priors.

    ``t⁺_ij(μ) = τ·max(1 − β·(|i−μ_i|/H + |j−μ_j|/W), −1)``, ``t⁻ = −τ``; priors are all ``1/(S+1)``.
    Results are cached per ``(H, W, β, τ, dtype, device)``; treat them as read-only.

    Args:
        height: map height ``H``.
        width: map width ``W``.
        beta: template slope (default 4).
        tau: template scale (default ``0.5/S``).
        dtype: floating dtype (default ``torch.get_default_dtype()``).
        device: device (default CPU).

    Returns:
        ``(templates (S+1, H, W), log_prior (S+1,))``.

    Example:
        >>> t, lp = part_templates(7, 7)
        >>> t.shape, round(float(t[24, 3, 3]) * 98, 6), float(lp.exp().sum())
        (torch.Size([50, 7, 7]), 1.0, 1.0)
    """
    for v, n in ((height, "height"), (width, "width")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"Expected `{n}` to be an integer >= 1, but got {v!r}.")
    s = height * width
    tau = 0.5 / s if tau is None else float(tau)
    if not math.isfinite(float(beta)) or float(beta) <= 0:
        raise ValueError(f"Expected `beta` to be a finite number > 0, but got {beta!r}.")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device("cpu") if device is None else torch.device(device)
    return _templates_cached(height, width, float(beta), tau, dtype, device)


# ----------------------------------------------------------------------------------------- masks
def _round_half_away(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def part_mask(
    x: Tensor,
    *,
    beta: float | Tensor = 4.0,
    mode: Literal["argmax", "centroid"] = "argmax",
    coords: Literal["pixel", "unit_grid"] = "pixel",
) -> Tensor:
    """Template mask of each map, centred on its (detached) peak: values in ``[-1, 1]``.

    ``m_ij = max(1 − β·(|i−μ̂_i|/H + |j−μ̂_j|/W), −1)`` (``coords="pixel"``) or, with the reference's unit
    grid, ``max(1 − β·(|u_i−u_μ̂| + |v_j−v_μ̂|), −1)`` with ``u = linspace(−1, 1, H)``. The centre ``μ̂`` is
    the first row-major maximum (``"argmax"``) or the activation-weighted centroid rounded half away from
    zero on 1-based indices (``"centroid"``, MATLAB reference). The mask is a constant (no gradient): the
    masked output is ``x * relu(mask)``.

    Args:
        x: post-ReLU maps ``(N, C, H, W)``.
        beta: slope, a float or a per-channel tensor ``(C,)``.
        mode: ``"argmax"`` (paper, default) or ``"centroid"`` (reference code).
        coords: ``"pixel"`` (default) or ``"unit_grid"`` (reference compat).

    Returns:
        ``(N, C, H, W)`` mask, same dtype as ``x``, no autograd history.

    Example:
        >>> x = torch.zeros(1, 1, 7, 7); x[0, 0, 3, 3] = 1.0
        >>> m = part_mask(x)
        >>> float(m[0, 0, 3, 3]), round(float(m[0, 0, 3, 4]), 6), float(m[0, 0, 0, 0])
        (1.0, 0.428571, -1.0)
    """
    _check_maps(x)
    if mode not in ("argmax", "centroid"):
        raise ValueError(f"Expected `mode` in ('argmax', 'centroid'), but got {mode!r}.")
    if coords not in ("pixel", "unit_grid"):
        raise ValueError(f"Expected `coords` in ('pixel', 'unit_grid'), but got {coords!r}.")
    n, c, h, w = x.shape
    a = x.detach()
    ii = torch.arange(h, device=x.device, dtype=x.dtype)
    jj = torch.arange(w, device=x.device, dtype=x.dtype)
    if mode == "argmax":
        idx = a.reshape(n, c, h * w).argmax(-1)  # first maximum in row-major order
        mu_i = torch.div(idx, w, rounding_mode="floor").to(x.dtype)
        mu_j = (idx % w).to(x.dtype)
    else:
        mass = a.sum((2, 3))
        safe = torch.where(mass > 0, mass, torch.ones_like(mass))
        ci = (a.sum(3) * ii).sum(2) / safe
        cj = (a.sum(2) * jj).sum(2) / safe
        mu_i = (_round_half_away(ci + 1.0).clamp_min(1.0) - 1.0) * (mass > 0)
        mu_j = (_round_half_away(cj + 1.0).clamp_min(1.0) - 1.0) * (mass > 0)
    if isinstance(beta, Tensor):
        b = beta.detach().to(device=x.device, dtype=x.dtype)
        if b.ndim == 1:
            if b.numel() != c:
                raise ValueError(f"Expected a per-channel `beta` of shape ({c},), but got {tuple(b.shape)}.")
            b = b.view(1, c, 1, 1)
        elif b.ndim != 0:
            raise ValueError(f"Expected `beta` to be a scalar or of shape (C,), but got {tuple(b.shape)}.")
    else:
        b = float(beta)
    di = (ii.view(1, 1, h, 1) - mu_i.view(n, c, 1, 1)).abs()
    dj = (jj.view(1, 1, 1, w) - mu_j.view(n, c, 1, 1)).abs()
    if coords == "pixel":
        dist = di / h + dj / w
    else:
        dist = di * (2.0 / max(h - 1, 1)) + dj * (2.0 / max(w - 1, 1))
    return torch.clamp(1.0 - b * dist, min=-1.0)


# ----------------------------------------------------------------------------------------- filter loss
def _normalize_maps(a: Tensor, normalize: str, reference_peak: float) -> Tensor:
    if normalize == "none":
        return a
    if normalize != "batch_peak":
        raise ValueError(f"Expected `normalize` in ('none', 'batch_peak'), but got {normalize!r}.")
    s = a.shape[2] * a.shape[3]
    peak = a.amax((2, 3)).mean(0)  # (C,), not detached: exact scale invariance
    return a * (reference_peak * s / (peak + 1e-6)).view(1, -1, 1, 1)


def _mi_core(a: Tensor, templates: Tensor, log_prior: Tensor) -> Tensor:
    b, c, h, w = a.shape
    m = templates.shape[0]
    sc = (a.transpose(0, 1).reshape(c * b, h * w) @ templates.reshape(m, h * w).T).view(c, b, m)
    log_px_t = torch.log_softmax(sc, dim=1)  # (C,B,M): log p(x_b|T_m), Z_T over the batch (fused kernel)
    # uniform priors pi = 1/M (spec 2.2), so log p(x_b) = logsumexp_m log p(x_b|T_m) - log M and
    # MI = sum_m pi sum_b p(x|T)(log p(x|T) - log p(x)) = mean_m sum_b p log p - sum_b p(x_b) log p(x_b)
    log_px = torch.logsumexp(log_px_t, dim=2) + log_prior[0]  # (C,B)
    p_x_t = log_px_t.exp()
    return (p_x_t * log_px_t).sum((1, 2)) / m - (log_px.exp() * log_px).sum(1)


def filter_mutual_information(
    x: Tensor,
    *,
    beta: float = 4.0,
    tau: float | None = None,
    normalize: Literal["none", "batch_peak"] = "none",
    reference_peak: float = 4.0,
    chunk_channels: int | None = None,
) -> Tensor:
    """Mutual information ``MI(X; T)`` between the maps of each channel and the part templates.

    Exact, differentiable and vectorised over channels (one GEMM ``(C·B, S) @ (S, S+1)``); the batch is
    the sample (``Z_T`` is estimated over it). Computed in float32 at least (float64 stays float64).

    Args:
        x: post-ReLU pre-mask maps ``(B, C, H, W)``.
        beta, tau: template parameters (see :func:`part_templates`).
        normalize: ``"none"`` (paper) or ``"batch_peak"`` (scale-invariant, spec 2.4).
        reference_peak: ``κ`` of ``"batch_peak"``.
        chunk_channels: process this many channels per GEMM (same result, less memory).

    Returns:
        ``(C,)`` MI per channel, in ``[0, min(log B, log(S+1))]``.

    Example:
        >>> x = torch.zeros(4, 1, 5, 5); x[torch.arange(4), 0, torch.arange(4), 0] = 100.0
        >>> bool(filter_mutual_information(x)[0] > 0)
        True
    """
    _check_maps(x)
    if not math.isfinite(float(reference_peak)) or float(reference_peak) <= 0:
        raise ValueError(f"Expected `reference_peak` to be a finite number > 0, but got {reference_peak!r}.")
    b, c, h, w = x.shape
    dt = _compute_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        a = x.to(dt)
        if b < 2:
            _warn_once("b1", "filter loss: the mutual information needs >= 2 images per batch; B = 1 gives 0.")
            return a.sum((0, 2, 3)) * 0.0
        a = _normalize_maps(a, normalize, float(reference_peak))
        templates, log_prior = part_templates(h, w, beta=beta, tau=tau, dtype=dt, device=x.device)
        if chunk_channels is None or chunk_channels >= c:
            return _mi_core(a, templates, log_prior)
        if isinstance(chunk_channels, bool) or not isinstance(chunk_channels, int) or chunk_channels < 1:
            raise ValueError(f"Expected `chunk_channels` to be an integer >= 1, but got {chunk_channels!r}.")
        return torch.cat([_mi_core(part, templates, log_prior) for part in a.split(chunk_channels, 1)])


class _ReferenceFilterGrad(torch.autograd.Function):
    """Forward: exact −MI per channel (for logging). Backward: the reference's hand-written gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, loss: Tensor, g: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(g)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (g,) = ctx.saved_tensors
        go = grad_out.to(g.dtype)
        go = go if go.ndim == 0 else go.view(1, -1, 1, 1)  # per-channel (reduction="none")
        return g * go, None, None


def _finite(t: Tensor) -> Tensor:
    big = torch.finfo(t.dtype).max
    fin = t[torch.isfinite(t)]
    top = fin.abs().max() if fin.numel() else torch.zeros((), dtype=t.dtype, device=t.device)
    t = torch.nan_to_num(t, nan=0.0, posinf=float(big), neginf=-float(big))
    return torch.where(t.abs() >= big, torch.sign(t) * top, t)


def reference_filter_gradient(
    x: Tensor,
    mask: Tensor,
    *,
    positive_mask: Tensor | None = None,
    epoch: int = 1,
    mag: float = 0.1,
    w_pos: float = 1.0,
    w_neg: float = 1.0,
) -> Tensor:
    """The reference's injected gradient ``G`` (spec 2.5) for pre-mask maps ``x`` and masks ``mask``.

    Example:
        >>> x = torch.rand(4, 2, 5, 5); m = part_mask(x)
        >>> reference_filter_gradient(x, m).shape
        torch.Size([4, 2, 5, 5])
    """
    _check_maps(x)
    if mask.shape != x.shape:
        raise ValueError(f"Expected `mask` of shape {tuple(x.shape)}, but got {tuple(mask.shape)}.")
    alpha = 0.5
    a = x.detach().to(_compute_dtype(x))
    m = mask.detach().to(a.dtype)
    b = a.shape[0]
    pos = torch.ones(b, dtype=torch.bool, device=a.device) if positive_mask is None else positive_mask.bool()
    if pos.shape != (b,):
        raise ValueError(f"Expected `positive_mask` of shape ({b},), but got {tuple(pos.shape)}.")
    s = (a * m).mean((2, 3))  # (B, C)
    s_rev = (a * m.flip(0, 1)).mean((2, 3))
    t = a.mean((2, 3))
    log_zp = alpha * (torch.logsumexp(s_rev / alpha, 0) - math.log(b))  # (C,)
    log_zn = alpha * (torch.logsumexp(-t / alpha, 0) - math.log(b))
    gp = _finite(torch.exp(s / alpha)) * (s - log_zp + alpha)
    gn = _finite(torch.exp(-t / alpha)) * (-t - log_zn + alpha)
    posf = pos.to(a.dtype).view(b, 1)
    negf = 1.0 - posf
    mean_p = (gp * posf).sum(0) / posf.sum().clamp_min(1)
    mean_n = (gn * negf).sum(0) / negf.sum().clamp_min(1)
    gp = _finite(gp * mag / (epoch * mean_p))
    gn = _finite(gn * mag / (epoch * mean_n))
    g = -1e-5 * w_pos * (gp * posf).view(b, -1, 1, 1) * m + 1e-5 * w_neg * (gn * negf).view(b, -1, 1, 1)
    return g.to(x.dtype)


def filter_loss(
    x: Tensor,
    *,
    beta: float = 4.0,
    tau: float | None = None,
    normalize: Literal["none", "batch_peak"] = "none",
    reference_peak: float = 4.0,
    mode: Literal["exact", "reference"] = "exact",
    mask: Tensor | None = None,
    positive_mask: Tensor | None = None,
    epoch: int = 1,
    mag: float = 0.1,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """Filter loss ``−MI`` of post-ReLU pre-mask maps (spec 2.4), or the reference approximate gradient.

    ``mode="exact"`` differentiates the exact ``−MI``. ``mode="reference"`` returns the same value but its
    backward injects the reference's hand-written gradient ``G`` (spec 2.5, ``mask`` defaults to
    :func:`part_mask` of ``x``).

    Args:
        x: maps ``(B, C, H, W)``.
        beta, tau, normalize, reference_peak: see :func:`filter_mutual_information`.
        mode: ``"exact"`` (default) or ``"reference"``.
        mask, positive_mask, epoch, mag: reference-mode inputs.
        reduction: ``"mean"`` over channels, ``"sum"`` or ``"none"`` (``(C,)``).

    Example:
        >>> x = (torch.rand(8, 3, 5, 5) * 40).requires_grad_()
        >>> loss = filter_loss(x); loss.backward()
        >>> loss.ndim, x.grad.shape
        (0, torch.Size([8, 3, 5, 5]))
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"Expected `reduction` in ('mean', 'sum', 'none'), but got {reduction!r}.")
    if mode not in ("exact", "reference"):
        raise ValueError(f"Expected `mode` in ('exact', 'reference'), but got {mode!r}.")
    mi = filter_mutual_information(x, beta=beta, tau=tau, normalize=normalize, reference_peak=reference_peak)
    loss = -mi
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    if mode == "reference":
        # value: the exact -MI (for logging); gradient: grad_output * G (reference semantics)
        m = part_mask(x, beta=beta) if mask is None else mask
        g = reference_filter_gradient(x, m, positive_mask=positive_mask, epoch=epoch, mag=mag)
        loss = _ReferenceFilterGrad.apply(x, loss.detach(), g)
    return loss


# ----------------------------------------------------------------------------------------- receptive field
@dataclass(frozen=True)
class ReceptiveField:
    """Geometry of a conv stack: unit ``(i, j)`` is centred at ``(start_y + i·jump_y, start_x + j·jump_x)``
    (0-based pixel-centre coordinates) and sees ``size`` pixels per axis.

    Example:
        >>> rf = ReceptiveField((1.5, 1.5), (4.0, 4.0), (18.0, 18.0))
        >>> rf.centers(2, 2)[1, 1].tolist()
        [5.5, 5.5]
    """

    start: tuple[float, float]
    jump: tuple[float, float]
    size: tuple[float, float]

    def centers(self, height: int, width: int, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Tensor:
        """``(H, W, 2)`` centres (row, col) of all units of an ``H×W`` map."""
        i = self.start[0] + torch.arange(height, dtype=dtype, device=device) * self.jump[0]
        j = self.start[1] + torch.arange(width, dtype=dtype, device=device) * self.jump[1]
        return torch.stack(torch.meshgrid(i, j, indexing="ij"), -1)


_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.PReLU, nn.Hardswish,
    nn.Mish, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.Dropout, nn.Dropout2d, nn.Identity,
    nn.LocalResponseNorm,
)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _analytic(model: nn.Module, layer: str) -> ReceptiveField:
    target = get_module(model, layer)
    inside = {id(m) for m in target.modules()}
    start, jump, size = [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]
    done = False
    for name, mod in model.named_modules():
        if done and id(mod) not in inside:
            break
        if mod is target:
            done = True
        if any(True for _ in mod.children()):
            continue  # containers: walk their leaves
        if isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k = _pair(mod.kernel_size)
            s = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
            d = _pair(getattr(mod, "dilation", 1)) if isinstance(mod, (nn.Conv2d, nn.MaxPool2d)) else (1, 1)
            pad = mod.padding
            if isinstance(pad, str):
                if pad == "same":
                    p = tuple((d[a] * (k[a] - 1)) / 2 for a in range(2))
                else:
                    p = (0, 0)
            else:
                p = _pair(pad)
            for ax in range(2):
                start[ax] += (d[ax] * (k[ax] - 1) / 2 - p[ax]) * jump[ax]
                size[ax] += d[ax] * (k[ax] - 1) * jump[ax]
                jump[ax] *= s[ax]
        elif isinstance(mod, _ELEMENTWISE):
            continue
        else:
            raise ValueError(
                f"receptive_field(method='analytic') cannot map module {name!r} ({type(mod).__name__}); it "
                "supports Conv2d, MaxPool2d, AvgPool2d and element-wise modules. Use method='probe' (with "
                "`input_size`) or pass an explicit ReceptiveField."
            )
    if not done:
        raise ValueError(f"Layer {layer!r} was not reached while walking the modules of the model.")
    return ReceptiveField(tuple(start), tuple(jump), tuple(size))  # type: ignore[arg-type]


class _Stop(Exception):
    pass


def _probe(model: nn.Module, layer: str, input_size: tuple[int, int] | None) -> ReceptiveField:
    if input_size is None:
        raise ValueError("receptive_field(method='probe') needs `input_size=(H, W)` of the model's input.")
    net = copy.deepcopy(model).double().eval()
    in_ch = None
    for name, mod in list(net.named_modules()):
        if isinstance(mod, nn.Conv2d):
            in_ch = mod.in_channels if in_ch is None else in_ch
            with torch.no_grad():
                mod.weight.fill_(1.0)
                if mod.bias is not None:
                    mod.bias.zero_()
    for name, mod in list(net.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(mod, cname, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                 ceil_mode=child.ceil_mode))
            elif isinstance(child, (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)):
                setattr(mod, cname, nn.Identity())
    if in_ch is None:
        raise ValueError("receptive_field(method='probe') found no Conv2d to infer the input channels.")
    x = torch.ones(1, in_ch, *input_size, dtype=torch.float64, requires_grad=True)
    out: list[Tensor] = []

    def hook(_m, _a, o):
        out.append(o)
        raise _Stop

    handle = get_module(net, layer).register_forward_hook(hook)
    try:
        net(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not out or not isinstance(out[0], Tensor) or out[0].ndim != 4:
        raise ValueError(f"Layer {layer!r} did not produce a 4-D feature map in the probe forward pass.")
    y = out[0]
    h, w = y.shape[2:]
    if h < 3 or w < 3:
        raise ValueError(f"receptive_field(method='probe') needs a target map >= 3x3, but got {h}x{w}; "
                         "use a larger `input_size`.")
    units = [(h // 2 - 1, w // 2 - 1), (h // 2, w // 2)]
    boxes = []
    for ui, uj in units:
        (g,) = torch.autograd.grad(y[0, :, ui, uj].sum(), x, retain_graph=True)
        sup = g[0].abs().sum(0) > 0
        rows = torch.nonzero(sup.any(1)).flatten()
        cols = torch.nonzero(sup.any(0)).flatten()
        boxes.append((float(rows.min()), float(rows.max()), float(cols.min()), float(cols.max())))
    (r0a, r1a, c0a, c1a), (r0b, r1b, c0b, c1b) = boxes
    ca = ((r0a + r1a) / 2, (c0a + c1a) / 2)
    cb = ((r0b + r1b) / 2, (c0b + c1b) / 2)
    jump = (cb[0] - ca[0], cb[1] - ca[1])
    start = (cb[0] - units[1][0] * jump[0], cb[1] - units[1][1] * jump[1])
    size = (r1b - r0b + 1, c1b - c0b + 1)
    return ReceptiveField(start, jump, size)


def receptive_field(
    model: nn.Module,
    layer: str,
    *,
    method: Literal["analytic", "probe"] = "analytic",
    input_size: tuple[int, int] | None = None,
) -> ReceptiveField:
    """Receptive-field geometry (start, jump, size) of the units of ``layer`` (spec 2.10).

    ``"analytic"`` walks the modules (registration order) up to ``layer``; ``"probe"`` back-propagates
    from two interior units of a float64 copy with unit weights (any architecture; needs ``input_size``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
        >>> receptive_field(net, "3")
        ReceptiveField(start=(0.5, 0.5), jump=(2.0, 2.0), size=(8.0, 8.0))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    get_module(model, layer)
    if method == "analytic":
        return _analytic(model, layer)
    if method == "probe":
        return _probe(model, layer, input_size)
    raise ValueError(f"Expected `method` in ('analytic', 'probe'), but got {method!r}.")


# ----------------------------------------------------------------------------------------- instability
@dataclass
class LocationInstabilityResult:
    """Location instability: ``value`` (mean over the selected active filters), ``per_filter`` ``(F,)``
    (NaN for inactive filters) and ``num_active``."""

    value: Tensor
    per_filter: Tensor
    num_active: int


def peak_positions(maps: Tensor, rf: ReceptiveField) -> tuple[Tensor, Tensor]:
    """Image positions (row, col) of the first row-major peak of every map, and the peak values.

    Returns:
        ``(positions (N, F, 2), values (N, F))``.

    Example:
        >>> m = torch.zeros(1, 1, 4, 4); m[0, 0, 2, 1] = 3.0
        >>> q, v = peak_positions(m, ReceptiveField((1.5, 1.5), (4.0, 4.0), (18.0, 18.0)))
        >>> q[0, 0].tolist(), float(v[0, 0])
        ([9.5, 5.5], 3.0)
    """
    _check_maps(maps, "maps")
    n, f, h, w = maps.shape
    flat = maps.detach().reshape(n, f, h * w)
    idx = flat.argmax(-1)  # first maximum in row-major order (NaN counts as the maximum)
    v = flat.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    dt = _compute_dtype(maps)
    i = torch.div(idx, w, rounding_mode="floor").to(dt)
    j = (idx % w).to(dt)
    q = torch.stack([rf.start[0] + i * rf.jump[0], rf.start[1] + j * rf.jump[1]], -1)
    return q, v.to(dt)


def _image_diag(image_size, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(image_size, Tensor):
        sz = image_size.to(device=device, dtype=dtype)
        if sz.shape == (2,):
            sz = sz.expand(n, 2)
        if sz.shape != (n, 2):
            raise ValueError(f"Expected `image_size` (H, W) or (N, 2), but got shape {tuple(sz.shape)}.")
    else:
        if not (isinstance(image_size, Sequence) and len(image_size) == 2):
            raise ValueError(f"Expected `image_size` to be (H_img, W_img), but got {image_size!r}.")
        sz = torch.tensor([float(image_size[0]), float(image_size[1])], dtype=dtype, device=device).expand(n, 2)
    if not bool((sz > 0).all()):
        raise ValueError(f"Expected positive image sizes, but got {image_size!r}.")
    return sz


def _check_landmarks(landmarks: Tensor, n: int, sz: Tensor, base: int) -> Tensor:
    if not isinstance(landmarks, Tensor) or landmarks.ndim != 3 or landmarks.shape[0] != n or landmarks.shape[2] != 2:
        shape = tuple(landmarks.shape) if isinstance(landmarks, Tensor) else type(landmarks).__name__
        raise ValueError(f"Expected `landmarks` of shape (N={n}, K, 2) as (row, col) pixels, but got {shape}.")
    if base not in (0, 1):
        raise ValueError(f"Expected `landmark_index_base` 0 or 1, but got {base!r}.")
    lm = landmarks.to(sz.dtype) - float(base)
    fin = torch.isfinite(lm).all(-1, keepdim=True)
    lo = -0.5
    hi = sz.view(n, 1, 2) - 0.5
    outside = fin & ((lm < lo) | (lm > hi))
    if bool(outside.any()):
        raise ValueError(
            "Expected landmarks inside the image ((row, col) pixel coordinates in [-0.5, size - 0.5], 0-based), "
            f"but {int(outside.any(-1).sum())} landmark(s) lie outside; rescale them with the image, or set "
            "`landmark_index_base=1` for 1-based (MATLAB) files."
        )
    return torch.where(fin, lm, torch.full_like(lm, float("nan")))


def _topk_order(score: Tensor, k: int) -> Tensor:
    """Indices along dim 0 of the ``k`` highest scores, ties by lower index (stable sort)."""
    return torch.sort(score, dim=0, descending=True, stable=True).indices[:k]


def _instability_from_candidates(
    score: Tensor,
    dist: Tensor,
    *,
    top_k: int,
    select_ratio: float,
    ddof: int,
    drop_filter_if_any_undefined: bool,
) -> LocationInstabilityResult:
    """``score``/``dist`` ``(N, F, K)``; invalid candidates have score ``-inf``."""
    k = min(top_k, score.shape[0])
    order = _topk_order(score, k)
    sc = torch.gather(score, 0, order)
    d = torch.gather(dist, 0, order)
    valid = torch.isfinite(sc)
    cnt = valid.sum(0).to(d.dtype)  # (F, K)
    d0 = torch.where(valid, d, torch.zeros_like(d))
    mean = d0.sum(0) / cnt.clamp_min(1)
    var = (torch.where(valid, (d - mean) ** 2, torch.zeros_like(d))).sum(0) / (cnt - ddof).clamp_min(1)
    defined = cnt >= max(2, ddof + 1)
    sigma = torch.where(defined, var.sqrt(), torch.full_like(var, float("nan")))
    nd = defined.sum(1)
    per_filter = torch.where(nd > 0, torch.nan_to_num(sigma).sum(1) / nd.clamp_min(1), torch.full_like(nd, 0,
                             dtype=d.dtype) + float("nan"))
    if drop_filter_if_any_undefined:
        per_filter = torch.where(defined.all(1), per_filter, torch.full_like(per_filter, float("nan")))
    active = torch.isfinite(per_filter)
    num_active = int(active.sum())
    if num_active == 0:
        cause = "no finite landmarks" if not bool(torch.isfinite(dist).any()) else "all peaks zero or < 2 candidates"
        warnings.warn(f"location_instability: no active filter ({cause}); the value is NaN.", UserWarning,
                      stacklevel=3)
        return LocationInstabilityResult(torch.tensor(float("nan"), dtype=d.dtype, device=d.device), per_filter, 0)
    vals = torch.sort(per_filter[active]).values
    n_sel = max(1, int(round(select_ratio * num_active)))
    return LocationInstabilityResult(vals[:n_sel].mean(), per_filter, num_active)


def _candidates(maps, landmarks, rf, image_size, include_zero_peaks, landmark_index_base):
    _check_maps(maps, "maps")
    n = maps.shape[0]
    q, v = peak_positions(maps, rf)
    if not bool(torch.isfinite(v).all()):  # a NaN or +inf anywhere in a map is its peak (argmax)
        raise ValueError("Expected finite `maps`, but got NaN/inf values; check the features for NaN.")
    sz = _image_diag(image_size, n, q.dtype, q.device)
    lm = _check_landmarks(landmarks, n, sz, landmark_index_base)
    diag = sz.pow(2).sum(-1).sqrt()  # (N,)
    dist = (q[:, :, None, :] - lm[:, None, :, :]).pow(2).sum(-1).sqrt() / diag.view(n, 1, 1)  # (N,F,K)
    ok = torch.isfinite(lm).all(-1)[:, None, :]
    if not include_zero_peaks:
        ok = ok & (v > 0)[:, :, None]
    score = torch.where(ok, v[:, :, None].expand_as(dist), torch.full_like(dist, float("-inf")))
    return score, torch.where(ok, dist, torch.zeros_like(dist))


def location_instability(
    maps: Tensor,
    landmarks: Tensor,
    rf: ReceptiveField,
    image_size: tuple[int, int] | Tensor,
    *,
    top_k: int = 100,
    select_ratio: float = 1.0,
    ddof: int = 1,
    include_zero_peaks: bool = False,
    drop_filter_if_any_undefined: bool = False,
    landmark_index_base: int = 0,
) -> LocationInstabilityResult:
    """Location instability of filters (spec 2.9): spread of the peak-to-landmark distance over the
    ``top_k`` most strongly firing images, normalised by the image diagonal; lower is more part-like.

    Args:
        maps: ``(N, F, H, W)`` maps on the grid of ``rf``.
        landmarks: ``(N, K, 2)`` (row, col) pixel coordinates of the image as fed (NaN = missing).
        rf: receptive field of the map grid.
        image_size: ``(H_img, W_img)`` or an ``(N, 2)`` tensor.
        top_k, select_ratio, ddof, include_zero_peaks, drop_filter_if_any_undefined, landmark_index_base:
            see the spec (reference compat switches).

    Example:
        >>> maps = torch.zeros(3, 1, 4, 4); maps[torch.arange(3), 0, torch.arange(3), 0] = 1.0
        >>> lm = torch.tensor([[[2.0, 1.0]], [[6.0, 1.0]], [[10.0, 1.0]]])
        >>> rf = ReceptiveField((1.5, 1.5), (4.0, 4.0), (18.0, 18.0))
        >>> float(location_instability(maps, lm, rf, (16, 16)).value)
        0.0
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2:
        raise ValueError(f"Expected `top_k` to be an integer >= 2, but got {top_k!r}.")
    if not 0 < float(select_ratio) <= 1:
        raise ValueError(f"Expected `select_ratio` in (0, 1], but got {select_ratio!r}.")
    if ddof not in (0, 1):
        raise ValueError(f"Expected `ddof` 0 or 1, but got {ddof!r}.")
    score, dist = _candidates(maps, landmarks, rf, image_size, include_zero_peaks, landmark_index_base)
    return _instability_from_candidates(score, dist, top_k=top_k, select_ratio=float(select_ratio), ddof=ddof,
                                        drop_filter_if_any_undefined=drop_filter_if_any_undefined)

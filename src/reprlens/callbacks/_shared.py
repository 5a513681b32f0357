"""Pieces shared by the callbacks that explain a layer pair (ExplanationRegularization, ScoreMonitor)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from reprlens.utils import get_module, unwrap_model

__all__ = ["default_forward_fn", "default_inputs_fn", "noise_inputs", "resolve_head"]


def default_inputs_fn(batch: Any, *, prefer_views: bool = False, owner: str = "reprlens") -> Tensor:
    """Find the model inputs in a batch.

    Layouts: a Tensor; a dict with ``"image"`` (or ``"images"``, ``"x"``, ``"input"``, ``"inputs"``) and/or
    ``"views"`` (a list of view tensors); a tuple/list whose first element is a Tensor or a list of views
    (lightly, solo-learn, bolts). ``prefer_views=True`` (training) takes the first view of a dict before its
    un-augmented image; validation prefers the image.

    Raises:
        TypeError: for any other layout, asking for an ``inputs_fn``.

    Example:
        >>> import torch
        >>> default_inputs_fn({"image": torch.zeros(2, 3, 4, 4), "label": torch.zeros(2)}).shape
        torch.Size([2, 3, 4, 4])
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        views = batch.get("views")
        first_view = views[0] if isinstance(views, (list, tuple)) and views and isinstance(views[0], Tensor) else None
        if prefer_views and first_view is not None:
            return first_view
        for key in ("image", "images", "x", "input", "inputs"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
        if first_view is not None:
            return first_view
    elif isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        if isinstance(first, Tensor):
            return first
        if isinstance(first, (list, tuple)) and first and isinstance(first[0], Tensor):
            return first[0]
    layout = f"dict with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else type(batch).__name__
    raise TypeError(
        f"{owner} cannot find the model inputs in a batch of type {layout}: expected a Tensor, a dict with "
        "'image' (or 'views'), or a tuple/list whose first element is a Tensor or a list of views. Pass "
        "`inputs_fn=lambda batch: ...` returning the tensor the model's forward takes."
    )


def default_forward_fn(pl_module: Any, x: Tensor) -> Any:
    """``pl_module(x)``: the forward used for extra (noise, probe) passes."""
    return pl_module(x)


def noise_inputs(
    x: Tensor,
    noise: str | Tensor | Callable[[Tensor, torch.Generator], Tensor],
    num_noise: int,
    generator: torch.Generator,
) -> Tensor:
    """Reference (noise) inputs for informativeness (spec 2.5).

    ``"uniform"``: ``U(lo_c, hi_c)`` element-wise with the per-channel min/max of ``x`` (``U(0, 1)`` for
    [0, 1] images); ``"gaussian"``: per-channel mean/std of ``x``; a Tensor: fixed inputs; a callable
    ``(x, generator) -> Tensor``. Draws come from ``generator`` (on its own device), the result is on
    ``x``'s device in ``x``'s dtype.

    Example:
        >>> x = torch.rand(4, 3, 8, 8)
        >>> noise_inputs(x, "uniform", 2, torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3, 8, 8])
    """
    if isinstance(noise, Tensor):
        return noise.to(device=x.device, dtype=x.dtype)
    if callable(noise):
        out = noise(x, generator)
        if not isinstance(out, Tensor):
            raise TypeError(f"The `noise` callable must return a Tensor, but returned {type(out).__name__}.")
        return out.to(x.device)
    xd = x.detach().float()
    shape = (num_noise, *x.shape[1:])
    axes = [d for d in range(xd.ndim) if d != 1] if xd.ndim > 1 else [0]
    view = [1] * xd.ndim
    if xd.ndim > 1:
        view[1] = xd.shape[1]
    gen_device = generator.device
    if noise == "uniform":
        lo = xd.amin(dim=axes).reshape(view)
        hi = xd.amax(dim=axes).reshape(view)
        u = torch.rand(shape, generator=generator, device=gen_device).to(x.device)
        return (lo + (hi - lo) * u).to(x.dtype)
    mean = xd.mean(dim=axes).reshape(view)
    std = xd.std(dim=axes).reshape(view) if xd.numel() > 1 else torch.zeros_like(mean)
    return (mean + std * torch.randn(shape, generator=generator, device=gen_device).to(x.device)).to(x.dtype)


def resolve_head(pl_module: Any, head: str | Callable[[Any, Tensor], Tensor] | None,
                 pooled_head: str | None) -> Callable[[Tensor], Tensor] | None:
    """The head ``h -> z`` a callback was configured with: a ``PooledHead`` around the module named by
    ``pooled_head``, the module named by ``head``, ``lambda h: head(pl_module, h)`` for a callable, or None."""
    root = unwrap_model(pl_module)
    if pooled_head is not None:
        from reprlens.attribution import PooledHead

        return PooledHead(get_module(root, pooled_head, what="pooled head"))
    if isinstance(head, str):
        return get_module(root, head, what="head")
    if head is not None:
        fn, module = head, pl_module
        return lambda h: fn(module, h)
    return None

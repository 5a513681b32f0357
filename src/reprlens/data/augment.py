"""Batched, counter-seeded image augmentation for two-view (contrastive) batches.

One call augments a whole batch with tensor ops (one ``grid_sample`` for the geometry, a few
element-wise ops for the colour), so it is cheap enough to run inside a CPU DataLoader. Every random
parameter is a hash of ``(seed key, epoch, view, example index)`` (see :mod:`reprlens.data._random`),
so the views of an example are reproducible whatever the batch it lands in, and different per
epoch and per view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from reprlens.data._random import hash32_int, uniforms

__all__ = ["AugmentConfig", "augment_batch"]


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of :func:`augment_batch` (SimCLR-style, scaled down for small images).

    Args:
        crop_scale: range of the crop area as a fraction of the image area.
        crop_ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        flip_prob: probability of a horizontal flip (use 0 for digits, where flips change meaning).
        jitter_prob: probability that colour jitter is applied to an example.
        brightness: brightness factor drawn from ``[1 - b, 1 + b]``.
        contrast: contrast factor drawn from ``[1 - c, 1 + c]``.
        saturation: saturation factor drawn from ``[1 - s, 1 + s]`` (RGB only).
        grayscale_prob: probability of converting to grey (RGB only).
    """

    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_prob: float = 0.2

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"Expected 0 < crop_scale[0] <= crop_scale[1] <= 1, but got {self.crop_scale!r}.")
        rlo, rhi = self.crop_ratio
        if not (0 < rlo <= rhi):
            raise ValueError(f"Expected 0 < crop_ratio[0] <= crop_ratio[1], but got {self.crop_ratio!r}.")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob"):
            p = getattr(self, name)
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"Expected `{name}` in [0, 1], but got {p!r}.")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not (0.0 <= v < 1.0):
                raise ValueError(f"Expected `{name}` in [0, 1), but got {v!r}.")


def _luminance(images: Tensor) -> Tensor:
    if images.shape[1] == 1:
        return images
    w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    return (images * w[None, :, None, None]).sum(1, keepdim=True)


def augment_batch(
    images: Tensor,
    index: Tensor,
    key: int,
    *,
    epoch: int = 0,
    view: int = 0,
    config: AugmentConfig | None = None,
    landmarks: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Random resized crop + horizontal flip + colour jitter + random grey, for a whole batch at once.

    Args:
        images: ``(N, C, H, W)`` float images in ``[0, 1]`` (C = 1 or 3).
        index: ``(N,)`` int64 example ids; they select the random parameters.
        key: 32-bit seed key (see :func:`reprlens.data._random.seed_key`).
        epoch: epoch number (different epochs give different views).
        view: view number (0, 1, ...).
        config: augmentation parameters (default :class:`AugmentConfig`).
        landmarks: optional ``(N, L, 2)`` (row, col) pixel coordinates in ``images``; they are mapped
            through the same crop/flip (NaN where they fall outside the view).

    Returns:
        ``(views, landmarks)``: ``(N, C, H, W)`` augmented images in ``[0, 1]``, and the mapped
        landmarks (None if none were given).

    Example:
        >>> import torch
        >>> x = torch.rand(4, 3, 16, 16)
        >>> v, _ = augment_batch(x, torch.arange(4), key=123, view=0)
        >>> v.shape
        torch.Size([4, 3, 16, 16])
        >>> bool(torch.equal(v, augment_batch(x, torch.arange(4), key=123, view=0)[0]))
        True
    """
    if images.ndim != 4:
        raise ValueError(f"Expected images of shape (N, C, H, W), but got {tuple(images.shape)}.")
    cfg = config or AugmentConfig()
    n, c, h, w = images.shape
    dtype = images.dtype if images.is_floating_point() else torch.float32
    x = images.to(dtype)
    sub = hash32_int(key ^ hash32_int(((int(epoch) & 0xFFFFFF) * 64 + int(view) + 0x2545F491) & 0xFFFFFFFF))
    u = uniforms(sub, index.to(images.device), 10, dtype=dtype)

    # geometry: one affine grid for crop + flip (normalised coordinates, align_corners=False)
    lo, hi = cfg.crop_scale
    area = lo + (hi - lo) * u[:, 0]
    log_r = math.log(cfg.crop_ratio[0]) + (math.log(cfg.crop_ratio[1]) - math.log(cfg.crop_ratio[0])) * u[:, 1]
    ratio = torch.exp(log_r)
    cw = torch.sqrt(area * ratio).clamp(max=1.0)
    ch = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - cw)
    cy = (2 * u[:, 3] - 1) * (1 - ch)
    flip = torch.where(u[:, 4] < cfg.flip_prob, -1.0, 1.0).to(dtype)
    zeros = torch.zeros_like(cw)
    theta = torch.stack(
        [torch.stack([cw * flip, zeros, cx], -1), torch.stack([zeros, ch, cy], -1)], dim=1
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # colour: brightness, contrast, saturation (with probability), then random grey
    apply = (u[:, 5] < cfg.jitter_prob).to(dtype)
    b = 1 + apply * cfg.brightness * (2 * u[:, 6] - 1)
    k = 1 + apply * cfg.contrast * (2 * u[:, 7] - 1)
    out = (out * b[:, None, None, None]).clamp(0, 1)
    mean = _luminance(out).mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * k[:, None, None, None] + mean).clamp(0, 1)
    if c == 3:
        s = 1 + apply * cfg.saturation * (2 * u[:, 8] - 1)
        grey = _luminance(out)
        out = ((out - grey) * s[:, None, None, None] + grey).clamp(0, 1)
        to_grey = (u[:, 9] < cfg.grayscale_prob)[:, None, None, None]
        out = torch.where(to_grey, _luminance(out).expand_as(out), out)

    mapped = None
    if landmarks is not None:
        lm = landmarks.to(dtype)
        x_in = (2 * lm[..., 1] + 1) / w - 1
        y_in = (2 * lm[..., 0] + 1) / h - 1
        x_out = (x_in - cx[:, None]) / (cw * flip)[:, None]
        y_out = (y_in - cy[:, None]) / ch[:, None]
        col = ((x_out + 1) * w - 1) / 2
        row = ((y_out + 1) * h - 1) / 2
        mapped = torch.stack([row, col], -1)
        inside = (row >= -0.5) & (row <= h - 0.5) & (col >= -0.5) & (col <= w - 0.5)
        mapped = torch.where(inside[..., None], mapped, torch.full_like(mapped, float("nan")))
    return out.to(images.dtype) if images.is_floating_point() else out, mapped

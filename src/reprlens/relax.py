"""RELAX: which pixels does a *representation* depend on? Masking-based explanation with uncertainty.

Implements Wickstrøm et al., "RELAX: Representation Learning Explainability" (IJCV 2023), with the
semantics of the public reference code (``relax-xai`` 0.0.5), vectorised:

- masks are drawn as tiny ``s x s`` Bernoulli grids (:class:`MaskBank`) and rendered on the compute
  device in chunks (bilinear upsampling, reflect padding, random shift; no per-mask Python loop);
- every rendered chunk is applied to all images of the call, several images per encoder forward;
- the mask-weighted mean similarity (importance) and the weighted sum of squares (M2) are accumulated
  exactly with two GEMMs per chunk and Chan's parallel merge in float64 (scores shifted by a
  per-image constant, so nothing cancels);
- optional early stopping on the per-pixel standard error, optional autocast for the encoder;
- ``mode="reference"`` reproduces relax-xai's mask stream (same RNG order and device) and estimator
  (``eps = 1e-10`` pseudo-observation, M2 uncertainty) so maps can be compared on identical masks.
  Unlike the reference, results never depend on ``batch_size`` (its ``batch_size=1`` bug is absent).

Choosing parameters: ``num_cells=7, p_keep=0.5`` are tuned for 112-224 px images; smaller images want
fewer cells (e.g. 4-5 cells at 32-64 px). ``num_masks=1000`` with ``early_stop_tol`` is a fast mode for
monitoring; 3000 masks for final maps. Importance is a raw similarity (for cosine often a narrow band
close to 1): compare ranks, or min-max scale for display. The RISE-style normalisation used by a later
author notebook equals ``importance * sum_of_weights / (num_masks_used * p_keep)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    >>> res = Relax(enc, num_masks=200, num_cells=4, seed=0).explain(torch.rand(2, 3, 16, 16))
    >>> res.importance.shape, res.num_masks_used.tolist()
    (torch.Size([2, 16, 16]), [200, 200])
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlens.utils import check_positive_int

__all__ = ["MaskBank", "Relax", "RelaxResult", "relax", "sample_masks"]

_REFERENCE_EPS = 1e-10


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RelaxResult:
    """Maps and sufficient statistics of one :meth:`Relax.explain` call; all tensors are batched.

    Attributes:
        importance: ``(N, H, W)`` mask-weighted mean similarity ``A / (eps + S)``.
        uncertainty: ``(N, H, W)`` the selected uncertainty: weighted variance ``M2 / S`` (default) or
            ``M2`` (reference mode / ``uncertainty="m2"``).
        m2: ``(N, H, W)`` unnormalised weighted sum of squares ``sum_n M_n (s_n - R)^2``.
        sum_of_weights: ``(N, H, W)`` ``S = sum_n M_n`` (``eps + S`` in reference mode).
        sum_of_squared_weights: ``(N, H, W)`` ``S2 = sum_n M_n^2``.
        u_relax: ``(N, H, W)`` importance with the high-uncertainty pixels zeroed.
        u_relax_mask: ``(N, H, W)`` bool, pixels kept by the uncertainty threshold.
        num_masks_used: ``(N,)`` int64, masks used per image (less than ``num_masks`` after early stop).
        uncertainty_kind: ``"variance"`` or ``"m2"``.
        epsilon: the pseudo-weight included in ``sum_of_weights`` (0 in default mode).

    Example:
        >>> r = relax(lambda x: x.mean((2, 3)) + 1, torch.rand(3, 8, 8), num_masks=50, num_cells=3, seed=0)
        >>> r.variance.shape
        torch.Size([1, 8, 8])
    """

    importance: Tensor
    uncertainty: Tensor
    m2: Tensor
    sum_of_weights: Tensor
    sum_of_squared_weights: Tensor
    u_relax: Tensor
    u_relax_mask: Tensor
    num_masks_used: Tensor
    uncertainty_kind: Literal["variance", "m2"]
    epsilon: float = 0.0

    @property
    def _raw_weights(self) -> Tensor:
        return self.sum_of_weights - self.epsilon if self.epsilon else self.sum_of_weights

    @property
    def variance(self) -> Tensor:
        """Mask-weighted (biased) variance ``M2 / S`` of the similarity; NaN where ``S = 0``."""
        s = self._raw_weights
        return torch.where(s > 0, self.m2 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.nan)

    @property
    def standard_error(self) -> Tensor:
        """Standard error of the importance, ``sqrt(V * S2) / S`` (Kish effective sample size)."""
        s = self._raw_weights
        return torch.sqrt(self.variance * self.sum_of_squared_weights) / s

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RelaxResult:
        """Move every tensor (floating tensors also cast to ``dtype`` when given)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
            out[f.name] = v
        return RelaxResult(**out)

    def cpu(self) -> RelaxResult:
        """Copy of the result on the CPU."""
        return self.to("cpu")

    def as_dict(self) -> dict[str, Any]:
        """All fields (and ``variance``, ``standard_error``) in a plain dict, e.g. for ``torch.save``."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["variance"] = self.variance
        d["standard_error"] = self.standard_error
        return d


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------
def _check_shape(shape: Any) -> tuple[int, int]:
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2):
        raise ValueError(f"Expected the mask shape to be a pair (H, W), but got {shape!r}.")
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"Expected a positive mask shape (H, W), but got {shape!r}.")
    return h, w


def _check_mask_args(num_cells: Any, p_keep: Any, shift: Any, shape: tuple[int, int]) -> None:
    check_positive_int(num_cells, "num_cells")
    if isinstance(p_keep, bool) or not isinstance(p_keep, (int, float)) or not 0.0 < float(p_keep) < 1.0:
        raise ValueError(f"Expected `p_keep` (probability of keeping a grid cell) in (0, 1), but got {p_keep!r}.")
    if shift not in ("reference", "rise"):
        raise ValueError(f"Expected `shift` to be 'reference' or 'rise', but got {shift!r}.")
    if shift == "reference":
        pad = num_cells // 2
        h, w = shape
        if h <= pad or w <= pad:
            raise ValueError(
                f"Images of size {h}x{w} are too small for num_cells={num_cells}: reflect padding by "
                f"num_cells // 2 = {pad} needs H and W >= {pad + 1}. Use larger images or a smaller `num_cells` "
                f"(at most {2 * min(h, w) - 1})."
            )


def _rise_cell(shape: tuple[int, int], num_cells: int) -> tuple[int, int]:
    return math.ceil(shape[0] / num_cells), math.ceil(shape[1] / num_cells)


def _reflect(t: Tensor, n: int) -> Tensor:
    t = torch.where(t < 0, -t, t)
    return torch.where(t > n - 1, 2 * (n - 1) - t, t)


class MaskBank:
    """A reusable stream of RELAX masks stored at grid resolution (never ``N x H x W``).

    Mask ``n`` is the ``s x s`` grid ``grids[n]`` upsampled bilinearly to ``H x W`` (align_corners=False),
    reflect-padded by ``s // 2`` and cropped at offset ``shifts[n]`` (``shift="reference"``, the relax-xai
    procedure), or upsampled to ``(s+1)`` cells of ``ceil(H/s)`` pixels and cropped without padding
    (``shift="rise"``). Rendering is vectorised: one interpolation and two gathers per chunk.

    Attributes:
        grids: ``(N, s, s)`` bool, True where a cell is kept.
        shifts: ``(N, 2)`` int64 ``(shift_rows, shift_cols)``.
        shape: ``(H, W)`` of the rendered masks.

    Example:
        >>> bank = MaskBank.sample(10, (16, 16), num_cells=4, seed=0)
        >>> bank.render(0, 3).shape
        torch.Size([3, 16, 16])
    """

    def __init__(
        self,
        grids: Tensor,
        shifts: Tensor,
        shape: tuple[int, int],
        *,
        num_cells: int,
        p_keep: float = 0.5,
        shift: Literal["reference", "rise"] = "reference",
    ) -> None:
        shape = _check_shape(shape)
        _check_mask_args(num_cells, p_keep, shift, shape)
        if grids.ndim != 3 or grids.shape[1:] != (num_cells, num_cells):
            raise ValueError(f"Expected grids of shape (N, {num_cells}, {num_cells}), but got {tuple(grids.shape)}.")
        if shifts.shape != (grids.shape[0], 2):
            raise ValueError(f"Expected shifts of shape ({grids.shape[0]}, 2), but got {tuple(shifts.shape)}.")
        self.grids = grids.bool()
        self.shifts = shifts.long()
        self.shape = shape
        self.num_cells = num_cells
        self.p_keep = float(p_keep)
        self.shift = shift
        self._sums: dict[str, tuple[Tensor, Tensor]] = {}
        self._ops: dict[tuple[str, torch.dtype], tuple[Tensor, Tensor]] = {}

    @classmethod
    def sample(
        cls,
        num_masks: int,
        shape: tuple[int, int],
        *,
        num_cells: int = 7,
        p_keep: float = 0.5,
        shift: Literal["reference", "rise"] = "reference",
        block_size: int = 100,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> MaskBank:
        """Draw ``num_masks`` masks in blocks of ``block_size`` in relax-xai's RNG order.

        Per block of B masks: ``rand(B, 1, s, s) < p_keep``, then ``randint(0, s, (B,))`` for the row
        shifts, then for the column shifts (for ``"rise"`` the upper bounds are the cell sizes). With the
        same seed, block size and device the masks equal relax-xai 0.0.5's. Draws happen on
        ``generator.device`` when a generator is given, else on ``device`` (default CPU) from a fresh
        generator seeded with ``seed``, else from that device's global generator.

        Example:
            >>> MaskBank.sample(5, (8, 8), num_cells=3, seed=1).grids.shape
            torch.Size([5, 3, 3])
        """
        check_positive_int(num_masks, "num_masks")
        check_positive_int(block_size, "block_size")
        shape = _check_shape(shape)
        _check_mask_args(num_cells, p_keep, shift, shape)
        if seed is not None and generator is not None:
            raise ValueError("Pass either `seed` or `generator`, not both (got both).")
        if generator is not None:
            dev = generator.device
        else:
            dev = torch.device(device if device is not None else "cpu")
            if seed is not None:
                generator = torch.Generator(dev)
                generator.manual_seed(int(seed))
        if shift == "reference":
            hi_r = hi_c = num_cells
        else:
            hi_r, hi_c = _rise_cell(shape, num_cells)
        grids, srow, scol = [], [], []
        for start in range(0, num_masks, block_size):
            b = min(block_size, num_masks - start)
            grids.append(torch.rand(b, 1, num_cells, num_cells, generator=generator, device=dev) < p_keep)
            srow.append(torch.randint(0, hi_r, (b,), generator=generator, device=dev))
            scol.append(torch.randint(0, hi_c, (b,), generator=generator, device=dev))
        g = torch.cat(grids)[:, 0]
        shifts = torch.stack([torch.cat(srow), torch.cat(scol)], dim=1)
        return cls(g, shifts, shape, num_cells=num_cells, p_keep=p_keep, shift=shift)

    def __len__(self) -> int:
        return int(self.grids.shape[0])

    def __repr__(self) -> str:
        return (
            f"MaskBank(num_masks={len(self)}, shape={self.shape}, num_cells={self.num_cells}, "
            f"p_keep={self.p_keep}, shift={self.shift!r}, device={self.grids.device})"
        )

    def render(
        self,
        start: int,
        stop: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        method: Literal["interpolate", "separable"] = "interpolate",
    ) -> Tensor:
        """Masks ``start:stop`` at full resolution, ``(stop - start, H, W)`` in [0, 1].

        ``method="interpolate"``: interpolate -> reflect-pad -> crop, done as one ``F.interpolate`` and two
        gathers with reflected indices (bit-identical to relax-xai's mask generator on the same device).
        ``method="separable"``: ``M = L[sx] g L'[sy]^T``, two small batched matmuls (several times faster;
        equal within ~3e-7 in float32, ~1e-16 in float64).
        """
        if method not in ("interpolate", "separable"):
            raise ValueError(f"Expected `method` to be 'interpolate' or 'separable', but got {method!r}.")
        dev = torch.device(device) if device is not None else self.grids.device
        g = self.grids[start:stop].to(device=dev, dtype=dtype)
        sh = self.shifts[start:stop].to(dev)
        b = g.shape[0]
        h, w = self.shape
        s = self.num_cells
        if b == 0:
            return torch.empty(0, h, w, device=dev, dtype=dtype)
        if method == "separable":
            key = (str(dev), dtype)
            if key not in self._ops:
                self._ops[key] = _shift_operators(self, dev, dtype)
            lr, lc = self._ops[key]
            with _highest_matmul_precision(dev.type == "cuda" and dtype == torch.float32):
                return torch.bmm(torch.bmm(lr[sh[:, 0]], g), lc[sh[:, 1]].transpose(1, 2))
        if self.shift == "reference":
            up = F.interpolate(g[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            pad = s // 2
            rows = _reflect(sh[:, :1] + torch.arange(h, device=dev) - pad, h)
            cols = _reflect(sh[:, 1:] + torch.arange(w, device=dev) - pad, w)
        else:
            ch, cw = _rise_cell(self.shape, s)
            up = F.interpolate(g[:, None], size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False)
            up = up[:, 0]
            rows = sh[:, :1] + torch.arange(h, device=dev)
            cols = sh[:, 1:] + torch.arange(w, device=dev)
        out = up.gather(1, rows[:, :, None].expand(b, h, up.shape[2]))
        return out.gather(2, cols[:, None, :].expand(b, h, w))

    def batches(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Iterator[Tensor]:
        """Rendered masks in consecutive chunks of ``batch_size``."""
        check_positive_int(batch_size, "batch_size")
        for start in range(0, len(self), batch_size):
            yield self.render(start, min(start + batch_size, len(self)), device=device, dtype=dtype)

    def weight_sums(self, *, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``(S, S2)``: sums of the masks and of their squares, ``(H, W)`` float64, cached per device."""
        dev = torch.device(device) if device is not None else self.grids.device
        key = str(dev)
        if key not in self._sums:
            s = torch.zeros(self.shape, dtype=torch.float64, device=dev)
            s2 = torch.zeros_like(s)
            for m in self.batches(256, device=dev):
                m = m.double()
                s += m.sum(0)
                s2 += (m * m).sum(0)
            self._sums[key] = (s, s2)
        return self._sums[key]

    def to(self, device: torch.device | str) -> MaskBank:
        """The same masks with grids and shifts on ``device``."""
        return MaskBank(
            self.grids.to(device),
            self.shifts.to(device),
            self.shape,
            num_cells=self.num_cells,
            p_keep=self.p_keep,
            shift=self.shift,  # type: ignore[arg-type]
        )


def sample_masks(
    num_masks: int,
    shape: tuple[int, int],
    *,
    batch_size: int = 100,
    num_cells: int = 7,
    p_keep: float = 0.5,
    shift: Literal["reference", "rise"] = "reference",
    block_size: int = 100,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[Tensor]:
    """Stream rendered RELAX masks in ``(b, H, W)`` batches (see :meth:`MaskBank.sample`).

    Example:
        >>> [m.shape[0] for m in sample_masks(250, (16, 16), batch_size=100, num_cells=4, seed=0)]
        [100, 100, 50]
    """
    bank = MaskBank.sample(
        num_masks,
        shape,
        num_cells=num_cells,
        p_keep=p_keep,
        shift=shift,
        block_size=block_size,
        generator=generator,
        seed=seed,
        device=device if generator is None else None,
    )
    return bank.batches(batch_size, device=device, dtype=dtype)


class _BankSource:
    def __init__(self, bank: MaskBank, limit: int, device: torch.device, dtype: torch.dtype, method: str) -> None:
        self.bank, self.limit, self.device, self.dtype, self.pos = bank, min(limit, len(bank)), device, dtype, 0
        self.method = method

    def total(self) -> int | None:
        return self.limit

    def take(self, n: int) -> Tensor | None:
        if self.pos >= self.limit:
            return None
        stop = min(self.pos + n, self.limit)
        out = self.bank.render(self.pos, stop, device=self.device, dtype=self.dtype, method=self.method)
        self.pos = stop
        return out


class _IterSource:
    """Re-chunks an iterable of ``(b, H, W)`` / ``(b, 1, H, W)`` tensors; validates shape and range."""

    def __init__(self, masks: Iterable[Tensor], shape: tuple[int, int], device: torch.device, dtype: torch.dtype):
        self.it = iter(masks)
        self.shape, self.device, self.dtype = shape, device, dtype
        self.buf: list[Tensor] = []
        self.nbuf = 0
        self.checked = False
        self._total = int(masks.shape[0]) if isinstance(masks, Tensor) else None

    def total(self) -> int | None:
        return self._total

    def _prep(self, m: Any) -> Tensor:
        if not isinstance(m, Tensor):
            raise TypeError(f"Expected mask batches to be tensors (b, H, W) or (b, 1, H, W), but got {type(m).__name__}.")
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        elif m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or tuple(m.shape[1:]) != self.shape:
            raise ValueError(
                f"Expected masks of shape (b, {self.shape[0]}, {self.shape[1]}) or (b, 1, {self.shape[0]}, "
                f"{self.shape[1]}) matching the images, but got {tuple(m.shape)}."
            )
        m = m.to(device=self.device, dtype=self.dtype)
        if not self.checked and m.numel() > 0:
            self.checked = True
            lo, hi = torch.aminmax(m)
            if not (bool(lo >= -1e-6) and bool(hi <= 1 + 1e-6)):  # interpolation rounding
                raise ValueError(
                    f"Expected mask values in [0, 1], but got values in [{float(lo):.4g}, {float(hi):.4g}]. "
                    "Rescale the masks (1 keeps a pixel, 0 removes it)."
                )
        return m

    def take(self, n: int) -> Tensor | None:
        while self.nbuf < n:
            try:
                nxt = next(self.it)
            except StopIteration:
                break
            m = self._prep(nxt)
            if m.shape[0]:
                self.buf.append(m)
                self.nbuf += m.shape[0]
        if self.nbuf == 0:
            return None
        cat = self.buf[0] if len(self.buf) == 1 else torch.cat(self.buf)
        out, rest = cat[:n], cat[n:]
        self.buf = [rest] if rest.shape[0] else []
        self.nbuf = rest.shape[0]
        return out


# --------------------------------------------------------------------------------------------------
# Explainer
# --------------------------------------------------------------------------------------------------
def _compute_device(encoder: Any, images: Tensor) -> torch.device:
    if isinstance(encoder, nn.Module):
        for t in encoder.parameters():
            return t.device
        for t in encoder.buffers():
            return t.device
    return images.device


@contextlib.contextmanager
def _eval_mode(encoder: Any, enabled: bool) -> Iterator[None]:
    if not enabled or not isinstance(encoder, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _highest_matmul_precision(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _interp_matrix(n_out: int, s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``U (n_out, s)``: 1-D bilinear interpolation (align_corners=False) of ``s`` cells to ``n_out`` samples."""
    i = torch.arange(n_out, dtype=torch.float64, device=device)
    u = ((i + 0.5) * (s / n_out) - 0.5).clamp_min(0.0)
    i0 = u.floor().long().clamp_max(s - 1)
    i1 = (i0 + 1).clamp_max(s - 1)
    lam = u - i0.to(torch.float64)
    U = torch.zeros(n_out, s, dtype=torch.float64, device=device)
    rows = torch.arange(n_out, device=device)
    U.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    U.index_put_((rows, i1), lam, accumulate=True)
    return U.to(dtype)


def _shift_operators(bank: MaskBank, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Row and column operators ``L (n_shifts, H, s)``, ``L' (n_shifts, W, s)``: mask = L[sx] g L'[sy]^T."""
    h, w = bank.shape
    s = bank.num_cells
    ops = []
    for n, lo_n in enumerate((h, w)):
        if bank.shift == "reference":
            U = _interp_matrix(lo_n, s, dtype, device)
            sig = torch.arange(s, device=device)
            idx = _reflect(sig[:, None] + torch.arange(lo_n, device=device) - s // 2, lo_n)
        else:
            cell = _rise_cell(bank.shape, s)[n]
            U = _interp_matrix((s + 1) * cell, s, dtype, device)
            sig = torch.arange(cell, device=device)
            idx = sig[:, None] + torch.arange(lo_n, device=device)
        ops.append(U[idx])
    return ops[0], ops[1]


class _PixelAcc:
    """Exact streaming accumulation at pixel resolution: two GEMMs and a Chan merge per chunk."""

    def __init__(self, k: int, hw: int, dtype: torch.dtype, device: torch.device, need_s2: bool) -> None:
        self.S = torch.zeros(hw, dtype=dtype, device=device)
        self.S2 = torch.zeros(hw, dtype=dtype, device=device) if need_s2 else None
        self.R = torch.zeros(k, hw, dtype=dtype, device=device)
        self.M2 = torch.zeros(k, hw, dtype=dtype, device=device)
        self.dtype = dtype

    def update(self, d: Tensor, m: Tensor, active: Tensor | None, **_: Any) -> None:
        b = m.shape[0]
        m64 = m.reshape(b, -1).to(self.dtype)
        s_b = m64.sum(0)
        if self.S2 is not None:
            self.S2 += (m64 * m64).sum(0)
        ad = torch.cat([d, d * d]) @ m64
        a_b, q_b = ad[: d.shape[0]], ad[d.shape[0] :]
        pos_b = s_b > 0
        r_b = torch.where(pos_b, a_b / torch.where(pos_b, s_b, torch.ones_like(s_b)), torch.zeros_like(a_b))
        m2_b = torch.where(pos_b, q_b - a_b * r_b, torch.zeros_like(a_b))
        s_new = self.S + s_b
        pos_new = s_new > 0
        frac = torch.where(pos_new, s_b / torch.where(pos_new, s_new, torch.ones_like(s_new)), torch.zeros_like(s_new))
        r_old = self.R if active is None else self.R.index_select(0, active)
        m2_old = self.M2 if active is None else self.M2.index_select(0, active)
        delta = r_b - r_old
        r_new = r_old + delta * frac
        m2_new = m2_old + m2_b + delta * delta * (self.S * frac)
        if active is None:
            self.R, self.M2 = r_new, m2_new
        else:
            self.R.index_copy_(0, active, r_new)
            self.M2.index_copy_(0, active, m2_new)
        self.S = s_new

    def stats(self, active: Tensor | None, S: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(R', M2, S)`` for the given images (all when None); R' is relative to the shift."""
        del S  # stopped images keep their frozen R', M2
        if active is None:
            return self.R, self.M2, self.S
        return self.R.index_select(0, active), self.M2.index_select(0, active), self.S


class _CellAcc:
    """Exact accumulation at grid resolution per shift bin (s^2 MACs per image-mask); rendered on demand."""

    def __init__(self, k: int, bank: MaskBank, dtype: torch.dtype, device: torch.device, need_s2: bool) -> None:
        self.bank = bank
        s = bank.num_cells
        self.Lr, self.Lc = _shift_operators(bank, device, dtype)
        self.nbx, self.nby = self.Lr.shape[0], self.Lc.shape[0]
        nb = self.nbx * self.nby
        self.G0 = torch.zeros(nb, s * s, dtype=dtype, device=device)
        self.G1 = torch.zeros(k, nb, s * s, dtype=dtype, device=device)
        self.G2 = torch.zeros(k, nb, s * s, dtype=dtype, device=device)
        self.S2 = torch.zeros(bank.shape[0] * bank.shape[1], dtype=dtype, device=device) if need_s2 else None
        self.dtype, self.device = dtype, device
        self.det = torch.are_deterministic_algorithms_enabled() and device.type != "cpu"

    def update(self, d: Tensor, m: Tensor, active: Tensor | None, *, start: int, stop: int) -> None:
        g = self.bank.grids[start:stop].to(device=self.device, dtype=self.dtype).flatten(1)  # (b, s^2)
        sh = self.bank.shifts[start:stop].to(self.device)
        bins = sh[:, 0] * self.nby + sh[:, 1]
        if self.S2 is not None:
            mf = m.reshape(m.shape[0], -1)
            self.S2 += (mf * mf).sum(0).to(self.dtype)  # pairwise float32 sum per chunk, then float64
        dd = torch.stack([d, d * d])  # (2, ka, b)
        contrib = dd[..., None] * g  # (2, ka, b, s^2)
        if self.det:
            onehot = F.one_hot(bins, self.G0.shape[0]).to(self.dtype)  # (b, nb)
            upd = torch.einsum("tkbc,bn->tknc", contrib, onehot)
            self.G0 += onehot.T @ g
        else:
            upd = torch.zeros(2, d.shape[0], *self.G0.shape, dtype=self.dtype, device=self.device)
            upd.index_add_(2, bins, contrib)
            self.G0.index_add_(0, bins, g)
        if active is None:
            self.G1 += upd[0]
            self.G2 += upd[1]
        else:
            self.G1.index_add_(0, active, upd[0])
            self.G2.index_add_(0, active, upd[1])

    def _render(self, G: Tensor) -> Tensor:
        # G (k, nbx*nby, s*s) -> (k, H*W): sum over bins of Lr[x] G[x, y] Lc[y]^T
        s = self.bank.num_cells
        k = G.shape[0]
        h, w = self.bank.shape
        Gv = G.reshape(k, self.nbx, self.nby, s, s)
        t = torch.einsum("kxyij,ywj->kxiw", Gv, self.Lc)
        return torch.einsum("xhi,kxiw->khw", self.Lr, t).reshape(k, h * w)

    def stats(self, active: Tensor | None, S: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(R', M2, S)``; ``S`` (per image, ``(k, HW)``) overrides the current weight sums."""
        G1 = self.G1 if active is None else self.G1.index_select(0, active)
        G2 = self.G2 if active is None else self.G2.index_select(0, active)
        if S is None:
            S = self._render(self.G0[None])[0]
        A, Q = self._render(G1), self._render(G2)
        pos = S > 0
        R = torch.where(pos, A / torch.where(pos, S, torch.ones_like(S)), torch.zeros_like(A))
        return R, Q - A * R, S


_RELAX_ARGS = (
    "num_masks",
    "batch_size",
    "num_cells",
    "p_keep",
    "similarity",
    "shift",
    "baseline",
    "uncertainty",
    "mode",
    "mask_block_size",
    "generator",
    "seed",
    "accumulate_dtype",
    "autocast_dtype",
    "accumulate_at",
    "images_per_forward",
    "early_stop_tol",
    "early_stop_quantile",
    "early_stop_min_masks",
    "early_stop_every_n_masks",
    "u_relax_quantile",
    "output_transform",
    "eval_mode",
    "pad_last_batch",
    "progress",
    "render_method",
)


class Relax:
    """RELAX explainer for an encoder: importance and uncertainty maps of its representation.

    For images ``x_k`` and random smooth masks ``M_n``, the score ``s_kn = sim(f(x_k), f(M_n * x_k))``
    is attributed to the kept pixels: importance ``R = sum_n M_n s_n / sum_n M_n`` (the expected
    similarity given the pixel is kept), ``M2 = sum_n M_n (s_n - R)^2`` and variance ``M2 / S``.
    U-RELAX keeps the importance where the uncertainty is at most its per-image ``u_relax_quantile``
    (lower order statistic). All images of a call share the same masks.

    Args:
        encoder: module or callable mapping ``(B, C, H, W)`` to ``(B, ...)`` (flattened to ``(B, D)``).
        num_masks: masks per image (cap when early stopping). Ignored when ``masks`` are passed.
        batch_size: maximum masked inputs per encoder forward (memory knob; results do not depend on it).
        num_cells: grid cells per side ``s``.
        p_keep: probability of keeping a grid cell (relax-xai's misnamed ``probablity_of_drop``).
        similarity: ``"cosine"`` or ``fn(h_ref, h_masked) -> (B,)`` on ``(B, D)`` float32 inputs.
        shift: ``"reference"`` (relax-xai masks) or ``"rise"`` (RISE-style shifted crops).
        baseline: value of removed pixels: scalar, ``(C,)``, ``(C, H, W)`` or ``fn(images) -> (N, C, H, W)``.
            The default 0 is the dataset mean colour for normalised images.
        uncertainty: ``"variance"`` or ``"m2"``; None picks ``"variance"`` (default mode) / ``"m2"`` (reference).
        mode: ``"default"`` or ``"reference"`` (relax-xai 0.0.5 compatible: eps = 1e-10, M2 uncertainty,
            draws on the compute device).
        mask_block_size: masks drawn per RNG block (relax-xai's ``batch_size`` for identical masks).
        generator: RNG for the masks (its state advances). Mutually exclusive with ``seed``.
        seed: every call restarts the mask stream from this seed (same masks for all calls).
        accumulate_dtype: accumulator and result dtype (float64 recommended).
        autocast_dtype: run the encoder under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
        accumulate_at: ``"pixel"`` (two GEMMs per chunk at full resolution), ``"cell"`` (exact sums per shift
            bin at grid resolution, rendered at the end; only for generated masks / a MaskBank) or ``"auto"``
            (``"cell"`` when masks come from a bank and the number of shift bins is at most ``N / 4``).
        images_per_forward: images per encoder forward; None: ``min(K, batch_size)``.
        early_stop_tol: stop an image when the ``early_stop_quantile`` of its per-pixel standard error is
            at most ``early_stop_tol * (max R - min R)``; checked after ``early_stop_min_masks`` masks and
            then every ``early_stop_every_n_masks`` (use multiples of ``mask_block_size`` so an early-stopped
            result equals a fixed-N run). Default mode only.
        u_relax_quantile: uncertainty quantile of the U-RELAX threshold.
        output_transform: applied to the encoder output, e.g. ``lambda out: out[-1]``.
        eval_mode: put the encoder in eval mode during the call (flags restored afterwards).
        pad_last_batch: pad the last forward to a fixed shape (compiled encoders, CUDA graphs).
        progress: show a tqdm progress bar.
        render_method: how generated masks are rendered: ``"separable"`` (two small batched matmuls, fast;
            within ~3e-7 (a few float32 ulps) of relax-xai's float32 masks) or ``"interpolate"`` (bit-identical to relax-xai).

    Example:
        >>> from torch import nn
        >>> enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        >>> explainer = Relax(enc, num_masks=100, num_cells=4, seed=0)
        >>> explainer(torch.rand(3, 16, 16)).u_relax_mask.float().mean().item() >= 0.5
        True
    """

    def __init__(
        self,
        encoder: nn.Module | Callable[[Tensor], Any],
        *,
        num_masks: int = 3000,
        batch_size: int = 100,
        num_cells: int = 7,
        p_keep: float = 0.5,
        similarity: Literal["cosine"] | Callable[[Tensor, Tensor], Tensor] = "cosine",
        shift: Literal["reference", "rise"] = "reference",
        baseline: float | Tensor | Callable[[Tensor], Tensor] = 0.0,
        uncertainty: Literal["variance", "m2"] | None = None,
        mode: Literal["default", "reference"] = "default",
        mask_block_size: int = 100,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        autocast_dtype: torch.dtype | None = None,
        accumulate_at: Literal["auto", "pixel", "cell"] = "auto",
        images_per_forward: int | None = None,
        early_stop_tol: float | None = None,
        early_stop_quantile: float = 0.95,
        early_stop_min_masks: int = 500,
        early_stop_every_n_masks: int = 500,
        u_relax_quantile: float = 0.5,
        output_transform: Callable[[Any], Tensor] | None = None,
        eval_mode: bool = True,
        pad_last_batch: bool = False,
        progress: bool = False,
        render_method: Literal["separable", "interpolate"] = "separable",
    ) -> None:
        if not callable(encoder):
            raise TypeError(f"Expected `encoder` to be an nn.Module or a callable, but got {type(encoder).__name__}.")
        check_positive_int(num_masks, "num_masks")
        check_positive_int(batch_size, "batch_size")
        check_positive_int(mask_block_size, "mask_block_size")
        check_positive_int(images_per_forward, "images_per_forward", allow_none=True)
        check_positive_int(early_stop_min_masks, "early_stop_min_masks")
        check_positive_int(early_stop_every_n_masks, "early_stop_every_n_masks")
        if num_masks < batch_size:
            raise ValueError(
                f"Expected num_masks >= batch_size, but got num_masks={num_masks} < batch_size={batch_size}. "
                f"Lower `batch_size` to at most {num_masks} or use more masks."
            )
        _check_mask_args(num_cells, p_keep, shift, (10**9, 10**9))
        if not (similarity == "cosine" or callable(similarity)):
            raise ValueError(f"Expected `similarity` to be 'cosine' or a callable, but got {similarity!r}.")
        if mode not in ("default", "reference"):
            raise ValueError(f"Expected `mode` to be 'default' or 'reference', but got {mode!r}.")
        if uncertainty not in (None, "variance", "m2"):
            raise ValueError(f"Expected `uncertainty` to be 'variance', 'm2' or None, but got {uncertainty!r}.")
        if accumulate_at not in ("auto", "pixel", "cell"):
            raise ValueError(f"Expected `accumulate_at` to be 'auto', 'pixel' or 'cell', but got {accumulate_at!r}.")
        if seed is not None and generator is not None:
            raise ValueError("Pass either `seed` (restart the stream every call) or `generator`, not both.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Expected `generator` to be a torch.Generator, but got {type(generator).__name__}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"Expected `seed` to be an int, but got {type(seed).__name__}.")
        if not (isinstance(accumulate_dtype, torch.dtype) and accumulate_dtype.is_floating_point):
            raise TypeError(f"Expected `accumulate_dtype` to be a floating torch.dtype, but got {accumulate_dtype!r}.")
        if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
            raise TypeError(f"Expected `autocast_dtype` to be a torch.dtype or None, but got {autocast_dtype!r}.")
        for qname, q in (("u_relax_quantile", u_relax_quantile), ("early_stop_quantile", early_stop_quantile)):
            if isinstance(q, bool) or not isinstance(q, (int, float)):
                raise TypeError(f"Expected `{qname}` to be a number in [0, 1], but got {type(q).__name__} {q!r}.")
        if not 0.0 <= float(u_relax_quantile) <= 1.0:
            raise ValueError(f"Expected `u_relax_quantile` in [0, 1], but got {u_relax_quantile!r}.")
        if not 0.0 <= float(early_stop_quantile) <= 1.0:
            raise ValueError(f"Expected `early_stop_quantile` in [0, 1], but got {early_stop_quantile!r}.")
        if early_stop_tol is not None:
            if isinstance(early_stop_tol, bool) or not isinstance(early_stop_tol, (int, float)) or early_stop_tol <= 0:
                raise ValueError(f"Expected `early_stop_tol` to be a positive number or None, but got {early_stop_tol!r}.")
        if output_transform is not None and not callable(output_transform):
            raise TypeError("Expected `output_transform` to be callable, e.g. `lambda out: out[-1]`.")
        if not (isinstance(baseline, (int, float, Tensor)) or callable(baseline)) or isinstance(baseline, bool):
            raise TypeError(
                f"Expected `baseline` to be a number, a tensor (C,) or (C, H, W), or a callable, got {type(baseline).__name__}."
            )
        if mode == "reference":
            problems = []
            if early_stop_tol is not None:
                problems.append("early_stop_tol must be None")
            if shift != "reference":
                problems.append("shift must be 'reference'")
            if float(u_relax_quantile) != 0.5:
                problems.append("u_relax_quantile must be 0.5")
            if not (isinstance(baseline, (int, float)) and float(baseline) == 0.0):
                problems.append("baseline must be 0")
            if problems:
                raise ValueError(
                    "mode='reference' reproduces relax-xai 0.0.5, which has no such option: "
                    + "; ".join(problems)
                    + ". Use mode='default' for these options."
                )
            if uncertainty == "variance":
                warnings.warn(
                    "mode='reference' with uncertainty='variance' departs from relax-xai, which reports and "
                    "thresholds M2.",
                    stacklevel=2,
                )
        self.encoder = encoder
        self.num_masks = num_masks
        self.batch_size = batch_size
        self.num_cells = num_cells
        self.p_keep = float(p_keep)
        self.similarity = similarity
        self.shift = shift
        self.baseline = baseline
        self.mode = mode
        self.uncertainty = uncertainty or ("m2" if mode == "reference" else "variance")
        self.mask_block_size = mask_block_size
        self.generator = generator
        self.seed = seed
        self.accumulate_dtype = accumulate_dtype
        self.autocast_dtype = autocast_dtype
        self.accumulate_at = accumulate_at
        self.images_per_forward = images_per_forward
        self.early_stop_tol = None if early_stop_tol is None else float(early_stop_tol)
        self.early_stop_quantile = float(early_stop_quantile)
        self.early_stop_min_masks = early_stop_min_masks
        self.early_stop_every_n_masks = early_stop_every_n_masks
        self.u_relax_quantile = float(u_relax_quantile)
        self.output_transform = output_transform
        self.eval_mode = eval_mode
        self.pad_last_batch = pad_last_batch
        self.progress = progress
        if render_method not in ("separable", "interpolate"):
            raise ValueError(f"Expected `render_method` to be 'separable' or 'interpolate', got {render_method!r}.")
        self.render_method = render_method
        self.epsilon = _REFERENCE_EPS if mode == "reference" else 0.0
        self._bank_cache: dict[tuple[Any, ...], MaskBank] = {}

    # ---------------------------------------------------------------------------------------------
    def mask_bank(self, shape: tuple[int, int], device: torch.device | str) -> MaskBank:
        """The masks a call on images of ``shape`` computed on ``device`` uses (consumes the generator)."""
        device = torch.device(device)
        draw_device = device if self.mode == "reference" else torch.device("cpu")
        if self.generator is not None:
            draw_device = self.generator.device
        key = (shape, str(draw_device))
        if self.seed is not None and key in self._bank_cache:
            return self._bank_cache[key]
        bank = MaskBank.sample(
            self.num_masks,
            shape,
            num_cells=self.num_cells,
            p_keep=self.p_keep,
            shift=self.shift,
            block_size=self.mask_block_size,
            generator=self.generator,
            seed=self.seed,
            device=draw_device if self.generator is None else None,
        )
        if self.seed is not None:
            self._bank_cache = {key: bank}
        return bank

    def _encode(self, x: Tensor, device_type: str) -> Tensor:
        ctx = (
            torch.autocast(device_type=device_type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            out = self.encoder(x)
        if self.output_transform is not None:
            out = self.output_transform(out)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"The encoder returned a {type(out).__name__}, but RELAX needs a tensor (B, ...). Pass "
                "`output_transform`, e.g. `output_transform=lambda out: out[-1]` for list outputs or "
                "`lambda out: out['features']` for dicts."
            )
        if out.ndim < 2 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"Expected the encoder output to have shape (B, ...) with B = {x.shape[0]} inputs and at least "
                f"2 dims, but got {tuple(out.shape)}. Return one representation per input (or use "
                "`output_transform`)."
            )
        out = out.reshape(out.shape[0], -1)
        return out if out.dtype == torch.float64 else out.float()

    def _similarity(self, h_ref: Tensor, h: Tensor) -> Tensor:
        # h_ref: (g, D), h: (g, b, D) -> (g, b)
        g, b, d = h.shape
        if self.similarity == "cosine":
            return F.cosine_similarity(h_ref[:, None, :], h, dim=-1, eps=1e-8)
        ref = h_ref[:, None, :].expand(g, b, d).reshape(g * b, d)
        out = self.similarity(ref, h.reshape(g * b, d))  # type: ignore[operator]
        if not isinstance(out, Tensor) or tuple(out.shape) != (g * b,):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"Expected the similarity to return shape ({g * b},) for inputs of shape ({g * b}, {d}), but got "
                f"{got}. Reduce over the feature dimension (dim=1)."
            )
        return out.reshape(g, b)

    def _baseline_tensor(self, images: Tensor) -> Tensor | None:
        bl = self.baseline
        if isinstance(bl, (int, float)):
            return None if float(bl) == 0.0 else torch.full((1, 1, 1, 1), float(bl), dtype=images.dtype, device=images.device)
        if isinstance(bl, Tensor):
            t = bl.to(device=images.device, dtype=images.dtype)
            c, h, w = images.shape[1:]
            if t.ndim == 0:
                return t.reshape(1, 1, 1, 1)
            if t.ndim == 1 and t.shape[0] == c:
                return t.reshape(1, c, 1, 1)
            if t.ndim == 3 and tuple(t.shape) == (c, h, w):
                return t[None]
            raise ValueError(f"Expected a baseline tensor of shape (), ({c},) or ({c}, {h}, {w}), but got {tuple(t.shape)}.")
        t = bl(images)
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(images.shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"Expected the baseline callable to return shape {tuple(images.shape)}, but got {got}.")
        return t.to(images.dtype)

    # ---------------------------------------------------------------------------------------------
    def explain(self, images: Tensor, masks: MaskBank | Tensor | Iterable[Tensor] | None = None) -> RelaxResult:
        """Explain one image ``(C, H, W)`` or a batch ``(N, C, H, W)``; returns batched maps ``(N, H, W)``.

        Args:
            images: floating images, normalised as the encoder expects.
            masks: optional explicit masks: a :class:`MaskBank`, a tensor ``(B, H, W)`` / ``(B, 1, H, W)``
                or an iterable of such tensors (values in [0, 1]); ``num_masks`` is then ignored.

        Raises:
            TypeError / ValueError: bad images, masks or encoder outputs.
            RuntimeError: the encoder produced non-finite similarities.
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"Expected `images` to be a tensor (C, H, W) or (N, C, H, W), but got {type(images).__name__}.")
        if not images.is_floating_point():
            raise TypeError(
                f"Expected floating-point images, but got dtype {images.dtype}. Convert with `images.float() / 255` "
                "and normalise as the encoder expects."
            )
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"Expected images of shape (C, H, W) or (N, C, H, W), but got {tuple(images.shape)}.")
        if images.shape[0] == 0:
            raise ValueError("Expected at least one image, but got an empty batch.")
        if images.device.type == "meta":
            raise ValueError("Expected images holding data, but got a 'meta' tensor. Pass real (CPU/GPU) images.")
        if not bool(torch.isfinite(images).all()):
            bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"Expected finite images, but images {bad[:8]} contain NaN or Inf. Clean or drop them before "
                "explaining (RELAX scores would be undefined)."
            )
        shape = (int(images.shape[2]), int(images.shape[3]))
        if masks is None:
            _check_mask_args(self.num_cells, self.p_keep, self.shift, shape)
        device = _compute_device(self.encoder, images)
        with _eval_mode(self.encoder, self.eval_mode), torch.inference_mode():
            out = self._explain(images.detach().to(device), masks, shape, device)
        return RelaxResult(**{k: (v.clone() if isinstance(v, Tensor) else v) for k, v in out.items()})

    __call__ = explain

    def _explain(
        self, images: Tensor, masks: Any, shape: tuple[int, int], device: torch.device
    ) -> dict[str, Any]:
        k_total, c, h, w = images.shape
        hw = h * w
        acc = self.accumulate_dtype
        mask_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        bank: MaskBank | None = None
        if masks is None:
            bank = self.mask_bank(shape, device)
            source: Any = _BankSource(bank, self.num_masks, device, mask_dtype, self.render_method)
        elif isinstance(masks, MaskBank):
            if masks.shape != shape:
                raise ValueError(f"Expected a MaskBank of shape {shape} matching the images, but got {masks.shape}.")
            bank = masks
            source = _BankSource(masks, len(masks), device, mask_dtype, self.render_method)
        elif isinstance(masks, Tensor):
            source = _IterSource([masks], shape, device, mask_dtype)
            source._total = int(masks.shape[0]) if masks.ndim >= 3 else 1
        elif isinstance(masks, Iterable):
            source = _IterSource(masks, shape, device, mask_dtype)
        else:
            raise TypeError(f"Expected `masks` to be a MaskBank, a tensor or an iterable of tensors, got {type(masks).__name__}.")
        early = self.early_stop_tol is not None
        use_cell = False
        if bank is not None:
            nbins = (bank.num_cells**2) if bank.shift == "reference" else math.prod(_rise_cell(shape, bank.num_cells))
            if self.accumulate_at == "cell" or (self.accumulate_at == "auto" and nbins <= source.limit / 4):
                use_cell = True
        # S2 is image-independent: from the bank's cache when it is there and the whole bank is used
        s2_from_bank = (
            bank is not None and not early and source.limit == len(bank) and str(device) in bank._sums
        )
        if use_cell:
            assert bank is not None
            accum: Any = _CellAcc(k_total, bank, acc, device, need_s2=not s2_from_bank)
        else:
            accum = _PixelAcc(k_total, hw, acc, device, need_s2=not s2_from_bank)

        base = self._baseline_tensor(images)
        x_in = images if base is None else images - base
        ipf_all = min(self.images_per_forward or min(k_total, self.batch_size), k_total)
        mpf = max(1, self.batch_size // ipf_all)
        # several forwards share one rendered chunk, one similarity call and one accumulation update
        render_size = max(mpf, min(max(4 * self.mask_block_size, mpf), (64 << 20) // (4 * hw)))
        render_size = (render_size // mpf) * mpf
        buf = torch.empty(ipf_all * mpf * c * h * w, dtype=images.dtype, device=device)
        device_type = device.type

        # reference representations, same autocast settings as the masked forwards
        try:
            h_ref = torch.cat([self._encode(images[i : i + ipf_all], device_type) for i in range(0, k_total, ipf_all)])
        except RuntimeError as err:  # the images do not fit the encoder (channels, size, dtype, device)
            raise ValueError(
                f"The encoder could not be applied to the images of shape {tuple(images.shape)}, dtype "
                f"{images.dtype}, device {images.device} ({type(err).__name__}: {err}). Pass images in the layout, "
                "number of channels and normalisation the encoder expects."
            ) from err
        shift_c: Tensor | None = None
        bad = torch.zeros(k_total, dtype=torch.bool, device=device)
        S_img = torch.zeros(k_total, hw, dtype=acc, device=device)
        S2_img = torch.zeros(k_total, hw, dtype=acc, device=device)
        used = torch.zeros(k_total, dtype=torch.int64)
        active = torch.arange(k_total, device=device)
        active_host = list(range(k_total))
        all_active = True
        next_check = self.early_stop_min_masks
        pos = 0
        bar = None
        if self.progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=source.total(), desc="RELAX masks", unit="mask", leave=False)
            except ImportError:  # pragma: no cover
                bar = None
        hm_buf: Tensor | None = None
        with _highest_matmul_precision(acc == torch.float32):
            while active_host:
                n = render_size if not early else min(render_size, next_check - pos)
                start = pos
                m = source.take(n)
                if m is None:
                    break
                b = m.shape[0]
                m_in = m if m.dtype == images.dtype else m.to(images.dtype)
                ka = len(active_host)
                x_act = x_in if all_active else x_in.index_select(0, active)
                href_act = h_ref if all_active else h_ref.index_select(0, active)
                base_act = base if (base is None or base.shape[0] == 1 or all_active) else base.index_select(0, active)
                ipf = min(ipf_all, ka)
                hm_all: Tensor | None = None
                for j0 in range(0, b, mpf):
                    mj = m_in[j0 : j0 + mpf]
                    bj = mj.shape[0]
                    bpad = mpf if self.pad_last_batch else bj
                    if bpad != bj:
                        mj = torch.cat([mj, mj.new_ones(bpad - bj, h, w)])
                    for g0 in range(0, ka, ipf):
                        g1 = min(g0 + ipf, ka)
                        gsz = g1 - g0
                        xb = buf[: gsz * bpad * c * h * w].view(gsz, bpad, c, h, w)
                        torch.mul(x_act[g0:g1, None], mj[None, :, None], out=xb)
                        if base_act is not None:
                            xb.add_(base_act[g0:g1, None] if base_act.shape[0] > 1 else base_act[:, None])
                        hm = self._encode(xb.view(gsz * bpad, c, h, w), device_type).view(gsz, bpad, -1)
                        if hm_all is None:
                            dim = hm.shape[-1]
                            if hm_buf is None or hm_buf.shape[2] != dim or hm_buf.dtype != hm.dtype or hm_buf.shape[1] < b:
                                hm_buf = torch.empty(k_total, render_size, dim, dtype=hm.dtype, device=device)
                            hm_all = hm_buf[:ka, :b]
                        hm_all[g0:g1, j0 : j0 + bj] = hm[:, :bj]
                assert hm_all is not None
                scores = self._similarity(href_act, hm_all)
                # ---- exact streaming accumulation (scores shifted by a per-image constant) ----
                sc = scores.to(acc)
                bad_act = ~torch.isfinite(sc).all(1)
                if all_active:
                    bad |= bad_act
                else:
                    bad.index_copy_(0, active, bad.index_select(0, active) | bad_act)
                if shift_c is None:
                    shift_c = torch.nan_to_num(sc.mean(1), nan=0.0, posinf=0.0, neginf=0.0)
                d = sc - (shift_c if all_active else shift_c.index_select(0, active))[:, None]
                accum.update(d, m, None if all_active else active, start=start, stop=start + b)
                pos += b
                if bar is not None:
                    bar.update(b)
                if early and pos >= next_check:
                    next_check += self.early_stop_every_n_masks
                    r_a, m2_a, s_cur = accum.stats(None if all_active else active)
                    stop = self._early_stop(r_a, m2_a, s_cur, accum.S2)
                    stop_host = stop.cpu().tolist()  # the one host sync per check
                    if any(stop_host):
                        keep = []
                        for i, k in enumerate(active_host):
                            if stop_host[i]:
                                S_img[k] = s_cur
                                S2_img[k] = accum.S2
                                used[k] = pos
                            else:
                                keep.append(k)
                        active_host = keep
                        active = torch.tensor(keep, dtype=torch.long, device=device)
                        all_active = False
        if bar is not None:
            bar.close()
        if pos == 0:
            raise ValueError("No masks were given: `masks` yielded no mask.")
        S = accum.stats(active[:0])[2]
        S2 = bank.weight_sums(device=device)[1].reshape(hw).to(acc) if s2_from_bank else accum.S2
        if active_host:
            idx = torch.tensor(active_host, dtype=torch.long, device=device)
            S_img.index_copy_(0, idx, S.expand(len(active_host), hw).contiguous())
            S2_img.index_copy_(0, idx, S2.expand(len(active_host), hw).contiguous())
            used[active_host] = pos
        R, M2, _ = accum.stats(None, S_img)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0, 0])
            raise RuntimeError(
                f"The encoder produced non-finite similarities (NaN/Inf) for image {first}. Check the encoder output "
                "for NaN/Inf on masked inputs (e.g. normalisation by a zero norm, or overflow under autocast)."
            )
        assert shift_c is not None
        r0 = shift_c[:, None] + R
        pos_s = S_img > 0
        eps = self.epsilon
        if self.mode == "reference":
            importance = S_img * r0 / (eps + S_img)
            m2 = M2 + eps * importance * importance
            sow = S_img + eps
        else:
            importance = torch.where(pos_s, r0, torch.nan)
            m2 = torch.where(pos_s, M2, torch.nan)
            sow = S_img
            if not bool(pos_s.all()):
                warnings.warn(
                    "Some pixels were never kept by any mask (their maps are NaN); increase num_masks.", stacklevel=3
                )
        variance = torch.where(pos_s, M2 / torch.where(pos_s, S_img, torch.ones_like(S_img)), torch.nan)
        unc = m2 if self.uncertainty == "m2" else variance
        keep = self._u_relax_keep(unc)
        u_relax = torch.where(keep, importance, torch.zeros_like(importance))
        shp = (k_total, h, w)
        return {
            "importance": importance.view(shp),
            "uncertainty": unc.view(shp),
            "m2": m2.view(shp),
            "sum_of_weights": sow.view(shp),
            "sum_of_squared_weights": S2_img.view(shp),
            "u_relax": u_relax.view(shp),
            "u_relax_mask": keep.view(shp),
            "num_masks_used": used.to(device),
            "uncertainty_kind": self.uncertainty,
            "epsilon": eps,
        }

    def _u_relax_keep(self, unc: Tensor) -> Tensor:
        finite = torch.isfinite(unc)
        vals = torch.where(finite, unc, torch.inf)
        srt = vals.sort(dim=1).values
        n = finite.sum(1)
        idx = torch.floor((n - 1).clamp_min(0).to(torch.float64) * self.u_relax_quantile).long()
        thr = srt.gather(1, idx[:, None])
        return finite & (unc <= thr)

    def _early_stop(self, R: Tensor, M2: Tensor, S: Tensor, S2: Tensor) -> Tensor:
        pos_s = S > 0
        s_safe = torch.where(pos_s, S, torch.ones_like(S))
        se = torch.where(pos_s, torch.sqrt((M2 / s_safe).clamp_min(0) * S2) / s_safe, torch.nan)
        q = torch.nanquantile(se, self.early_stop_quantile, dim=1)
        rng = torch.where(pos_s, R, -torch.inf).amax(1) - torch.where(pos_s, R, torch.inf).amin(1)
        assert self.early_stop_tol is not None
        return q <= self.early_stop_tol * rng


def relax(
    encoder: nn.Module | Callable[[Tensor], Any],
    images: Tensor,
    *,
    masks: MaskBank | Tensor | Iterable[Tensor] | None = None,
    **kwargs: Any,
) -> RelaxResult:
    """Functional form: ``Relax(encoder, **kwargs).explain(images, masks)``.

    Example:
        >>> r = relax(lambda x: x.mean((2, 3)) + 1, torch.rand(2, 3, 8, 8), num_masks=50, num_cells=3, seed=0)
        >>> r.importance.shape
        torch.Size([2, 8, 8])
    """
    unknown = sorted(set(kwargs) - set(_RELAX_ARGS))
    if unknown:
        import difflib

        hints = {u: difflib.get_close_matches(u, _RELAX_ARGS, n=2) for u in unknown}
        raise TypeError(f"Unknown Relax arguments {unknown}; closest valid names: {hints}.")
    kwargs.setdefault("batch_size", min(100, kwargs.get("num_masks", 3000)))
    return Relax(encoder, **kwargs).explain(images, masks)

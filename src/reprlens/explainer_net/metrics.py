"""torchmetrics for the explainer network (spec 2.8): location instability (streaming top-k), relative
reconstruction error, head fidelity and gate statistics. Sum/cat states, DDP-synced."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from reprlens.explainer_net.functional import (
    LocationInstabilityResult,
    ReceptiveField,
    _candidates,
    _instability_from_candidates,
    _topk_order,
)

__all__ = ["GateStatistics", "HeadFidelity", "LocationInstability", "RelativeReconstructionError"]


class LocationInstability(Metric):
    """Streaming location instability (spec 2.9): keeps the best ``top_k`` (score, distance) pairs per
    (filter, landmark), so the result equals :func:`location_instability` on all data for any batch split.

    Args:
        rf: receptive field of the maps' grid.
        top_k, select_ratio, ddof, include_zero_peaks, drop_filter_if_any_undefined, landmark_index_base:
            as in :func:`reprlens.explainer_net.location_instability`.

    Example:
        >>> rf = ReceptiveField((0.0, 0.0), (1.0, 1.0), (1.0, 1.0))
        >>> m = LocationInstability(rf)
        >>> maps = torch.zeros(3, 1, 4, 4); maps[torch.arange(3), 0, torch.arange(3), 0] = 1.0
        >>> m.update(maps, torch.tensor([[[0.0, 1.0]], [[1.0, 1.0]], [[2.0, 1.0]]]), (4, 4))
        >>> float(m.compute().value)
        0.0
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, rf: ReceptiveField, *, top_k: int = 100, select_ratio: float = 1.0, ddof: int = 1,
                 include_zero_peaks: bool = False, drop_filter_if_any_undefined: bool = False,
                 landmark_index_base: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(rf, ReceptiveField):
            raise TypeError(f"Expected `rf` to be a ReceptiveField, but got {type(rf).__name__}.")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2:
            raise ValueError(f"Expected `top_k` to be an integer >= 2, but got {top_k!r}.")
        if not 0 < float(select_ratio) <= 1:
            raise ValueError(f"Expected `select_ratio` in (0, 1], but got {select_ratio!r}.")
        if ddof not in (0, 1):
            raise ValueError(f"Expected `ddof` 0 or 1, but got {ddof!r}.")
        self.rf = rf
        self.top_k = top_k
        self.select_ratio = float(select_ratio)
        self.ddof = ddof
        self.include_zero_peaks = include_zero_peaks
        self.drop_filter_if_any_undefined = drop_filter_if_any_undefined
        self.landmark_index_base = landmark_index_base
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("dists", default=[], dist_reduce_fx="cat")

    def _merge(self, score: Tensor, dist: Tensor) -> tuple[Tensor, Tensor]:
        order = _topk_order(score, min(self.top_k, score.shape[0]))
        return torch.gather(score, 0, order), torch.gather(dist, 0, order)

    def update(self, maps: Tensor, landmarks: Tensor, image_size: tuple[int, int] | Tensor) -> None:
        """Add a batch: maps ``(N, F, H, W)``, landmarks ``(N, K, 2)``, image size ``(H, W)`` or ``(N, 2)``."""
        score, dist = _candidates(maps.detach(), landmarks, self.rf, image_size, self.include_zero_peaks,
                                  self.landmark_index_base)
        if self.scores:
            score = torch.cat([*self.scores, score.to(self.scores[0].dtype)])
            dist = torch.cat([*self.dists, dist.to(self.dists[0].dtype)])
        s, d = self._merge(score, dist)
        self.scores = [s]
        self.dists = [d]

    def compute(self) -> LocationInstabilityResult:
        """The instability over all batches (and ranks)."""
        scores = self.scores if isinstance(self.scores, Tensor) else torch.cat(self.scores) if self.scores else None
        dists = self.dists if isinstance(self.dists, Tensor) else torch.cat(self.dists) if self.dists else None
        if scores is None:
            raise RuntimeError("LocationInstability.compute() called before any update().")
        return _instability_from_candidates(scores, dists, top_k=self.top_k, select_ratio=self.select_ratio,
                                            ddof=self.ddof,
                                            drop_filter_if_any_undefined=self.drop_filter_if_any_undefined)


class RelativeReconstructionError(Metric):
    """``sqrt(Σ‖f̂−f‖² / Σ‖f‖²)`` pooled over all examples (not a mean of batch values).

    Example:
        >>> m = RelativeReconstructionError()
        >>> m.update(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
        >>> float(m.compute())
        1.0
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("err", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ref", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, reconstruction: Tensor, target: Tensor) -> None:
        """Add a batch of reconstructions and targets (same shape)."""
        if reconstruction.shape != target.shape:
            raise ValueError(f"Expected equal shapes, but got {tuple(reconstruction.shape)} and {tuple(target.shape)}.")
        r, t = reconstruction.detach().double(), target.detach().double()
        self.err += (r - t).pow(2).sum()
        self.ref += t.pow(2).sum()

    def compute(self) -> Tensor:
        return (self.err / self.ref.clamp_min(1e-300)).sqrt().float()


class HeadFidelity(Metric):
    """Does the performer's head still work on the reconstruction? Accuracy on original vs reconstructed
    features, their gap and the argmax agreement; ``output_cosine`` for embedders (``target=None``).

    Example:
        >>> m = HeadFidelity()
        >>> m.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]))
        >>> {k: round(float(v), 2) for k, v in m.compute().items()}["acc_reconstructed"]
        0.5
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("correct_orig", "correct_rec", "agree", "total", "labelled", "cos"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, original: Tensor, reconstructed: Tensor, target: Tensor | None = None) -> None:
        """Add outputs ``(N, num_classes)`` (or ``(N, D)`` embeddings) from ``x`` and from ``x̃``."""
        o = original.detach().flatten(1).double()
        r = reconstructed.detach().flatten(1).double()
        if o.shape != r.shape:
            raise ValueError(f"Expected equal output shapes, but got {tuple(o.shape)} and {tuple(r.shape)}.")
        self.total += o.shape[0]
        self.cos += F.cosine_similarity(o, r, dim=1).sum()
        if o.shape[1] > 1:
            self.agree += (o.argmax(1) == r.argmax(1)).sum()
        if target is not None:
            t = target.to(o.device).view(-1)
            self.labelled += t.numel()
            self.correct_orig += (o.argmax(1) == t).sum()
            self.correct_rec += (r.argmax(1) == t).sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.total.clamp_min(1)
        out = {"output_cosine": (self.cos / n).float()}
        if bool(self.labelled > 0):
            lab = self.labelled.clamp_min(1)
            ao, ar = self.correct_orig / lab, self.correct_rec / lab
            out.update(acc_original=ao.float(), acc_reconstructed=ar.float(), acc_gap=(ao - ar).float(),
                       agreement=(self.agree / n).float())
        return out


class GateStatistics(Metric):
    """Distribution of the gate ``p``: mean, std, 0.05/0.5/0.95 quantiles, a 20-bin histogram and, with
    labels, the mean per class.

    Example:
        >>> m = GateStatistics()
        >>> m.update(torch.tensor([0.2, 0.4]))
        >>> round(float(m.compute()["p_mean"]), 3)
        0.3
    """

    higher_is_better = None
    is_differentiable = False
    full_state_update = False

    def __init__(self, num_bins: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_bins = num_bins
        self.add_state("p", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, p: Tensor, labels: Tensor | None = None) -> None:
        """Add gates ``(N,)`` (and optional integer labels ``(N,)``)."""
        self.p.append(p.detach().float().view(-1))
        if labels is not None:
            self.labels.append(labels.detach().long().view(-1))

    def compute(self) -> dict[str, Tensor]:
        p = self.p if isinstance(self.p, Tensor) else torch.cat(self.p)
        q = torch.quantile(p, torch.tensor([0.05, 0.5, 0.95], device=p.device))
        out = {
            "p_mean": p.mean(),
            "p_std": p.std(unbiased=False),
            "p_q05": q[0],
            "p_q50": q[1],
            "p_q95": q[2],
            "p_hist": torch.histc(p, bins=self.num_bins, min=0.0, max=1.0),
        }
        labels = self.labels if isinstance(self.labels, Tensor) else (torch.cat(self.labels) if self.labels else None)
        if labels is not None and labels.numel() == p.numel():
            k = int(labels.max()) + 1
            s = torch.zeros(k, device=p.device).index_add_(0, labels, p)
            c = torch.zeros(k, device=p.device).index_add_(0, labels, torch.ones_like(p))
            out["p_mean_per_class"] = s / c.clamp_min(1)
        return out

"""Informativeness and disentanglement as torchmetrics ``Metric`` classes (accumulation, DDP sync, logging).

The classes accumulate the per-sample scores of :mod:`reprlens.scores.functional` (a sum and a count, both
reduced with ``"sum"`` across processes), so ``compute()`` is the mean score over every sample seen on every
rank. Use them for logging (``self.log("val/ns", metric)``); a training loss should call the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from reprlens.scores.functional import (
    _disentanglement_arg_validation,
    _disentanglement_tensor_validation,
    _disentanglement_update,
    _informativeness_arg_validation,
    _informativeness_tensor_validation,
    _informativeness_update,
)

__all__ = ["Disentanglement", "Informativeness"]


class Informativeness(Metric):
    """Mean informativeness score (NS) over all samples seen (see :func:`~reprlens.scores.informativeness`).

    ``update(maps, reference_maps)`` takes maps of real inputs ``(N, K, *P)`` and of reference (noise) inputs
    ``(M, K, *P)``; each batch is scored against its own reference maps. ``plot_upper_bound = 1`` holds for
    ``normalization="minmax"`` (the other modes are unbounded).

    Args:
        reduce_dims: ``"sum"``, ``"abs"`` or ``"var"``.
        normalize_dims: min-max normalise each dim's map before reducing dims.
        normalization: ``"minmax"``, ``"max"`` or ``"none"``.
        eps: flatness threshold of the normalisation.
        ddof: delta degrees of freedom for ``reduce_dims="var"``.
        validate_args: check every batch (shapes, finiteness; synchronises with the device).
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``dist_sync_fn``, ...).

    Example:
        >>> import torch
        >>> metric = Informativeness()
        >>> metric.update(torch.tensor([[[[2.0, 1.0]], [[0.0, 0.0]]]]), torch.ones(1, 2, 1, 2))
        >>> metric.update(torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]]), torch.ones(1, 2, 1, 2))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable: bool = True
    higher_is_better: bool = True
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    score_sum: Tensor
    num_samples: Tensor

    def __init__(
        self,
        reduce_dims: str = "sum",
        normalize_dims: bool = False,
        normalization: str = "minmax",
        eps: float = 1e-6,
        ddof: int = 0,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _informativeness_arg_validation(reduce_dims, normalize_dims, normalization, eps, ddof, "mean")
        if not isinstance(validate_args, bool):
            raise TypeError(f"Expected argument `validate_args` to be a bool, but got {validate_args!r}.")
        self.reduce_dims = reduce_dims
        self.normalize_dims = normalize_dims
        self.normalization = normalization
        self.eps = eps
        self.ddof = ddof
        self.validate_args = validate_args
        self.add_state("score_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("num_samples", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor, reference_maps: Tensor) -> None:
        """Add the per-sample scores of one batch of maps (``(N, K, *P)``) against its reference maps."""
        if self.validate_args:
            _informativeness_tensor_validation(maps, reference_maps, self.reduce_dims, self.ddof)
        scores = _informativeness_update(
            maps, reference_maps, self.reduce_dims, self.normalize_dims, self.normalization, self.eps,
            self.ddof,
        )
        self.score_sum += scores.sum()
        self.num_samples += scores.shape[0]

    def compute(self) -> Tensor:
        """Mean NS over every sample seen (NaN before the first update, with torchmetrics' warning)."""
        return self.score_sum / self.num_samples

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> Any:
        """Plot a value or a sequence of values (e.g. one per epoch) with matplotlib (torchmetrics ``_plot``).

        Args:
            val: a scalar tensor or a list of them; default ``compute()``.
            ax: an existing matplotlib axis.

        Returns:
            ``(figure, axis)``.
        """
        return self._plot(val, ax)


class Disentanglement(Metric):
    """Mean disentanglement score (VS) over all samples seen (see :func:`~reprlens.scores.disentanglement`).

    ``plot_upper_bound = 0.25`` holds for the defaults (normalised maps, ``ddof=0``, spatial mean); with
    ``ddof=1`` the bound is ``K/(4(K-1))`` (even K) or ``(K+1)/(4K)`` (odd K).

    Args:
        normalize: min-max normalise each map first.
        ddof: delta degrees of freedom of the variance over dims.
        eps: flatness threshold of the normalisation.
        spatial_reduction: ``"mean"`` or ``"var"`` over positions (``"none"`` is not a scalar score).
        num_dims_total: total number of dims when each update holds a random subset of them (unbiased).
        validate_args: check every batch.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = Disentanglement()
        >>> metric(torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]]))  # batch value
        tensor(0.2500)
        >>> metric(torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]]))
        tensor(0.)
        >>> metric.compute()
        tensor(0.1250)
    """

    is_differentiable: bool = True
    higher_is_better: bool = True
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 0.25

    score_sum: Tensor
    num_samples: Tensor

    def __init__(
        self,
        normalize: bool = True,
        ddof: int = 0,
        eps: float = 1e-6,
        spatial_reduction: str = "mean",
        num_dims_total: int | None = None,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _disentanglement_arg_validation(normalize, ddof, eps, spatial_reduction, num_dims_total, "mean")
        if spatial_reduction == "none":
            raise ValueError(
                "Expected argument `spatial_reduction` to be 'mean' or 'var' for the Disentanglement "
                "metric, but got 'none'. Use `reprlens.scores.disentanglement(..., "
                "spatial_reduction='none')` for variance maps."
            )
        if not isinstance(validate_args, bool):
            raise TypeError(f"Expected argument `validate_args` to be a bool, but got {validate_args!r}.")
        self.normalize = normalize
        self.ddof = ddof
        self.eps = eps
        self.spatial_reduction = spatial_reduction
        self.num_dims_total = num_dims_total
        self.validate_args = validate_args
        self.add_state("score_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("num_samples", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor) -> None:
        """Add the per-sample scores of one batch of maps ``(N, K, *P)``."""
        if self.validate_args:
            _disentanglement_tensor_validation(maps, self.ddof, self.num_dims_total)
        scores = _disentanglement_update(
            maps, self.normalize, self.ddof, self.eps, self.spatial_reduction, self.num_dims_total
        )
        self.score_sum += scores.sum()
        self.num_samples += scores.shape[0]

    def compute(self) -> Tensor:
        """Mean VS over every sample seen."""
        return self.score_sum / self.num_samples

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> Any:
        """Plot a value or a sequence of values (e.g. one per epoch) with matplotlib (torchmetrics ``_plot``).

        Args:
            val: a scalar tensor or a list of them; default ``compute()``.
            ax: an existing matplotlib axis.

        Returns:
            ``(figure, axis)``.
        """
        return self._plot(val, ax)

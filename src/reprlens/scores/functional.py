"""Informativeness and disentanglement scores of attribution maps (pure, differentiable functions).

Both scores take channel-aggregated attribution maps ``A`` of shape ``(N, K, *P)``: ``N`` samples, ``K``
target dims (e.g. embedding units), ``P`` positions of the source feature map (``(H, W)`` for conv
layers; any number of position axes, they are flattened). Maps come from
:func:`reprlens.attribution.layer_attributions` with a ``transform``.

* :func:`informativeness` (NS, in ``[0, 1]``): mean absolute difference between the min-max normalised
  summed map of each input and that of reference (noise) inputs. Higher: the representation depends on the
  structure of the input rather than on what any input activates.
* :func:`disentanglement` (VS, in ``[0, 0.25]`` with ``ddof=0``): variance across dims of the normalised
  maps, averaged over positions. Higher: different dims look at different regions; 0 for redundant dims.

Normalisation is :func:`reprlens.attribution.normalize_maps` (per map, over positions): ``(A - min) /
(max - min)`` for valid maps and the zero map for constant or numerically flat maps (``max - min <= eps *
max|A|``), with zero gradient there, so the scores are finite and NaN-free for every finite input.

Layout follows torchmetrics: ``_x_arg_validation`` (cheap, Python values), ``_x_tensor_validation``
(shapes, dtype, finiteness; the finiteness check synchronises with the device), ``_x_update`` (per-sample
scores) and ``_x_compute`` (reduction over samples). Public functions take ``validate_args=True``; pass
``False`` in hot loops (e.g. a training step) to skip every check, including the finiteness check (the
only host synchronisation). Without the check, a map holding NaN or Inf is treated as a flat map (the zero
map, zero gradient) by the min-max/max normalisation, and propagates NaN where no normalisation is applied
(``normalization="none"``, ``normalize=False``); with
``validate_args=True`` such maps raise a ``ValueError`` instead.

Half-precision maps (float16/bfloat16) are upcast to float32 before any arithmetic; float64 stays float64.
"""

from __future__ import annotations

import math

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "disentanglement",
    "disentanglement_per_dim",
    "informativeness",
    "informativeness_per_dim",
    "map_similarity",
]

Reduction = Literal["mean", "sum", "none"]
Normalization = Literal["minmax", "max", "none"]
ReduceDims = Literal["sum", "abs", "var"]
SpatialReduction = Literal["mean", "var", "none"]

_REDUCTIONS = ("mean", "sum", "none")
_NORMALIZATIONS = ("minmax", "max", "none")
_REDUCE_DIMS = ("sum", "abs", "var")
_SPATIAL = ("mean", "var", "none")


# ----------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Expected argument `{name}` to be one of {list(choices)}, but got {value!r}.")


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(
            f"Expected argument `{name}` to be a bool, but got {type(value).__name__} ({value!r})."
        )


def _check_eps(eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 <= float(eps) < float("inf")):
        raise ValueError(
            f"Expected argument `eps` to be a finite float >= 0 (default 1e-6), but got {eps!r}."
        )


def _check_ddof(ddof: object) -> None:
    if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
        raise ValueError(f"Expected argument `ddof` to be an integer >= 0 (0 or 1), but got {ddof!r}.")


def _check_maps(maps: object, name: str = "maps") -> None:
    """Type, dtype, ndim, emptiness and finiteness of an ``(N, K, *P)`` map tensor."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor of shape (N, K, *P), but got "
                        f"{type(maps).__name__}.")
    if not maps.is_floating_point():
        raise TypeError(
            f"Expected argument `{name}` to be a floating point tensor, but got dtype {maps.dtype}. "
            f"Convert it with `{name}.float()`."
        )
    if maps.ndim < 3:
        raise ValueError(
            f"Expected argument `{name}` to have shape (N, K, *P) with at least one position axis (ndim >= "
            f"3), but got shape {tuple(maps.shape)}. For vector features (no positions) add one with "
            f"`{name}.unsqueeze(-1)`; maps from `layer_attributions` need a `transform` to aggregate "
            "channels."
        )
    if maps.device.type == "meta":
        raise ValueError(f"Expected argument `{name}` to hold data, but got a 'meta' tensor (shape only). Compute "
                         "the maps on a CPU or accelerator device.")
    if maps.numel() == 0:
        raise ValueError(f"Expected argument `{name}` to hold at least one sample, dim and position, but got "
                         f"shape {tuple(maps.shape)}.")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(
            f"Expected argument `{name}` to be finite, but it contains NaN or Inf values. Check the model "
            "and the attribution (e.g. exploding activations, fp16 overflow); the scores are undefined for "
            "such maps."
        )


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _normalize(maps: Tensor, mode: str, eps: float) -> Tensor:
    """Per-map normalisation over every axis after the first two (2.4 of the spec), or identity."""
    if mode == "none":
        return maps
    from reprlens.attribution import normalize_maps  # lazy: attribution sits below scores but is heavier

    return normalize_maps(maps, eps=eps, mode=mode)


def _reduce_samples(scores: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return scores.mean(dim=0)
    if reduction == "sum":
        return scores.sum(dim=0)
    return scores


# ----------------------------------------------------------------------------------------------------------
# informativeness (NS)
# ----------------------------------------------------------------------------------------------------------


def _informativeness_arg_validation(
    reduce_dims: str, normalize_dims: bool, normalization: str, eps: float, ddof: int, reduction: str
) -> None:
    _check_choice(reduce_dims, "reduce_dims", _REDUCE_DIMS)
    _check_bool(normalize_dims, "normalize_dims")
    _check_choice(normalization, "normalization", _NORMALIZATIONS)
    _check_eps(eps)
    _check_ddof(ddof)
    _check_choice(reduction, "reduction", _REDUCTIONS)


def _informativeness_tensor_validation(
    maps: Tensor, reference_maps: Tensor, reduce_dims: str = "sum", ddof: int = 0
) -> None:
    _check_maps(maps, "maps")
    _check_maps(reference_maps, "reference_maps")
    if maps.shape[1:] != reference_maps.shape[1:]:
        raise ValueError(
            "Expected `maps` (N, K, *P) and `reference_maps` (M, K, *P) to agree in every axis but the "
            f"first, but got shapes {tuple(maps.shape)} and {tuple(reference_maps.shape)}. Compute both with "
            "the same layers, dims and transform."
        )
    if reduce_dims == "var" and maps.shape[1] <= ddof:
        raise ValueError(
            f"`reduce_dims='var'` with ddof={ddof} needs more than {ddof} target dims, but got "
            f"K={maps.shape[1]}."
        )


def _reduce_dims(maps: Tensor, reduce_dims: str, ddof: int, scale: Tensor | None = None) -> Tensor:
    """``(N, K, *P) -> (N, *P)``: sum, sum of abs, or variance over the dims axis.

    ``scale`` (``(N,)``, detached) multiplies every sample's maps before the reduction (no overflow of the
    accumulation when it brings ``max |A|`` below 1; cheaper on CPU than a fused batched GEMM or einsum, which
    may also sum before scaling).
    """
    if scale is not None:
        maps = maps * scale.reshape(-1, *([1] * (maps.ndim - 1)))
    if reduce_dims == "sum":
        return maps.sum(dim=1)
    if reduce_dims == "abs":
        return maps.abs().sum(dim=1)
    return maps.var(dim=1, correction=ddof)


def _informativeness_update(
    maps: Tensor,
    reference_maps: Tensor,
    reduce_dims: str = "sum",
    normalize_dims: bool = False,
    normalization: str = "minmax",
    eps: float = 1e-6,
    ddof: int = 0,
) -> Tensor:
    """Per-sample NS, shape ``(N,)``."""
    maps, reference_maps = _upcast(maps), _upcast(reference_maps)
    dtype = torch.promote_types(maps.dtype, reference_maps.dtype)
    maps, reference_maps = maps.to(dtype), reference_maps.to(dtype)
    if normalize_dims:  # per-dim min-max (spec 2.4), whatever the final `normalization`
        maps = _normalize(maps, "minmax", eps)
        reference_maps = _normalize(reference_maps, "minmax", eps)
    scale = ref_scale = None
    if normalization != "none" and not normalize_dims:
        # the normalisation is invariant to a positive scale per sample (and one for all references): bring
        # every sample's max |A| into [0.5, 1) by an exact power of 2, so the dim sum/variance cannot overflow
        scale = _pow2_scale(maps, tuple(range(1, maps.ndim))).reshape(-1)
        ref_scale = _pow2_scale(reference_maps, tuple(range(reference_maps.ndim))).reshape(()).expand(
            reference_maps.shape[0])
    reduced = _reduce_dims(maps, reduce_dims, ddof, scale)  # (N, *P)
    reference = _reduce_dims(reference_maps, reduce_dims, ddof, ref_scale).mean(dim=0, keepdim=True)  # (1, *P)
    norm = _normalize(reduced.unsqueeze(1), normalization, eps).flatten(1)  # (N, L)
    norm_ref = _normalize(reference.unsqueeze(1), normalization, eps).flatten(1)  # (1, L)
    return (norm - norm_ref).abs().mean(dim=1)


def _pow2_scale(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Detached power-of-2 factor ``2**-e`` with ``max |t| = m * 2**e``, ``m in [0.5, 1)``, over ``dims``; 1 for zero."""
    d = t.detach()
    m = torch.maximum(d.amax(dim=dims, keepdim=True), -d.amin(dim=dims, keepdim=True))  # max |t|, no copy
    info = torch.finfo(t.dtype)
    _, e = torch.frexp(m)
    e = e.clamp(math.ceil(math.log2(info.tiny)) + 1, int(math.log2(info.max)))
    return torch.where(m > 0, torch.pow(2.0, -e.to(t.dtype)), torch.ones((), dtype=t.dtype, device=t.device))


def _informativeness_compute(scores: Tensor, reduction: str = "mean") -> Tensor:
    return _reduce_samples(scores, reduction)


def informativeness(
    maps: Tensor,
    reference_maps: Tensor,
    *,
    reduce_dims: ReduceDims = "sum",
    normalize_dims: bool = False,
    normalization: Normalization = "minmax",
    eps: float = 1e-6,
    ddof: int = 0,
    reduction: Reduction = "mean",
    validate_args: bool = True,
) -> Tensor:
    r"""Informativeness score (NS): how different real-input maps are from noise-input maps.

    With :math:`R_n(p) = \sum_k A_{n,k}(p)` (``reduce_dims="sum"``) and the reference
    :math:`R^{ref}(p) = \mathrm{mean}_j R^{ref}_j(p)` over the ``M`` reference inputs,

    .. math:: NS_n = \mathrm{mean}_p \left| \mathcal{N}(R_n)(p) - \mathcal{N}(R^{ref})(p) \right|

    where :math:`\mathcal{N}` is the per-map normalisation (``normalization``). In ``[0, 1]`` for
    ``"minmax"``; ``NS(x, x) = 0``; invariant to scaling all maps by ``c > 0``.

    Args:
        maps: attribution maps of the real inputs, ``(N, K, *P)``.
        reference_maps: maps of the reference (noise) inputs, ``(M, K, *P)``, same method and transform.
        reduce_dims: how dims are combined into one map per input: ``"sum"`` (:math:`\sum_k A`), ``"abs"``
            (:math:`\sum_k |A|`) or ``"var"`` (:math:`\mathrm{Var}_k A` with ``ddof``; the reference's
            dataset-drift variant).
        normalize_dims: min-max normalise each :math:`A_{n,k}` over positions before reducing dims (the
            reference's per-dim normalisation; independent of ``normalization``, which applies to the reduced
            maps).
        normalization: ``"minmax"`` (default, bounded in [0, 1]), ``"max"`` (divide by the max; reference
            training path, unbounded for signed maps) or ``"none"``.
        eps: relative flatness threshold of the normalisation: maps with ``max - min <= eps * max|A|``
            become 0.
        ddof: delta degrees of freedom of ``reduce_dims="var"``.
        reduction: ``"mean"`` over samples (scalar), ``"sum"`` or ``"none"`` (``(N,)``).
        validate_args: check arguments and tensors (shapes, dtype, finiteness). ``False`` skips the checks
            (no host synchronisation); non-finite maps then give NaN.

    Returns:
        Scalar, or ``(N,)`` for ``reduction="none"``. Differentiable w.r.t. both map tensors.

    Raises:
        TypeError: if a map argument is not a floating point tensor.
        ValueError: for a bad option, maps with fewer than 3 axes, mismatching shapes or non-finite values.

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[[2.0, 1.0]], [[0.0, 0.0]]]])  # N=1, K=2, P=(1, 2)
        >>> noise = torch.ones(1, 2, 1, 2)  # flat reference map -> normalised to zeros
        >>> informativeness(maps, noise)
        tensor(0.5000)
        >>> float(informativeness(maps, maps))
        0.0
    """
    if validate_args:
        _informativeness_arg_validation(reduce_dims, normalize_dims, normalization, eps, ddof, reduction)
        _informativeness_tensor_validation(maps, reference_maps, reduce_dims, ddof)
    scores = _informativeness_update(
        maps, reference_maps, reduce_dims, normalize_dims, normalization, eps, ddof
    )
    return _informativeness_compute(scores, reduction)


def _informativeness_per_dim_update(
    maps: Tensor, reference_maps: Tensor, normalization: str = "minmax", eps: float = 1e-6
) -> Tensor:
    """Per-sample, per-dim NS, shape ``(N, K)``."""
    maps, reference_maps = _upcast(maps), _upcast(reference_maps)
    dtype = torch.promote_types(maps.dtype, reference_maps.dtype)
    maps, reference_maps = maps.to(dtype), reference_maps.to(dtype)
    norm = _normalize(maps, normalization, eps).flatten(2)  # (N, K, L)
    reference = reference_maps.mean(dim=0, keepdim=True)
    norm_ref = _normalize(reference, normalization, eps).flatten(2)  # (1, K, L)
    return (norm - norm_ref).abs().mean(dim=2)


def informativeness_per_dim(
    maps: Tensor,
    reference_maps: Tensor,
    *,
    normalization: Normalization = "minmax",
    eps: float = 1e-6,
    reduction: Reduction = "mean",
    validate_args: bool = True,
) -> Tensor:
    r"""Informativeness of each dim separately.

    .. math:: NS_{n,k} = \mathrm{mean}_p \left| \mathcal{N}(A_{n,k})(p) - \mathcal{N}(\mathrm{mean}_j
        A^{ref}_{j,k})(p) \right|

    Args:
        maps: ``(N, K, *P)`` maps of the real inputs.
        reference_maps: ``(M, K, *P)`` maps of the reference inputs.
        normalization: ``"minmax"``, ``"max"`` or ``"none"`` (see :func:`informativeness`).
        eps: flatness threshold of the normalisation.
        reduction: ``"mean"`` over samples (``(K,)``), ``"sum"`` (``(K,)``) or ``"none"`` (``(N, K)``).
        validate_args: check arguments and tensors.

    Returns:
        ``(K,)`` or ``(N, K)``. With ``K = 1`` it equals :func:`informativeness` with ``reduce_dims="sum"``.

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[[2.0, 1.0]], [[0.0, 1.0]]]])
        >>> informativeness_per_dim(maps, torch.ones(3, 2, 1, 2))
        tensor([0.5000, 0.5000])
    """
    if validate_args:
        _check_choice(normalization, "normalization", _NORMALIZATIONS)
        _check_eps(eps)
        _check_choice(reduction, "reduction", _REDUCTIONS)
        _informativeness_tensor_validation(maps, reference_maps)
    scores = _informativeness_per_dim_update(maps, reference_maps, normalization, eps)
    return _reduce_samples(scores, reduction)


# ----------------------------------------------------------------------------------------------------------
# disentanglement (VS)
# ----------------------------------------------------------------------------------------------------------


def _disentanglement_arg_validation(
    normalize: bool,
    ddof: int,
    eps: float,
    spatial_reduction: str,
    num_dims_total: int | None,
    reduction: str,
) -> None:
    _check_bool(normalize, "normalize")
    _check_ddof(ddof)
    _check_eps(eps)
    _check_choice(spatial_reduction, "spatial_reduction", _SPATIAL)
    if num_dims_total is not None and (
        isinstance(num_dims_total, bool) or not isinstance(num_dims_total, int) or num_dims_total < 2
    ):
        raise ValueError(
            "Expected argument `num_dims_total` to be None or the total number of dims K >= 2 the subset "
            f"was drawn from, but got {num_dims_total!r}."
        )
    if num_dims_total is not None and num_dims_total <= ddof:
        raise ValueError(f"Expected `num_dims_total` > ddof={ddof}, but got {num_dims_total}.")
    _check_choice(reduction, "reduction", _REDUCTIONS)


def _disentanglement_tensor_validation(
    maps: Tensor, ddof: int = 0, num_dims_total: int | None = None
) -> None:
    _check_maps(maps, "maps")
    k = maps.shape[1]
    if k < 2:
        raise ValueError(f"disentanglement needs at least 2 target dims, got K={k}")
    if num_dims_total is not None and k > num_dims_total:
        raise ValueError(
            f"Expected the subset of dims in `maps` (K'={k}) to be at most "
            f"`num_dims_total`={num_dims_total}. Pass the size of the full set of dims the subset was drawn "
            "from."
        )
    if num_dims_total is None and k <= ddof:
        raise ValueError(f"disentanglement with ddof={ddof} needs more than {ddof} target dims, got K={k}")


def _dims_variance(norm: Tensor, ddof: int, num_dims_total: int | None) -> Tensor:
    """``(N, K', L) -> (N, L)`` variance over dims, or its unbiased estimate from a random subset of dims."""
    k = norm.shape[1]
    if num_dims_total is None or num_dims_total == k:
        return norm.var(dim=1, correction=ddof)
    # Var_{ddof=d} over K = (K-1)/(K-d) * Var_{ddof=1} over K, and the subset's ddof-1 variance is unbiased
    # for the full set's ddof-1 variance (sampling without replacement).
    return norm.var(dim=1, correction=1) * ((num_dims_total - 1) / (num_dims_total - ddof))


def _disentanglement_update(
    maps: Tensor,
    normalize: bool = True,
    ddof: int = 0,
    eps: float = 1e-6,
    spatial_reduction: str = "mean",
    num_dims_total: int | None = None,
) -> Tensor:
    """Per-sample VS: ``(N,)``, or the ``(N, *P)`` variance map for ``spatial_reduction="none"``."""
    maps = _upcast(maps)
    norm = _normalize(maps, "minmax" if normalize else "none", eps)
    var = _dims_variance(norm.flatten(2), ddof, num_dims_total)  # (N, L)
    if spatial_reduction == "mean":
        return var.mean(dim=1)
    if spatial_reduction == "var":
        if var.shape[1] > ddof:
            return var.var(dim=1, correction=ddof)
        return var[:, 0] * 0.0  # one position: no spatial spread (kept in the graph, zero gradient)
    return var.reshape(maps.shape[:1] + maps.shape[2:])


def _disentanglement_compute(scores: Tensor, reduction: str = "mean") -> Tensor:
    return _reduce_samples(scores, reduction)


def disentanglement(
    maps: Tensor,
    *,
    normalize: bool = True,
    ddof: int = 0,
    eps: float = 1e-6,
    spatial_reduction: SpatialReduction = "mean",
    num_dims_total: int | None = None,
    reduction: Reduction = "mean",
    validate_args: bool = True,
) -> Tensor:
    r"""Disentanglement score (VS): variance across dims of the normalised maps, averaged over positions.

    .. math:: VS_n = \mathrm{mean}_p \, \mathrm{Var}_k \, \mathcal{N}(A_{n,k})(p)

    With ``normalize=True`` and ``ddof=0`` it lies in ``[0, 0.25]`` (Popoviciu): 0 for identical maps, 0.25
    for two complementary 0/1 masks, ``(K-1)/K**2`` for ``K`` disjoint indicator masks partitioning the
    positions (``1/K`` with ``ddof=1``). Invariant to scaling maps by ``c > 0`` and to permuting dims.

    **Dim subsampling.** If ``maps`` holds a uniformly random subset of ``m >= 2`` of ``K`` dims (drawn
    without replacement), pass ``num_dims_total=K``: the result is ``(K-1)/(K-ddof)`` times the subset's
    ddof-1 variance, an unbiased estimate of the full score (for ``spatial_reduction="mean"``/``"none"``;
    ``"var"`` is not unbiased). With ``m = K`` it is the exact score.

    Args:
        maps: ``(N, K, *P)`` attribution maps.
        normalize: min-max normalise each map over positions first
            (:func:`~reprlens.attribution.normalize_maps`).
        ddof: delta degrees of freedom of the variance over dims (0: population variance).
        eps: flatness threshold of the normalisation.
        spatial_reduction: ``"mean"`` over positions (default), ``"var"`` (variance over positions with the
            same ``ddof``, a reference option) or ``"none"`` (the ``(N, *P)`` variance map, for plotting).
        num_dims_total: size of the full set of dims when ``maps`` holds a random subset of them.
        reduction: ``"mean"`` over samples, ``"sum"``, or ``"none"`` (per sample).
        validate_args: check arguments and tensors.

    Returns:
        Scalar for ``reduction="mean"``/``"sum"`` and a spatially reduced score, ``(N,)`` for ``"none"``;
        with ``spatial_reduction="none"`` a trailing ``*P``. Differentiable.

    Raises:
        ValueError: ``"disentanglement needs at least 2 target dims, got K=1"`` for ``K = 1``; bad options,
            shapes or non-finite maps.

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # two complementary masks
        >>> disentanglement(maps)
        tensor(0.2500)
        >>> disentanglement(torch.cat([maps[:, :1], maps[:, :1]], dim=1))  # duplicated dims
        tensor(0.)
    """
    if validate_args:
        _disentanglement_arg_validation(normalize, ddof, eps, spatial_reduction, num_dims_total, reduction)
        _disentanglement_tensor_validation(maps, ddof, num_dims_total)
    scores = _disentanglement_update(maps, normalize, ddof, eps, spatial_reduction, num_dims_total)
    return _disentanglement_compute(scores, reduction)


def _disentanglement_per_dim_update(maps: Tensor, normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """``(N, K)``: mean over positions of the squared deviation of each normalised map from the dims' mean."""
    norm = _normalize(_upcast(maps), "minmax" if normalize else "none", eps).flatten(2)
    return (norm - norm.mean(dim=1, keepdim=True)).square().mean(dim=2)


def disentanglement_per_dim(
    maps: Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    reduction: Reduction = "mean",
    validate_args: bool = True,
) -> Tensor:
    r"""Contribution of each dim to the disentanglement score.

    :math:`D_{n,k} = \mathrm{mean}_p (\mathcal{N}(A_{n,k})(p) - \bar A_n(p))^2` with
    :math:`\bar A_n = \mathrm{mean}_k \mathcal{N}(A_{n,k})`, so that ``mean_k D[n, k]`` equals
    :func:`disentanglement` with ``ddof=0`` for sample ``n``. Small ``D`` marks a dim close to the average
    map.

    Args:
        maps: ``(N, K, *P)`` attribution maps, ``K >= 2``.
        normalize: min-max normalise each map first.
        eps: flatness threshold of the normalisation.
        reduction: ``"mean"`` over samples (``(K,)``), ``"sum"`` or ``"none"`` (``(N, K)``).
        validate_args: check arguments and tensors.

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])
        >>> disentanglement_per_dim(maps)
        tensor([0.2500, 0.2500])
    """
    if validate_args:
        _check_bool(normalize, "normalize")
        _check_eps(eps)
        _check_choice(reduction, "reduction", _REDUCTIONS)
        _disentanglement_tensor_validation(maps)
    return _reduce_samples(_disentanglement_per_dim_update(maps, normalize, eps), reduction)


# ----------------------------------------------------------------------------------------------------------
# map similarity
# ----------------------------------------------------------------------------------------------------------


def _safe_unit(vectors: Tensor) -> Tensor:
    """Rows divided by their L2 norm; zero rows stay zero with zero gradient (double ``where``, no NaN)."""
    sq = vectors.square().sum(dim=-1, keepdim=True)
    valid = sq > 0
    norm = torch.where(valid, sq, torch.ones_like(sq)).sqrt()
    return torch.where(valid, vectors / norm, torch.zeros_like(vectors))


def map_similarity(
    maps: Tensor, *, normalize: bool = True, eps: float = 1e-6, validate_args: bool = True
) -> Tensor:
    """Cosine similarity between the (normalised) maps of every pair of dims, per sample.

    ``S[n, i, j] = <N(A_{n,i}), N(A_{n,j})> / (|N(A_{n,i})| |N(A_{n,j})|)``. Redundant dims have similarity
    1. A map that is all zeros after normalisation (constant or flat map) has similarity 0 with every dim,
    itself included (documented guard: no NaN).

    Args:
        maps: ``(N, K, *P)`` attribution maps.
        normalize: min-max normalise each map first (then similarities lie in ``[0, 1]``).
        eps: flatness threshold of the normalisation.
        validate_args: check arguments and tensors.

    Returns:
        ``(N, K, K)`` symmetric similarity matrices.

    Example:
        >>> import torch
        >>> maps = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]], [[0.0, 1.0]]]])
        >>> map_similarity(maps)[0]
        tensor([[1., 1., 0.],
                [1., 1., 0.],
                [0., 0., 1.]])
    """
    if validate_args:
        _check_bool(normalize, "normalize")
        _check_eps(eps)
        _check_maps(maps, "maps")
    norm = _normalize(_upcast(maps), "minmax" if normalize else "none", eps).flatten(2)
    unit = _safe_unit(norm)
    return unit @ unit.transpose(1, 2)

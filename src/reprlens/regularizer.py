"""Informativeness and disentanglement scores as a differentiable loss term (plain torch, no Lightning).

:class:`ExplanationRegularizer` turns a source activation ``h`` and its target ``z`` (or a head callable
``h -> z``) captured during the model's own forward pass into ``-sum_i w_i * score_i``: a scalar to add
to the task loss (the scores are maximised), plus the detached score values for logging. The maps are
computed with ``create_graph=True``, so the single ordinary backward of the returned loss carries the
score gradient into the head parameters and, through ``d score / d h``, into the backbone.

Semantics: ``../shared/spec/attribution_and_scores.md`` section 2.9.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from reprlens.attribution import PooledHead, layer_attributions, summed_map
from reprlens.scores.functional import disentanglement, informativeness

__all__ = ["ExplanationRegularizer", "RegularizerOutput"]

_METHODS = ("grad", "grad_x_act", "expected_gradients", "integrated_gradients")
_TRANSFORMS = ("abs", "lin", "sqrt")
_NORMALIZATIONS = ("minmax", "max", "none")


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class RegularizerOutput(NamedTuple):
    """Result of :class:`ExplanationRegularizer`.

    Attributes:
        loss: scalar, differentiable: ``-sum_i w_i * score_i`` (add it to the task loss).
        scores: detached scalars for logging: ``"informativeness"``/``"disentanglement"`` (those with a
            weight > 0) and ``"total"`` (``sum_i w_i * score_i``).
    """

    loss: Tensor
    scores: dict[str, Tensor]


def _check_weight(value: float, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Expected argument `{name}` to be a number, but got {type(value).__name__}.") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError(
            f"Expected argument `{name}` to be a finite weight >= 0, but got {value!r}. The scores are"
            " maximised with weight w (the loss gets -w * score); use 0 to switch a score off."
        )
    return out


class ExplanationRegularizer(nn.Module):
    """Differentiable explanation constraint: ``-(w_ns * informativeness + w_vs * disentanglement)``.

    Args:
        informativeness: weight of the informativeness score (NS, in [0, 1]); 0 skips its work.
        disentanglement: weight of the disentanglement score (VS, in [0, 0.25]); 0 skips its work.
        method: attribution method of the maps (``"grad"``, ``"grad_x_act"``, ``"integrated_gradients"``
            with a head callable; ``"expected_gradients"`` when the caller passes ``samples_per_input`` rows
            per explained input).
        transform: channel aggregation (``"lin"`` default for training, ``"abs"``, ``"sqrt"``).
        normalization: map normalisation of the scores (``"minmax"``, ``"max"``, ``"none"``).
        ddof: delta degrees of freedom of the variance across dims (disentanglement).
        eps: validity threshold of the normalisation (relative).
        dims: optional subset of target dims to explain.
        num_dims_sampled: draw this many dims per call for the disentanglement score (unbiased estimator of
            the all-dims score; spec 2.6). ``None`` uses all dims.
        head: optional callable ``h -> z`` (or :class:`~reprlens.attribution.PooledHead`) that recomputes the
            target from the source; enables the fast paths, IG and fp32 inner gradients.
        head_batchnorm: BatchNorm policy of the head (``"auto"``, ``"eval"``, ``"per_sample"``, ``"batch"``).
        chunk_size: dims per batched VJP (``None``: automatic).
        inner_fp32: upcast half-precision activations to float32 before taking the inner gradients.
        target_fn: optional ``(N, ...) -> (N, K)`` applied to the target before attribution.
        path: attribution path for a head callable (see :func:`~reprlens.attribution.layer_attributions`).
            ``"auto"`` uses the factorised path for a ``PooledHead``, the per-dim autograd loop for heads with
            convolutions on CPU (``benchmarks/bench_regularizer.py`` T2: loop 0.94x vs chunked vmap 1.53x of
            the FLOP bound), and chunked ``torch.func`` vmap otherwise.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
        >>> reg = ExplanationRegularizer(informativeness=0.1, disentanglement=0.1, head=head)
        >>> h = torch.randn(5, 2, 4, 4, requires_grad=True)
        >>> out = reg(h, reference_source=torch.rand(3, 2, 4, 4))
        >>> out.loss.shape, sorted(out.scores)
        (torch.Size([]), ['disentanglement', 'informativeness', 'total'])
        >>> out.loss.backward()
    """

    def __init__(
        self,
        informativeness: float = 0.0,
        disentanglement: float = 0.0,
        *,
        method: str = "grad_x_act",
        transform: str = "lin",
        normalization: str = "minmax",
        ddof: int = 0,
        eps: float = 1e-6,
        dims: Sequence[int] | Tensor | None = None,
        num_dims_sampled: int | None = None,
        head: Callable[[Tensor], Tensor] | PooledHead | None = None,
        head_batchnorm: str = "auto",
        chunk_size: int | None = None,
        inner_fp32: bool = True,
        target_fn: Callable[[Tensor], Tensor] | None = None,
        path: str = "auto",
    ) -> None:
        super().__init__()
        self.w_informativeness = _check_weight(informativeness, "informativeness")
        self.w_disentanglement = _check_weight(disentanglement, "disentanglement")
        if method not in _METHODS:
            raise ValueError(f"Expected argument `method` to be one of {_METHODS}, but got {method!r}.")
        if transform not in _TRANSFORMS:
            raise ValueError(
                f"Expected argument `transform` to be one of {_TRANSFORMS}, but got {transform!r}"
                " (the scores need channel-aggregated maps)."
            )
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"Expected argument `normalization` to be one of {_NORMALIZATIONS}, but got {normalization!r}."
            )
        if ddof not in (0, 1):
            raise ValueError(f"Expected argument `ddof` to be 0 or 1, but got {ddof!r}.")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"Expected argument `eps` to be a finite number >= 0, but got {eps!r}.")
        if num_dims_sampled is not None and (
            isinstance(num_dims_sampled, bool) or not isinstance(num_dims_sampled, int) or num_dims_sampled < 2
        ):
            raise ValueError(
                f"Expected argument `num_dims_sampled` to be None or an integer >= 2, but got {num_dims_sampled!r}."
            )
        if head is not None and not callable(head):
            raise TypeError(f"Expected argument `head` to be callable (h -> z), but got {type(head).__name__}.")
        if target_fn is not None and not callable(target_fn):
            raise TypeError(f"Expected argument `target_fn` to be callable, but got {type(target_fn).__name__}.")
        self.method = method
        self.transform = transform
        self.normalization = normalization
        self.ddof = ddof
        self.eps = float(eps)
        self.dims = dims
        self.num_dims_sampled = num_dims_sampled
        # Kept out of nn.Module's registry: the head belongs to the user's model (which moves it).
        self._head_holder: tuple[Callable[[Tensor], Tensor] | None] = (head,)
        self.head_batchnorm = head_batchnorm
        self.chunk_size = chunk_size
        self.inner_fp32 = inner_fp32
        self.target_fn = target_fn
        if path not in ("auto", "factorized", "vmap", "loop"):
            raise ValueError(f"Expected argument `path` to be 'auto', 'factorized', 'vmap' or 'loop', but got {path!r}.")
        self.path = path
        self._warned_biased_ns = False

    @property
    def head(self) -> Callable[[Tensor], Tensor] | None:
        """The head callable ``h -> z`` (``None``: graph-only path)."""
        return self._head_holder[0]

    def set_head(self, head: Callable[[Tensor], Tensor] | None) -> None:
        """Set or clear the head callable ``h -> z``."""
        if head is not None and not callable(head):
            raise TypeError(f"Expected `head` to be callable (h -> z), but got {type(head).__name__}.")
        self._head_holder = (head,)

    @property
    def weights(self) -> dict[str, float]:
        """The non-zero score weights, by score name."""
        w = {"informativeness": self.w_informativeness, "disentanglement": self.w_disentanglement}
        return {k: v for k, v in w.items() if v > 0}

    def set_weights(self, informativeness: float | None = None, disentanglement: float | None = None) -> None:
        """Change the weights (e.g. from a warm-up schedule) with the same validation as ``__init__``."""
        if informativeness is not None:
            self.w_informativeness = _check_weight(informativeness, "informativeness")
        if disentanglement is not None:
            self.w_disentanglement = _check_weight(disentanglement, "disentanglement")

    # ------------------------------------------------------------------------------------------------
    def _target(self, source: Tensor, target: Tensor | None, what: str) -> Tensor | Callable[[Tensor], Tensor]:
        if self.head is not None:
            if self.target_fn is None:
                return self.head
            head, fn = self.head, self.target_fn
            return lambda h: fn(head(h))
        if target is None:
            raise ValueError(
                f"ExplanationRegularizer needs the {what} target activation (computed from the source in the"
                " autograd graph) or a `head` callable h -> z given at construction."
            )
        return self.target_fn(target) if self.target_fn is not None else target

    def _path(self, source: Tensor, target: Tensor | Callable[[Tensor], Tensor]) -> str:
        if self.path != "auto" or isinstance(target, Tensor) or isinstance(target, PooledHead):
            return self.path
        if source.device.type == "cpu" and isinstance(target, nn.Module):
            if any(isinstance(m, nn.modules.conv._ConvNd) for m in target.modules()):
                return "loop"
        return "auto"

    def _maps(
        self,
        source: Tensor,
        target: Tensor | Callable[[Tensor], Tensor],
        *,
        dims: Sequence[int] | Tensor | None,
        create_graph: bool,
        samples_per_input: int,
    ) -> Tensor:
        method = "grad_x_act" if self.method == "expected_gradients" else self.method
        if samples_per_input > 1:
            # expected gradients: S interpolants per explained input; average phi per group, then transform
            phi = layer_attributions(
                source, target, method=method, dims=dims, create_graph=create_graph,
                chunk_size=self.chunk_size, transform=None, head_batchnorm=self.head_batchnorm,
                path=self._path(source, target),
            )
            phi = phi.unflatten(0, (-1, samples_per_input)).mean(1)
            from reprlens.attribution import aggregate_channels

            return aggregate_channels(phi, self.transform)
        return layer_attributions(
            source, target, method=method, dims=dims, create_graph=create_graph,
            chunk_size=self.chunk_size, transform=self.transform, head_batchnorm=self.head_batchnorm,
            path=self._path(source, target),
        )

    def _num_dims(self, source: Tensor, target: Tensor | Callable[[Tensor], Tensor]) -> int:
        if self.dims is not None:
            return len(self.dims)
        if isinstance(target, Tensor):
            return target.reshape(target.shape[0], -1).shape[1] if target.ndim <= 2 else target.shape[1]
        with torch.no_grad():
            z = target(source[:1].detach())
        return z.shape[1]

    def forward(
        self,
        source: Tensor,
        target: Tensor | None = None,
        *,
        reference_source: Tensor | None = None,
        reference_target: Tensor | None = None,
        samples_per_input: int = 1,
        generator: torch.Generator | None = None,
    ) -> RegularizerOutput:
        """Compute the regularisation term.

        Args:
            source: source activation ``h`` ``(N, C, H, W)`` (or ``(N, D)``), part of the autograd graph.
            target: target activation ``z`` computed from ``source`` (graph-only path); omit with a head.
            reference_source: source activations of the noise reference inputs (needed for
                informativeness).
            reference_target: their targets (graph-only path).
            samples_per_input: rows per explained input (expected gradients); maps are averaged per group.
            generator: random generator for ``num_dims_sampled``.

        Returns:
            :class:`RegularizerOutput` with the differentiable loss term and the detached scores.
        """
        if not isinstance(source, Tensor):
            raise TypeError(f"Expected argument `source` to be a Tensor, but got {type(source).__name__}.")
        if not isinstance(samples_per_input, int) or samples_per_input < 1:
            raise ValueError(f"Expected `samples_per_input` to be an integer >= 1, but got {samples_per_input!r}.")
        weights = self.weights
        zero = source.new_zeros((), dtype=torch.float32 if source.dtype in (torch.float16, torch.bfloat16) else None)
        if not weights:
            return RegularizerOutput(zero, {"total": zero.detach()})
        device_type = source.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            if self.head is not None and self.inner_fp32:
                # re-run the head in fp32: a differentiable upcast of half-precision activations
                source = _upcast(source)
                if reference_source is not None:
                    reference_source = _upcast(reference_source)
            tgt = self._target(source, target, "source")
            scores: dict[str, Tensor] = {}
            k_total = self._num_dims(source, tgt)
            dims = self.dims
            need_vs = "disentanglement" in weights
            need_ns = "informativeness" in weights
            maps = None
            if need_vs:
                vs_dims = dims
                if self.num_dims_sampled is not None and self.num_dims_sampled < k_total:
                    perm = torch.randperm(k_total, generator=generator, device="cpu")[: self.num_dims_sampled]
                    base = torch.as_tensor(dims) if dims is not None else None
                    vs_dims = (base[perm] if base is not None else perm).tolist()
                    if need_ns and not self._ns_fast_path() and not self._warned_biased_ns:
                        warnings.warn(
                            "ExplanationRegularizer: `num_dims_sampled` with informativeness outside the lin+sum"
                            " fast path uses the same dim subset for informativeness, which biases it.",
                            stacklevel=2,
                        )
                        self._warned_biased_ns = True
                maps = self._maps(source, tgt, dims=vs_dims, create_graph=True, samples_per_input=samples_per_input)
                scores["disentanglement"] = disentanglement(
                    maps, normalize=self.normalization != "none", ddof=self.ddof, eps=self.eps,
                    num_dims_total=k_total if vs_dims is not dims else None, validate_args=False,
                )
                if vs_dims is not dims:
                    maps = None if self._ns_fast_path() else maps
            if need_ns:
                if reference_source is None:
                    raise ValueError(
                        "The informativeness score needs `reference_source` (source activations of noise"
                        " inputs); the ExplanationRegularization callback makes them for you."
                    )
                ref_tgt = self._target(reference_source, reference_target, "reference")
                if maps is None and self._ns_fast_path() and samples_per_input == 1:
                    real = summed_map(source, tgt, method=self._fast_method(), create_graph=True).unsqueeze(1)
                    with torch.enable_grad():
                        ref = summed_map(reference_source, ref_tgt, method=self._fast_method()).unsqueeze(1)
                else:
                    real = maps if maps is not None else self._maps(
                        source, tgt, dims=dims, create_graph=True, samples_per_input=samples_per_input
                    )
                    with torch.enable_grad():
                        ref = self._maps(reference_source, ref_tgt, dims=dims, create_graph=False,
                                         samples_per_input=1)
                scores["informativeness"] = informativeness(
                    real.float() if real.dtype in (torch.float16, torch.bfloat16) else real,
                    ref.detach().to(real.dtype if real.dtype not in (torch.float16, torch.bfloat16) else torch.float32),
                    normalization=self.normalization, eps=self.eps, ddof=self.ddof, validate_args=False,
                )
            total = sum(weights[name] * scores[name] for name in scores)
        detached = {name: value.detach() for name, value in scores.items()}
        detached["total"] = total.detach()
        return RegularizerOutput(-total, detached)

    def _ns_fast_path(self) -> bool:
        return self.transform == "lin" and self.dims is None and self.method in ("grad", "grad_x_act")

    def _fast_method(self) -> str:
        return self.method if self.method in ("grad", "grad_x_act") else "grad_x_act"

    def extra_repr(self) -> str:
        return (
            f"informativeness={self.w_informativeness}, disentanglement={self.w_disentanglement}, "
            f"method={self.method!r}, transform={self.transform!r}, normalization={self.normalization!r}, "
            f"ddof={self.ddof}"
        )

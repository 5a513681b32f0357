"""Random projection of trace factors (TRAK-style): store ``ÃQᵀ`` and ``GPᵀ`` instead of ``Ã`` and ``G``.

With Q ∈ R^{k_in×D_in} and P ∈ R^{k_out×D_out} independent with ``E[QᵀQ] = I`` and ``E[PᵀP] = I`` (entries
N(0, 1/k) or Rademacher ±1/√k), every dot product the reader computes from projected factors — contribution
scores ``⟨Pc_i, PΔz⟩``, TracIn dots and self-influence — is an unbiased estimate of the exact one. Cosines, norms,
rankings and completeness are not unbiased (completeness holds in expectation only). The bias term stays
exact on the input side: ``Ã_xQᵀQÃᵀ + β11ᵀ``.

Variance of one Gaussian pair ``⟨Pu, Pv⟩``: ``(‖u‖²‖v‖² + ⟨u,v⟩²)/k``; Rademacher subtracts ``2Σ_j u_j²v_j²``.

Example:
    >>> Q, P = projection_matrices(8, 3, k_in=4, k_out=2, seed=0)
    >>> Q.shape, P.shape, Q.dtype
    (torch.Size([4, 8]), torch.Size([2, 3]), torch.float64)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reprlens.trace.functional import LayerSpec, grad_matrix, layer_spec, patch_matrix

__all__ = ["project_factors", "projected_spec", "projection_matrices"]


def projection_matrices(
    d_in: int, d_out: int, *, k_in: int, k_out: int, seed: int, kind: str = "gaussian"
) -> tuple[Tensor, Tensor]:
    """Q (k_in × d_in) and P (k_out × d_out) in float64 on CPU, identical for the same seed on every rank.

    ``kind="gaussian"``: N(0, 1/k) entries; ``"rademacher"``: ±1/√k.
    """
    if kind not in ("gaussian", "rademacher"):
        raise ValueError(f"Expected kind in ('gaussian', 'rademacher'), got {kind!r}.")
    for name, k in (("k_in", k_in), ("k_out", k_out)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Expected projection dim {name} >= 1, got {k!r}.")
    g = torch.Generator().manual_seed(int(seed))

    def draw(k: int, d: int) -> Tensor:
        if kind == "gaussian":
            return torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(k)
        return (torch.randint(0, 2, (k, d), generator=g).to(torch.float64) * 2 - 1) / math.sqrt(k)

    return draw(k_in, d_in), draw(k_out, d_out)


def projected_spec(spec: LayerSpec, k_in: int, k_out: int) -> LayerSpec:
    """The layer that projected factors describe: a Linear ``k_in → k_out`` over the P patch rows."""
    return LayerSpec("Linear", (int(k_out), int(k_in)), spec.bias)


def project_factors(module, a: Tensor, g: Tensor, Q: Tensor, P: Tensor) -> tuple[Tensor, Tensor]:
    """Projected patch and gradient rows ``(N, P, k_in)``, ``(N, P, k_out)`` (grouped convs are not supported).

    Example:
        >>> lin = torch.nn.Linear(8, 3)
        >>> Q, P = projection_matrices(8, 3, k_in=4, k_out=2, seed=0)
        >>> a, g = project_factors(lin, torch.randn(5, 8), torch.randn(5, 3), Q.float(), P.float())
        >>> a.shape, g.shape
        (torch.Size([5, 1, 4]), torch.Size([5, 1, 2]))
    """
    spec = layer_spec(module)
    if spec.groups != 1:
        raise NotImplementedError("Random projection of grouped convolutions is not supported; use projection=None.")
    A = patch_matrix(spec, a)[:, 0]  # (N, P, D_in)
    G = grad_matrix(spec, g)[:, 0]  # (N, P, D_out)
    return A @ Q.to(A.dtype).T, G @ P.to(G.dtype).T

"""Functional core of INVERT: exact midranks, rank-sum AUCs, Mann-Whitney p-values, vectorised beam search.

Everything here is plain torch (scipy only for the few exact-path p-values). Rank sums are float64 and
integer- or half-integer-valued, so every AUC is exact (one rounding in the final division) and bitwise
identical across devices, BLAS libraries and chunk sizes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BeamSettings",
    "BeamTables",
    "auroc",
    "auroc_exact",
    "beam_search",
    "mann_whitney",
    "mann_whitney_from_stats",
    "midranks",
]

_ALTERNATIVES = ("two-sided", "greater", "less")


def _check_no_nan(x: Tensor, what: str = "activations") -> None:
    if x.is_floating_point() or x.is_complex():
        bad = torch.isnan(x)
        if bad.any():
            cols = bad.reshape(bad.shape[0], -1).any(0).nonzero().flatten().tolist() if bad.dim() > 1 else [0]
            raise ValueError(
                f"Expected {what} without NaN, but units {cols[:20]}{'...' if len(cols) > 20 else ''} contain NaN."
                " Remove or impute them before ranking (+-inf values are allowed and ranked)."
            )


def _midranks_rows(xt: Tensor) -> tuple[Tensor, Tensor]:
    """Midranks along the last dim of a ``(D, N)`` tensor (contiguous rows): ``(ranks (D, N) f64, tie (D,))``.

    Group boundaries of the sorted rows give each position the first (``left``) and one-past-last
    (``right``) index of its tie group via a running max / min; the midrank is ``(left + right + 1) / 2``.
    """
    d, n = xt.shape
    srt, idx = torch.sort(xt, dim=1)
    diff = srt[:, 1:] != srt[:, :-1]
    edge = torch.ones(d, 1, dtype=torch.bool, device=xt.device)
    ar = torch.arange(n, device=xt.device).expand(d, n)
    left = torch.where(torch.cat([edge, diff], 1), ar, 0).cummax(1).values
    right = torch.where(torch.cat([diff, edge], 1), ar + 1, n).flip(1).cummin(1).values.flip(1)
    mid = (left + right + 1).to(torch.float64) / 2.0
    ranks = torch.empty((d, n), dtype=torch.float64, device=xt.device).scatter_(1, idx, mid)
    t = (right - left).to(torch.float64)
    return ranks, (t * t - 1.0).sum(1)


def midranks(x: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Midranks (1-based, ties get the mean position) along ``dim`` and the tie term per column.

    The ranks are float64 (integers or half-integers). The tie term of a column is
    ``sum over tie groups of (t**3 - t)``, as used by the Mann-Whitney variance.

    Args:
        x: ``(N,)`` or ``(N, D)`` real tensor; ranked in its own dtype (never downcast).
        dim: the sample dimension (0 or -2 for 2-D input).

    Returns:
        ``(ranks, tie_term)``: float64 tensors of the shape of ``x`` and ``(D,)`` (or a scalar for 1-D input).

    Raises:
        ValueError: on NaN values.

    Example:
        >>> r, t = midranks(torch.tensor([3.0, 1.0, 3.0, 2.0]))
        >>> r.tolist(), float(t)
        ([3.5, 1.0, 3.5, 2.0], 6.0)
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected a torch.Tensor, but got {type(x).__name__}.")
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if x.is_complex():
        raise TypeError("Expected real-valued activations, but got a complex tensor.")
    _check_no_nan(x)
    if x.dim() == 1:
        r, t = _midranks_rows(x[None, :].contiguous())
        return r[0], t[0]
    if x.dim() != 2:
        raise ValueError(f"Expected a 1-D or 2-D tensor, but got shape {tuple(x.shape)}.")
    xt = x.movedim(dim, -1).contiguous()  # (D, N)
    r, t = _midranks_rows(xt)
    return r.movedim(-1, dim), t


def _as_bool_target(target: Tensor) -> Tensor:
    if target.dtype == torch.bool:
        return target
    if target.is_floating_point() or target.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        ok = (target == 0) | (target == 1)
        if not bool(ok.all()):
            raise ValueError(
                "Expected binary concept labels (bool, or numbers in {0, 1}), but got other values "
                f"(e.g. {target[~ok].flatten()[:5].tolist()}). Binarise the labels first."
            )
        return target != 0
    raise TypeError(f"Expected a bool or numeric label tensor, but got dtype {target.dtype}.")


def _auc_from_stats(s: Tensor, n1: Tensor, n: int) -> Tensor:
    """AUC = (S - n1(n1+1)/2) / (n1 (N - n1)) in float64; NaN where n1 is 0 or N."""
    n1 = n1.to(torch.float64)
    den = n1 * (n - n1)
    auc = (s - n1 * (n1 + 1.0) / 2.0) / den
    return torch.where(den > 0, auc, torch.full_like(auc, float("nan")))


@contextlib.contextmanager
def exact_matmul_context(device: torch.device) -> Iterator[None]:
    """Disable autocast and TF32 locally (restored on exit) so the count GEMM stays exact."""
    old_mm = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=device.type if device.type in ("cuda", "cpu") else "cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_mm
        torch.backends.cudnn.allow_tf32 = old_cudnn


def auroc_exact(preds: Tensor, target: Tensor) -> Tensor:
    """Exact AUC (midranks, ties count one half) of every unit for every concept, in one float64 GEMM.

    Args:
        preds: ``(N,)`` or ``(N, D)`` unit activations (any real dtype; NaN raises).
        target: ``(N,)`` or ``(N, K)`` binary labels (bool, or integers/floats in {0, 1}).

    Returns:
        float64 ``(K, D)`` AUC matrix (squeezed like the inputs); NaN for constant concepts.

    Example:
        >>> preds = torch.tensor([0.1, 0.4, 0.35, 0.8])
        >>> float(auroc_exact(preds, torch.tensor([0, 0, 1, 1])))
        0.75
    """
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError("Expected `preds` and `target` to be torch tensors.")
    p2 = preds.unsqueeze(1) if preds.dim() == 1 else preds
    t2 = _as_bool_target(target)
    t2 = t2.unsqueeze(1) if t2.dim() == 1 else t2
    if p2.dim() != 2 or t2.dim() != 2:
        raise ValueError(f"Expected preds (N,) or (N, D) and target (N,) or (N, K), got {tuple(preds.shape)}, "
                         f"{tuple(target.shape)}.")
    if p2.shape[0] != t2.shape[0]:
        raise ValueError(f"Expected the same number of samples, but preds has {p2.shape[0]} and target "
                         f"{t2.shape[0]} rows.")
    if p2.shape[0] == 0:
        raise ValueError(f"Expected at least one sample, but got preds of shape {tuple(preds.shape)}; the AUC of an "
                         "empty set is undefined. Collect activations on a non-empty dataset.")
    ranks, _ = midranks(p2)
    t2 = t2.to(ranks.device)
    with exact_matmul_context(ranks.device):
        s = t2.to(torch.float64).t() @ ranks
    n1 = t2.sum(0).to(torch.float64)[:, None]
    auc = _auc_from_stats(s, n1, p2.shape[0])
    if preds.dim() == 1:
        auc = auc[:, 0]
    if target.dim() == 1:
        auc = auc[0]
    return auc


def auroc(activations: Tensor, concepts: Any) -> Tensor:
    """The full ``(D, K)`` AUC matrix of units against concepts (a ``ConceptSet`` or a label tensor).

    Example:
        >>> a = torch.tensor([[0.1], [0.4], [0.35], [0.8]])
        >>> auroc(a, torch.tensor([[0, 1], [0, 0], [1, 0], [1, 1]])).tolist()
        [[0.75, 0.5]]
    """
    labels = getattr(concepts, "labels", concepts)
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(np.asarray(labels))
    if not isinstance(activations, Tensor):
        activations = torch.as_tensor(np.asarray(activations))
    a2 = activations.unsqueeze(1) if activations.dim() == 1 else activations
    l2 = labels.unsqueeze(1) if labels.dim() == 1 else labels
    return auroc_exact(a2, l2).t()


def mann_whitney_from_stats(
    u: Tensor,
    n1: Tensor,
    n_total: int,
    tie_term: Tensor,
    alternative: str = "two-sided",
) -> tuple[Tensor, Tensor]:
    """Normal-approximation Mann-Whitney p-value and log p (tie and continuity corrected, scipy's formula).

    Args:
        u: U statistic of the positives (float64).
        n1: number of positives.
        n_total: N.
        tie_term: ``sum (t**3 - t)`` of the unit each row belongs to.
        alternative: ``"two-sided"``, ``"greater"`` (positives larger) or ``"less"``.

    Returns:
        ``(p, log_p)`` float64; ``p = 1, log_p = 0`` where the variance is 0.
    """
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"Expected `alternative` to be one of {_ALTERNATIVES}, but got {alternative!r}.")
    u = u.to(torch.float64)
    n1 = n1.to(torch.float64)
    n0 = n_total - n1
    prod = n1 * n0
    if alternative == "greater":
        ustar, f = u, 1.0
    elif alternative == "less":
        ustar, f = prod - u, 1.0
    else:
        ustar, f = torch.maximum(u, prod - u), 2.0
    nn = float(n_total)
    var = prod / 12.0 * ((nn + 1.0) - tie_term.to(torch.float64) / (nn * (nn - 1.0)))
    sigma = torch.sqrt(torch.clamp(var, min=0.0))
    ok = sigma > 0
    z = (ustar - prod / 2.0 - 0.5) / torch.where(ok, sigma, torch.ones_like(sigma))
    log_p = torch.clamp(math.log(f) + torch.special.log_ndtr(-z), max=0.0)
    p = torch.clamp(f * torch.special.ndtr(-z), max=1.0)
    p = torch.where(ok, p, torch.ones_like(p))
    log_p = torch.where(ok, log_p, torch.zeros_like(log_p))
    return p, log_p


def mann_whitney(
    preds: Tensor, target: Tensor, alternative: str = "two-sided"
) -> tuple[Tensor, Tensor, Tensor]:
    """Mann-Whitney U of the positives, p-value and log p, matching ``scipy.stats.mannwhitneyu`` (auto).

    ``preds`` is ``(N,)`` or ``(N, D)``; ``target`` ``(N,)`` or ``(N, K)``; outputs are ``(K, D)`` (squeezed).
    The exact distribution is used where scipy's ``method="auto"`` uses it (min(n1, n0) <= 8 and no ties
    in the unit); otherwise the normal approximation with tie and continuity correction.

    Example:
        >>> u, p, logp = mann_whitney(torch.arange(10.0), torch.arange(10) >= 5)
        >>> float(u), round(float(p), 6)
        (25.0, 0.007937)
    """
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"Expected `alternative` to be one of {_ALTERNATIVES}, but got {alternative!r}.")
    p2 = preds.unsqueeze(1) if preds.dim() == 1 else preds
    t2 = _as_bool_target(target)
    t2 = t2.unsqueeze(1) if t2.dim() == 1 else t2
    n = p2.shape[0]
    ranks, tie = midranks(p2)
    t2 = t2.to(ranks.device)
    with exact_matmul_context(ranks.device):
        s = t2.to(torch.float64).t() @ ranks
    n1 = t2.sum(0).to(torch.float64)[:, None].expand_as(s)
    u = s - n1 * (n1 + 1) / 2
    p, logp = mann_whitney_from_stats(u, n1, n, tie[None, :].expand_as(s), alternative)
    exact = (torch.minimum(n1, n - n1) <= 8) & (tie == 0)[None, :] & (n1 > 0) & (n1 < n)
    if bool(exact.any()):
        ks, ds = exact.nonzero(as_tuple=True)
        pe = _exact_p(p2, t2, ks.tolist(), ds.tolist(), alternative)
        p = p.clone()
        logp = logp.clone()
        p[ks, ds] = pe.to(p.device)
        logp[ks, ds] = torch.log(pe).clamp(max=0.0).to(p.device)
    out = (u, p, logp)
    if preds.dim() == 1:
        out = tuple(o[:, 0] for o in out)
    if target.dim() == 1:
        out = tuple(o[0] for o in out)
    return out  # type: ignore[return-value]


def _exact_p(values: Tensor, truth: Tensor, cols_t: list[int], cols_v: list[int], alternative: str) -> Tensor:
    from scipy.stats import mannwhitneyu

    vals = values.detach().to("cpu", torch.float64).numpy()
    tr = truth.detach().cpu().numpy()
    out = []
    for k, d in zip(cols_t, cols_v):
        m = tr[:, k]
        out.append(mannwhitneyu(vals[m, d], vals[~m, d], alternative=alternative, method="exact").pvalue)
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------------------


@dataclass
class BeamSettings:
    """Resolved search settings (see :class:`reprlens.invert.Invert` for the meaning of each)."""

    max_length: int = 3
    beam_size: int = 3
    limit_search: int | None = None
    min_fraction: float = 0.0
    max_fraction: float = 1.0
    alpha: float | None = None
    mode: str = "positive"
    dedupe: bool = True
    compat: str | None = None


@dataclass
class BeamTables:
    """Raw survivor tables of one beam search over ``D`` units (numpy, CPU).

    Per step ``l`` (index ``l - 1``): ``src[l]`` (D, B) parent slot in beam ``l - 1`` (or own slot of
    an old member), ``atom[l]`` (D, B) atom index in ``0..2K-1`` (``-1``: old member kept; at step 1
    the atom itself), ``op[l]`` (D, B) 0 = AND, 1 = OR, ``valid[l]`` (D, B), ``s``/``n``/``auc``/
    ``length`` (D, B). ``n_tests`` (D,) feasible atoms plus feasible candidates of steps 2..L.
    """

    num_concepts: int
    num_samples: int
    src: list[np.ndarray] = field(default_factory=list)
    atom: list[np.ndarray] = field(default_factory=list)
    op: list[np.ndarray] = field(default_factory=list)
    valid: list[np.ndarray] = field(default_factory=list)
    s: list[np.ndarray] = field(default_factory=list)
    n: list[np.ndarray] = field(default_factory=list)
    auc: list[np.ndarray] = field(default_factory=list)
    length: list[np.ndarray] = field(default_factory=list)
    n_tests: np.ndarray | None = None
    best_stat: np.ndarray | None = None

    def chain(self, step: int, d: int, b: int) -> list[tuple[int, int]]:
        """Atoms and ops (op -1 for the first atom) of entry ``b`` of unit ``d`` in beam ``step`` (1-based)."""
        items: list[tuple[int, int]] = []
        l, slot = step, b
        while l >= 1:
            a = int(self.atom[l - 1][d, slot])
            if l == 1:
                items.append((a, -1))
                break
            src = int(self.src[l - 1][d, slot])
            if a >= 0:
                items.append((a, int(self.op[l - 1][d, slot])))
            slot = src
            l -= 1
        return items[::-1]


def _f32(x: float) -> float:
    return float(np.float32(x))


def _feasible(n: Tensor, n_total: int, st: BeamSettings, *, negated_atom_of: Tensor | None = None) -> Tensor:
    """Fraction filter on counts ``n`` (float64)."""
    if st.compat == "reference":
        if negated_atom_of is not None:
            frac = torch.tensor(1.0, dtype=torch.float32, device=n.device) - (
                negated_atom_of.to(torch.float32) / np.float32(n_total)
            )
        else:
            frac = n.to(torch.float32) / np.float32(n_total)
        return (frac >= _f32(st.min_fraction)) & (frac <= _f32(st.max_fraction)) & (frac > 0) & (frac < 1)
    base = (n > 0) & (n < n_total)
    if st.alpha is not None:
        return base & (torch.minimum(n, n_total - n) / n_total >= st.alpha)
    frac = n / n_total
    return base & (frac >= st.min_fraction) & (frac <= st.max_fraction)


def _stable_first_k(keys: Tensor, k: int) -> Tensor:
    """Indices of the first ``k`` entries per row by (key ascending, index ascending): a stable top-k."""
    m = keys.shape[1]
    k = min(k, m)
    if m <= 512 or 4 * k >= m:
        return torch.sort(keys, dim=1, stable=True).indices[:, :k]
    kk = min(m, 2 * k + 8)
    vals, idx = torch.topk(keys, kk, dim=1, largest=False, sorted=True)
    idx_sorted, perm = idx.sort(dim=1)
    vals_by_idx = vals.gather(1, perm)
    order = torch.sort(vals_by_idx, dim=1, stable=True).indices
    sel = idx_sorted.gather(1, order)
    ok = (vals[:, kk - 1] > vals[:, k - 1]) | torch.isinf(vals[:, k - 1])
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        sel[bad] = torch.sort(keys[bad], dim=1, stable=True).indices[:, :kk]
    return sel[:, :k]


def _atom_rows(ct: Tensor, atoms: Tensor) -> Tensor:
    """Truth vectors of atoms (indices in 0..2K-1, any shape) from ``ct`` (K, N) -> (*atoms.shape, N) bool."""
    k = ct.shape[0]
    return ct[atoms % k] ^ (atoms >= k).unsqueeze(-1)


def _select_distinct(
    keys: Tensor,
    k: int,
    vec_fn: Any,
    stats: Tensor,
    n_samples: int,
) -> Tensor:
    """First ``k`` entries per row by (key, index) whose truth vectors are distinct (infeasible = inf key).

    ``vec_fn(rows, idx)`` returns the truth vectors ``(R, k', N)`` of entries ``idx`` (R, k') of rows
    ``rows``; ``stats`` (D, M) is the count n1 of each entry (equal vectors have equal key and n1).
    Returns (D, k) indices with -1 where fewer than k feasible distinct entries exist.
    """
    d_all, m = keys.shape
    out = torch.full((d_all, k), -1, dtype=torch.long, device=keys.device)
    rows = torch.arange(d_all, device=keys.device)
    fetch = min(m, 4 * k)
    while rows.numel() > 0:
        sub = keys[rows]
        idx = _stable_first_k(sub, fetch)
        kv = sub.gather(1, idx)
        nv = stats[rows].gather(1, idx)
        finite = torch.isfinite(kv)
        # pairs (i < j) with equal key and n1: candidates for duplicates
        eq = (kv[:, :, None] == kv[:, None, :]) & (nv[:, :, None] == nv[:, None, :])
        eq &= torch.triu(torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool, device=keys.device), 1)[None]
        eq &= finite[:, :, None] & finite[:, None, :]
        dup = torch.zeros_like(finite)
        if bool(eq.any()):
            r, i, j = eq.nonzero(as_tuple=True)
            step = max(1, (256 << 20) // max(int(n_samples), 1))  # pairs per block: bounded memory
            for s0 in range(0, r.numel(), step):
                rr, ii, jj = r[s0 : s0 + step], i[s0 : s0 + step], j[s0 : s0 + step]
                vi = vec_fn(rows[rr], idx[rr, ii][:, None])[:, 0]  # (P, N)
                vj = vec_fn(rows[rr], idx[rr, jj][:, None])[:, 0]
                same = (vi == vj).all(-1)
                dup[rr[same], jj[same]] = True
        keep = finite & ~dup
        nkeep = keep.sum(1)
        enough = (nkeep >= k) | (fetch >= m) | (finite.sum(1) < idx.shape[1])
        # write rows that are done
        done = enough.nonzero().flatten()
        if done.numel():
            kd = keep[done]
            order = torch.sort((~kd).to(torch.int8), dim=1, stable=True).indices[:, :k]
            chosen = idx[done].gather(1, order)
            chosen = torch.where(kd.gather(1, order), chosen, torch.full_like(chosen, -1))
            if chosen.shape[1] < k:
                pad = torch.full((chosen.shape[0], k - chosen.shape[1]), -1, dtype=torch.long, device=keys.device)
                chosen = torch.cat([chosen, pad], 1)
            out[rows[done]] = chosen
        rows = rows[~enough]
        fetch = min(m, fetch * 2)
    return out


def beam_search(
    ranks: Tensor,
    concepts: Tensor,
    settings: BeamSettings,
    *,
    cache: dict[str, Tensor] | None = None,
    excluded: Tensor | None = None,
    ranks_are_rows: bool = False,
) -> BeamTables:
    """Vectorised INVERT beam search for all units (columns of ``ranks``) at once.

    Args:
        ranks: ``(N, D)`` float64 midranks (see :func:`midranks`); ``(D, N)`` with ``ranks_are_rows``.
        concepts: ``(N, K)`` bool concept matrix on the same device.
        settings: resolved :class:`BeamSettings` (``compat="reference"`` or default semantics).
        cache: optional dict holding ``"c64"`` / ``"c32"`` (float64 / float32 copies of ``concepts``) and
            ``"ct"`` (the transposed ``(K, N)`` bool matrix).
        excluded: ``(2K,)`` bool atoms excluded in default mode (constant / duplicate truth vectors);
            computed when ``None``.

    Returns:
        :class:`BeamTables` (numpy) with one ``(D, B)`` table per step.

    Example:
        >>> c = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)
        >>> r, _ = midranks(torch.tensor([[3.0], [4.0], [1.0], [2.0]]))
        >>> t = beam_search(r, c, BeamSettings(max_length=1, beam_size=1, alpha=0.1))
        >>> int(t.atom[0][0, 0]), float(t.auc[0][0, 0])
        (0, 1.0)
    """
    st = settings
    if ranks.dtype != torch.float64:
        raise TypeError(f"Expected float64 ranks, but got {ranks.dtype}.")
    rt = ranks.contiguous() if ranks_are_rows else ranks.t().contiguous()  # (D, N)
    dev = rt.device
    d_units, n_total = rt.shape
    k_conc = concepts.shape[1]
    b = st.beam_size
    ref = st.compat == "reference"
    positive = st.mode == "positive"
    cache = {} if cache is None else cache
    c64 = cache["c64"] if "c64" in cache else concepts.to(torch.float64)
    c32 = cache["c32"] if "c32" in cache else concepts.to(torch.float32)
    ct = cache["ct"] if "ct" in cache else concepts.t().contiguous()
    tables = BeamTables(num_concepts=k_conc, num_samples=n_total)
    inf = math.inf
    zero64 = torch.zeros((), dtype=torch.float64, device=dev)

    with exact_matmul_context(dev):
        # ---- atoms: S = R C (D, K), one float64 GEMM
        s_pos = rt @ c64
        assert s_pos.dtype == torch.float64
        n_pos = c32.sum(0).to(torch.float64)  # (K,)
        total = n_total * (n_total + 1) / 2.0
        s_atom = torch.cat([s_pos, total - s_pos], 1)  # (D, 2K)
        n_atom = torch.cat([n_pos, n_total - n_pos], 0)  # (2K,)
        auc_atom = _auc_from_stats(s_atom, n_atom[None, :], n_total)  # (D, 2K)
        const_atom = (n_atom == 0) | (n_atom == n_total)
        if ref:
            fill = torch.cat([torch.zeros(k_conc, device=dev), torch.ones(k_conc, device=dev)]).to(torch.float64)
            auc_atom = torch.where(const_atom[None, :], fill[None, :], auc_atom)
            feas_atom = torch.cat(
                [_feasible(n_pos, n_total, st), _feasible(n_pos, n_total, st, negated_atom_of=n_pos)]
            )
        else:
            if excluded is None:
                excluded = excluded_atoms(concepts)
            feas_atom = _feasible(n_atom, n_total, st) & ~excluded
        key_atom = -auc_atom if positive else auc_atom
        key_atom = torch.nan_to_num(key_atom, nan=inf)
        key_feas = torch.where(feas_atom[None, :], key_atom, inf)
        n_tests = feas_atom.sum().to(torch.float64).expand(d_units).clone()

        if ref or not st.dedupe:
            sel = _stable_first_k(key_feas, b)
            sel = torch.where(torch.isfinite(key_feas.gather(1, sel)), sel, -1)
        else:
            sel = _select_distinct(
                key_feas, b, lambda rows, idx: _atom_rows(ct, idx), n_atom[None, :].expand_as(key_feas), n_total
            )
        if sel.shape[1] < b:
            sel = torch.cat([sel, torch.full((d_units, b - sel.shape[1]), -1, dtype=torch.long, device=dev)], 1)
        valid = sel >= 0
        sel0 = sel.clamp(min=0)
        beam_s = torch.where(valid, s_atom.gather(1, sel0), zero64)
        beam_n = torch.where(valid, n_atom[sel0], zero64)
        beam_auc = auc_atom.gather(1, sel0)
        beam_len = torch.ones_like(sel)
        _record(tables, sel0, sel0, torch.zeros_like(sel), valid, beam_s, beam_n, beam_auc, beam_len)

        if st.max_length == 1:
            tables.n_tests = n_tests.cpu().numpy()
            tables.best_stat = _best_stat(beam_auc, valid, positive)
            return tables

        # ---- expansion pool (per unit)
        diff = 2.0 * (0.5 - auc_atom).abs()
        if ref:
            order1 = torch.sort(key_atom, dim=1, stable=True).indices  # Lambda
            order2 = torch.sort(-diff.gather(1, order1), dim=1, stable=True).indices
            pool = order1.gather(1, order2)
            p_size = 2 * k_conc if st.limit_search is None else min(st.limit_search, 2 * k_conc)
        else:
            dd = torch.nan_to_num(torch.where(excluded[None, :], inf, -diff), nan=inf)
            pool = torch.sort(dd, dim=1, stable=True).indices
            n_avail = int((~excluded).sum())
            p_size = n_avail if st.limit_search is None else min(st.limit_search, n_avail)
        pool = pool[:, :p_size].contiguous()  # (D, P)
        s_a = s_atom.gather(1, pool)[:, None, :]  # (D, 1, P)
        n_a = n_atom[pool][:, None, :]

        # ---- beam truth vectors (D, B, N)
        phi = _atom_rows(ct, sel0) & valid[:, :, None]
        for step in range(2, st.max_length + 1):
            m = b
            phir = torch.where(phi, rt[:, None, :], zero64).reshape(d_units * m, n_total)  # (D*m, N) f64
            g_s = (phir @ c64).reshape(d_units, m, k_conc)
            assert g_s.dtype == torch.float64
            phi32 = phi.reshape(d_units * m, n_total).to(torch.float32)
            g_n = (phi32 @ c32).to(torch.float64).reshape(d_units, m, k_conc)
            bs = beam_s[:, :, None]
            bn = beam_n[:, :, None]
            pidx = pool[:, None, :].expand(d_units, m, p_size)
            s_and = torch.cat([g_s, bs - g_s], 2).gather(2, pidx)  # (D, m, P) in pool order
            n_and = torch.cat([g_n, bn - g_n], 2).gather(2, pidx)
            cand_s = torch.stack([s_and, bs + s_a - s_and], 3)  # (D, m, P, 2): AND, OR
            cand_n = torch.stack([n_and, bn + n_a - n_and], 3)
            feas = _feasible(cand_n, n_total, st) & valid[:, :, None, None]
            n_tests += feas.reshape(d_units, -1).sum(1).to(torch.float64)
            cand_auc = _auc_from_stats(cand_s, cand_n, n_total)
            if ref:
                cand_auc = torch.nan_to_num(cand_auc, nan=0.0)
            sel_ok = feas
            if not ref and st.dedupe:
                # a no-op extension (phi & a with phi in a, phi | a with a in phi) has its parent's count and
                # is exactly the parent's truth vector, which competes earlier in generation order
                sel_ok = feas & (cand_n != bn[..., None])
            ck = torch.where(sel_ok, -cand_auc if positive else cand_auc, inf).reshape(d_units, -1)
            old_k = torch.where(valid, -beam_auc if positive else beam_auc, inf)
            keys = torch.cat([old_k, ck], 1)
            all_n = torch.cat([beam_n, cand_n.reshape(d_units, -1)], 1)

            def vec_fn(rows: Tensor, idx: Tensor, _phi: Tensor = phi, _m: int = m, _p: int = p_size) -> Tensor:
                return _entry_rows(_phi, ct, pool, rows, idx, _m, _p)

            if ref or not st.dedupe:
                sel = _stable_first_k(keys, b)
                sel = torch.where(torch.isfinite(keys.gather(1, sel)), sel, -1)
            else:
                sel = _select_distinct(keys, b, vec_fn, all_n, n_total)
            if sel.shape[1] < b:
                sel = torch.cat([sel, torch.full((d_units, b - sel.shape[1]), -1, dtype=torch.long, device=dev)], 1)
            valid_new = sel >= 0
            sel0 = sel.clamp(min=0)
            is_old = sel0 < m
            t = (sel0 - m).clamp(min=0)
            slot = torch.where(is_old, sel0, t // (2 * p_size))
            atom = torch.where(is_old, -1, pool.gather(1, (t // 2) % p_size))
            op = t % 2
            new_s = torch.cat([beam_s, cand_s.reshape(d_units, -1)], 1).gather(1, sel0)
            new_n = all_n.gather(1, sel0)
            new_auc = torch.cat([beam_auc, cand_auc.reshape(d_units, -1)], 1).gather(1, sel0)
            new_len = torch.where(is_old, beam_len.gather(1, slot), step)
            rows = torch.arange(d_units, device=dev)
            phi = _entry_rows(phi, ct, pool, rows, sel0, m, p_size) & valid_new[:, :, None]
            _record(tables, slot, atom, op, valid_new, new_s, new_n, new_auc, new_len)
            beam_s, beam_n, beam_auc, beam_len, valid = new_s, new_n, new_auc, new_len, valid_new

    tables.n_tests = n_tests.cpu().numpy()
    tables.best_stat = _best_stat(beam_auc, valid, positive)
    return tables


def _best_stat(beam_auc: Tensor, valid: Tensor, positive: bool) -> np.ndarray:
    s = beam_auc[:, 0] if positive else 1.0 - beam_auc[:, 0]
    s = torch.where(valid[:, 0], s, torch.full_like(s, float("nan")))
    return s.cpu().numpy()


def _entry_rows(phi: Tensor, ct: Tensor, pool: Tensor, rows: Tensor, idx: Tensor, m: int, p_size: int) -> Tensor:
    """Truth vectors (R, k', N) of competition entries ``idx`` (R, k') of units ``rows``; ``phi`` is (D, m, N)."""
    is_old = idx < m
    t = (idx - m).clamp(min=0)
    slot = torch.where(is_old, idx, t // (2 * p_size))
    atom = pool[rows].gather(1, (t // 2) % p_size)
    op = t % 2
    parent = phi[rows[:, None].expand_as(slot), slot]  # (R, k', N)
    acol = _atom_rows(ct, atom)
    res = torch.where((op == 0)[..., None], parent & acol, parent | acol)
    return torch.where(is_old[..., None], parent, res)


def _record(tables: BeamTables, src, atom, op, valid, s, n, auc, length) -> None:  # noqa: ANN001
    tables.src.append(src.cpu().numpy())
    tables.atom.append(torch.where(valid, atom, torch.full_like(atom, -2)).cpu().numpy())
    tables.op.append(op.cpu().numpy())
    tables.valid.append(valid.cpu().numpy())
    tables.s.append(s.cpu().numpy())
    tables.n.append(n.cpu().numpy())
    tables.auc.append(auc.cpu().numpy())
    tables.length.append(length.cpu().numpy())


def excluded_atoms(concepts: Tensor) -> Tensor:
    """Default-mode exclusions over the 2K atoms: constant truth vectors and repeats of an earlier atom.

    Example:
        >>> c = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)  # c2 = c0, c3 empty, c1 = ~c0
        >>> excluded_atoms(c).tolist()
        [False, False, True, True, True, True, True, True]
    """
    n, k = concepts.shape
    atoms = torch.cat([concepts, ~concepts], 1).t().contiguous()  # (2K, N)
    counts = atoms.sum(1)
    const = (counts == 0) | (counts == n)
    pad = (-n) % 8
    if pad:
        atoms = torch.cat([atoms, torch.zeros(2 * k, pad, dtype=torch.bool, device=atoms.device)], 1)
    w = (2 ** torch.arange(8, device=atoms.device, dtype=torch.int16)).to(torch.uint8)
    packed = (atoms.reshape(2 * k, -1, 8).to(torch.uint8) * w).sum(2).to(torch.uint8)
    _, inverse = torch.unique(packed, dim=0, return_inverse=True)
    first = torch.full((2 * k,), 2 * k, dtype=torch.long, device=atoms.device)
    first.scatter_reduce_(0, inverse, torch.arange(2 * k, device=atoms.device), reduce="amin")
    dup = first[inverse] != torch.arange(2 * k, device=atoms.device)
    return const | dup

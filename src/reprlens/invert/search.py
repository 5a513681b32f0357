"""``Invert`` (labels all units of a layer at once) and ``InvertResult`` (one row per unit and beam rank)."""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reprlens.invert.concepts import ConceptSet
from reprlens.invert.functional import (
    BeamSettings,
    BeamTables,
    _auc_from_stats,
    _exact_p,
    _midranks_rows,
    beam_search,
    exact_matmul_context,
    excluded_atoms,
    mann_whitney_from_stats,
    midranks,
)

__all__ = ["Invert", "InvertResult"]

_MODES = ("positive", "negative")
_COMPATS = (None, "reference")
_CORRECTIONS = (None, "bonferroni", "permutation")
_ALTERNATIVES = ("two-sided", "greater", "less")
_COLUMNS = (
    "neuron", "rank", "formula", "length", "auc", "fraction", "n_pos", "u_statistic", "p_value", "log_p",
    "p_corrected", "log_p_corrected", "n_tests",
)


class InvertResult:
    """Columnar table of INVERT labels: one row per (unit, beam rank) (per step too with ``return_states``).

    Columns (numpy arrays; ``formula`` a list of str): ``neuron``, ``rank``, ``formula``, ``length``,
    ``auc``, ``fraction``, ``n_pos``, ``u_statistic``, ``p_value``, ``log_p``, ``p_corrected``,
    ``log_p_corrected``, ``n_tests`` (and ``step`` with states). ``params`` holds the search settings.
    """

    def __init__(self, columns: dict[str, Any], params: dict[str, Any], concepts: ConceptSet | None = None) -> None:
        self.columns = columns
        self.params = params
        self._concepts = concepts

    def __len__(self) -> int:
        return len(self.columns["formula"])

    def __getitem__(self, name: str) -> Any:
        return self.columns[name]

    def __getattr__(self, name: str) -> Any:
        cols = self.__dict__.get("columns", {})
        if name in cols:
            return cols[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"InvertResult(rows={len(self)}, units={len(np.unique(self.columns['neuron']))})"

    def _take(self, mask: np.ndarray) -> InvertResult:
        idx = np.nonzero(mask)[0]
        cols = {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx]) for k, v in self.columns.items()}
        return InvertResult(cols, self.params, self._concepts)

    def best(self) -> InvertResult:
        """Rank-0 rows of the final beam (one per labelled unit)."""
        mask = self.columns["rank"] == 0
        if "step" in self.columns:
            mask &= self.columns["step"] == self.params["max_length"]
        return self._take(mask)

    def for_neuron(self, d: int) -> InvertResult:
        """Rows of unit ``d``."""
        return self._take(self.columns["neuron"] == d)

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` as a dict."""
        return {k: (v[i] if isinstance(v, list) else v[i].item()) for k, v in self.columns.items()}

    def expr(self, i: int) -> Any:
        """The sympy expression of row ``i``."""
        import sympy

        names = self._concepts.names if self._concepts is not None else None
        local = {n: sympy.Symbol(n) for n in (names or [])}
        return sympy.parse_expr(self.columns["formula"][i], local_dict=local) if names else sympy.sympify(
            self.columns["formula"][i]
        )

    def truth_vector(self, i: int) -> Tensor:
        """``(N,)`` bool truth vector of row ``i``'s formula."""
        if self._concepts is None:
            raise RuntimeError("This result carries no ConceptSet; evaluate the formula with ConceptSet.evaluate.")
        return self._concepts.evaluate(self.columns["formula"][i])

    def describe(self, i: int) -> str:
        """Row ``i``'s formula with concept descriptions."""
        f = self.columns["formula"][i]
        return self._concepts.describe(f) if self._concepts is not None else f

    def to_dict(self) -> dict[str, list[Any]]:
        """Columns as plain Python lists."""
        return {k: (list(v) if isinstance(v, list) else v.tolist()) for k, v in self.columns.items()}

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` (pandas is optional)."""
        from reprlens.utils import require

        pd = require("pandas", extra="all", purpose="InvertResult.to_pandas")
        return pd.DataFrame(self.to_dict())

    def to_csv(self, path: str | os.PathLike[str] | None = None, *, header_params: bool = True) -> str:
        """Write the table as CSV (params as ``#`` lines first); returns the text."""
        buf = io.StringIO()
        if header_params:
            for k, v in self.params.items():
                buf.write(f"# {k}: {v}\n")
        w = csv.writer(buf, lineterminator="\n")
        keys = list(self.columns)
        w.writerow(keys)
        d = self.to_dict()
        for i in range(len(self)):
            w.writerow([_fmt(d[k][i]) for k in keys])
        text = buf.getvalue()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def summary(self, top_k: int = 10) -> str:
        """A short markdown table of the top units by objective."""
        b = self.best()
        if len(b) == 0:
            return "(no labels)"
        auc = b.columns["auc"]
        score = auc if self.params.get("mode", "positive") == "positive" else 1 - auc
        order = np.argsort(-score, kind="stable")[:top_k]
        lines = ["| unit | formula | AUC | fraction | p_corrected |", "|---|---|---|---|---|"]
        for i in order:
            lines.append(
                f"| {b.columns['neuron'][i]} | {b.columns['formula'][i]} | {auc[i]:.4f} | "
                f"{b.columns['fraction'][i]:.4f} | {b.columns['p_corrected'][i]:.3g} |"
            )
        return "\n".join(lines)

    def to_reference(self) -> dict[int, Any]:
        """The reference implementation's output dicts per unit (``{"1": [...], ...}`` with states)."""
        out: dict[int, Any] = {}
        states = "step" in self.columns
        c = self.columns
        for i in range(len(self)):
            entry = {
                "formula": c["formula"][i],
                "length": int(c["length"][i]),
                "metric": float(c["auc"][i]),
                "differentiability": float(2 * abs(0.5 - c["auc"][i])),
                "concept_fraction": float(c["fraction"][i]),
            }
            d = int(c["neuron"][i])
            if states:
                out.setdefault(d, {}).setdefault(str(int(c["step"][i])), []).append(entry)
            else:
                out.setdefault(d, []).append(entry)
        return out


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)
    return v


def _to_tensor(activations: Any) -> Tensor:
    from reprlens.invert.collector import Activations

    if isinstance(activations, (str, os.PathLike)):
        activations = Activations.load(activations)
    if isinstance(activations, Activations):
        return activations.tensor()
    if isinstance(activations, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(activations))
    if isinstance(activations, Tensor):
        return activations.detach()
    raise TypeError(
        f"Expected activations as a Tensor, ndarray, Activations or .npy path, but got {type(activations).__name__}."
    )


class Invert:
    """INVERT: label units with compositional concept formulas by AUC, with Mann-Whitney significance.

    All units are labelled in one call by an exact vectorised beam search (float64 rank-sum GEMMs).

    Args:
        concepts: the :class:`ConceptSet` (row i = dataset index i of the activations).
        max_length: L, atoms per formula (>= 1).
        beam_size: B, formulas kept per step (>= 1).
        limit_search: size of the expansion pool (None: all atoms; larger values are clamped).
        min_fraction: lower bound on the fraction of positives of a label.
        max_fraction: upper bound (the reference's default is 0.5, which forbids anti-concepts).
        alpha: symmetric bound ``alpha <= T <= 1 - alpha`` (default 0.002 when no bound is given).
        mode: ``"positive"`` maximises AUC, ``"negative"`` minimises it.
        dedupe: keep distinct truth vectors in each beam (default semantics only).
        compat: ``"reference"`` reproduces the reference v1.1 beams string-for-string (implies
            ``dedupe=False`` and the [0, 0.5] fraction interval by default); ``None`` the default semantics.
        correction: ``"bonferroni"`` (default), ``"permutation"`` or ``None``.
        n_permutations: permutations for ``correction="permutation"``.
        seed: seed of the permutation generator.
        alternative: ``"two-sided"``, ``"greater"`` (concept-positive samples larger) or ``"less"``.
        device: device when activations are not a tensor (default CPU).
        neuron_chunk: units per chunk (default: the largest within ``max_memory``).
        max_memory: working bytes per unit chunk (default 1 GiB on CPU, half the free CUDA memory); the
            concept caches (N x K as bool, float32 and float64) come on top.

    Example:
        >>> from reprlens.invert._fixtures import fx1
        >>> acts, labels, names = fx1(clean=True)
        >>> res = Invert(ConceptSet(labels, names, warn=False), max_length=2, beam_size=1).explain(acts)
        >>> res.best().formula[:4]
        ['c3', 'c1 & ~c2', 'c5 | c6', '~c7']
    """

    def __init__(
        self,
        concepts: ConceptSet,
        *,
        max_length: int = 3,
        beam_size: int = 3,
        limit_search: int | None = None,
        min_fraction: float | None = None,
        max_fraction: float | None = None,
        alpha: float | None = None,
        mode: str = "positive",
        dedupe: bool = True,
        compat: str | None = None,
        correction: str | None = "bonferroni",
        n_permutations: int = 200,
        seed: int = 0,
        alternative: str = "two-sided",
        device: str | torch.device | None = None,
        neuron_chunk: int | None = None,
        max_memory: int | None = None,
    ) -> None:
        if not isinstance(concepts, ConceptSet):
            raise TypeError(f"Expected `concepts` to be a ConceptSet, but got {type(concepts).__name__}.")
        for name, v in (("max_length", max_length), ("beam_size", beam_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Expected `{name}` to be an integer >= 1, but got {v!r}.")
        if limit_search is not None and (isinstance(limit_search, bool) or not isinstance(limit_search, int)
                                         or limit_search < 1):
            raise ValueError(f"Expected `limit_search` to be None or an integer >= 1, but got {limit_search!r}.")
        if mode not in _MODES:
            raise ValueError(f"Expected `mode` to be one of {_MODES}, but got {mode!r}.")
        if compat not in _COMPATS:
            raise ValueError(f"Expected `compat` to be one of {_COMPATS}, but got {compat!r}.")
        if correction not in _CORRECTIONS:
            raise ValueError(f"Expected `correction` to be one of {_CORRECTIONS}, but got {correction!r}.")
        if alternative not in _ALTERNATIVES:
            raise ValueError(f"Expected `alternative` to be one of {_ALTERNATIVES}, but got {alternative!r}.")
        if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
            raise ValueError(f"Expected `n_permutations` to be an integer >= 1, but got {n_permutations!r}.")
        for name, v in (("min_fraction", min_fraction), ("max_fraction", max_fraction)):
            if v is not None and not (0.0 <= float(v) <= 1.0):
                raise ValueError(f"Expected `{name}` in [0, 1], but got {v!r}.")
        if alpha is not None and not (0.0 <= float(alpha) < 0.5):
            raise ValueError(f"Expected `alpha` in [0, 0.5), but got {alpha!r}.")
        if compat == "reference":
            if alpha is not None:
                raise ValueError("`alpha` (symmetric fraction bound) is not available with compat='reference'; "
                                 "use min_fraction / max_fraction.")
            lo = 0.0 if min_fraction is None else float(min_fraction)
            hi = 0.5 if max_fraction is None else float(max_fraction)
            dedupe = False
        else:
            if alpha is not None and (min_fraction is not None or max_fraction is not None):
                raise ValueError("Give either `alpha` or `min_fraction`/`max_fraction`, not both.")
            if alpha is None and min_fraction is None and max_fraction is None:
                alpha = 0.002
            lo = 0.0 if min_fraction is None else float(min_fraction)
            hi = 1.0 if max_fraction is None else float(max_fraction)
        if lo > hi:
            raise ValueError(f"Expected min_fraction <= max_fraction, but got {lo} > {hi}.")
        self.concepts = concepts
        self.settings = BeamSettings(
            max_length=max_length, beam_size=beam_size, limit_search=limit_search, min_fraction=lo,
            max_fraction=hi, alpha=None if alpha is None else float(alpha), mode=mode, dedupe=bool(dedupe),
            compat=compat,
        )
        self.correction = correction
        self.n_permutations = n_permutations
        self.seed = int(seed)
        self.alternative = alternative
        self.device = torch.device(device) if device is not None else None
        self.neuron_chunk = neuron_chunk
        self.max_memory = max_memory
        self._cache: dict[Any, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        """The settings, as recorded in results and CSV headers."""
        s = self.settings
        return {
            "max_length": s.max_length, "beam_size": s.beam_size, "limit_search": s.limit_search,
            "min_fraction": s.min_fraction, "max_fraction": s.max_fraction, "alpha": s.alpha, "mode": s.mode,
            "dedupe": s.dedupe, "compat": s.compat, "correction": self.correction,
            "n_permutations": self.n_permutations, "seed": self.seed, "alternative": self.alternative,
            "num_samples": self.concepts.num_samples, "num_concepts": self.concepts.num_concepts,
        }

    def _device_cache(self, device: torch.device) -> dict[str, Tensor]:
        key = str(device)
        if key not in self._cache:
            cb = self.concepts.labels.to(device)
            self._cache[key] = {"bool": cb, "c64": cb.to(torch.float64), "c32": cb.to(torch.float32),
                                "ct": cb.t().contiguous()}
            if self.settings.compat is None:
                self._cache[key]["excluded"] = excluded_atoms(cb)
        return self._cache[key]

    def _prepare(self, activations: Any, neurons: Sequence[int] | None) -> tuple[Tensor, np.ndarray]:
        a = _to_tensor(activations)
        if a.dim() == 1:
            a = a[:, None]
        if a.dim() != 2:
            raise ValueError(f"Expected activations of shape (N,) or (N, D), but got {tuple(a.shape)}.")
        if a.is_complex() or a.dtype == torch.bool:
            raise TypeError(f"Expected real-valued activations, but got dtype {a.dtype}.")
        n, d = a.shape
        if n != self.concepts.num_samples:
            raise ValueError(
                f"Expected activations with {self.concepts.num_samples} rows (the ConceptSet's samples), but got "
                f"{n}. Row i of both must be dataset index i."
            )
        if n < 2:
            raise ValueError(f"Expected at least 2 samples, but got N = {n}.")
        if d == 0:
            raise ValueError("Expected at least one unit, but got D = 0.")
        ids = np.arange(d) if neurons is None else np.asarray(list(neurons), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= d):
            raise ValueError(f"Expected neurons in [0, {d}), but got {ids.tolist()[:10]}.")
        if neurons is not None:
            a = a[:, torch.as_tensor(ids)]
        if self.device is not None and not isinstance(activations, Tensor):
            a = a.to(self.device)
        if a.is_floating_point():
            bad = torch.isnan(a).any(0)
            if bool(bad.any()):
                raise ValueError(
                    f"Expected activations without NaN, but units {ids[bad.cpu().numpy()].tolist()[:20]} contain NaN."
                )
        return a, ids

    def _chunk_size(self, n: int, d: int, device: torch.device) -> int:
        if self.neuron_chunk is not None:
            return max(1, int(self.neuron_chunk))
        if self.max_memory is not None:
            budget = int(self.max_memory)
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free // 2
        else:
            budget = 1 << 30  # working memory; the concept caches (N x K as bool, f32, f64) come on top
        b = self.settings.beam_size
        k2 = 2 * self.concepts.num_concepts
        # ranks and sort temporaries (~60 B/sample), beam buffers (bool, f64, f32 and gathers: ~20 B per
        # sample and slot), candidate tables (~12 float64 arrays of B x 2K x 2 per unit)
        per_unit = n * (60 + b * 20) + k2 * b * 2 * 8 * 12
        return max(1, min(d, budget // max(per_unit, 1)))

    # ------------------------------------------------------------------------------------------------
    def explain(
        self,
        activations: Tensor | np.ndarray | Any,
        *,
        neurons: Sequence[int] | None = None,
        return_states: bool = False,
        progress: bool = False,
    ) -> InvertResult:
        """Label every unit (column) of ``activations`` ``(N, D)`` (or ``(N,)``); see the class docstring."""
        a, ids = self._prepare(activations, neurons)
        dev = a.device
        cache = self._device_cache(dev)
        n, d = a.shape
        st = self.settings
        chunk = self._chunk_size(n, d, dev)
        rows: list[dict[str, Any]] = []
        groups: dict[bytes, dict[str, Any]] = {}
        no_rows: list[int] = []
        const_units: list[int] = []
        it = range(0, d, chunk)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="INVERT", unit="chunk")
        with exact_matmul_context(dev):
            for start in it:
                sl = slice(start, min(d, start + chunk))
                ranks, tie = _midranks_rows(a[:, sl].t().contiguous())  # (D_c, N) float64
                assert ranks.dtype == torch.float64
                tables = beam_search(ranks, cache["bool"], st, cache=cache, excluded=cache.get("excluded"),
                                     ranks_are_rows=True)
                tie_np = tie.cpu().numpy()
                const_units += [int(ids[sl][i]) for i in np.nonzero(tie_np == float(n) ** 3 - n)[0]]
                self._rows_from_tables(tables, a[:, sl], ids[sl], tie_np, return_states, rows, no_rows)
                if self.correction == "permutation":
                    srt = torch.sort(ranks, dim=1).values.cpu().numpy()
                    for j in range(srt.shape[0]):  # one dict lookup per unit (grouping, not a hot path)
                        key = srt[j].tobytes()
                        g = groups.setdefault(key, {"ranks": srt[j].copy(), "units": [], "stats": []})
                        g["units"].append(int(ids[sl][j]))
                        g["stats"].append(float(tables.best_stat[j]))
        if const_units:
            warnings.warn(f"Constant units (every AUC 0.5, p = 1): {const_units[:20]}.", UserWarning, stacklevel=2)
        if no_rows:
            warnings.warn(
                f"No concept passes the fraction filter for units {no_rows[:20]}{'...' if len(no_rows) > 20 else ''}"
                f" ({len(no_rows)} units get no rows). Widen min_fraction/max_fraction/alpha.",
                UserWarning,
                stacklevel=2,
            )
        cols = self._columns(rows, return_states)
        if self.correction == "permutation" and len(rows):
            self._permutation(cols, groups, d, dev, cache)
        return InvertResult(cols, self.params, self.concepts)

    def _rows_from_tables(
        self,
        t: BeamTables,
        acts: Tensor,
        ids: np.ndarray,
        tie: np.ndarray,
        return_states: bool,
        rows: list[dict[str, Any]],
        no_rows: list[int],
    ) -> None:
        n = t.num_samples
        steps = range(1, len(t.atom) + 1) if return_states else [len(t.atom)]
        for step in steps:
            valid = t.valid[step - 1]
            for d in range(valid.shape[0]):
                if step == len(t.atom) and not valid[d].any():
                    no_rows.append(int(ids[d]))
            dd, bb = np.nonzero(valid)
            if dd.size == 0:
                continue
            s = torch.from_numpy(t.s[step - 1][dd, bb])
            n1 = torch.from_numpy(t.n[step - 1][dd, bb])
            u = s - n1 * (n1 + 1) / 2
            p, logp = mann_whitney_from_stats(u, n1, n, torch.from_numpy(tie[dd]), self.alternative)
            p, logp = p.numpy().copy(), logp.numpy().copy()
            formulas = [self._formula(t, step, int(x), int(y)) for x, y in zip(dd, bb)]
            exact = (np.minimum(n1.numpy(), n - n1.numpy()) <= 8) & (tie[dd] == 0)
            if exact.any():
                ex = np.nonzero(exact)[0]
                truth = torch.stack([self.concepts.evaluate(formulas[i]) for i in ex], 1)
                vals = acts[:, torch.as_tensor(dd[ex])].cpu()
                pe = _exact_p(vals, truth, list(range(len(ex))), list(range(len(ex))), self.alternative).numpy()
                p[ex] = pe
                logp[ex] = np.minimum(np.log(pe), 0.0)
            for r in range(dd.size):
                rows.append({
                    "neuron": int(ids[dd[r]]), "rank": int(bb[r]), "formula": formulas[r],
                    "length": int(t.length[step - 1][dd[r], bb[r]]), "auc": float(t.auc[step - 1][dd[r], bb[r]]),
                    "fraction": float(n1[r]) / n, "n_pos": int(n1[r]), "u_statistic": float(u[r]),
                    "p_value": float(p[r]), "log_p": float(logp[r]), "n_tests": int(t.n_tests[dd[r]]),
                    "step": step,
                })

    def _formula(self, t: BeamTables, step: int, d: int, b: int) -> str:
        k = t.num_concepts
        names = self.concepts.names
        expr: _Expr | None = None
        for atom, op in t.chain(step, d, b):
            lit = _Expr.literal(names[atom % k], atom >= k)
            expr = lit if expr is None else _Expr.combine("and" if op == 0 else "or", expr, lit)
        assert expr is not None
        return expr.text

    def _columns(self, rows: list[dict[str, Any]], return_states: bool) -> dict[str, Any]:
        if return_states:
            rows.sort(key=lambda r: (r["neuron"], r["step"], r["rank"]))
        else:
            rows.sort(key=lambda r: (r["neuron"], r["rank"]))
        names = list(_COLUMNS) + (["step"] if return_states else [])
        cols: dict[str, Any] = {}
        for name in names:
            if name == "formula":
                cols[name] = [r["formula"] for r in rows]
            elif name in ("p_corrected", "log_p_corrected"):
                continue
            else:
                dtype = np.int64 if name in ("neuron", "rank", "length", "n_pos", "n_tests", "step") else np.float64
                cols[name] = np.array([r[name] for r in rows], dtype=dtype)
        p, logp, nt = cols["p_value"], cols["log_p"], cols["n_tests"].astype(np.float64)
        if self.correction == "bonferroni":
            cols["p_corrected"] = np.minimum(1.0, p * nt)
            cols["log_p_corrected"] = np.minimum(0.0, logp + np.log(np.maximum(nt, 1.0)))
        else:  # None, or filled in by the permutation step
            cols["p_corrected"] = p.copy()
            cols["log_p_corrected"] = logp.copy()
        return {k: cols[k] for k in names}

    def _permutation(
        self, cols: dict[str, Any], groups: dict[bytes, dict[str, Any]], d: int, dev: torch.device, cache: dict
    ) -> None:
        pn = self.n_permutations
        total = pn * len(groups)
        if total > 20 * d:
            warnings.warn(
                f"Permutation correction needs {total} null columns ({len(groups)} distinct tie structures x {pn}); "
                "this exceeds 20 x D. Consider correction='bonferroni'.",
                UserWarning,
                stacklevel=3,
            )
        gen = torch.Generator().manual_seed(self.seed)
        n = self.concepts.num_samples
        st = self.settings
        null_of_unit: dict[int, np.ndarray] = {}
        chunk = self._chunk_size(n, pn, dev)
        for g in groups.values():
            r0 = torch.from_numpy(g["ranks"])
            perms = torch.argsort(torch.rand(pn, n, generator=gen), dim=1)
            rows_r = r0[perms].to(dev)  # (P, N)
            stats = []
            for s in range(0, pn, chunk):
                tb = beam_search(rows_r[s : s + chunk], cache["bool"], st, cache=cache,
                                 excluded=cache.get("excluded"), ranks_are_rows=True)
                stats.append(tb.best_stat)
            null = np.concatenate(stats)
            for u in g["units"]:
                null_of_unit[u] = null
        auc = cols["auc"]
        s_row = auc if st.mode == "positive" else 1.0 - auc
        pc = np.empty_like(auc)
        for i, u in enumerate(cols["neuron"]):  # one comparison per output row (few rows)
            null = null_of_unit[int(u)]
            pc[i] = (1 + np.sum(np.nan_to_num(null, nan=-np.inf) >= s_row[i])) / (1 + pn)
        cols["p_corrected"] = pc
        cols["log_p_corrected"] = np.log(pc)

    # ------------------------------------------------------------------------------------------------
    def score(
        self, activations: Any, formulas: str | Sequence[str], *, neurons: Sequence[int] | None = None
    ) -> InvertResult:
        """Test given formulas (user hypotheses) on every unit: same columns, no search.

        ``n_tests`` (Bonferroni) is the number of formulas; permutation correction is not available here
        (it falls back to Bonferroni).

        Example:
            >>> from reprlens.invert._fixtures import fx1
            >>> acts, labels, names = fx1()
            >>> res = Invert(ConceptSet(labels, names, warn=False)).score(acts[:, :1], "c3")
            >>> round(float(res.auc[0]), 6)
            0.989414
        """
        if isinstance(formulas, str):
            formulas = [formulas]
        formulas = list(formulas)
        if not formulas:
            raise ValueError("Expected at least one formula.")
        a, ids = self._prepare(activations, neurons)
        n, d = a.shape
        truth = torch.stack([self.concepts.evaluate(f) for f in formulas], 1).to(a.device)
        ranks, tie = midranks(a)
        with exact_matmul_context(a.device):
            s = truth.to(torch.float64).t() @ ranks  # (F, D)
        n1 = truth.sum(0).to(torch.float64)[:, None].expand_as(s)
        auc = _auc_from_stats(s, n1, n)
        u = s - n1 * (n1 + 1) / 2
        p, logp = mann_whitney_from_stats(u, n1, n, tie[None, :].expand_as(s), self.alternative)
        f_idx, d_idx = np.meshgrid(np.arange(len(formulas)), np.arange(d), indexing="xy")
        f_idx, d_idx = f_idx.flatten(), d_idx.flatten()
        p_np, logp_np = p.cpu().numpy()[f_idx, d_idx].copy(), logp.cpu().numpy()[f_idx, d_idx].copy()
        n1_np = n1.cpu().numpy()[f_idx, d_idx]
        tie_np = tie.cpu().numpy()
        exact = (np.minimum(n1_np, n - n1_np) <= 8) & (tie_np[d_idx] == 0) & (n1_np > 0) & (n1_np < n)
        if exact.any():
            ex = np.nonzero(exact)[0]
            pe = _exact_p(a.cpu(), truth.cpu(), f_idx[ex].tolist(), d_idx[ex].tolist(), self.alternative).numpy()
            p_np[ex] = pe
            logp_np[ex] = np.minimum(np.log(pe), 0.0)
        nt = float(len(formulas))
        cols = {
            "neuron": ids[d_idx].astype(np.int64), "rank": f_idx.astype(np.int64),
            "formula": [formulas[i] for i in f_idx],
            "length": np.array([_count_atoms(formulas[i]) for i in f_idx], dtype=np.int64),
            "auc": auc.cpu().numpy()[f_idx, d_idx], "fraction": n1_np / n, "n_pos": n1_np.astype(np.int64),
            "u_statistic": u.cpu().numpy()[f_idx, d_idx], "p_value": p_np, "log_p": logp_np,
            "p_corrected": np.minimum(1.0, p_np * nt) if self.correction else p_np.copy(),
            "log_p_corrected": np.minimum(0.0, logp_np + math.log(nt)) if self.correction else logp_np.copy(),
            "n_tests": np.full(f_idx.shape, len(formulas), dtype=np.int64),
        }
        return InvertResult(cols, {**self.params, "scored": True}, self.concepts)


_ONE_KEY = ((1, 0, "Number"), (0, ()), (), 1)


class _Expr:
    """A propositional formula printed exactly as ``str()`` of the sympy expression built the same way.

    sympy's ``And``/``Or`` flatten nested same-type arguments, drop repeats and order arguments with
    ``ordered``: by node count, then ``sort_key``; ``&`` binds tighter than ``|`` and ``~`` tighter than
    both. Reproducing those rules avoids a sympy object per output row (~0.2 ms each); the tests
    compare against sympy on thousands of random chains.
    """

    __slots__ = ("kind", "args", "key", "nodes", "text")

    def __init__(self, kind: str, args: tuple, key: tuple, nodes: int, text: str) -> None:
        self.kind, self.args, self.key, self.nodes, self.text = kind, args, key, nodes, text

    @staticmethod
    def literal(name: str, negated: bool) -> _Expr:
        sym_key = ((2, 0, "Symbol"), (1, (name,)), _ONE_KEY, 1)
        if not negated:
            return _Expr("sym", (), sym_key, 1, name)
        return _Expr("not", (), ((5, 0, "Not"), (1, (sym_key,)), _ONE_KEY, 1), 2, "~" + name)

    @staticmethod
    def combine(kind: str, left: _Expr, right: _Expr) -> _Expr:
        flat: dict[tuple, _Expr] = {}
        for x in (left, right):
            for y in (x.args if x.kind == kind else (x,)):
                flat.setdefault(y.key, y)
        args = sorted(flat.values(), key=lambda e: (e.nodes, e.key))
        if len(args) == 1:
            return args[0]
        cls_name = "And" if kind == "and" else "Or"
        key = ((5, 0, cls_name), (len(args), tuple(a.key for a in args)), _ONE_KEY, 1)
        other = "or" if kind == "and" else "and"
        sep = " & " if kind == "and" else " | "
        text = sep.join(f"({a.text})" if a.kind == other else a.text for a in args)
        return _Expr(kind, tuple(args), key, 1 + sum(a.nodes for a in args), text)


def _count_atoms(formula: str) -> int:
    from reprlens.invert.concepts import _tokenize

    return sum(1 for t in _tokenize(formula) if t not in "&|~()")

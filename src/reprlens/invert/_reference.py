"""Reference-semantics baseline: INVERT v1.1 (lapalap/invert) taken literally, one unit per call.

Per candidate formula: a sympy expression, its truth vector evaluated from the concept columns, and a
torchmetrics ``binary_auroc`` (full sort), in Python lists with stable sorts. Used by the tests (as an
independent oracle of ``compat="reference"``) and by ``benchmarks/invert_bench.py`` as the speed baseline.
The reference package is not on PyPI; ``sympytorch`` compilation is replaced by a direct tree walk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import sympy
import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

__all__ = ["reference_explain"]


def _evaluate(expr: Any, columns: dict[str, Tensor]) -> Tensor:
    if isinstance(expr, sympy.Symbol):
        return columns[expr.name]
    if isinstance(expr, sympy.Not):
        return ~_evaluate(expr.args[0], columns)
    if isinstance(expr, sympy.And):
        out = _evaluate(expr.args[0], columns)
        for a in expr.args[1:]:
            out = out & _evaluate(a, columns)
        return out
    if isinstance(expr, sympy.Or):
        out = _evaluate(expr.args[0], columns)
        for a in expr.args[1:]:
            out = out | _evaluate(a, columns)
        return out
    if expr is sympy.true:
        return torch.ones_like(next(iter(columns.values())))
    if expr is sympy.false:
        return torch.zeros_like(next(iter(columns.values())))
    raise TypeError(f"Unexpected expression {expr!r}")


def _metric(activation: Tensor, truth: Tensor) -> float:
    return float(binary_auroc(activation, truth.long()))


def reference_explain(
    activation: Tensor,
    labels: Tensor,
    names: Sequence[str],
    *,
    max_length: int = 1,
    beam_size: int = 1,
    limit_search: int | None = None,
    min_fraction: float = 0.0,
    max_fraction: float = 0.5,
    mode: str = "positive",
) -> list[dict[str, Any]]:
    """Explain one unit the reference way; returns the final beam as the reference's dicts."""
    act = activation.to(torch.float32).flatten()
    n = act.shape[0]
    columns = {nm: labels[:, i].bool() for i, nm in enumerate(names)}
    fmin, fmax = np.float32(min_fraction), np.float32(max_fraction)
    reverse = mode == "positive"

    def feasible(frac: np.float32) -> bool:
        return bool(fmin <= frac <= fmax and 0 < frac < 1)

    atoms: list[dict[str, Any]] = []
    for nm in names:
        truth = columns[nm]
        metric = _metric(act, truth)
        frac = np.float32(truth.float().mean().item())
        atoms.append({"expr": sympy.Symbol(nm), "metric": metric, "fraction": frac, "length": 1})
    for i, nm in enumerate(names):
        base = atoms[i]
        atoms.append({
            "expr": ~sympy.Symbol(nm), "metric": 1.0 - base["metric"],
            "fraction": np.float32(1.0) - base["fraction"], "length": 1,
        })
    lam = sorted(atoms, key=lambda e: e["metric"], reverse=reverse)
    beam = [e for e in lam if feasible(e["fraction"])][:beam_size]
    if not beam:
        return []
    pool = sorted(lam, key=lambda e: 2 * abs(0.5 - e["metric"]), reverse=True)
    ls = len(pool) if limit_search is None else min(limit_search, len(pool))
    pool = pool[:ls]
    for step in range(2, max_length + 1):
        comp = list(beam)
        for b in beam:
            for p in pool:
                for expr in (b["expr"] & p["expr"], b["expr"] | p["expr"]):
                    truth = _evaluate(expr, columns)
                    frac = np.float32(truth.float().mean().item())
                    if not feasible(frac):
                        continue
                    comp.append({"expr": expr, "metric": _metric(act, truth), "fraction": frac, "length": step})
        beam = sorted(comp, key=lambda e: e["metric"], reverse=reverse)[:beam_size]
    return [
        {"formula": str(e["expr"]), "length": e["length"], "metric": e["metric"],
         "differentiability": 2 * abs(0.5 - e["metric"]), "concept_fraction": float(e["fraction"])}
        for e in beam
    ]

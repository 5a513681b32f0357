"""``ConceptSet``: an N x K boolean concept matrix with names, plus builders and a formula evaluator."""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["ConceptSet", "datamodule_concepts", "parse_formula"]

_BAD_NAME = re.compile(r"[\s&|~(),;]")
_TRUE = {"1", "true", "t", "yes", "y", "1.0"}
_FALSE = {"0", "false", "f", "no", "n", "0.0", ""}


def _to_bool_matrix(labels: Any, what: str = "labels") -> Tensor:
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(np.ascontiguousarray(labels))
    elif not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(np.asarray(labels))
        except Exception as err:  # noqa: BLE001
            raise TypeError(f"Expected {what} as a tensor or array, but got {type(labels).__name__}.") from err
    if labels.dim() == 1:
        labels = labels[:, None]
    if labels.dim() != 2:
        raise ValueError(f"Expected {what} of shape (N, K), but got shape {tuple(labels.shape)}.")
    if labels.dtype == torch.bool:
        return labels.cpu().contiguous()
    if labels.is_complex():
        raise TypeError(f"Expected real {what}, but got dtype {labels.dtype}.")
    ok = (labels == 0) | (labels == 1)
    if not bool(ok.all()):
        bad = labels[~ok].flatten()[:5].tolist()
        raise ValueError(
            f"Expected binary {what} (bool, or numbers in {{0, 1}}), but got other values such as {bad}. "
            "Binarise them first (e.g. `labels > threshold`)."
        )
    return (labels != 0).cpu().contiguous()


def _check_names(names: Sequence[str], k: int) -> list[str]:
    names = [str(n) for n in names]
    if len(names) != k:
        raise ValueError(f"Expected {k} concept names (one per column), but got {len(names)}.")
    for n in names:
        if not n or _BAD_NAME.search(n):
            raise ValueError(
                f"Invalid concept name {n!r}: names must be non-empty without whitespace or any of "
                "'& | ~ ( ) , ;'. Replace those characters (e.g. with '_')."
            )
    seen: set[str] = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dups:
        raise ValueError(f"Expected unique concept names, but these repeat: {dups[:10]}.")
    return names


# ---- formula parsing (names, ~, &, |, parentheses; precedence ~ > & > |) -----------------------------------


def _tokenize(formula: str) -> list[str]:
    tokens = re.findall(r"\s*([&|~()]|[^\s&|~()]+)", formula)
    if "".join(tokens) != re.sub(r"\s+", "", formula):
        raise ValueError(f"Cannot parse formula {formula!r}.")
    return tokens


def parse_formula(formula: str) -> Any:
    """Parse ``"a & (b | ~c)"`` into a nested tuple tree ``("and", [...])``, ``("or", ...)``, ``("not", x)``, name.

    Example:
        >>> parse_formula("a & ~b | c")
        ('or', [('and', ['a', ('not', 'b')]), 'c'])
    """
    if not isinstance(formula, str) or not formula.strip():
        raise ValueError(f"Expected a non-empty formula string, but got {formula!r}.")
    toks = _tokenize(formula)
    pos = 0

    def peek() -> str | None:
        return toks[pos] if pos < len(toks) else None

    def take() -> str:
        nonlocal pos
        t = toks[pos]
        pos += 1
        return t

    def p_or() -> Any:
        items = [p_and()]
        while peek() == "|":
            take()
            items.append(p_and())
        return items[0] if len(items) == 1 else ("or", items)

    def p_and() -> Any:
        items = [p_not()]
        while peek() == "&":
            take()
            items.append(p_not())
        return items[0] if len(items) == 1 else ("and", items)

    def p_not() -> Any:
        if peek() == "~":
            take()
            return ("not", p_not())
        if peek() == "(":
            take()
            e = p_or()
            if peek() != ")":
                raise ValueError(f"Unbalanced parentheses in formula {formula!r}.")
            take()
            return e
        t = peek()
        if t is None or t in "&|)":
            raise ValueError(f"Unexpected {'end' if t is None else repr(t)} in formula {formula!r}.")
        return take()

    tree = p_or()
    if pos != len(toks):
        raise ValueError(f"Unexpected {toks[pos]!r} in formula {formula!r}.")
    return tree


class ConceptSet:
    """Binary concept labels: an ``(N, K)`` bool matrix whose columns have unique names.

    Row ``i`` must be dataset index ``i`` of the loader whose units are labelled. Names are the symbols
    of the formulas (``"shape=circle & ~color=red"``).

    Args:
        labels: ``(N, K)`` bool, or numbers in {0, 1} (anything else raises ``ValueError``).
        names: one unique name per column (default ``c0..c{K-1}``).
        descriptions: optional human-readable text per column (defaults to the names).

    Example:
        >>> cs = ConceptSet(torch.tensor([[1, 0], [0, 1], [1, 1]]), names=["red", "round"])
        >>> cs.evaluate("red & ~round").tolist()
        [True, False, False]
    """

    def __init__(
        self,
        labels: Tensor | np.ndarray,
        names: Sequence[str] | None = None,
        descriptions: Sequence[str] | None = None,
        *,
        warn: bool = True,
    ) -> None:
        self.labels: Tensor = _to_bool_matrix(labels)
        k = self.labels.shape[1]
        if k == 0:
            raise ValueError("Expected at least one concept column, but got K = 0.")
        self.names: list[str] = _check_names(names if names is not None else [f"c{i}" for i in range(k)], k)
        if descriptions is None:
            self.descriptions: list[str] = list(self.names)
        else:
            if len(descriptions) != k:
                raise ValueError(f"Expected {k} descriptions, but got {len(descriptions)}.")
            self.descriptions = [str(d) for d in descriptions]
        self._index = {n: i for i, n in enumerate(self.names)}
        if warn:
            self._warn_degenerate()

    # ---- properties
    @property
    def num_samples(self) -> int:
        """N, the number of rows."""
        return int(self.labels.shape[0])

    @property
    def num_concepts(self) -> int:
        """K, the number of columns."""
        return int(self.labels.shape[1])

    @property
    def counts(self) -> Tensor:
        """Positives per concept, ``(K,)`` int64."""
        return self.labels.sum(0)

    @property
    def fractions(self) -> Tensor:
        """Fraction of positives per concept, ``(K,)`` float64."""
        return self.counts.to(torch.float64) / max(self.num_samples, 1)

    def __len__(self) -> int:
        return self.num_concepts

    def __repr__(self) -> str:
        return f"ConceptSet(num_samples={self.num_samples}, num_concepts={self.num_concepts})"

    def _warn_degenerate(self) -> None:
        const = ((self.counts == 0) | (self.counts == self.num_samples)).nonzero().flatten().tolist()
        dup = self._duplicate_columns()
        if const or dup:
            msg = []
            if const:
                msg.append(f"constant concepts {[self.names[i] for i in const][:10]}")
            if dup:
                msg.append(f"duplicate columns {[self.names[i] for i in dup][:10]}")
            warnings.warn(
                "ConceptSet has " + " and ".join(msg) + "; they are kept (reference mode needs them) and "
                "ignored by the default search. Use drop_constant() / drop_duplicates() to remove them.",
                UserWarning,
                stacklevel=3,
            )

    def _duplicate_columns(self) -> list[int]:
        if self.num_samples == 0:
            return []
        packed = np.packbits(self.labels.t().numpy(), axis=1)
        _, first = np.unique(packed, axis=0, return_index=True)
        keep = np.zeros(self.num_concepts, dtype=bool)
        keep[first] = True
        return np.nonzero(~keep)[0].tolist()

    # ---- builders
    @classmethod
    def from_label_matrix(
        cls, labels: Tensor | np.ndarray, names: Sequence[str] | None = None, descriptions: Sequence[str] | None = None
    ) -> ConceptSet:
        """Same as the constructor.

        Example:
            >>> ConceptSet.from_label_matrix(np.eye(3, dtype=bool)).names
            ['c0', 'c1', 'c2']
        """
        return cls(labels, names, descriptions)

    @classmethod
    def from_csv(
        cls, path: str | os.PathLike[str], *, id_column: str | None = None, ids: Sequence[Any] | None = None
    ) -> ConceptSet:
        """Read a CSV whose header holds the concept names and whose cells are 0/1/true/false.

        Args:
            path: CSV file.
            id_column: optional column with sample ids (not a concept).
            ids: the dataset's ids in dataset order; rows are reordered to match (needs ``id_column``).

        Example:
            >>> import tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), "c.csv")
            >>> _ = open(p, "w").write("id,red,round\\nb,0,1\\na,1,1\\n")
            >>> ConceptSet.from_csv(p, id_column="id", ids=["a", "b"]).labels.tolist()
            [[True, True], [False, True]]
        """
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            raise ValueError(f"CSV {path} is empty; expected a header with concept names.")
        header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
        id_vals = None
        if id_column is not None:
            if id_column not in header:
                raise ValueError(f"id_column {id_column!r} not in the CSV header {header[:10]}.")
            ci = header.index(id_column)
            id_vals = [r[ci].strip() for r in body]
            body = [r[:ci] + r[ci + 1 :] for r in body]
            header = header[:ci] + header[ci + 1 :]
        elif ids is not None:
            raise ValueError("`ids` needs `id_column` (the CSV column holding the sample ids).")
        vals = np.zeros((len(body), len(header)), dtype=bool)
        for i, r in enumerate(body):  # parsing text, not a hot path
            if len(r) != len(header):
                raise ValueError(f"CSV row {i + 2} has {len(r)} cells, expected {len(header)}.")
            for j, cell in enumerate(r):
                c = cell.strip().lower()
                if c in _TRUE:
                    vals[i, j] = True
                elif c not in _FALSE:
                    raise ValueError(f"CSV row {i + 2}, column {header[j]!r}: expected 0/1/true/false, got {cell!r}.")
        if ids is not None and id_vals is not None:
            pos = {v: i for i, v in enumerate(id_vals)}
            missing = [i for i in ids if str(i) not in pos]
            if missing:
                raise ValueError(f"{len(missing)} dataset ids are missing from the CSV, e.g. {missing[:5]}.")
            vals = vals[[pos[str(i)] for i in ids]]
        return cls(vals, header)

    @classmethod
    def from_class_labels(cls, targets: Tensor | Sequence[int], class_names: Sequence[str]) -> ConceptSet:
        """One-hot concepts from integer class targets.

        Example:
            >>> ConceptSet.from_class_labels(torch.tensor([0, 2, 1]), ["a", "b", "c"]).labels.int().tolist()
            [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
        """
        t = torch.as_tensor(targets).long().flatten()
        k = len(class_names)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
            raise ValueError(f"Expected targets in [0, {k}), but got values in [{int(t.min())}, {int(t.max())}].")
        onehot = torch.nn.functional.one_hot(t, k).bool()
        return cls(onehot, class_names)

    @classmethod
    def from_hierarchy(
        cls,
        targets: Tensor | Sequence[int],
        class_names: Sequence[str],
        parents: Mapping[str, Sequence[str]],
        *,
        min_count: int = 1,
        descriptions: Mapping[str, str] | Sequence[str] | None = None,
    ) -> ConceptSet:
        """Leaf classes (one-hot) then parents (OR of all leaf descendants, transitive).

        Dropped: parents covering one leaf, parents identical to an earlier column, and concepts with fewer
        than ``min_count`` positives. Cycles and unknown names raise ``ValueError``.

        Example:
            >>> cs = ConceptSet.from_hierarchy([0, 1, 2, 3], ["cat", "dog", "car", "bus"],
            ...                                {"animal": ["cat", "dog"], "vehicle": ["car", "bus"]})
            >>> cs.names[-2:], cs.evaluate("animal").tolist()
            (['animal', 'vehicle'], [True, True, False, False])
        """
        class_names = list(class_names)
        leaves = {n: i for i, n in enumerate(class_names)}
        resolved: dict[str, frozenset[int]] = {}

        def leaves_of(name: str, stack: tuple[str, ...]) -> frozenset[int]:
            if name in leaves:
                return frozenset([leaves[name]])
            if name not in parents:
                raise ValueError(f"Unknown class or parent {name!r} in the hierarchy (child of {stack[-1]!r}).")
            if name in stack:
                raise ValueError(f"Cycle in the hierarchy: {' -> '.join(stack + (name,))}.")
            if name not in resolved:
                out: set[int] = set()
                for ch in parents[name]:
                    out |= leaves_of(ch, stack + (name,))
                resolved[name] = frozenset(out)
            return resolved[name]

        base = cls.from_class_labels(targets, class_names)
        cols = [base.labels]
        names = list(class_names)
        seen_sets = {frozenset([i]) for i in range(len(class_names))}
        for p in parents:
            if p in leaves:
                raise ValueError(f"Parent {p!r} is also a leaf class name; use distinct names.")
            s = leaves_of(p, ())
            if len(s) <= 1 or s in seen_sets:
                continue
            seen_sets.add(s)
            cols.append(base.labels[:, sorted(s)].any(1, keepdim=True))
            names.append(p)
        labels = torch.cat(cols, 1)
        keep = labels.sum(0) >= min_count
        labels = labels[:, keep]
        names = [n for n, k in zip(names, keep.tolist()) if k]
        desc = None
        if descriptions is not None:
            if isinstance(descriptions, Mapping):
                desc = [str(descriptions.get(n, n)) for n in names]
            else:
                full = list(descriptions)
                desc = [d for d, k in zip(full, keep.tolist()) if k] if len(full) == len(keep) else None
        return cls(labels, names, desc)

    @classmethod
    def from_factors(
        cls,
        factors: Mapping[str, Tensor | np.ndarray],
        *,
        value_names: Mapping[str, Sequence[str] | Mapping[int, str]] | None = None,
        bins: Mapping[str, int | Sequence[float]] | None = None,
    ) -> ConceptSet:
        """Concepts from generative factors: bool -> ``f``; integer -> ``f=<value>`` per observed value;
        float needs ``bins`` (int: equal-frequency quantiles, or edges) -> ``f=<lo>..<hi>``.

        Example:
            >>> cs = ConceptSet.from_factors({"shape": torch.tensor([0, 1, 1]), "big": torch.tensor([1, 0, 1]) > 0},
            ...                              value_names={"shape": ["circle", "square"]})
            >>> cs.names
            ['shape=circle', 'shape=square', 'big']
        """
        cols: list[Tensor] = []
        names: list[str] = []
        bins = dict(bins or {})
        value_names = dict(value_names or {})
        for f, v in factors.items():
            t = torch.as_tensor(np.asarray(v)) if not isinstance(v, Tensor) else v.detach().cpu()
            t = t.flatten()
            if t.dtype == torch.bool:
                cols.append(t[:, None])
                names.append(str(f))
            elif not t.is_floating_point():
                vals = torch.unique(t)
                vn = value_names.get(f)
                for val in vals.tolist():
                    if vn is None:
                        label = str(val)
                    elif isinstance(vn, Mapping):
                        label = str(vn.get(val, val))
                    else:
                        label = str(vn[val]) if 0 <= val < len(vn) else str(val)
                    cols.append((t == val)[:, None])
                    names.append(f"{f}={label}")
            else:
                if f not in bins:
                    raise ValueError(
                        f"Factor {f!r} is continuous; pass bins={{{f!r}: 4}} (quantiles) or explicit edges."
                    )
                b = bins[f]
                x = t.to(torch.float64)
                if isinstance(b, int):
                    edges = torch.quantile(x, torch.linspace(0, 1, b + 1, dtype=torch.float64)).tolist()
                else:
                    edges = [float(e) for e in b]
                idx = torch.bucketize(x, torch.tensor(edges[1:-1], dtype=torch.float64), right=True)
                for i in range(len(edges) - 1):
                    cols.append((idx == i)[:, None])
                    names.append(f"{f}={edges[i]:.3g}..{edges[i + 1]:.3g}")
        if not cols:
            raise ValueError("Expected at least one factor, but got an empty mapping.")
        return cls(torch.cat(cols, 1), names)

    @classmethod
    def from_shapes(cls, dataset: Any, split: str | None = None) -> ConceptSet:
        """Concepts of a ``reprlens.data.ShapesDataset`` (its ``concept_matrix()`` and ``concept_names``).

        Also accepts a ``ShapesDataModule`` (``split``, default ``"val"``: rows follow
        ``eval_dataloader(split)``), or any object with ``factors`` and ``factor_names``.

        Example:
            >>> from reprlens.data import ShapesDataset
            >>> cs = ConceptSet.from_shapes(ShapesDataset(50, image_size=16, seed=0))
            >>> "shape=circle" in cs.names
            True
        """
        ds = dataset
        if callable(getattr(ds, "dataset", None)) and hasattr(ds, "concept_matrix"):
            ds = ds.dataset(split or "val")
        elif not hasattr(ds, "concept_matrix") and hasattr(ds, "dataset"):
            ds = ds.dataset
        if hasattr(ds, "concept_matrix"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out = cls(ds.concept_matrix(), list(ds.concept_names))
            return out
        if hasattr(ds, "factors") and hasattr(ds, "factor_names"):
            fac = torch.as_tensor(ds.factors)
            return cls.from_factors({n: fac[:, i] for i, n in enumerate(ds.factor_names)})
        raise TypeError(
            f"Expected a shapes dataset with `concept_matrix()` and `concept_names`, but got {type(dataset).__name__}."
        )

    # ---- transforms
    def select(self, names: Sequence[str]) -> ConceptSet:
        """Keep the named columns, in the given order."""
        idx = [self._col(n) for n in names]
        return ConceptSet(self.labels[:, idx], [self.names[i] for i in idx], [self.descriptions[i] for i in idx],
                          warn=False)

    def drop_constant(self) -> ConceptSet:
        """Drop all-false and all-true columns."""
        keep = ((self.counts > 0) & (self.counts < self.num_samples)).nonzero().flatten().tolist()
        return self.select([self.names[i] for i in keep])

    def drop_duplicates(self) -> ConceptSet:
        """Drop columns identical to an earlier column."""
        dup = set(self._duplicate_columns())
        return self.select([n for i, n in enumerate(self.names) if i not in dup])

    def subset_rows(self, index: Tensor | Sequence[int]) -> ConceptSet:
        """Rows ``index`` (e.g. a sample subset), all columns."""
        idx = torch.as_tensor(index).long()
        return ConceptSet(self.labels[idx], self.names, self.descriptions, warn=False)

    def _col(self, name: str) -> int:
        if name not in self._index:
            import difflib

            close = difflib.get_close_matches(name, self.names, n=3)
            raise ValueError(f"Unknown concept {name!r}." + (f" Did you mean {close}?" if close else ""))
        return self._index[name]

    # ---- formulas
    def evaluate(self, formula: str) -> Tensor:
        """Truth vector ``(N,)`` bool of a formula over concept names (``~``, ``&``, ``|``, parentheses)."""
        tree = parse_formula(formula)

        def ev(node: Any) -> Tensor:
            if isinstance(node, str):
                return self.labels[:, self._col(node)]
            op, arg = node
            if op == "not":
                return ~ev(arg)
            out = ev(arg[0])
            for a in arg[1:]:
                out = (out & ev(a)) if op == "and" else (out | ev(a))
            return out

        return ev(tree).clone()

    def describe(self, formula: str) -> str:
        """The formula with every name replaced by its description."""
        toks = _tokenize(formula)
        out = []
        for t in toks:
            if t in "&|~()":
                out.append({"&": " AND ", "|": " OR ", "~": "NOT "}.get(t, t))
            else:
                out.append(self.descriptions[self._col(t)])
        return re.sub(r"\s+", " ", "".join(out)).strip()

    # ---- io
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write packed bits plus names and descriptions to ``path`` (``.npz``)."""
        path = Path(path)
        np.savez_compressed(
            path,
            bits=np.packbits(self.labels.numpy(), axis=0),
            shape=np.array(self.labels.shape),
            names=np.array(self.names, dtype=object).astype(str),
            descriptions=np.array(self.descriptions, dtype=object).astype(str),
        )
        return path if path.suffix == ".npz" else path.with_suffix(path.suffix + ".npz")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ConceptSet:
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            n, k = (int(v) for v in z["shape"])
            bits = np.unpackbits(z["bits"], axis=0, count=n).astype(bool)
            return cls(bits[:, :k], list(z["names"]), list(z["descriptions"]), warn=False)


def datamodule_concepts(trainer: Any, pl_module: Any = None, split: str = "val") -> ConceptSet:
    """``ConceptSet`` of ``trainer.datamodule`` (shapes: ``concept_matrix(split)``), for callbacks and configs.

    Use it as ``ConceptLabeler(layer, concepts=functools.partial(datamodule_concepts, split="val"))``.
    """
    dm = getattr(trainer, "datamodule", None)
    if dm is None:
        raise ValueError("datamodule_concepts needs `trainer.datamodule`; pass a ConceptSet instead.")
    if hasattr(dm, "concept_set"):
        return dm.concept_set(split)
    return ConceptSet.from_shapes(dm, split=split)

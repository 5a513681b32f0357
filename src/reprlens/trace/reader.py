"""Reading a training trace: per-example contributions, class sums, TracIn influence, completeness.

Units and signs: a representation-mode score ``s_i`` is in pre-activation units — the length of the
projection of example i's contribution ``c_i(x)`` onto the net change ``Δz(x)`` of the layer's pre-activation
(positive: i's updates moved ``z(x)`` toward its final value). TracIn scores are loss × learning rate
(positive: a step on example i lowers the loss on x). The paper explains the *representation*; TracIn explains
the *loss*.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from reprlens.trace import TraceRecorder, TraceReader
    >>> net = nn.Sequential(nn.Linear(4, 3)).double()
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> d = tempfile.mkdtemp()
    >>> with TraceRecorder(net, ["0"], d, dtype="float64") as rec:
    ...     for t in range(3):
    ...         rec.begin_step(torch.arange(5))
    ...         net(torch.randn(5, 4, dtype=torch.float64)).pow(2).mean().backward()
    ...         rec.before_optimizer_step(opt); opt.step(); opt.zero_grad(); rec.end_step()
    >>> res = TraceReader(d).contributions(layer="0", layer_inputs=torch.randn(2, 4, dtype=torch.float64))
    >>> bool(torch.allclose(res.score.sum(1), res.delta_z_norm))
    True
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from reprlens.trace import store as S
from reprlens.trace.functional import (
    LayerSpec,
    apply_delta,
    factor_dot,
    factor_sq_norm,
    grad_matrix,
    patch_matrix,
    per_example_grads,
    row_contributions,
)
from reprlens.trace.projection import projected_spec
from reprlens.utils import get_module, unwrap_model

__all__ = [
    "ClassContributions",
    "CompletenessReport",
    "Contributions",
    "Influence",
    "TopK",
    "TraceCheckpoint",
    "TraceReader",
    "captum_checkpoint_loader",
]

EPS = 1e-14


@dataclass
class Contributions:
    """Per-training-example contributions to the change of a layer's pre-activation (M test inputs, N ids).

    Attributes:
        layer: the layer name.
        ids: (N,) example ids (sorted).
        labels: (N,) labels recorded with the rows, or None.
        score: (M, N) scalar projections ``s_i = ⟨c_i, Δz⟩/‖Δz‖`` (sum over i = ‖Δz‖).
        dot: (M, N) ``⟨c_i, Δz⟩``; norm: (M, N) ``‖c_i‖``; cosine: (M, N).
        delta_z: (M, *z); delta_z_norm: (M,); completeness_error: (M,) ``‖Σ_i c_i − Δz‖/‖Δz‖``.
        vectors: (M, N, *z) if requested.
        exact: whether the trace is an exact decomposition.
        step_*: class_batches / granularity="step": per-step (or per-row) quantities. In class_batches mode the
            per-example ``score`` splits each step's score over its non-ghost members; per-example ``norm`` and
            ``cosine`` are undefined there (NaN) — use ``step_norm`` / ``step_cosine``.
    """

    layer: str
    ids: Tensor
    labels: Tensor | None
    score: Tensor
    dot: Tensor
    norm: Tensor
    cosine: Tensor
    delta_z: Tensor
    delta_z_norm: Tensor
    completeness_error: Tensor
    vectors: Tensor | None = None
    exact: bool = True
    granularity: str = "example"
    step: Tensor | None = None
    step_class: Tensor | None = None
    step_score: Tensor | None = None
    step_cosine: Tensor | None = None
    step_norm: Tensor | None = None

    def to_dense(self, num_examples: int) -> Tensor:
        """Scores as (M, num_examples) with 0 for ids never seen."""
        out = torch.zeros(self.score.shape[0], num_examples, dtype=self.score.dtype)
        keep = self.ids < num_examples
        out[:, self.ids[keep]] = self.score[:, keep]
        return out

    def to_frame(self):  # pragma: no cover - pandas optional
        """A long pandas DataFrame (test, id, label, score, cosine, norm)."""
        import pandas as pd

        m, n = self.score.shape
        return pd.DataFrame({
            "test": np.repeat(np.arange(m), n), "id": np.tile(self.ids.numpy(), m),
            "label": np.tile(self.labels.numpy(), m) if self.labels is not None else -1,
            "score": self.score.reshape(-1).numpy(), "cosine": self.cosine.reshape(-1).numpy(),
            "norm": self.norm.reshape(-1).numpy(),
        })


@dataclass
class Influence:
    """TracIn influence scores: ``scores`` (M, N) [test, train], (1, N) aggregated or (N,) self-influence."""

    ids: Tensor
    scores: Tensor
    checkpoints: list
    labels: Tensor | None = None

    @property
    def T(self) -> Tensor:  # noqa: N802
        """dattri's [n_train, n_test] layout."""
        return self.scores.T if self.scores.dim() == 2 else self.scores


@dataclass
class TopK:
    """Top-k ids/values per test input (proponents = largest, opponents = smallest)."""

    ids: Tensor
    values: Tensor
    labels: Tensor | None
    proponents: bool
    by: str


@dataclass
class ClassContributions:
    """Per-class sums ``S_c`` (M, C), contribution mass Σ‖c_i‖, weighted mean cosine and per-class points."""

    classes: Tensor
    score: Tensor
    mass: Tensor
    mean_cosine: Tensor
    points: list  # points[m][j] = (cosines, weights) of class classes[j]
    drift: Tensor | None = None
    layer: str = ""


@dataclass
class TraceCheckpoint:
    """A tracin checkpoint: global step, learning rate and file path."""

    step: int
    lr: float
    path: str


@dataclass
class CompletenessReport:
    """Exactness report of a trace (see ``assert_exact``)."""

    exact: bool
    approximations: list
    last_complete_step: int
    steps_per_rank: dict
    missing_steps: list
    duplicate_steps: list
    skipped_steps: list
    truncations: list
    nonfinite_rows: int
    damaged: list = field(default_factory=list)
    weight_error_abs: dict = field(default_factory=dict)
    weight_error_rel: dict = field(default_factory=dict)
    sum_error: Tensor | None = None
    score_sum_error: Tensor | None = None

    def __str__(self) -> str:
        lines = [
            f"exact: {self.exact}  last_complete_step: {self.last_complete_step}",
            f"approximations: {self.approximations or 'none'}",
            f"truncations: {self.truncations or 'none'}  damaged: {self.damaged or 'none'}",
            f"missing steps: {self.missing_steps[:10]}  duplicate steps: {self.duplicate_steps[:10]}  "
            f"skipped (AMP): {len(self.skipped_steps)}  non-finite rows: {self.nonfinite_rows}",
        ]
        for name in self.weight_error_abs:
            lines.append(
                f"layer {name}: |W0 + sum A_i - W_T| = {self.weight_error_abs[name]:.3e} "
                f"(rel {self.weight_error_rel[name]:.3e})"
            )
        if self.sum_error is not None:
            lines.append(f"max input sum error: {float(self.sum_error.max()):.3e}")
        return "\n".join(lines)

    def assert_exact(self, rtol: float = 1e-5) -> None:
        """Raise ``AssertionError`` with the table unless every error is within ``rtol``."""
        bad = [n for n, e in self.weight_error_rel.items() if not e <= rtol]
        if self.sum_error is not None and not bool((self.sum_error <= rtol).all()):
            bad.append("sum_error")
        if bad or self.damaged:
            raise AssertionError(f"Trace not exact within rtol={rtol}: {bad}\n{self}")


@dataclass
class _Block:
    rank: int
    layer: str
    a: np.ndarray | None
    d: np.ndarray | None
    delta: np.ndarray | None
    rows: np.ndarray
    keep: np.ndarray
    kappa: np.ndarray  # per row
    lr: np.ndarray  # per row


def _tensor(x: np.ndarray) -> Tensor:
    """Zero-copy tensor view of a (read-only, memory-mapped) array; the reader never writes to it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(x))


def captum_checkpoint_loader(model: nn.Module, path: str) -> float:
    """Checkpoint loader for Captum / dattri TracIn: loads ``ckpt["state_dict"]`` and returns its lr."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    unwrap_model(model).load_state_dict(ckpt["state_dict"])
    return float(ckpt["lr"])


class TraceReader:
    """Read-only access to a trace store written by :class:`TraceRecorder` / ``TrainingTrace``.

    Args:
        path: the store directory.
        device: where queries compute.
        dtype: query dtype (float32 default; sums and completeness checks accumulate in float64).
        cache_dir: where aggregates are cached (default ``<path>/cache``).

    Damaged (truncated) shards are skipped with a warning and truncate the trace at their first step.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.path = Path(path)
        if not (self.path / "trace.json").exists():
            raise FileNotFoundError(f"No trace store at {self.path}: trace.json is missing.")
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.path / "cache"
        self.refresh()

    # ------------------------------------------------------------------ loading
    def refresh(self) -> None:
        """Re-read the metadata and manifests (live reading during training)."""
        self.meta = S.read_json(self.path / "trace.json")
        if self.meta.get("format") != S.FORMAT:
            raise ValueError(f"{self.path} is not a reprlens trace (format {self.meta.get('format')!r}).")
        self.mode: str = self.meta["mode"]
        self.layers: list[str] = list(self.meta["layers"])
        self.layer_info: dict[str, LayerSpec] = {
            n: LayerSpec.from_dict({k: v for k, v in d.items() if k not in ("type", "factorization")})
            for n, d in self.meta["layers"].items()
        }
        self.factorization = {n: d["factorization"] for n, d in self.meta["layers"].items()}
        self.projection = self.meta.get("projection")
        self._proj: dict[str, tuple[Tensor, Tensor]] = {}
        self._row_spec: dict[str, LayerSpec] = dict(self.layer_info)
        if self.projection:
            mats = torch.load(self.path / "projection.pt", map_location="cpu", weights_only=True)
            for n, (k_in, k_out) in self.projection["dims"].items():
                self._proj[n] = (mats[n]["Q"], mats[n]["P"])
                self._row_spec[n] = projected_spec(self.layer_info[n], k_in, k_out)
        self.world_size: int = int(self.meta.get("world_size", 1))
        self.approximations: list[str] = list(self.meta.get("approximations", []))
        segs = sorted(self.meta["segments"], key=lambda s: s["segment"])
        self.damaged: list[str] = []
        self._manifests: dict[tuple[int, int], dict] = {}
        for seg in segs:
            k = seg["segment"]
            for r in range(self.world_size):
                mp = self.path / f"seg_{k}" / f"rank_{r}" / "manifest.json"
                if mp.exists():
                    self._manifests[(k, r)] = S.read_json(mp)
        last_seg = segs[-1]["segment"]
        ends = [
            self._manifests[(last_seg, r)]["last_complete_step"] if (last_seg, r) in self._manifests
            else segs[-1]["start_step"]
            for r in range(self.world_size)
        ]
        lcs = min(ends)
        # validate files; a damaged file truncates the trace at its shard's first step
        self._blocks: dict[str, list[_Block]] = {n: [] for n in self.layers + ["__members__"]}
        self._steps: list[np.ndarray] = []
        self._steps_rank: list[int] = []
        self._ckpt_steps: dict[int, float] = {}
        starts = [s["start_step"] for s in segs] + [None]
        shard_list = []
        for i, seg in enumerate(segs):
            lo, hi = starts[i], starts[i + 1]
            for r in range(self.world_size):
                man = self._manifests.get((seg["segment"], r))
                if man is None:
                    continue
                rank_dir = self.path / f"seg_{seg['segment']}" / f"rank_{r}"
                for entry in man["shards"]:
                    shard_list.append((lo, hi, r, rank_dir, entry))
        for lo, hi, r, rank_dir, entry in shard_list:
            files = [entry["steps"]] + [v for fs in entry["layers"].values() for rec in fs for k, v in rec.items()
                                        if k != "n"]
            bad = [f for f in files if not S.check_npy(rank_dir / f)]
            if bad:
                self.damaged.extend(str(rank_dir / f) for f in bad)
                warnings.warn(
                    f"Trace shard {rank_dir}/{entry['first']}-{entry['end']} is damaged ({bad}); skipping it and "
                    f"truncating the trace at step {entry['first']}.", stacklevel=2,
                )
                lcs = min(lcs, int(entry["first"]))
        # weight snapshot at T* <= lcs
        snaps = {int(p.stem.split("_")[1]): p for p in (self.path / "weights").glob("step_*.pt")}
        if self.mode in ("representation", "class_batches"):
            cands = [s for s in snaps if s <= lcs]
            lcs = max(cands) if cands else 0
        self.last_complete_step: int = int(lcs)
        self._snapshot_path = snaps.get(self.last_complete_step)
        self.truncations = list(self.meta.get("truncations", []))
        for lo, hi, r, rank_dir, entry in shard_list:
            if any(str(rank_dir / f) in self.damaged for f in [entry["steps"]]):
                continue
            steps = np.load(rank_dir / entry["steps"])
            ok = (steps["step"] >= lo) & ((steps["step"] < hi) if hi is not None else True)
            is_ckpt = "checkpoint" in entry
            if not is_ckpt:
                ok &= steps["step"] < self.last_complete_step
            steps = steps[ok]
            self._steps.append(steps)
            self._steps_rank.append(r)
            if is_ckpt and len(steps):
                self._ckpt_steps[int(entry["checkpoint"])] = float(steps["lr"][0])
            order = np.argsort(steps["step"], kind="stable")
            st_sorted = steps["step"][order]
            for name, recs in entry["layers"].items():
                for rec in recs:
                    if any(str(rank_dir / v) in self.damaged for k, v in rec.items() if k != "n"):
                        continue
                    rows = np.load(rank_dir / rec["rows"])
                    keep = np.isin(rows["step"], steps["step"])
                    if name != "__members__" and self.mode == "class_batches":
                        keep &= True
                    # per-row step coefficients, vectorised (rows of unknown steps are not kept anyway)
                    pos = np.clip(np.searchsorted(st_sorted, rows["step"]), 0, max(len(st_sorted) - 1, 0))
                    if len(st_sorted):
                        kap = np.where(keep, steps["kappa"][order][pos], 0.0).astype(np.float64)
                        lrs = np.where(keep, steps["lr"][order][pos], 0.0).astype(np.float64)
                    else:
                        kap = lrs = np.zeros(len(rows), dtype=np.float64)
                    self._blocks.setdefault(name, []).append(_Block(
                        r, name,
                        np.load(rank_dir / rec["a"], mmap_mode="r") if "a" in rec else None,
                        np.load(rank_dir / rec["d"], mmap_mode="r") if "d" in rec else None,
                        np.load(rank_dir / rec["delta"], mmap_mode="r") if "delta" in rec else None,
                        rows, keep, kap, lrs,
                    ))
        self.id_overlap_fraction = self._rank_overlap()
        if self.id_overlap_fraction > 0.05:
            warnings.warn(
                f"{100 * self.id_overlap_fraction:.0f}% of the rows share (step, id) with a row of another rank. Ids "
                "must be dataset-level (global); this looks like rank-local ids (e.g. positions within the local "
                "batch). Fix the `example_id_fn` (DistributedSampler padding explains only a few duplicates).",
                stacklevel=2,
            )
        self.exact = not self.approximations and not self.damaged and self.meta["config"].get("every_n_steps", 1) == 1
        all_ids = [b.rows["id"][b.keep] for n in self.layers for b in self._blocks.get(n, [])]
        if self.mode == "class_batches":
            all_ids = [b.rows["id"][b.keep] for b in self._blocks.get("__members__", [])]
        ids = np.unique(np.concatenate(all_ids)) if all_ids else np.zeros(0, dtype=np.int64)
        self.example_ids: Tensor = torch.from_numpy(ids.astype(np.int64))
        self.num_examples: int = len(ids)

    def _rank_overlap(self) -> float:
        """Fraction of rows whose (step, id) also appears on another rank (rank-local id detection)."""
        if self.world_size < 2 or self.mode == "tracin":
            return 0.0
        name = "__members__" if self.mode == "class_batches" else self.layers[0]
        keys = []
        for b in self._blocks.get(name, []):
            r = b.rows[b.keep]
            if name != "__members__":
                r = r[r["call"] == 0]
            keys.append(np.stack([r["step"], r["id"], np.full(len(r), b.rank)], 1))
        if not keys:
            return 0.0
        k = np.unique(np.concatenate(keys), axis=0)  # distinct (step, id, rank)
        _, counts = np.unique(k[:, :2], axis=0, return_counts=True)
        return float((counts[counts > 1]).sum() / max(len(k), 1))

    def summary(self) -> str:
        """Mode, layers, steps, rows, bytes, exactness, last complete step."""
        n_rows = {n: int(sum(b.keep.sum() for b in self._blocks.get(n, []))) for n in self.layers}
        size = sum(p.stat().st_size for p in self.path.rglob("*.npy"))
        layer_desc = ", ".join(f"{n} ({self.meta['layers'][n]['type']}, {self.factorization[n]})" for n in self.layers)
        return (
            f"reprlens trace at {self.path}\n mode: {self.mode}  dtype: {self.meta['dtype']}  world_size: "
            f"{self.world_size}\n layers: {layer_desc}\n"
            f" last complete step: {self.last_complete_step}  examples: {self.num_examples}  rows: {n_rows}\n"
            f" bytes on disk: {size}  exact: {self.exact}  approximations: {self.approximations or 'none'}\n"
            f" damaged files: {len(self.damaged)}"
        )

    # ------------------------------------------------------------------ weights
    def weights(self, layer: str, step: int | Literal["initial", "final"] = "final") -> dict[str, Tensor]:
        """Tracked-layer weights: ``"initial"`` (W_0), ``"final"`` (W at the last complete step) or a step."""
        self._check_layer(layer)
        if step == "initial":
            path = self.path / "weights" / "initial.pt"
        elif step == "final":
            if self.last_complete_step == 0 or self._snapshot_path is None:
                path = self.path / "weights" / "initial.pt"
            else:
                path = self._snapshot_path
        else:
            path = self.path / "weights" / f"step_{int(step)}.pt"
            if not path.exists():
                raise ValueError(f"No weight snapshot for step {step}; available: "
                                 f"{sorted(p.stem for p in (self.path / 'weights').glob('*.pt'))}.")
        w = torch.load(path, map_location="cpu", weights_only=True)[layer]
        return {k: v.to(self.device) for k, v in w.items()}

    def checkpoints(self) -> list[TraceCheckpoint]:
        """Stored tracin checkpoints (step, lr, path), in step order."""
        return [
            TraceCheckpoint(s, lr, str(self.path / "checkpoints" / f"step_{s}.pt"))
            for s, lr in sorted(self._ckpt_steps.items())
        ]

    def _check_layer(self, layer: str | None) -> str:
        if layer is None:
            if len(self.layers) == 1:
                return self.layers[0]
            raise ValueError(f"The trace tracks several layers {self.layers}; pass `layer=`.")
        if layer not in self.layers:
            raise ValueError(f"Layer {layer!r} is not in this trace; traced layers: {self.layers}.")
        return layer

    # ------------------------------------------------------------------ row streaming
    def _iter_rows(self, layer: str, batch_rows: int, progress: bool = False, checkpoint: int | None = None):
        """Yield (ids, steps, Ã-input (R, *a), U (R, *δ) with κ and exponents applied, rows) blocks."""
        blocks = self._blocks.get(layer, [])
        it = blocks
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(blocks, desc=f"trace rows {layer}")
        for b in it:
            idx = np.nonzero(b.keep if checkpoint is None else (b.keep & (b.rows["step"] == checkpoint)))[0]
            for s in range(0, len(idx), batch_rows):
                sel = idx[s : s + batch_rows]
                if len(sel) == 0:
                    continue
                contiguous = sel[-1] - sel[0] + 1 == len(sel)
                rows = b.rows[sel]

                def take(arr):
                    x = arr[sel[0] : sel[-1] + 1] if contiguous else arr[sel]
                    return _tensor(x).to(self.device)

                a = take(b.a) if b.a is not None else None
                d = take(b.d) if b.d is not None else None
                delta = take(b.delta) if b.delta is not None else None
                yield b, sel, rows, a, d, delta

    def _factors(self, b: _Block, sel, rows, a, d, *, use_kappa: bool = True, dtype: torch.dtype | None = None):
        dt = dtype or self.dtype
        a_exp = torch.from_numpy(rows["a_exp"].astype(np.float64)).to(self.device)
        d_exp = torch.from_numpy(rows["d_exp"].astype(np.float64)).to(self.device)
        coef = torch.exp2(d_exp)
        if use_kappa:
            coef = coef * torch.from_numpy(b.kappa[sel]).to(self.device)
        shape_a = (-1,) + (1,) * (a.dim() - 1)
        shape_d = (-1,) + (1,) * (d.dim() - 1)
        A = a.to(dt) * torch.exp2(a_exp).to(dt).reshape(shape_a)
        U = d.to(dt) * coef.to(dt).reshape(shape_d)
        return A, U

    def _id_index(self, ids_np: np.ndarray) -> Tensor:
        return torch.from_numpy(np.searchsorted(self.example_ids.numpy(), ids_np)).to(self.device)

    def _labels(self) -> Tensor | None:
        lab = np.full(self.num_examples, -1, dtype=np.int64)
        src = self.layers if self.mode != "class_batches" else ["__members__"]
        for n in src:
            for b in self._blocks.get(n, []):
                r = b.rows[b.keep]
                lab[np.searchsorted(self.example_ids.numpy(), r["id"])] = r["label"]
        return None if (lab < 0).all() else torch.from_numpy(lab)

    # ------------------------------------------------------------------ test side
    def _project_test(self, layer: str, a_x: Tensor, g_x: Tensor) -> tuple[Tensor, Tensor]:
        """Test-side factors in the stored (possibly projected) space: (M, P', k_in), (M, P', k_out)."""
        if layer not in self._proj:
            return a_x, g_x
        spec = self.layer_info[layer]
        q, p = self._proj[layer]
        a_rows = patch_matrix(spec, a_x)[:, 0]
        g_rows = grad_matrix(spec, g_x)[:, 0]
        return a_rows @ q.to(a_rows.device, a_rows.dtype).T, g_rows @ p.to(g_rows.device, g_rows.dtype).T

    def _layer_inputs(self, layer: str, inputs: Any, model: nn.Module | None, forward_fn) -> Tensor:
        if model is None:
            raise ValueError("Pass `model=` (the trained model) to compute the test inputs' layer activations, or "
                             "`layer_inputs=` to give them directly.")
        net = copy.deepcopy(unwrap_model(model)).eval()
        mod = get_module(net, layer)
        got: list[Tensor] = []
        h = mod.register_forward_hook(lambda m, i, o: got.append(i[0].detach()))
        try:
            with torch.no_grad():
                (forward_fn or (lambda m, x: m(x)))(net, inputs)
        finally:
            h.remove()
        if not got:
            raise RuntimeError(f"The forward pass never called layer {layer!r}.")
        return got[0] if len(got) == 1 else torch.cat(got)

    # ------------------------------------------------------------------ representation queries
    def contributions(
        self,
        inputs: Any = None,
        layer: str | None = None,
        *,
        model: nn.Module | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        layer_inputs: Tensor | None = None,
        reference: Literal["trace", "model"] = "trace",
        granularity: Literal["example", "step"] = "example",
        return_vectors: bool = False,
        example_score: Literal["projection", "positive_cosine_sum"] = "projection",
        use_aggregate: bool | None = None,
        batch_rows: int = 65536,
        progress: bool = False,
    ) -> Contributions:
        """Split the net change ``Δz(x)`` of ``layer``'s pre-activation into per-training-example parts.

        Args:
            inputs: test inputs for ``forward_fn(model_copy.eval(), inputs)`` (default ``model(inputs)``).
            layer: traced layer (optional when only one is traced).
            model: the trained model (computes ``a(x)``; with ``reference="model"`` also gives W_T).
            layer_inputs: the layer inputs ``a(x)`` directly (skips the model).
            reference: ``"trace"``: W_T = snapshot at the last complete step; ``"model"``: the model's weights.
            granularity: ``"example"`` (sum over each id's rows) or ``"step"`` (one entry per row).
            return_vectors: keep ``c_i(x)`` (M, N, *z).
            example_score: class_batches only: ``"projection"`` (s_t split equally over the step's non-ghosts)
                or ``"positive_cosine_sum"`` (Σ max(cos_t, 0), paper-era reference).
            use_aggregate: use the cached per-example aggregate (None: when present in the cache).
            batch_rows: rows per streamed block.
            progress: tqdm progress bar.

        Returns:
            :class:`Contributions`; ``score`` sums to ``‖Δz‖`` over ids (exact traces).
        """
        layer = self._check_layer(layer)
        if self.mode == "tracin":
            raise ValueError("contributions() needs a representation or class_batches trace; use influence() for tracin.")
        if granularity not in ("example", "step"):
            raise ValueError(f"Expected granularity in ('example', 'step'), got {granularity!r}.")
        spec = self.layer_info[layer]
        with torch.inference_mode(False), torch.enable_grad():
            a_x = layer_inputs if layer_inputs is not None else self._layer_inputs(layer, inputs, model, forward_fn)
            a_x = a_x.detach().clone().to(self.device, self.dtype)
            w0 = self.weights(layer, "initial")
            if reference == "model":
                if model is None:
                    raise ValueError("reference='model' needs `model=`.")
                mod = get_module(model, layer)
                wt = {"weight": mod.weight.detach().to(self.device)}
                if mod.bias is not None:
                    wt["bias"] = mod.bias.detach().to(self.device)
            elif reference == "trace":
                wt = self.weights(layer, "final")
                if model is not None:
                    mw = get_module(model, layer).weight.detach().to(self.device, torch.float64)
                    rel = (mw - wt["weight"].double()).norm() / wt["weight"].double().norm().clamp_min(1e-30)
                    if rel > 1e-6:
                        warnings.warn(
                            f"The model's {layer!r} weights differ from the trace's final snapshot (step "
                            f"{self.last_complete_step}) by {float(rel):.2e} relative; scores explain the snapshot. "
                            "Pass reference='model' to use the model's weights.", stacklevel=2,
                        )
            else:
                raise ValueError(f"Expected reference in ('trace', 'model'), got {reference!r}.")
            dw = (wt["weight"].double() - w0["weight"].double())[None]
            db = (wt["bias"].double() - w0["bias"].double())[None] if spec.bias else None
            delta_z = apply_delta(spec, a_x.double(), dw, db)[:, 0]  # (M, *z) float64
            m = a_x.shape[0]
            zshape = tuple(delta_z.shape[1:])
            dz_norm = delta_z.flatten(1).norm(dim=1)
            if self.mode == "class_batches":
                return self._class_batch_contributions(layer, spec, a_x, delta_z, dz_norm, example_score,
                                                       batch_rows, progress)
            n = self.num_examples
            if layer in self._proj:  # projected trace: contributions live in the k_out space, ‖Δz‖ stays exact
                if use_aggregate:
                    raise ValueError("The aggregate is not available for a projected trace; use use_aggregate=False.")
                use_aggregate = False
                a_x, delta_z = self._project_test(layer, a_x, delta_z.to(self.dtype))
                delta_z = delta_z.double()
                zshape = tuple(delta_z.shape[1:])
                spec = self._row_spec[layer]
            if use_aggregate is None:
                use_aggregate = granularity == "example" and self._aggregate_cache_path(layer).exists()
            if use_aggregate and granularity == "example":
                agg = self.aggregate(layer)
                C = self._apply_aggregate(spec, agg, a_x, batch_rows)
            elif granularity == "example":
                C = torch.zeros(m, n, *zshape, dtype=self.dtype, device=self.device)
                for b, sel, rows, a, d, _ in self._iter_rows(layer, batch_rows, progress):
                    A, U = self._factors(b, sel, rows, a, d)
                    c = self._row_c(layer, spec, A, U, a_x)
                    C.index_add_(1, self._id_index(rows["id"]), c)
            else:
                cs, ids_l, steps_l = [], [], []
                for b, sel, rows, a, d, _ in self._iter_rows(layer, batch_rows, progress):
                    A, U = self._factors(b, sel, rows, a, d)
                    cs.append(self._row_c(layer, spec, A, U, a_x))
                    ids_l.append(rows["id"])
                    steps_l.append(rows["step"])
                C = torch.cat(cs, 1) if cs else torch.zeros(m, 0, *zshape, dtype=self.dtype)
                row_ids = torch.from_numpy(np.concatenate(ids_l)) if ids_l else torch.zeros(0, dtype=torch.int64)
                row_steps = torch.from_numpy(np.concatenate(steps_l)) if steps_l else torch.zeros(0, dtype=torch.int64)
            return self._finish(layer, C, delta_z, dz_norm, return_vectors, granularity,
                                row_ids if granularity == "step" else None,
                                row_steps if granularity == "step" else None)

    def _row_c(self, layer: str, spec: LayerSpec, A: Tensor, U: Tensor, a_x: Tensor) -> Tensor:
        if self.factorization[layer] == "full":
            nw = int(np.prod(spec.weight_shape))
            dw = U[:, :nw].reshape(-1, *spec.weight_shape)
            db = U[:, nw:] if spec.bias else None
            return apply_delta(spec, a_x, dw, db)
        return row_contributions(spec, A, U, a_x)

    def _finish(self, layer, C, delta_z, dz_norm, return_vectors, granularity, row_ids=None, row_steps=None):
        m = C.shape[0]
        dz = delta_z.to(C.dtype)
        flatC = C.reshape(m, C.shape[1], -1)
        dot = torch.einsum("mnk,mk->mn", flatC.double(), delta_z.reshape(m, -1)).to(C.dtype)
        norm = flatC.norm(dim=2)
        dzn = dz_norm.to(C.dtype)
        safe = dzn > 0
        score = torch.where(safe[:, None], dot / dzn.clamp_min(EPS)[:, None], torch.zeros_like(dot))
        cos = torch.where(safe[:, None], dot / (norm * dzn[:, None] + EPS), torch.zeros_like(dot))
        total = flatC.double().sum(1)
        err = (total - delta_z.reshape(m, -1)).norm(dim=1) / dz_norm.clamp_min(EPS)
        if granularity == "example":
            ids, labels = self.example_ids, self._labels()
        else:
            ids, labels = row_ids, None
        return Contributions(
            layer=layer, ids=ids, labels=labels, score=score.cpu(), dot=dot.cpu(), norm=norm.cpu(), cosine=cos.cpu(),
            delta_z=dz.cpu(), delta_z_norm=dzn.cpu(), completeness_error=err.cpu(),
            vectors=C.cpu() if return_vectors else None, exact=self.exact, granularity=granularity,
            step=row_steps,
        )

    def _class_batch_contributions(self, layer, spec, a_x, delta_z, dz_norm, example_score, batch_rows, progress):
        cs, steps, classes = [], [], []
        nw = int(np.prod(spec.weight_shape))
        for b, sel, rows, _, _, delta in self._iter_rows(layer, batch_rows, progress):
            dl = delta.to(self.dtype)
            dw = dl[:, :nw].reshape(-1, *spec.weight_shape)
            db = dl[:, nw:] if spec.bias else None
            cs.append(apply_delta(spec, a_x, dw, db))
            steps.append(rows["step"])
            classes.append(np.where(rows["call"] == 1, -1, rows["label"]))
        m = a_x.shape[0]
        C = torch.cat(cs, 1) if cs else torch.zeros(m, 0, *delta_z.shape[1:], dtype=self.dtype)
        step_res = self._finish(layer, C, delta_z, dz_norm, False, "step")
        st = torch.from_numpy(np.concatenate(steps)) if steps else torch.zeros(0, dtype=torch.int64)
        cl = torch.from_numpy(np.concatenate(classes)) if classes else torch.zeros(0, dtype=torch.int64)
        # per-example scores from the members of each step (non-ghosts)
        mem = [b.rows[b.keep] for b in self._blocks.get("__members__", [])]
        memr = np.concatenate(mem) if mem else np.zeros(0, dtype=S.ROW_DTYPE)
        memr = memr[~memr["ghost"]]
        n = self.num_examples
        score = torch.zeros(m, n, dtype=torch.float64)
        real_step = cl >= 0
        if len(memr):
            # position of each member's step among the real (non-drift) step records, -1 if absent
            real_idx = torch.nonzero(real_step).reshape(-1)
            real_steps = st[real_idx]
            srt, perm = torch.sort(real_steps)
            ms = torch.from_numpy(memr["step"].copy())
            j = torch.searchsorted(srt, ms).clamp_max(max(len(srt) - 1, 0))
            found = (srt[j] == ms) if len(srt) else torch.zeros(len(ms), dtype=torch.bool)
            pos = torch.where(found, real_idx[perm[j]] if len(srt) else j, torch.full_like(ms, -1))
            valid = pos >= 0
            counts = np.bincount(memr["step"] - memr["step"].min()) if len(memr) else None
            m_t = torch.from_numpy(counts[memr["step"] - memr["step"].min()]).double()
            idx = self._id_index(memr["id"])
            if example_score == "projection":
                vals = step_res.score.double()[:, pos.clamp_min(0)] / m_t
            elif example_score == "positive_cosine_sum":
                vals = step_res.cosine.double()[:, pos.clamp_min(0)].clamp_min(0)
            else:
                raise ValueError(f"Unknown example_score {example_score!r}.")
            vals = vals * valid.double()
            score.index_add_(1, idx, vals)
        res = Contributions(
            layer=layer, ids=self.example_ids, labels=self._labels(), score=score.to(self.dtype),
            dot=score.to(self.dtype) * step_res.delta_z_norm[:, None], norm=torch.full_like(score, float("nan")),
            cosine=torch.full_like(score, float("nan")), delta_z=step_res.delta_z, delta_z_norm=step_res.delta_z_norm,
            completeness_error=step_res.completeness_error, exact=False, granularity="example", step=st,
            step_class=cl, step_score=step_res.score, step_cosine=step_res.cosine, step_norm=step_res.norm,
        )
        return res

    # ------------------------------------------------------------------ aggregate
    def _aggregate_cache_path(self, layer: str) -> Path:
        key = hashlib.blake2b(f"{self.meta['run_id']}:{layer}:{self.last_complete_step}".encode(),
                              digest_size=8).hexdigest()
        return self.cache_dir / f"aggregate_{layer.replace('/', '_')}_{key}.npy"

    def aggregate(self, layer: str, *, out: str | os.PathLike | None = None, batch_rows: int = 8192,
                  progress: bool = False, accumulate_dtype: torch.dtype = torch.float64) -> np.ndarray:
        """Per-example update sums ``A_i`` as an ``(N, numel(W) [+ D_out])`` float32 memmap (ids = ``example_ids``).

        Cached in ``cache/`` keyed by the last complete step; ``out`` writes it to a chosen path instead. The sums
        accumulate in ``accumulate_dtype`` (float64 by default: N·(numel(W)+D_out)·8 bytes of memory).
        """
        layer = self._check_layer(layer)
        if self.mode != "representation":
            raise ValueError("aggregate() is defined for representation traces.")
        if layer in self._proj:
            raise ValueError(f"Layer {layer!r} was recorded with random projection; its aggregate is not available.")
        path = Path(out) if out is not None else self._aggregate_cache_path(layer)
        if path.exists() and out is None:
            return np.load(path, mmap_mode="r")
        spec = self.layer_info[layer]
        width = int(np.prod(spec.weight_shape)) + (spec.out_features if spec.bias else 0)
        agg = torch.zeros(self.num_examples, width, dtype=accumulate_dtype, device=self.device)
        for b, sel, rows, a, d, _ in self._iter_rows(layer, batch_rows, progress):
            A, U = self._factors(b, sel, rows, a, d, dtype=accumulate_dtype)
            if self.factorization[layer] == "full":
                vec = U
            else:
                w, bb = per_example_grads(spec, A, U)
                vec = torch.cat([w.flatten(1)] + ([bb] if bb is not None else []), 1)
            agg.index_add_(0, self._id_index(rows["id"]), vec)
        path.parent.mkdir(parents=True, exist_ok=True)
        S.atomic_save_npy(path, agg.to(torch.float32).cpu().numpy())
        return np.load(path, mmap_mode="r")

    def _apply_aggregate(self, spec: LayerSpec, agg: np.ndarray, a_x: Tensor, batch_rows: int) -> Tensor:
        nw = int(np.prod(spec.weight_shape))
        outs = []
        for s in range(0, agg.shape[0], batch_rows):
            blk = _tensor(agg[s : s + batch_rows]).to(self.device, self.dtype)
            dw = blk[:, :nw].reshape(-1, *spec.weight_shape)
            db = blk[:, nw:] if spec.bias else None
            outs.append(apply_delta(spec, a_x, dw, db))
        return torch.cat(outs, 1)

    # ------------------------------------------------------------------ ranking and classes
    def top_k(
        self, result: Contributions | Influence, k: int = 10, *, proponents: bool = True,
        by: Literal["score", "cosine", "norm"] = "score",
    ) -> TopK:
        """The k most (``proponents=True``) or least influential ids per test input."""
        if isinstance(result, Influence):
            if by != "score":
                raise ValueError("by='cosine'/'norm' is available for Contributions only.")
            vals = result.scores if result.scores.dim() == 2 else result.scores[None]
        elif by in ("score", "cosine", "norm"):
            vals = {"score": result.score, "cosine": result.cosine, "norm": result.norm}[by]
        else:
            raise ValueError(f"Expected by in ('score', 'cosine', 'norm'), got {by!r}.")
        k = min(int(k), vals.shape[1])
        v, i = torch.topk(vals, k, dim=1, largest=proponents)
        ids = result.ids[i]
        labels = result.labels[i] if result.labels is not None else None
        return TopK(ids=ids, values=v, labels=labels, proponents=proponents, by=by)

    def class_contributions(self, result: Contributions, labels: Tensor | None = None) -> ClassContributions:
        """Per-class sums ``S_c = Σ_{y_i=c} s_i`` (sum over classes = ‖Δz‖), mass and points for ridge plots."""
        if result.step_class is not None:  # class_batches: per step
            cl = result.step_class
            real = cl >= 0
            classes = torch.unique(cl[real])
            onehot = (cl[real][:, None] == classes[None]).to(result.step_score.dtype)
            score = result.step_score[:, real] @ onehot
            mass = result.step_norm[:, real] @ onehot
            drift = result.step_score[:, ~real].sum(1)
            cos, nrm, lab = result.step_cosine[:, real], result.step_norm[:, real], cl[real]
        else:
            lab = labels if labels is not None else result.labels
            if lab is None:
                raise ValueError("No labels recorded in the trace; pass `labels=` (one per id in result.ids).")
            lab = torch.as_tensor(lab)
            if lab.shape[0] != result.ids.shape[0]:
                raise ValueError(f"Expected {result.ids.shape[0]} labels (one per id), got {lab.shape[0]}.")
            classes = torch.unique(lab)
            onehot = (lab[:, None] == classes[None]).to(result.score.dtype)
            score = result.score @ onehot
            mass = result.norm @ onehot
            drift = None
            cos, nrm = result.cosine, result.norm
        mean_cos = score / mass.clamp_min(EPS)
        points = [[(cos[m][lab == c], nrm[m][lab == c]) for c in classes] for m in range(score.shape[0])]
        return ClassContributions(classes, score, mass, mean_cos, points, drift, result.layer)

    # ------------------------------------------------------------------ tracin
    def _tracin_test_factors(self, ckpt: TraceCheckpoint, model, loss_fn, inputs, layers):
        net = copy.deepcopy(unwrap_model(model))
        captum_checkpoint_loader(net, ckpt.path)
        net.eval()
        got: dict[str, list] = {}
        hs = [get_module(net, n).register_forward_hook(
            lambda m, i, o, n=n: got.setdefault(n, []).append((i[0].detach(), o))) for n in layers]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                loss = loss_fn(net, inputs)
                outs = [o for n in layers for _, o in got.get(n, [])]
                grads = torch.autograd.grad(loss.sum(), outs, allow_unused=True)
        finally:
            for h in hs:
                h.remove()
        res, k = {}, 0
        for n in layers:
            for a, _ in got.get(n, []):
                g = grads[k]
                k += 1
                if g is None:  # the loss does not depend on this call: zero gradient, no contribution
                    continue
                res.setdefault(n, []).append((a.to(self.device, self.dtype), g.detach().to(self.device, self.dtype)))
        return res

    def _train_factors(self, layer: str, ckpt_step: int, batch_rows: int):
        seen = np.zeros(0, dtype=np.int64)
        for b, sel, rows, a, d, _ in self._iter_rows(layer, batch_rows, checkpoint=ckpt_step):
            A, U = self._factors(b, sel, rows, a, d, use_kappa=False)
            # keep the first of duplicate (checkpoint, id, call) rows (DDP sampler padding, overlapping shards)
            key = rows["id"].astype(np.int64) * 256 + rows["call"].astype(np.int64)
            first = np.zeros(len(key), dtype=bool)
            first[np.unique(key, return_index=True)[1]] = True
            mask = first & ~np.isin(key, seen)
            seen = np.concatenate([seen, key[mask]])
            mask_t = torch.from_numpy(mask).to(self.device)
            yield rows["id"][mask], A[mask_t], U[mask_t]

    def influence(
        self, inputs: Any, *, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor],
        layers: Sequence[str] | None = None, aggregate: bool = False, normalize: bool = False,
        batch_rows: int = 65536,
    ) -> Influence:
        """TracIn influence ``Σ_j η_j Σ_layers ⟨g_ij, g_xj⟩`` of every training id on each test input, (M, N).

        Equal to Captum ``TracInCP(..., sample_wise_grads_per_batch=True).influence((x, y), k=None)`` with the
        stored checkpoints, the same layers and a "sum" loss. ``loss_fn(module, inputs)`` returns per-example
        losses (M,). ``aggregate=True`` sums the test gradients first (one row of scores, exact).
        ``normalize=True`` gives TracIn-cos (gradients divided by their norms per checkpoint and layer).
        """
        if self.mode != "tracin":
            raise ValueError(f"influence() needs a tracin trace; this one is {self.mode!r}.")
        layers = list(layers) if layers is not None else self.layers
        for n in layers:
            self._check_layer(n)
        ckpts = self.checkpoints()
        scores = None
        for ck in ckpts:
            test = self._tracin_test_factors(ck, model, loss_fn, inputs, layers)
            m = next(iter(test.values()))[0][0].shape[0]
            if scores is None:
                scores = torch.zeros(1 if aggregate else m, self.num_examples, dtype=torch.float64, device=self.device)
            per = torch.zeros(m, self.num_examples, dtype=torch.float64, device=self.device)
            xnorm = torch.zeros(m, dtype=torch.float64, device=self.device)
            tnorm = torch.zeros(self.num_examples, dtype=torch.float64, device=self.device)
            for n in layers:
                spec = self._row_spec[n]
                for a_x, g_x in test.get(n, []):
                    a_x, g_x = self._project_test(n, a_x, g_x)
                    if normalize:
                        xnorm += factor_sq_norm(spec, a_x, g_x).double()
                    for ids, A, U in self._train_factors(n, ck.step, batch_rows):
                        idx = self._id_index(ids)
                        per.index_add_(1, idx, factor_dot(spec, a_x, g_x, A, U).double())
                if normalize:
                    for ids, A, U in self._train_factors(n, ck.step, batch_rows):
                        tnorm.index_add_(0, self._id_index(ids), factor_sq_norm(spec, A, U).double())
            if normalize:
                per = per / (xnorm.sqrt()[:, None] * tnorm.sqrt()[None]).clamp_min(EPS)
            scores += ck.lr * (per.sum(0, keepdim=True) if aggregate else per)
        if scores is None:
            raise RuntimeError("The trace holds no tracin checkpoints yet.")
        return Influence(self.example_ids, scores.to(self.dtype).cpu(), [c.step for c in ckpts], self._labels())

    def self_influence(self, layers: Sequence[str] | None = None, *, normalize: bool = False,
                       batch_rows: int = 65536) -> Influence:
        """TracIn self-influence ``Σ_j η_j Σ_layers ‖g_ij‖²`` from the stored factors alone, (N,).

        High values flag mislabelled or rare examples (removing the top few percent did not improve accuracy
        in the TracIn authors' experience).
        """
        if self.mode != "tracin":
            raise ValueError(f"self_influence() needs a tracin trace; this one is {self.mode!r}.")
        layers = list(layers) if layers is not None else self.layers
        out = torch.zeros(self.num_examples, dtype=torch.float64, device=self.device)
        ckpts = self.checkpoints()
        for ck in ckpts:
            per = torch.zeros_like(out)
            for n in layers:
                spec = self._row_spec[self._check_layer(n)]
                for ids, A, U in self._train_factors(n, ck.step, batch_rows):
                    per.index_add_(0, self._id_index(ids), factor_sq_norm(spec, A, U).double())
            if normalize:
                per = (per > 0).double()
            out += ck.lr * per
        return Influence(self.example_ids, out.to(self.dtype).cpu(), [c.step for c in ckpts], self._labels())

    # ------------------------------------------------------------------ completeness
    def completeness(
        self, layer: str | None = None, *, model: nn.Module | None = None, inputs: Any = None,
        layer_inputs: Tensor | None = None, batch_rows: int = 65536,
    ) -> CompletenessReport:
        """Exactness report: ``W_0 + Σ_i A_i`` vs the snapshot at the last complete step for every layer (float64),
        step bookkeeping per rank, and (with inputs) ``‖Σ_i c_i − Δz‖/‖Δz‖`` per input."""
        layers = [self._check_layer(layer)] if layer is not None else self.layers
        steps_per_rank: dict[int, int] = {}
        for r, st in zip(self._steps_rank, self._steps):
            steps_per_rank[r] = steps_per_rank.get(r, 0) + len(st)
        all_steps = np.concatenate([s["step"] for s in self._steps]) if self._steps else np.zeros(0, np.int64)
        skipped = [int(s) for st in self._steps for s in st["step"][~st["stepped"]]]
        nonfinite = 0
        werr_abs, werr_rel = {}, {}
        if self.mode != "tracin":
            for n in layers:
                spec = self.layer_info[n]
                if n in self._proj:  # the projected factors do not determine ΔW
                    werr_abs[n] = werr_rel[n] = float("nan")
                    continue
                w0, wt = self.weights(n, "initial"), self.weights(n, "final")
                total = torch.zeros(int(np.prod(spec.weight_shape)) + (spec.out_features if spec.bias else 0),
                                    dtype=torch.float64, device=self.device)
                for b, sel, rows, a, d, delta in self._iter_rows(n, batch_rows):
                    if delta is not None:
                        total += delta.double().sum(0)
                        continue
                    A, U = self._factors(b, sel, rows, a, d, dtype=torch.float64)
                    nonfinite += int((~torch.isfinite(U.flatten(1)).all(1)).sum())
                    if self.factorization[n] == "full":
                        total += U.sum(0)
                    else:
                        w, bb = per_example_grads(spec, A, U)
                        total += torch.cat([w.sum(0).reshape(-1)] + ([bb.sum(0)] if bb is not None else []))
                ref = [wt["weight"].double().reshape(-1) - w0["weight"].double().reshape(-1)]
                if spec.bias:
                    ref.append(wt["bias"].double() - w0["bias"].double())
                ref_t = torch.cat(ref)
                werr_abs[n] = float((total - ref_t).abs().max()) if total.numel() else 0.0
                werr_rel[n] = float((total - ref_t).norm() / ref_t.norm().clamp_min(1e-300))
        missing: list[int] = []
        if self.mode != "tracin":
            n_every = int(self.meta["config"].get("every_n_steps", 1))
            first = min(seg["start_step"] for seg in self.meta["segments"])
            expected = set(range(first + (-first) % n_every, self.last_complete_step, n_every))
            for r in range(self.world_size):
                have = {int(t) for rr, st in zip(self._steps_rank, self._steps) if rr == r for t in st["step"]}
                missing.extend(sorted(expected - have))
            missing = sorted(set(missing))
        uniq, counts = np.unique(all_steps, return_counts=True)
        dup = [int(s) for s, c in zip(uniq, counts) if c > self.world_size]
        sum_err = score_err = None
        if inputs is not None or layer_inputs is not None:
            res = self.contributions(inputs, layers[0], model=model, layer_inputs=layer_inputs)
            sum_err = res.completeness_error
            score_err = (res.score.double().sum(1) - res.delta_z_norm.double()).abs() / res.delta_z_norm.double().clamp_min(EPS)
        return CompletenessReport(
            exact=self.exact, approximations=self.approximations, last_complete_step=self.last_complete_step,
            steps_per_rank=steps_per_rank, missing_steps=missing, duplicate_steps=dup, skipped_steps=skipped,
            truncations=self.truncations, nonfinite_rows=nonfinite, damaged=list(self.damaged),
            weight_error_abs=werr_abs, weight_error_rel=werr_rel, sum_error=sum_err, score_sum_error=score_err,
        )

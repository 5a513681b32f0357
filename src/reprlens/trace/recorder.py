"""Plain-torch trace recorder: hooks on Linear/Conv2d layers, per-step factor rows, crash-safe flushes.

The Lightning callback :class:`reprlens.callbacks.TrainingTrace` is a thin driver around this class; it can
be used directly in a plain PyTorch loop::

    with TraceRecorder(model, ["fc2"], "trace_dir") as rec:
        for batch in loader:
            rec.begin_step(batch["index"])
            loss = loss_fn(model(batch["x"]), batch["y"]); loss.backward()
            rec.before_optimizer_step(opt)
            opt.step(); opt.zero_grad()
            rec.end_step()

Modes (see the spec): ``"representation"`` stores, per row (one example in one call of the layer), the layer
input ``a`` and the output gradient ``G`` (or the full per-row gradient), with the step coefficient
``κ_t = −η_t/(world_size·S_amp)`` kept in float64 metadata, so that the plain-SGD update decomposes exactly
into per-example parts. ``"class_batches"`` stores the per-step weight delta of class-pure batches.
``"tracin"`` stores per-example loss-gradient factors at checkpoints (:meth:`TraceRecorder.checkpoint`).

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> with TraceRecorder(net, ["0"], tempfile.mkdtemp(), flush_every_n_steps=2) as rec:
    ...     for t in range(3):
    ...         rec.begin_step(torch.arange(5))
    ...         net(torch.randn(5, 4)).pow(2).mean().backward()
    ...         rec.before_optimizer_step(opt)
    ...         opt.step(); opt.zero_grad()
    ...         rec.end_step()
    >>> rec.last_complete_step
    3
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from reprlens.trace import store as S
from reprlens.trace.functional import LayerSpec, layer_spec, per_example_grads
from reprlens.trace.ids import default_example_ids, to_id_tensor
from reprlens.trace.projection import project_factors, projection_matrices
from reprlens.utils import check_positive_int, get_module, in_extra_forward, unwrap_model

__all__ = ["DTYPES", "MODES", "TraceRecorder"]

MODES = ("representation", "class_batches", "tracin")
DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def _frexp_scale(x: Tensor) -> tuple[Tensor, Tensor]:
    """Scale each row by an exact power of two so its max-abs lies in [0.5, 1); returns (scaled, exponent)."""
    n = x.shape[0]
    if n == 0:
        return x, torch.zeros(0, dtype=torch.int8, device=x.device)
    amax = x.detach().reshape(n, -1).abs().amax(1)
    _, e = torch.frexp(amax)
    e = e.clamp(-126, 126)
    scaled = torch.ldexp(x, (-e).to(x.dtype).reshape(n, *([1] * (x.dim() - 1))))
    return scaled, e.to(torch.int8)


class TraceRecorder:
    """Records what each training example contributed to the weights of chosen layers.

    Args:
        model: the model whose layers are tracked (wrappers such as DDP are unwrapped).
        layers: dotted module names of ``nn.Linear`` / ``nn.Conv2d`` layers.
        dirpath: store directory.
        mode: ``"representation"``, ``"class_batches"`` or ``"tracin"``.
        dtype: storage dtype of factors: ``"float32"``, ``"float16"`` or ``"float64"``.
        flush_every_n_steps: steps between commits to disk.
        rank, world_size: DDP position (each rank writes its own shard set).
        strict: refuse settings that break exactness (representation mode) instead of recording them as
            approximations.
        factorization: ``"low_rank"`` (store a, G), ``"full"`` (store per-row gradients) or ``"auto"``.
        every_n_steps: record every n-th step (weighted by n; the trace becomes approximate) in
            representation mode.
        ghost_samples: class_batches: the last ``ghost_samples`` rows of each batch are ghosts.
        check_every_n_steps: steps between on-device consistency checks (factor and update checks).
        max_buffer_bytes: flush earlier when buffered rows exceed this size.
        overwrite: allow replacing a store that holds another run's trace.
        run_id: explicit run id (default: random).
        config: extra JSON-serialisable configuration written to ``trace.json``.
        projection: store randomly projected factors ``ÃQᵀ``, ``GPᵀ`` with ``k`` or ``(k_in, k_out)`` dims
            (unbiased dot products, approximate trace; see :mod:`reprlens.trace.projection`).
        projection_seed, projection_kind: seed and ``"gaussian"``/``"rademacher"`` entries of Q and P.

    Raises:
        ValueError: for bad arguments or an unknown layer (closest names listed).
        NotImplementedError: for unsupported layer types.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        dirpath: str | os.PathLike,
        *,
        mode: str = "representation",
        dtype: str = "float32",
        flush_every_n_steps: int = 50,
        rank: int = 0,
        world_size: int = 1,
        strict: bool = True,
        factorization: str = "auto",
        every_n_steps: int = 1,
        ghost_samples: int = 0,
        check_every_n_steps: int = 100,
        max_buffer_bytes: int = 256 * 2**20,
        overwrite: bool = False,
        run_id: str | None = None,
        config: dict | None = None,
        projection: int | tuple[int, int] | None = None,
        projection_seed: int = 0,
        projection_kind: str = "gaussian",
    ) -> None:
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(f"Expected `layers` to be a non-empty list of dotted module names, but got {layers!r}.")
        if mode not in MODES:
            raise ValueError(f"Expected `mode` in {MODES}, but got {mode!r}.")
        if dtype not in DTYPES:
            raise ValueError(f"Expected `dtype` in {tuple(DTYPES)} (no bfloat16: .npy has none), but got {dtype!r}.")
        if factorization not in ("auto", "low_rank", "full"):
            raise ValueError(f"Expected `factorization` in ('auto', 'low_rank', 'full'), but got {factorization!r}.")
        check_positive_int(flush_every_n_steps, "flush_every_n_steps")
        check_positive_int(every_n_steps, "every_n_steps")
        check_positive_int(check_every_n_steps, "check_every_n_steps")
        check_positive_int(max_buffer_bytes, "max_buffer_bytes")
        check_positive_int(world_size, "world_size")
        check_positive_int(ghost_samples, "ghost_samples", minimum=0)
        if mode == "class_batches" and every_n_steps != 1:
            raise ValueError(f"mode='class_batches' needs every_n_steps=1, but got {every_n_steps}.")
        self.model = unwrap_model(model)
        self.layers = layers
        self.modules: dict[str, nn.Module] = {n: get_module(self.model, n) for n in layers}
        self.specs: dict[str, LayerSpec] = {n: layer_spec(m, n) for n, m in self.modules.items()}
        for name, mod in self.modules.items():
            if not mod.weight.requires_grad:
                raise RuntimeError(
                    f"Tracked layer {name!r} has a weight without requires_grad; the trace records trained layers "
                    "only. Unfreeze it or track another layer."
                )
        self.dirpath = Path(dirpath)
        self.mode = mode
        self.dtype = dtype
        self.flush_every_n_steps = flush_every_n_steps
        self.rank, self.world_size = int(rank), int(world_size)
        self.strict = strict
        self.factorization = factorization
        self.every_n_steps = every_n_steps
        self.ghost_samples = ghost_samples
        self.check_every_n_steps = check_every_n_steps
        self.max_buffer_bytes = max_buffer_bytes
        self.overwrite = overwrite
        self.run_id = run_id or S.new_run_id()
        self.config = dict(config or {})
        self.approximations: list[str] = []
        if every_n_steps > 1:
            self.approximations.append(f"strided: every {every_n_steps}th step recorded, weighted by {every_n_steps}")
        self.segment = 0
        self.last_complete_step = 0
        self._resume: dict | None = None
        self._opened = False
        self._handles: list[Any] = []
        self._active = False
        self._pending: list[dict] = []  # micro-batches of the current step
        self._step: int | None = None
        self._next_step = 0
        self._buffers: dict[str, list[dict]] = {n: [] for n in layers}
        self._buf_steps: list[dict] = []
        self._buf_bytes = 0
        self._checks: list[tuple[int, str, Tensor]] = []
        self._check_tol: dict[str, float] = {}
        self._lr_interval: float | Tensor = 0.0
        self._step_state: dict = {}
        self._w_after: dict[str, list[Tensor]] | None = None
        self._guarded = False
        self._writer: S.TraceWriter | None = None
        self._snapshots: list[str] = []
        self.factorizations = {n: self._choose_factorization(n) for n in layers}
        self.projection_seed = int(projection_seed)
        self.projection_kind = projection_kind
        self._proj: dict[str, tuple[Tensor, Tensor]] = {}
        self._proj_dev: dict[tuple, tuple[Tensor, Tensor]] = {}
        if projection is not None:
            if mode == "class_batches":
                raise ValueError("projection is available in representation and tracin modes, not class_batches.")
            k_in, k_out = projection if isinstance(projection, tuple) else (projection, projection)
            for li, name in enumerate(layers):
                spec = self.specs[name]
                if spec.groups != 1:
                    raise NotImplementedError(f"Random projection of the grouped conv {name!r} is not supported.")
                self._proj[name] = projection_matrices(
                    spec.d_in, spec.out_features, k_in=k_in, k_out=k_out, seed=self.projection_seed + 1009 * li,
                    kind=projection_kind,
                )
                self.factorizations[name] = "low_rank"
            self.approximations.append(f"random projection ({projection_kind}, k_in={k_in}, k_out={k_out})")

    # ------------------------------------------------------------------ setup
    def _choose_factorization(self, name: str) -> str:
        if self.mode != "representation" or self.factorization != "auto":
            return "low_rank" if self.factorization == "auto" else self.factorization
        return "auto"  # decided at the first call, when the row shapes are known

    def _params(self, name: str) -> list[Tensor]:
        mod = self.modules[name]
        return [mod.weight] + ([mod.bias] if self.specs[name].bias else [])

    def _weights_cpu(self) -> dict[str, dict[str, Tensor]]:
        out = {}
        for name, mod in self.modules.items():
            d = {"weight": mod.weight.detach().to("cpu", copy=True)}
            if mod.bias is not None:
                d["bias"] = mod.bias.detach().to("cpu", copy=True)
            out[name] = d
        return out

    def _trace_json(self) -> dict:
        return {
            "format": S.FORMAT,
            "version": S.VERSION,
            "run_id": self.run_id,
            "mode": self.mode,
            "dtype": self.dtype,
            "world_size": self.world_size,
            "config": {
                "every_n_steps": self.every_n_steps,
                "flush_every_n_steps": self.flush_every_n_steps,
                "strict": self.strict,
                "ghost_samples": self.ghost_samples,
                **self.config,
            },
            "layers": {
                n: {**self.specs[n].to_dict(), "type": self.specs[n].kind, "factorization": self.factorizations[n]}
                for n in self.layers
            },
            "projection": None if not self._proj else {
                "seed": self.projection_seed, "kind": self.projection_kind,
                "dims": {n: [int(q.shape[0]), int(p.shape[0])] for n, (q, p) in self._proj.items()},
            },
            "segments": [],
            "truncations": [],
            "approximations": [],
        }

    def open(self) -> None:
        """Create (or, after :meth:`load_state_dict`, reopen) the store; rank 0 writes ``trace.json`` and W_0."""
        if self._opened:
            return
        meta_path = self.dirpath / "trace.json"
        if self._resume is not None:
            state = self._resume
            if not meta_path.exists():
                raise RuntimeError(f"Cannot resume the trace: {meta_path} does not exist (was the store moved?).")
            meta = S.read_json(meta_path)
            if meta.get("run_id") != state["run_id"] or list(meta["layers"]) != list(state["layers"]):
                raise RuntimeError(
                    f"The trace store {self.dirpath} belongs to run {meta.get('run_id')} with layers "
                    f"{list(meta['layers'])}, but the checkpoint expects run {state['run_id']} with layers "
                    f"{state['layers']}. Point `dirpath` at the original store."
                )
            self.run_id = state["run_id"]
            resume_step = int(state["last_flushed_step"])
            # every rank derives the same new segment index from the saved state (rank 0 may already have
            # appended it to trace.json)
            self.segment = int(state.get("segment", len(meta["segments"]) - 1)) + 1
            if self.rank == 0 and all(s["segment"] != self.segment for s in meta["segments"]):
                meta["segments"].append({"segment": self.segment, "start_step": resume_step})
                meta["truncations"].append({"segment": self.segment, "step": resume_step})
                S.atomic_write_json(meta_path, meta)
            # orphans (unlisted files) of older segments of this rank are removed
            for k in range(self.segment):
                rank_dir = self.dirpath / f"seg_{k}" / f"rank_{self.rank}"
                if (rank_dir / "manifest.json").exists():
                    S.remove_orphans(rank_dir, S.read_json(rank_dir / "manifest.json"))
            self.factorizations = {n: meta["layers"][n]["factorization"] for n in self.layers}
            self.approximations = list(meta.get("approximations", []))
            self._next_step = resume_step
            self.last_complete_step = resume_step
        else:
            if meta_path.exists() and self.rank == 0:
                old = S.read_json(meta_path)
                if old.get("run_id") != self.run_id:
                    if not self.overwrite:
                        raise ValueError(
                            f"{self.dirpath} already holds the trace of another run ({old.get('run_id')}). Pass "
                            "`overwrite=True` to replace it, or choose another `dirpath`."
                        )
                    for child in self.dirpath.iterdir():
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            self.dirpath.mkdir(parents=True, exist_ok=True)
            if self.rank == 0:
                meta = self._trace_json()
                meta["approximations"] = list(self.approximations)
                meta["segments"].append({"segment": 0, "start_step": self._next_step})
                S.atomic_torch_save(self.dirpath / "weights" / "initial.pt", self._weights_cpu())
                if self._proj:
                    S.atomic_torch_save(self.dirpath / "projection.pt", {n: {"Q": q, "P": p}
                                                                        for n, (q, p) in self._proj.items()})
                S.atomic_write_json(meta_path, meta)
            self.last_complete_step = self._next_step
        self._writer = S.TraceWriter(self.dirpath, segment=self.segment, rank=self.rank, start_step=self._next_step)
        self._opened = True

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._make_hook(name)))

    def detach(self) -> None:
        """Remove all hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._active = False

    def __enter__(self) -> TraceRecorder:
        self.open()
        self.attach()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(interrupted=exc_type is not None)

    def close(self, *, interrupted: bool = False) -> None:
        """Flush complete steps, mark the segment ``finished``/``interrupted`` and remove the hooks."""
        self.detach()
        self._pending = []
        if self._writer is not None:
            self.flush()
            self._writer.set_status("interrupted" if interrupted else "finished")

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not self._active or not torch.is_grad_enabled() or not self._pending or in_extra_forward():
                return  # extra forwards of other reprlens callbacks (noise references, head re-runs) are not steps
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            slot: list = [inputs[0].detach(), None]
            self._pending[-1]["calls"][name].append(slot)

            def grad_hook(g: Tensor) -> None:
                slot[1] = g.detach()

            output.register_hook(grad_hook)

        return hook

    # ------------------------------------------------------------------ step protocol
    def begin_step(
        self, ids: Tensor | Sequence[int] | Sequence[str], labels: Tensor | None = None, *, step: int | None = None
    ) -> None:
        """Start a (micro-)batch of step ``step`` (default: the next step) with these example ids.

        With gradient accumulation, call it for every micro-batch of a step; rows are committed at
        :meth:`end_step`.
        """
        if not self._opened:
            self.open()
        step = self._next_step if step is None else int(step)
        if self._step is not None and step != self._step and self._pending:
            self._pending = []  # a step that never reached end_step (e.g. skipped by the user)
        self._step = step
        if self.mode == "tracin" or step % self.every_n_steps != 0:
            self._active = False
            if self.mode == "tracin":
                self._step_state.setdefault("step", step)
            return
        ids_t = to_id_tensor(ids)
        lab = None if labels is None else torch.as_tensor(labels).reshape(-1)
        self._pending.append({"ids": ids_t, "labels": lab, "calls": {n: [] for n in self.layers}})
        self._active = True

    def pause(self) -> None:
        """Stop recording until the next :meth:`begin_step` (end of a micro-batch without optimizer step)."""
        self._active = False

    def _guards(self, optimizer: torch.optim.Optimizer) -> None:
        if self._guarded:
            return
        self._guarded = True
        tracked = {id(p): n for n in self.layers for p in self._params(n)}
        groups_of: dict[int, list[int]] = {}
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) in tracked:
                    groups_of.setdefault(id(p), []).append(gi)
        for pid, name in tracked.items():
            if len(groups_of.get(pid, [])) > 1:
                raise RuntimeError(f"A parameter of tracked layer {name!r} appears in several param groups.")
        self._groups = {
            n: optimizer.param_groups[groups_of.get(id(self.modules[n].weight), [0])[0]] for n in self.layers
        }
        if self.mode != "representation":
            return
        problems = []
        if type(optimizer) is not torch.optim.SGD:
            problems.append(f"optimizer {type(optimizer).__name__} (only plain torch.optim.SGD is exact)")
        for n, g in self._groups.items():
            if g.get("momentum", 0):
                problems.append(f"momentum={g['momentum']} on layer {n!r}")
            if g.get("nesterov", False):
                problems.append(f"nesterov on layer {n!r}")
            if g.get("weight_decay", 0):
                problems.append(f"weight_decay={g['weight_decay']} on layer {n!r}")
        self._report_problems(problems)

    def _report_problems(self, problems: list[str]) -> None:
        if not problems:
            return
        msg = (
            "Representation mode decomposes the update exactly only under plain SGD; found "
            + "; ".join(problems)
            + ". Fix: use torch.optim.SGD without momentum/weight decay/clipping, or mode='class_batches' (any "
            "optimizer), or strict=False to record an approximate trace."
        )
        if self.strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
        self._inexact_update = True  # the update checks will fail by design: already warned above
        for p in problems:
            if p not in self.approximations:
                self.approximations.append(p)

    def note_gradient_clipping(self, clip_val: float | None) -> None:
        """Tell the recorder that gradients are clipped (breaks exactness in representation mode)."""
        if clip_val and self.mode == "representation":
            self._report_problems([f"gradient_clip_val={clip_val}"])

    def before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, *, loss_scale: Tensor | float | None = None
    ) -> None:
        """Read the learning rate (and AMP scale) of this step; run the guards and consistency checks.

        Call it after the backward pass(es) and before ``optimizer.step()``; gradients must be unscaled.
        """
        self._guards(optimizer)
        self._active = False
        name0 = self.layers[0]
        group = self._groups[name0]
        lr = group["lr"]
        lr = float(lr) if not isinstance(lr, Tensor) else lr.detach().double()
        sign = 1.0 if group.get("maximize", False) else -1.0
        self._step_state.update({"lr": lr, "sign": sign, "scale": loss_scale})
        step = self._step if self._step is not None else self._next_step
        check = self.mode == "representation" and (step // self.every_n_steps) % self.check_every_n_steps == 0
        if self.mode == "class_batches" or (check and self.world_size == 1 and self._pending):
            self._step_state["w_before"] = {
                n: [p.detach().clone() for p in self._params(n)] for n in self.layers
            }
        if self.mode == "class_batches" and self._w_after is not None:
            for n in self.layers:
                drift = [b - a for b, a in zip(self._step_state["w_before"][n], self._w_after[n])]
                self._step_state.setdefault("drift", {})[n] = drift
        if check and self.world_size == 1 and self._pending:
            scale = 1.0 if loss_scale is None else loss_scale
            for n in self.layers:
                sw, sb = self._sum_rows_grad(n)
                if sw is None:
                    continue
                p = self._params(n)
                if p[0].grad is None:
                    continue
                ref = torch.cat([p[0].grad.reshape(-1)] + ([p[1].grad.reshape(-1)] if len(p) > 1 else []))
                got = torch.cat([sw.reshape(-1)] + ([sb.reshape(-1)] if sb is not None else [])) / scale
                err = (got - ref).norm() / ref.norm().clamp_min(torch.finfo(ref.dtype).tiny)
                self._checks.append((step, f"factor:{n}", err))
                # autocast (fp16/bf16 activations or gradients) rounds the layer's own weight gradient: the
                # tolerance follows the lowest precision involved
                low = min((torch.finfo(t.dtype).eps for mb in self._pending for call in mb["calls"][n]
                           for t in call if t is not None and t.dtype.is_floating_point), default=0.0)
                tol = max(1e-4, 8 * low)
                self._check_tol[f"factor:{n}"] = tol
                self._check_tol[f"update:{n}"] = tol
                self._step_state.setdefault("sum_rows", {})[n] = got

    def _sum_rows_grad(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        sw = sb = None
        for mb in self._pending:
            for a, g in mb["calls"][name]:
                if g is None:
                    continue
                w, b = per_example_grads(self.specs[name], a, g)
                sw = w.sum(0) if sw is None else sw + w.sum(0)
                if b is not None:
                    sb = b.sum(0) if sb is None else sb + b.sum(0)
        return sw, sb

    def end_step(self, *, stepped: bool | Tensor = True) -> None:
        """Commit the rows of this step (all its micro-batches); ``stepped=False`` drops them (skipped step)."""
        self._active = False
        step = self._step if self._step is not None else self._next_step
        st = self._step_state
        if self.mode == "tracin":
            lr = st.get("lr")
            if lr is not None:  # summed for lr_weighting="interval_sum" (see interval_lr_sum)
                lr_v = lr if not isinstance(lr, Tensor) else lr.to(torch.float64)
                self._lr_interval = self._lr_interval + (lr_v * torch.as_tensor(stepped, dtype=torch.float64)
                                                         if isinstance(stepped, Tensor) else lr_v * bool(stepped))
            self._step_state = {}
            self._next_step = step + 1
            self._step = None
            return
        lr = st.get("lr", 0.0)
        if self.mode == "representation" and self._pending:
            sign = st.get("sign", -1.0)
            scale = st.get("scale")
            n_rows = self._commit_rows(step)
            self._buf_steps.append(
                {"step": step, "lr": lr, "sign": sign * self.every_n_steps, "scale": scale, "stepped": stepped,
                 "class": -1, "n_rows": n_rows}
            )
            if "w_before" in st and "sum_rows" in st:
                for n in self.layers:
                    if n not in st["sum_rows"]:
                        continue
                    after = torch.cat([p.detach().reshape(-1) for p in self._params(n)])
                    before = torch.cat([p.reshape(-1) for p in st["w_before"][n]])
                    upd = after - before
                    lr_t = lr if not isinstance(lr, Tensor) else lr.to(upd.dtype)
                    expect = sign * lr_t * st["sum_rows"][n] / self.world_size
                    err = (upd - expect).norm() / upd.norm().clamp_min(torch.finfo(upd.dtype).tiny)
                    self._checks.append((step, f"update:{n}", torch.where(torch.as_tensor(stepped), err, 0 * err)))
        elif self.mode == "class_batches" and self._pending:
            self._commit_class_step(step, stepped)
        self._pending = []
        self._step_state = {}
        self._next_step = step + 1
        self._step = None
        n_steps = len(self._buf_steps)
        if n_steps >= self.flush_every_n_steps or self._buf_bytes > self.max_buffer_bytes:
            self.flush()

    def _ids_for(self, mb: dict, n_rows: int) -> tuple[Tensor, Tensor | None]:
        ids = mb["ids"]
        n = ids.numel()
        labels = mb["labels"]
        if n_rows == n:
            return ids, labels
        if n > 0 and n_rows % n == 0:
            m = n_rows // n
            return ids.repeat(m), None if labels is None else labels.repeat(m)
        raise RuntimeError(
            f"A tracked layer was called on {n_rows} rows but the batch has {n} example ids (neither equal nor a "
            "multiple, e.g. concatenated views). Pass a per-row `example_id_fn` that returns one id per row."
        )

    def _commit_rows(self, step: int) -> int:
        total = 0
        for name in self.layers:
            spec = self.specs[name]
            for mb in self._pending:
                for call_idx, (a, g) in enumerate(mb["calls"][name]):
                    if g is None:
                        continue
                    rows = a.shape[0]
                    ids, labels = self._ids_for(mb, rows)
                    fact = self.factorizations[name]
                    if fact == "auto":
                        numel_w = spec.weight_numel
                        fact = "full" if numel_w < a[0].numel() + g[0].numel() else "low_rank"
                        self.factorizations[name] = fact
                        if self.rank == 0:
                            self._update_meta(lambda m, n=name, f=fact: m["layers"][n].__setitem__("factorization", f))
                    if name in self._proj:
                        q, p = self._proj_on(name, a)
                        a, g = project_factors(spec, a, g.to(a.dtype), q, p)
                    if fact == "full":
                        w, b = per_example_grads(spec, a, g)
                        d = torch.cat([w.flatten(1)] + ([b] if b is not None else []), 1)
                        d_s, d_e = _frexp_scale(d)
                        a_s = torch.zeros(rows, 0, dtype=a.dtype, device=a.device)
                        a_e = torch.zeros(rows, dtype=torch.int8, device=a.device)
                    else:
                        a_s, a_e = _frexp_scale(a)
                        d_s, d_e = _frexp_scale(g.to(a.dtype) if g.dtype != a.dtype else g)
                    part = {
                        "a": a_s, "d": d_s, "a_exp": a_e, "d_exp": d_e, "ids": ids,
                        "labels": labels, "step": step, "call": min(call_idx, 255),
                    }
                    self._buffers[name].append(part)
                    self._buf_bytes += a_s.numel() * a_s.element_size() + d_s.numel() * d_s.element_size()
                    total += rows
        return total

    def _proj_on(self, name: str, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (name, like.device, like.dtype)
        if key not in self._proj_dev:
            q, p = self._proj[name]
            self._proj_dev[key] = (q.to(like.device, like.dtype), p.to(like.device, like.dtype))
        return self._proj_dev[key]

    def _commit_class_step(self, step: int, stepped: bool | Tensor) -> None:
        st = self._step_state
        ids = torch.cat([mb["ids"] for mb in self._pending])
        labels = [mb["labels"] for mb in self._pending]
        labels_t = torch.cat(labels) if all(lab is not None for lab in labels) else torch.full_like(ids, -1)
        gh = self.ghost_samples
        n = ids.numel()
        ghost = torch.zeros(n, dtype=torch.bool)
        if gh:
            per_mb = []
            for mb in self._pending:
                k = mb["ids"].numel()
                gflag = torch.zeros(k, dtype=torch.bool)
                gflag[max(0, k - gh):] = True
                per_mb.append(gflag)
            ghost = torch.cat(per_mb)
        labels_t = labels_t.to(ids.device)
        real = ~ghost.to(ids.device)
        first_label = labels_t[real][:1] if real.any() else labels_t[:1]
        cls = first_label.reshape(-1)[0] if first_label.numel() else torch.tensor(-1)
        if all(lab is not None for lab in labels):
            impure = (labels_t[real] != cls).any()
            self._checks.append((step, "purity", impure.to(torch.float64)))
        for name in self.layers:
            after = [p.detach() for p in self._params(name)]
            delta = torch.cat([(a - b).reshape(-1) for a, b in zip(after, st["w_before"][name])])[None]
            parts = [(delta, cls, 0)]
            drift = st.get("drift", {}).get(name)
            if drift is not None:
                dvec = torch.cat([d.reshape(-1) for d in drift])[None]
                parts.append((dvec, torch.tensor(-1), 1))
            for vec, c, kind in parts:
                self._buffers[name].append(
                    {"delta": vec, "step": step, "class": c, "kind": kind, "stepped": stepped}
                )
                self._buf_bytes += vec.numel() * vec.element_size()
            if self._w_after is None:
                self._w_after = {}
            self._w_after[name] = [p.detach().clone() for p in after]
        self._buffers.setdefault("__members__", []).append(
            {"ids": ids, "labels": labels_t, "ghost": ghost, "step": step}
        )
        self._buf_steps.append(
            {"step": step, "lr": st.get("lr", 0.0), "sign": 1.0, "scale": None, "stepped": stepped,
             "class": cls, "n_rows": n}
        )

    def _update_meta(self, fn: Callable[[dict], None]) -> None:
        path = self.dirpath / "trace.json"
        meta = S.read_json(path)
        fn(meta)
        S.atomic_write_json(path, meta)

    # ------------------------------------------------------------------ flush
    def flush(self, *, sync: bool = True) -> int:
        """Write buffered complete steps as one shard set and commit the manifest; returns last_complete_step."""
        if self._writer is None:
            return self.last_complete_step
        if not self._buf_steps and self._next_step <= self.last_complete_step:
            return self.last_complete_step
        first = self.last_complete_step
        end = max(self._next_step, first)
        np_dt = DTYPES[self.dtype]
        # per-step metadata (the only host sync of the trace: once per flush)
        steps = np.zeros(len(self._buf_steps), dtype=S.STEP_DTYPE)
        stepped_of: dict[int, bool] = {}
        for i, s in enumerate(self._buf_steps):
            lr = float(s["lr"]) if not isinstance(s["lr"], Tensor) else float(s["lr"].item())
            scale = 1.0 if s["scale"] is None else float(torch.as_tensor(s["scale"]).double().item())
            stepped = bool(torch.as_tensor(s["stepped"]).item())
            cls = int(torch.as_tensor(s["class"]).item())
            kappa = s["sign"] * lr / (self.world_size * scale)
            steps[i] = (s["step"], lr, kappa, scale, stepped, cls, s["n_rows"])
            stepped_of[s["step"]] = stepped
        checks = []
        for step, what, err in self._checks:
            val = float(err.item())
            checks.append({"step": step, "check": what, "error": val})
            tol = self._check_tol.get(what, 1e-4) if what != "purity" else 0.5
            if what == "purity" and val > 0:
                raise ValueError(
                    f"Step {step} is not class-pure: its non-ghost rows have several labels. class_batches mode "
                    "needs `ClassPureBatchSampler` batches (labels first, ghosts last)."
                )
            if val > tol and what.startswith("update:") and getattr(self, "_inexact_update", False):
                continue  # expected: the optimizer/settings were reported as approximate when training began
            if val > tol and what != "purity":
                msg = (
                    f"Trace consistency check {what} failed at step {step}: relative error {val:.3g} > {tol:g}. "
                    "Something changes the gradient or the update beyond the recorded rows (weight tying, an "
                    "unhooked call, hidden weight decay, an optimizer wrapper, external edits, or this layer sitting "
                    "inside an ExplanationRegularization head, whose second-order score gradient has no per-example "
                    "factors: trace a layer below the regularizer's source layer instead)."
                )
                if self.strict and self.mode == "representation":
                    raise RuntimeError(msg)
                warnings.warn(msg, stacklevel=2)
                if msg not in self.approximations:
                    self.approximations.append(f"check {what} failed at step {step} ({val:.3g})")
        layers_out: dict[str, list[dict[str, np.ndarray]]] = {}
        if self.mode == "representation":
            for name in self.layers:
                groups: dict[tuple, list[dict]] = {}
                for part in self._buffers[name]:
                    if not stepped_of.get(part["step"], True):
                        continue
                    key = (tuple(part["a"].shape[1:]), tuple(part["d"].shape[1:]))
                    groups.setdefault(key, []).append(part)
                outs = []
                for parts in groups.values():
                    a = torch.cat([p["a"] for p in parts]).to(_TORCH_DTYPES[self.dtype])
                    d = torch.cat([p["d"] for p in parts]).to(_TORCH_DTYPES[self.dtype])
                    n = a.shape[0]
                    rows = np.zeros(n, dtype=S.ROW_DTYPE)
                    rows["id"] = torch.cat([p["ids"] for p in parts]).cpu().numpy()
                    rows["step"] = np.concatenate([np.full(p["ids"].numel(), p["step"]) for p in parts])
                    rows["call"] = np.concatenate([np.full(p["ids"].numel(), p["call"]) for p in parts])
                    rows["a_exp"] = torch.cat([p["a_exp"] for p in parts]).cpu().numpy()
                    rows["d_exp"] = torch.cat([p["d_exp"] for p in parts]).cpu().numpy()
                    rows["label"] = np.concatenate(
                        [p["labels"].cpu().numpy() if p["labels"] is not None else np.full(p["ids"].numel(), -1)
                         for p in parts]
                    )
                    outs.append({"a": a.cpu().numpy(), "d": d.cpu().numpy(), "rows": rows})
                layers_out[name] = outs
        elif self.mode == "class_batches":
            for name in self.layers:
                parts = [p for p in self._buffers[name] if stepped_of.get(p["step"], True) or p["kind"] == 1]
                if not parts:
                    continue
                delta = torch.cat([p["delta"] for p in parts]).to(_TORCH_DTYPES[self.dtype]).cpu().numpy()
                rows = np.zeros(len(parts), dtype=S.ROW_DTYPE)
                rows["id"] = -1
                rows["step"] = [p["step"] for p in parts]
                rows["call"] = [p["kind"] for p in parts]
                rows["label"] = [int(torch.as_tensor(p["class"]).item()) for p in parts]
                layers_out[name] = [{"delta": delta, "rows": rows}]
            mem = self._buffers.get("__members__", [])
            if mem:
                n = sum(m["ids"].numel() for m in mem)
                rows = np.zeros(n, dtype=S.ROW_DTYPE)
                rows["id"] = torch.cat([m["ids"] for m in mem]).cpu().numpy()
                rows["step"] = np.concatenate([np.full(m["ids"].numel(), m["step"]) for m in mem])
                rows["label"] = torch.cat([m["labels"] for m in mem]).cpu().numpy()
                rows["ghost"] = torch.cat([m["ghost"] for m in mem]).cpu().numpy()
                layers_out["__members__"] = [{"rows": rows}]
        snapshot = None
        if self.rank == 0:
            snapshot = (f"step_{end}.pt", self._weights_cpu())
        self._writer.write(first, end, layers_out, steps, checks=checks, snapshot=snapshot)
        if snapshot is not None:
            self._snapshots.append(snapshot[0])
            while len(self._snapshots) > 3:
                old = self._snapshots.pop(0)
                try:
                    (self.dirpath / "weights" / old).unlink()
                except OSError:
                    pass
        if self.approximations and self.rank == 0:
            approx = list(self.approximations)
            self._update_meta(lambda m: m.__setitem__("approximations", sorted(set(m["approximations"]) | set(approx))))
        self._buffers = {n: [] for n in self._buffers}
        self._buf_steps = []
        self._buf_bytes = 0
        self._checks = []
        self.last_complete_step = end
        return end

    def save_weights(self, name: str) -> None:
        """Rank 0: snapshot the tracked layers' weights as ``weights/<name>.pt`` (e.g. at checkpoint saves)."""
        if self.rank == 0:
            S.atomic_torch_save(self.dirpath / "weights" / f"{name}.pt", self._weights_cpu())

    # ------------------------------------------------------------------ tracin
    def interval_lr_sum(self, *, reset: bool = True) -> float:
        """Sum of the learning rates of the optimizer steps since the last call (tracin ``"interval_sum"``)."""
        total = self._lr_interval
        if reset:
            self._lr_interval = 0.0
        return float(total.item()) if isinstance(total, Tensor) else float(total)

    def checkpoint(
        self,
        model: nn.Module,
        loader: Iterable,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        *,
        lr: float,
        step: int | None = None,
        epoch: int | None = None,
        example_id_fn: Callable[[Any], Any] | None = None,
        progress: bool = False,
    ) -> None:
        """Tracin: save a checkpoint and store per-example loss-gradient factors of the tracked layers.

        Runs ``loss_fn(model, batch) -> (N,)`` over ``loader`` in eval mode with autocast off and the RNG states
        (torch, CUDA, numpy, python) restored afterwards; only activation gradients are computed (``.grad`` of
        the parameters is untouched).
        """
        if not self._opened:
            self.open()
        model = unwrap_model(model)
        step = self._next_step if step is None else int(step)
        id_fn = example_id_fn or default_example_ids
        if self.rank == 0:
            ckpt_dir = self.dirpath / "checkpoints"
            S.atomic_torch_save(
                ckpt_dir / f"step_{step}.pt",
                {"state_dict": copy.deepcopy(model.state_dict()), "lr": float(lr), "step": step, "epoch": epoch},
            )
        rng = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        was_training = model.training
        self.flush()
        parts: dict[str, list[dict]] = {n: [] for n in self.layers}
        captured: dict[str, list[Tensor]] = {}

        def make(name):
            def hook(mod, inputs, output):
                captured.setdefault(name, []).append((inputs[0].detach(), output))
            return hook

        handles = [self.modules[n].register_forward_hook(make(n)) for n in self.layers]
        try:
            model.eval()
            iterator = loader
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(loader, desc="trace checkpoint pass")
            with torch.autocast(device_type="cuda", enabled=False), torch.inference_mode(False), torch.enable_grad():
                for batch in iterator:
                    captured.clear()
                    ids = to_id_tensor(id_fn(batch))
                    loss = loss_fn(model, batch)
                    if loss.dim() != 1:
                        raise ValueError(
                            f"Tracin `loss_fn(module, batch)` must return per-example losses (N,), got shape "
                            f"{tuple(loss.shape)}. Use reduction='none'."
                        )
                    outs = [o for n in self.layers for (_, o) in captured.get(n, [])]
                    grads = torch.autograd.grad(loss.sum(), outs, allow_unused=True)
                    k = 0
                    for n in self.layers:
                        for call, (a, _) in enumerate(captured.get(n, [])):
                            g = grads[k]
                            k += 1
                            if g is None:
                                continue
                            r_ids = ids if a.shape[0] == ids.numel() else ids.repeat(a.shape[0] // ids.numel())
                            if n in self._proj:
                                q, p = self._proj_on(n, a)
                                a, g = project_factors(self.specs[n], a, g.to(a.dtype), q, p)
                            a_s, a_e = _frexp_scale(a)
                            d_s, d_e = _frexp_scale(g)
                            parts[n].append({"a": a_s, "d": d_s, "a_exp": a_e, "d_exp": d_e, "ids": r_ids,
                                             "call": call})
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
            torch.set_rng_state(rng[0])
            np.random.set_state(rng[1])
            random.setstate(rng[2])
            if rng[3] is not None:
                torch.cuda.set_rng_state_all(rng[3])
        tdt = _TORCH_DTYPES[self.dtype]
        layers_out = {}
        for n, ps in parts.items():
            if not ps:
                continue
            rows = np.zeros(sum(p["ids"].numel() for p in ps), dtype=S.ROW_DTYPE)
            rows["id"] = torch.cat([p["ids"] for p in ps]).cpu().numpy()
            rows["step"] = step
            rows["call"] = np.concatenate([np.full(p["ids"].numel(), p["call"]) for p in ps])
            rows["a_exp"] = torch.cat([p["a_exp"] for p in ps]).cpu().numpy()
            rows["d_exp"] = torch.cat([p["d_exp"] for p in ps]).cpu().numpy()
            rows["label"] = -1
            layers_out[n] = [{
                "a": torch.cat([p["a"] for p in ps]).to(tdt).cpu().numpy(),
                "d": torch.cat([p["d"] for p in ps]).to(tdt).cpu().numpy(),
                "rows": rows,
            }]
        steps = np.zeros(1, dtype=S.STEP_DTYPE)
        n_total = sum(p["ids"].numel() for p in parts.get(self.layers[0], []))
        steps[0] = (step, float(lr), 0.0, 1.0, True, -1, n_total)
        first = self.last_complete_step
        end = max(self._next_step, first)
        self._writer.write(first, end, layers_out, steps)
        self._writer.manifest["shards"][-1]["checkpoint"] = step
        S.atomic_write_json(self._writer.dir / "manifest.json", self._writer.manifest)
        self.last_complete_step = end

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Flush synchronously and return the resume state (``last_flushed_step`` = last complete step)."""
        if self._writer is not None:
            self.flush()
        return {
            "version": S.VERSION,
            "run_id": self.run_id,
            "dirpath": str(self.dirpath),
            "mode": self.mode,
            "layers": list(self.layers),
            "last_flushed_step": int(self.last_complete_step),
            "segment": self.segment,
        }

    def load_state_dict(self, state: dict) -> None:
        """Stash a resume state; :meth:`open` applies it (new segment, truncation at the resume step)."""
        for key in ("run_id", "layers", "last_flushed_step"):
            if key not in state:
                raise ValueError(f"Trace state dict lacks {key!r}; got keys {sorted(state)}.")
        self._resume = dict(state)
        self.run_id = state["run_id"]

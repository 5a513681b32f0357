"""TrainingTrace: record what each training example contributed to chosen layers (Pfahler & Morik 2021; TracIn).

A thin Lightning driver around :class:`reprlens.trace.TraceRecorder`; read the result with
:class:`reprlens.trace.TraceReader` (``callback.reader()``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from reprlens.trace.ids import default_example_ids
from reprlens.trace.reader import TraceReader
from reprlens.trace.recorder import DTYPES, MODES, TraceRecorder
from reprlens.utils import check_positive_int, get_module

try:  # pragma: no cover - typing only
    from typing_extensions import override
except ImportError:  # pragma: no cover
    def override(f):  # type: ignore[no-redef]
        return f

__all__ = ["TrainingTrace"]


def _default_labels(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping):
        for key in ("label", "labels", "y", "target"):
            value = batch.get(key)
            # class labels only: one integer per row (regression targets are not labels)
            if isinstance(value, Tensor) and value.ndim == 1 and not value.is_floating_point():
                return value
    return None


class TrainingTrace(Callback):
    """Record per-example contributions of training to the weights of chosen Linear/Conv2d layers.

    Modes:
        * ``"representation"`` (default): the paper's exact per-example decomposition under plain SGD. The final
          change of any test input's layer pre-activation splits exactly into per-training-example parts.
          Momentum, weight decay, other optimizers and gradient clipping are refused (``strict=True``) or
          recorded as approximations.
        * ``"class_batches"``: the paper's mini-batch protocol with :class:`reprlens.trace.ClassPureBatchSampler`
          (class-pure batches + ghosts); any optimizer; each step's weight change is attributed to its class.
        * ``"tracin"``: per-example loss-gradient factors at checkpoints; influence equals Captum ``TracInCP``.

    Args:
        layers: dotted module names (``nn.Linear`` / ``nn.Conv2d``).
        mode: see above.
        dirpath: store directory (default ``<trainer.log_dir>/trace``).
        dtype: factor storage dtype (``float16`` halves the payload).
        every_n_steps: representation: record every n-th step (approximate when n > 1); tracin: checkpoint
            every n steps (None: each epoch end).
        example_id_fn: ``batch -> ids`` (default: ``batch["index"]`` of dict batches, see
            :mod:`reprlens.trace.ids`).
        label_fn: ``batch -> labels`` (default: ``batch["label"]`` when present).
        flush_every_n_steps: steps between crash-safe commits.
        strict: refuse settings that break exactness.
        factorization: ``"auto"``, ``"low_rank"`` or ``"full"``.
        aggregate, keep_factors: not implemented in this version (must stay at their defaults; the reader builds
            the aggregate on demand with ``TraceReader.aggregate``).
        projection: store randomly projected factors with ``k`` or ``(k_in, k_out)`` dims (unbiased dot products;
            the trace is reported approximate).
        num_examples: dataset size (for the storage estimate).
        projection_seed: seed of the projection matrices (identical on all ranks).
        ghost_samples: class_batches: ghosts per batch (None: read from the train sampler).
        loss_fn: tracin: ``(module, batch) -> (N,)`` per-example losses.
        tracin_dataloader: tracin: deterministic loader (or a callable returning one) of id-carrying batches;
            None uses the train loader with a warning.
        lr_weighting: tracin: ``"at_checkpoint"`` (Captum parity) or ``"interval_sum"``.
        check_every_n_steps: steps between on-device consistency checks.
        max_buffer_bytes: flush earlier past this buffered size.
        max_bytes: raise at the first step if the estimated store size exceeds it.
        overwrite: replace a store that holds another run's trace.

    Example:
        >>> cb = TrainingTrace("head", dirpath="trace_dir")
        >>> cb.mode
        'representation'
    """

    def __init__(
        self,
        layers: str | Sequence[str],
        mode: Literal["representation", "class_batches", "tracin"] = "representation",
        dirpath: str | os.PathLike | None = None,
        dtype: Literal["float32", "float16", "float64"] = "float32",
        every_n_steps: int | None = None,
        example_id_fn: Callable[[Any], Any] | None = None,
        label_fn: Callable[[Any], Tensor] | None = None,
        flush_every_n_steps: int = 50,
        strict: bool = True,
        factorization: Literal["auto", "low_rank", "full"] = "auto",
        aggregate: bool = False,
        keep_factors: bool = True,
        num_examples: int | None = None,
        projection: int | tuple[int, int] | None = None,
        projection_seed: int = 0,
        ghost_samples: int | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        tracin_dataloader: Iterable | Callable[[], Iterable] | None = None,
        lr_weighting: Literal["at_checkpoint", "interval_sum"] = "at_checkpoint",
        check_every_n_steps: int = 100,
        max_buffer_bytes: int = 256 * 2**20,
        max_bytes: int | None = None,
        overwrite: bool = False,
    ) -> None:
        if isinstance(layers, str):
            layers = [layers]
        if not layers or not all(isinstance(n, str) and n for n in layers):
            raise ValueError(f"Expected `layers` to be a non-empty list of dotted module names, got {layers!r}.")
        if mode not in MODES:
            raise ValueError(f"Expected `mode` in {MODES}, but got {mode!r}.")
        if dtype not in DTYPES:
            raise ValueError(f"Expected `dtype` in {tuple(DTYPES)}, but got {dtype!r}.")
        if factorization not in ("auto", "low_rank", "full"):
            raise ValueError(f"Expected `factorization` in ('auto', 'low_rank', 'full'), got {factorization!r}.")
        check_positive_int(every_n_steps, "every_n_steps", allow_none=True)
        check_positive_int(flush_every_n_steps, "flush_every_n_steps")
        check_positive_int(check_every_n_steps, "check_every_n_steps")
        check_positive_int(max_buffer_bytes, "max_buffer_bytes")
        check_positive_int(max_bytes, "max_bytes", allow_none=True)
        check_positive_int(num_examples, "num_examples", allow_none=True)
        check_positive_int(ghost_samples, "ghost_samples", allow_none=True, minimum=0)
        if mode == "tracin" and loss_fn is None:
            raise ValueError("mode='tracin' needs `loss_fn(module, batch) -> (N,)` per-example losses.")
        if mode == "class_batches" and every_n_steps not in (None, 1):
            raise ValueError(f"mode='class_batches' needs every_n_steps=1 (or None), got {every_n_steps}.")
        if lr_weighting not in ("at_checkpoint", "interval_sum"):
            raise ValueError(f"Expected lr_weighting in ('at_checkpoint', 'interval_sum'), got {lr_weighting!r}.")
        if projection is not None:
            ks = projection if isinstance(projection, tuple) else (projection,)
            if len(ks) not in (1, 2) or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks):
                raise ValueError(f"Expected projection dims > 0 (k or (k_in, k_out)), got {projection!r}.")
            if mode == "class_batches":
                raise ValueError("projection is available in representation and tracin modes, not class_batches.")
        if aggregate or not keep_factors:
            raise NotImplementedError("aggregate=True / keep_factors=False are not implemented in the recorder yet; "
                                      "the reader builds the aggregate on demand (`TraceReader.aggregate`).")
        if example_id_fn is not None and not callable(example_id_fn):
            raise TypeError(f"`example_id_fn` must be callable, got {type(example_id_fn).__name__}.")
        self.layers = list(layers)
        self.mode = mode
        self.dirpath = None if dirpath is None else str(dirpath)
        self.dtype = dtype
        self.every_n_steps = every_n_steps
        self.example_id_fn = example_id_fn
        self.label_fn = label_fn
        self.flush_every_n_steps = flush_every_n_steps
        self.strict = strict
        self.factorization = factorization
        self.num_examples = num_examples
        self.projection = projection
        self.projection_seed = projection_seed
        self.ghost_samples = ghost_samples
        self.loss_fn = loss_fn
        self.tracin_dataloader = tracin_dataloader
        self.lr_weighting = lr_weighting
        self.check_every_n_steps = check_every_n_steps
        self.max_buffer_bytes = max_buffer_bytes
        self.max_bytes = max_bytes
        self.overwrite = overwrite
        self.recorder: TraceRecorder | None = None
        self._stash: dict | None = None
        self._gs_at_start = -1
        self._scale_before: Tensor | None = None
        self._estimated = False
        self._last_lr: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, mode=self.mode, dirpath=self.dirpath)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for name in self.layers:
            get_module(pl_module, name)  # unknown names list the closest ones
        if self.dirpath is None:
            base = trainer.log_dir or trainer.default_root_dir
            self.dirpath = str(Path(base) / "trace")
        ghosts = self.ghost_samples
        if self.mode == "class_batches" and ghosts is None:
            ghosts = 0
        self.recorder = TraceRecorder(
            pl_module, self.layers, self.dirpath, mode=self.mode, dtype=self.dtype,
            flush_every_n_steps=self.flush_every_n_steps, rank=trainer.global_rank, world_size=trainer.world_size,
            strict=self.strict, factorization=self.factorization,
            every_n_steps=(self.every_n_steps or 1) if self.mode != "tracin" else 1,
            ghost_samples=ghosts or 0, check_every_n_steps=self.check_every_n_steps,
            max_buffer_bytes=self.max_buffer_bytes, overwrite=self.overwrite,
            projection=self.projection, projection_seed=self.projection_seed,
            config={"lightning": True, "tracin_every_n_steps": self.every_n_steps if self.mode == "tracin" else None},
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rec = self._rec()
        if not pl_module.automatic_optimization:
            raise RuntimeError("TrainingTrace needs automatic optimization (manual optimization is not supported).")
        strategy = type(trainer.strategy).__name__
        if any(k in strategy for k in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise RuntimeError(f"TrainingTrace does not support the {strategy} strategy (sharded parameters); use DDP.")
        if self._stash is not None:
            rec.load_state_dict(self._stash)
            self._stash = None
        # rank 0 writes trace.json first (or checks another run's store), the other ranks wait
        if trainer.global_rank == 0:
            rec.open()
        trainer.strategy.barrier("reprlens_trace_open")
        if trainer.global_rank != 0:
            rec.open()
        rec.note_gradient_clipping(trainer.gradient_clip_val)
        if isinstance(pl_module, torch.nn.Module) and type(getattr(trainer, "model", None)).__name__ == "OptimizedModule":
            rank_zero_warn("TrainingTrace: torch.compile'd modules need the hooks before the first compiled call.")
        rec.attach()

    def _rec(self) -> TraceRecorder:
        if self.recorder is None:
            raise RuntimeError("TrainingTrace was not set up: add it to a Trainer and call `fit`.")
        return self.recorder

    def _ids(self, batch: Any) -> Tensor:
        fn = self.example_id_fn or default_example_ids
        return fn(batch)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        rec = self._rec()
        self._gs_at_start = trainer.global_step
        if self.mode == "tracin":
            rec.begin_step([], step=trainer.global_step)
            return
        if not self._estimated:
            self._estimated = True
            if self.mode == "class_batches" and self.ghost_samples is None:
                sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
                rec.ghost_samples = int(getattr(sampler, "ghost_samples", 0) or 0)
            self._estimate(trainer, batch)
        ids = self._ids(batch)
        labels = self.label_fn(batch) if self.label_fn is not None else _default_labels(batch)
        rec.begin_step(ids, labels, step=trainer.global_step)

    def _estimate(self, trainer: pl.Trainer, batch: Any) -> None:
        rec = self._rec()
        try:
            n_per_step = len(self._ids(batch)) * max(1, trainer.accumulate_grad_batches)
            per_row = 0
            for name in self.layers:
                spec = rec.specs[name]
                per_row += spec.weight_numel if rec.factorizations[name] == "full" else 0
            steps = int(trainer.estimated_stepping_batches)
        except Exception:  # pragma: no cover - estimate is best effort
            return
        if per_row == 0:
            return  # low-rank sizes are known after the first backward; see the first flush
        est = steps * n_per_step * per_row * DTYPES[self.dtype]().itemsize
        rank_zero_info(f"TrainingTrace: estimated store size {est / 2**30:.2f} GiB.")
        if self.max_bytes is not None and est > self.max_bytes:
            raise ValueError(f"Estimated trace size {est} B exceeds max_bytes={self.max_bytes}.")

    def _scaler(self, trainer: pl.Trainer):
        return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        rec = self._rec()
        scaler = self._scaler(trainer)
        scale = None
        if scaler is not None and getattr(scaler, "_scale", None) is not None:
            scale = scaler._scale.detach().clone()
        self._scale_before = scale
        rec.before_optimizer_step(optimizer, loss_scale=scale)
        lr = rec._step_state.get("lr")
        self._last_lr = float(lr) if lr is not None else None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rec = self._rec()
        if trainer.global_step == self._gs_at_start:
            rec.pause()  # accumulation micro-batch: rows wait for the optimizer step
            return
        stepped: bool | Tensor = True
        scaler = self._scaler(trainer)
        if self._scale_before is not None and scaler is not None and getattr(scaler, "_scale", None) is not None:
            stepped = scaler._scale.detach() >= self._scale_before  # the scaler lowers the scale on a skipped step
        rec.end_step(stepped=stepped)
        if self.mode == "tracin" and self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            self._checkpoint(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "tracin" and self.every_n_steps is None:
            self._checkpoint(trainer, pl_module)

    def _checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rec = self._rec()
        loader = self.tracin_dataloader
        if callable(loader) and not isinstance(loader, Iterable):
            loader = loader()
        if loader is None:
            rank_zero_warn("TrainingTrace(mode='tracin') uses the train loader for checkpoint passes; augmentation "
                           "makes scores non-reproducible. Pass a deterministic `tracin_dataloader`.")
            loader = trainer.train_dataloader
        # "at_checkpoint": the learning rate of the last optimizer step (an epoch-interval scheduler has already
        # moved on); "interval_sum": the sum of the per-step learning rates since the previous checkpoint
        interval = rec.interval_lr_sum()
        lr = interval if self.lr_weighting == "interval_sum" else self._last_lr
        if lr is None:
            opt = trainer.optimizers[0]
            group = next((g for g in opt.param_groups
                          if any(p is rec.modules[self.layers[0]].weight for p in g["params"])), opt.param_groups[0])
            lr = float(group["lr"].item()) if isinstance(group["lr"], Tensor) else float(group["lr"])
        rec.checkpoint(pl_module, loader, self.loss_fn, lr=lr, step=trainer.global_step, epoch=trainer.current_epoch,
                       example_id_fn=self.example_id_fn)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.recorder.close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.recorder is not None and stage == "fit":
            self.recorder.detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.recorder is not None:
            try:
                self.recorder.close(interrupted=True)
            except Exception as err:  # pragma: no cover - never mask the original exception
                warnings.warn(f"TrainingTrace could not flush after an exception: {err}", stacklevel=2)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.recorder is None or not self.recorder._opened:
            return {}
        return self.recorder.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._stash = dict(state_dict)

    def reader(self, **kwargs: Any) -> TraceReader:
        """A :class:`TraceReader` on this callback's store."""
        if self.dirpath is None:
            raise RuntimeError("The trace directory is known after `Trainer.fit` started (or pass `dirpath=`).")
        return TraceReader(self.dirpath, **kwargs)

"""``ExplainerDistillation``: distil a part-based explainer network from a layer of the user's model and log
its metrics (spec ``explainer_network.md`` section 3).

* ``mode="after_fit"`` (default): in ``on_fit_end`` rank 0 caches the performer's features once from an
  unsharded loader and trains the explainer with a plain loop (no nested ``Trainer``); the other ranks wait
  at a barrier. Metrics go to ``trainer.loggers`` with the callback's own step counter.
* ``mode="alongside"``: each training batch, one explainer step on the detached features captured during
  the user's own forward (no extra performer forward; the user's loss is untouched). Metrics are updated on
  validation batches and logged at the end of each validation epoch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from torch import nn

from reprlens.capture import LayerCapture
from reprlens.utils import check_positive_int, get_module, unwrap_model

try:
    from typing_extensions import override
except ImportError:  # pragma: no cover
    def override(f):  # type: ignore[no-redef]
        return f

__all__ = ["ExplainerDistillation"]

_MODES = ("after_fit", "alongside")


class ExplainerDistillation(Callback):
    """Train a :class:`reprlens.explainer_net.PartExplainer` on ``target_layer`` of the model and log
    ``explainer/rel_err``, ``p_mean``, ``p_std``, head accuracy on reconstructed vs original features,
    location instability of explainer vs performer filters (with ``"landmarks"`` in the batches),
    ``filter_loss``, ``p_reward_weight`` and ``p_collapsed``.

    Args:
        target_layer: dotted name of a conv layer (4-D output) of the LightningModule.
        mode: ``"after_fit"`` (default) or ``"alongside"``.
        upper_layers: higher layers to reconstruct as well.
        max_epochs: explainer epochs (``after_fit``).
        batch_size: explainer batch size (``after_fit``; >= 2, >= 16 recommended).
        cache_features: run the performer once per example (``after_fit``). The cache freezes one
            augmentation per example; ``False`` keeps augmentation and reruns the performer every step.
        dataloader: ``"train"``/``"val"`` (the datamodule's un-augmented ``eval_dataloader(split)`` when it
            has one) or a callable ``trainer -> DataLoader``.
        eval_dataloader: the same for evaluation (``None`` skips evaluation).
        every_n_epochs: evaluate every n explainer epochs (and after the last).
        log_prefix: prefix of logged keys.
        save_path: ``None``, a path, or ``"auto"`` (``trainer.log_dir/explainer.pt``); stores config,
            state_dict, receptive field and metrics (reload with ``PartExplainer.load``).
        seed: seed of the explainer's initialisation and shuffling.
        **explainer_module_kwargs: passed to :class:`reprlens.explainer_net.ExplainerModule`.

    Example:
        >>> cb = ExplainerDistillation("features.relu3", max_epochs=2)
        >>> cb.mode
        'after_fit'
    """

    def __init__(
        self,
        target_layer: str,
        *,
        mode: Literal["after_fit", "alongside"] = "after_fit",
        upper_layers: Sequence[str] = (),
        max_epochs: int = 8,
        batch_size: int = 64,
        cache_features: bool = True,
        dataloader: str | Callable[[pl.Trainer], Any] = "train",
        eval_dataloader: str | Callable[[pl.Trainer], Any] | None = "val",
        every_n_epochs: int = 1,
        log_prefix: str = "explainer/",
        save_path: str | None = None,
        seed: int = 0,
        **explainer_module_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(target_layer, str) or not target_layer:
            raise TypeError(f"Expected `target_layer` to be a dotted module name, but got {target_layer!r}.")
        if mode not in _MODES:
            raise ValueError(f"Expected `mode` in {_MODES}, but got {mode!r}.")
        check_positive_int(max_epochs, "max_epochs")
        check_positive_int(batch_size, "batch_size", minimum=2)
        check_positive_int(every_n_epochs, "every_n_epochs")
        for name, dl in (("dataloader", dataloader), ("eval_dataloader", eval_dataloader)):
            if not (callable(dl) or dl in ("train", "val", "test") or (dl is None and name == "eval_dataloader")):
                raise ValueError(f"Expected `{name}` to be 'train', 'val', 'test' or a callable trainer -> "
                                 f"DataLoader, but got {dl!r}.")
        if isinstance(upper_layers, str):
            upper_layers = [upper_layers]
        from reprlens.explainer_net.lightning import ExplainerModule
        import inspect

        allowed = set(inspect.signature(ExplainerModule.__init__).parameters) - {
            "self", "performer", "target_layer", "upper_layers", "example_batch", "steps_per_epoch",
            "freeze_performer"}
        unknown = set(explainer_module_kwargs) - allowed
        if unknown:
            raise TypeError(f"Unknown ExplainerModule option(s) {sorted(unknown)}; valid: {sorted(allowed)}.")
        self.target_layer = target_layer
        self.mode = mode
        self.upper_layers = list(upper_layers)
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.cache_features = bool(cache_features)
        self.dataloader = dataloader
        self.eval_dataloader = eval_dataloader
        self.every_n_epochs = every_n_epochs
        self.log_prefix = log_prefix
        self.save_path = save_path
        self.seed = int(seed)
        self.module_kwargs = dict(explainer_module_kwargs)
        self.module: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.epoch = 0
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._pending_state: dict[str, Any] | None = None
        self._capture: LayerCapture | None = None

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = unwrap_model(pl_module)
        get_module(root, self.target_layer)  # ValueError with the closest names
        for name in self.upper_layers:
            get_module(root, name)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_capture()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_capture()

    def _close_capture(self) -> None:
        if self._capture is not None and self._capture.active:
            self._capture.__exit__(None, None, None)
        self._capture = None

    @override
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "metrics": dict(self.metrics)}
        if self.module is not None and self.module.explainer is not None:
            out["explainer_config"] = dict(self.module.explainer.config)
            out["explainer"] = self.module.explainer.state_dict()
            out["best_rel_err"] = self.module._best_rel_err
            if self.optimizer is not None:
                out["optimizer"] = self.optimizer.state_dict()
        return out

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = int(state_dict.get("epoch", 0))
        self.step = int(state_dict.get("step", 0))
        self.metrics = dict(state_dict.get("metrics", {}))
        self._pending_state = state_dict if "explainer" in state_dict else None

    # ------------------------------------------------------------------ helpers
    def _loader(self, trainer: pl.Trainer, which: Any, split_default: str) -> Any:
        if which is None:
            return None
        if callable(which):
            return which(trainer)
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "eval_dataloader"):
            return dm.eval_dataloader(which)
        if dm is not None:
            fn = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}[which]
            return getattr(dm, fn)()
        src = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders, "test": trainer.test_dataloaders}
        loader = src[which]
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            raise RuntimeError(f"ExplainerDistillation found no {which!r} dataloader; pass a datamodule or a callable "
                               "`dataloader=lambda trainer: ...`.")
        return loader

    def _new_module(self, pl_module: nn.Module, example: Any, steps_per_epoch: int, freeze: bool) -> Any:
        from reprlens.explainer_net.lightning import ExplainerModule

        torch.manual_seed(self.seed)
        kw = dict(self.module_kwargs)
        if self._pending_state is not None:
            from reprlens.explainer_net.modules import PartExplainer

            kw["explainer"] = PartExplainer(**self._pending_state["explainer_config"])
        module = ExplainerModule(unwrap_model(pl_module), self.target_layer, upper_layers=self.upper_layers,
                                 example_batch=example, steps_per_epoch=steps_per_epoch, freeze_performer=freeze,
                                 **kw)
        module.explainer.to(pl_module.device)
        for m in (*module.rel_err_metrics.values(), module.gate_metric, module.head_metric):
            m.to(pl_module.device)
        self.optimizer = module.configure_optimizers()
        if self._pending_state is not None:
            module.explainer.load_state_dict(self._pending_state["explainer"])
            module._best_rel_err = self._pending_state.get("best_rel_err", math.inf)
            if "optimizer" in self._pending_state:
                self.optimizer.load_state_dict(self._pending_state["optimizer"])
            self._pending_state = None
        return module

    def _log(self, trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
        clean = {f"{self.log_prefix}{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        for logger in trainer.loggers:
            logger.log_metrics(clean, step=step)
            logger.save()

    def _evaluate(self, trainer: pl.Trainer, loader: Any, device: torch.device) -> dict[str, float]:
        module = self.module
        module.explainer.eval()
        for batch in loader:
            module.update_metrics(move_data_to_device(batch, device))
        module.explainer.train()
        return module.compute_metrics()

    def _save(self, trainer: pl.Trainer) -> None:
        if self.save_path is None or self.module is None:
            return
        path = self.save_path
        if path == "auto":
            path = os.path.join(trainer.log_dir or trainer.default_root_dir, "explainer.pt")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        rf = self.module.rf
        self.module.explainer.save(path, receptive_field=None if rf is None else (rf.start, rf.jump, rf.size),
                                   metrics=dict(self.metrics), target_layer=self.target_layer)

    # ------------------------------------------------------------------ after_fit
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode != "after_fit":
            if trainer.is_global_zero:
                self._save(trainer)
            return
        if trainer.is_global_zero:
            self.run(trainer, pl_module)
        trainer.strategy.barrier()

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Cache, train and evaluate the explainer now (what ``after_fit`` does in ``on_fit_end``)."""
        from reprlens.explainer_net.lightning import FeatureCache

        model = unwrap_model(pl_module)
        was_training = model.training
        grad_flags = [p.requires_grad for p in model.parameters()]
        device = pl_module.device
        try:
            model.eval()
            train_loader = self._loader(trainer, self.dataloader, "train")
            eval_loader = self._loader(trainer, self.eval_dataloader, "val")
            example = move_data_to_device(next(iter(train_loader)), device)
            kw_in = {k: self.module_kwargs[k] for k in ("input_fn", "target_fn", "landmark_fn")
                     if self.module_kwargs.get(k) is not None}
            if self.cache_features:
                cache = FeatureCache.build(model, self.target_layer, _Moved(train_loader, device),
                                           upper_layers=self.upper_layers, device=device,
                                           call_index=self.module_kwargs.get("call_index"), **kw_in)
                gen = torch.Generator().manual_seed(self.seed)
                loader_fn = lambda: cache.dataloader(self.batch_size, shuffle=True, generator=gen)  # noqa: E731
                steps = math.ceil(len(cache) / self.batch_size)
            else:
                loader_fn = lambda: _Moved(train_loader, device)  # noqa: E731
                steps = len(train_loader)
            self.module = self._new_module(model, example, steps, freeze=True)
            module, opt = self.module, self.optimizer
            module.explainer.train()
            start = self.epoch
            for epoch in range(start, self.max_epochs):
                fl_sum = torch.zeros((), device=device)
                n_b = 0
                for batch in loader_fn():
                    feats = module.features(batch)
                    if feats["target"].shape[0] < 2:
                        raise ValueError("ExplainerDistillation needs batches of >= 2 examples (the filter loss "
                                         "estimates MI over the batch); got a batch of 1. Drop the last batch or "
                                         "raise `batch_size`.")
                    loss, _, logs = module.compute_loss(feats, module.current_p_reward_weight(self.step))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    fl_sum += logs["filter_loss"]
                    n_b += 1
                    self.step += 1
                self.epoch = epoch + 1
                if eval_loader is not None and (self.epoch % self.every_n_epochs == 0 or self.epoch == self.max_epochs):
                    module._fl_sum, module._fl_count = fl_sum.cpu(), n_b
                    res = self._evaluate(trainer, eval_loader, device)
                    res["p_reward_weight"] = module.current_p_reward_weight(self.step)
                    res["epoch"] = float(self.epoch)
                    self.metrics = res
                    self.history.append(dict(res))
                    self._log(trainer, res, self.step)
            self._save(trainer)
            return dict(self.metrics)
        finally:
            for p, flag in zip(model.parameters(), grad_flags):
                p.requires_grad_(flag)
            model.train(was_training)

    # ------------------------------------------------------------------ alongside
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.mode != "alongside":
            return
        self._close_capture()
        self._capture = LayerCapture(pl_module, [self.target_layer, *self.upper_layers], detach=True)
        self._capture.__enter__()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.mode != "alongside" or self._capture is None:
            return
        cap = self._capture
        self._close_capture()
        ci = self.module_kwargs.get("call_index")
        feats_raw = {}
        for name in [self.target_layer, *self.upper_layers]:
            n_calls = cap.num_calls(name)
            if n_calls == 0:
                return
            if n_calls > 1 and ci is None:
                raise ValueError(f"Layer {name!r} ran {n_calls} times per training step (multi-view); pass "
                                 "`call_index`.")
            t = cap.get(name, ci or 0)
            feats_raw[name] = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        tgt = feats_raw[self.target_layer]
        if self.module is None:
            if tgt.ndim != 4:
                raise ValueError(f"Expected target layer {self.target_layer!r} to output (N, C, H, W), but got "
                                 f"{tuple(tgt.shape)}; pick a convolutional layer.")
            self._build_alongside(trainer, pl_module, batch, feats_raw)
        module, opt = self.module, self.optimizer
        feats = {"target": tgt, "upper": {n: (feats_raw[n].flatten(1) if feats_raw[n].ndim != 4 else feats_raw[n])
                                          for n in self.upper_layers}}
        with torch.enable_grad():
            loss, _, logs = module.compute_loss(feats, module.current_p_reward_weight(self.step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.explainer.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= trainer.world_size
            off = 0
            for p, g in zip(module.explainer.parameters(), grads):
                p.grad = flat[off : off + g.numel()].view_as(g)
                off += g.numel()
        opt.step()
        self.step += 1
        self._fl_sum = getattr(self, "_fl_sum", 0.0) + logs["filter_loss"]
        self._fl_n = getattr(self, "_fl_n", 0) + 1

    def _build_alongside(self, trainer, pl_module, batch, feats_raw) -> None:
        from reprlens.explainer_net.lightning import ExplainerModule
        from reprlens.explainer_net.modules import PartExplainer

        tgt = feats_raw[self.target_layer]
        torch.manual_seed(self.seed)
        kw = dict(self.module_kwargs)
        cfg = self._pending_state["explainer_config"] if self._pending_state is not None else None
        if cfg is None:
            upper = {n: tuple(feats_raw[n].shape[1:]) if feats_raw[n].ndim == 4 else (int(feats_raw[n][0].numel()),)
                     for n in self.upper_layers}
            ekw = dict(kw.pop("explainer_kwargs", None) or {})
            ekw.setdefault("upper_shapes", upper)
            explainer = PartExplainer(int(tgt.shape[1]), **ekw)
            explainer.resolve_output_activation(tgt)
        else:
            kw.pop("explainer_kwargs", None)
            explainer = PartExplainer(**cfg)
        explainer.to(tgt.device)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in [*explainer.parameters(), *explainer.buffers()]:
                torch.distributed.broadcast(t.data, src=0)
        spe = trainer.num_training_batches if math.isfinite(trainer.num_training_batches) else 1
        self.module = ExplainerModule(unwrap_model(pl_module), self.target_layer, upper_layers=self.upper_layers,
                                      explainer=explainer, steps_per_epoch=max(1, int(spe)), freeze_performer=False,
                                      **kw)
        x = self.module.input_fn(batch)
        self.module._input_size = (int(x.shape[-2]), int(x.shape[-1]))
        if self.module.rf is None:
            from reprlens.explainer_net.lightning import _default_rf

            self.module.rf = _default_rf(unwrap_model(pl_module), self.target_layer, self.module._input_size)
        for m in (*self.module.rel_err_metrics.values(), self.module.gate_metric, self.module.head_metric):
            m.to(tgt.device)
        self.optimizer = self.module.configure_optimizers()
        if self._pending_state is not None:
            explainer.load_state_dict(self._pending_state["explainer"])
            self.module._best_rel_err = self._pending_state.get("best_rel_err", math.inf)
            if "optimizer" in self._pending_state:
                self.optimizer.load_state_dict(self._pending_state["optimizer"])
            self._pending_state = None

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.mode != "alongside" or self.module is None or trainer.sanity_checking:
            return
        self.module.explainer.eval()
        self.module.update_metrics(batch)
        self.module.explainer.train()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode != "alongside" or self.module is None or trainer.sanity_checking:
            return
        if isinstance(self.module.gate_metric.p, list) and not self.module.gate_metric.p:
            return
        n = getattr(self, "_fl_n", 0)
        if n:
            self.module._fl_sum, self.module._fl_count = torch.as_tensor(self._fl_sum).detach().cpu(), n
            self._fl_sum, self._fl_n = 0.0, 0
        res = self.module.compute_metrics()
        res["p_reward_weight"] = self.module.current_p_reward_weight(self.step)
        self.epoch = trainer.current_epoch + 1
        self.metrics = res
        self.history.append(dict(res))
        for k, v in res.items():
            if math.isfinite(v):
                pl_module.log(f"{self.log_prefix}{k}", float(v), sync_dist=False, rank_zero_only=False)


class _Moved:
    """Iterate a loader, moving each batch to ``device``."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.dataset = getattr(loader, "dataset", None)

    def __iter__(self):
        for batch in self.loader:
            yield move_data_to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)

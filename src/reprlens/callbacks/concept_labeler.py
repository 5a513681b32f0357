"""``ConceptLabeler``: label a layer's units with INVERT concept formulas during training.

Also ``ActivationWriter``: a prediction writer that streams a layer's activations to an
:class:`reprlens.invert.Activations` file inside ``trainer.predict``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Subset

from reprlens.invert.collector import ActivationCollector, Activations
from reprlens.invert.concepts import ConceptSet
from reprlens.invert.search import Invert, InvertResult
from reprlens.utils import check_positive_int, get_module

try:
    from typing_extensions import override
except ImportError:  # pragma: no cover
    def override(f):  # type: ignore[no-redef]
        return f

__all__ = ["ActivationWriter", "ConceptLabeler"]


class ActivationWriter(BasePredictionWriter):
    """Write a layer's aggregated activations during ``trainer.predict`` (rows at dataset indices).

    Example:
        >>> from reprlens.invert import ActivationCollector
        >>> writer = ActivationCollector("backbone.layer3").callback()
        >>> # trainer = Trainer(callbacks=[writer]); trainer.predict(model, loader); writer.result.shape
    """

    def __init__(self, collector: ActivationCollector) -> None:
        super().__init__(write_interval="batch")
        if not isinstance(collector, ActivationCollector):
            raise TypeError(f"Expected an ActivationCollector, but got {type(collector).__name__}.")
        self.collector = collector
        self.result: Activations | None = None
        self._meta: dict[str, Any] = {}

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.collector._reset()
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
        self._meta = self.collector._meta_for(pl_module, dataset, len(dataset))
        self.collector._attach(pl_module)

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        idx: Any = batch_indices
        if (idx is None or len(idx) == 0) and isinstance(batch, dict) and "index" in batch:
            idx = batch["index"]
        if idx is None:
            raise RuntimeError("No batch indices available; use a map-style dataset or dict batches with 'index'.")
        self.collector._write(idx, self._meta)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.collector._detach()
        self.result = self.collector._finish()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.collector._detach()


def _resolve(obj: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    return obj(trainer, pl_module) if callable(obj) and not isinstance(obj, (ConceptSet, DataLoader)) else obj


class ConceptLabeler(Callback):
    """Label a layer's units with INVERT formulas at the end of fit (and/or every n epochs).

    Each run collects the layer's activations over ``dataloader`` (eval mode, no grad), runs
    :meth:`reprlens.invert.Invert.explain` on rank 0 and writes ``{dirpath}/{layer}/epoch={E:04d}.csv``
    (params as ``#`` lines, then the table) and ``.png`` (top units). Metrics
    ``concept_labels/{layer}/best_auc_mean``, ``.../significant_fraction`` and
    ``.../label_change_fraction`` go to every logger; TensorBoard also gets the markdown table and
    the figure. Under DDP rank 0 collects and searches while the other ranks wait at a barrier (long
    CPU searches can approach the process-group timeout).

    Args:
        layer: dotted module name of the layer.
        concepts: a :class:`ConceptSet` or ``callable(trainer, pl_module) -> ConceptSet``; row i must be
            dataset index i of the loader.
        dataloader: loader or ``callable(trainer, pl_module)``; ``None`` uses the datamodule's
            ``concept_dataloader()`` or ``eval_dataloader("val")``.
        aggregate, channel_dim, select, input_fn: see :class:`reprlens.invert.ActivationCollector`.
        max_length, beam_size, limit_search, alpha, min_fraction, max_fraction, mode, correction,
        n_permutations, seed: see :class:`reprlens.invert.Invert`.
        significance_level: threshold on ``p_corrected`` for ``significant_fraction`` and the figure.
        every_n_epochs: also run after every n-th training epoch (None: only at fit end).
        run_on_fit_end: run in ``on_fit_end`` (skipped when that epoch already ran).
        neurons: subset of units to label.
        max_samples: seeded random subset of the loader's samples (concept rows alike).
        top_k: units in the figure and the logged table.
        dirpath: output directory (default ``<log_dir or default_root_dir>/concept_labels``).
        keep_activations: keep the ``.npy`` activation files next to the CSVs.

    Example:
        >>> import torch
        >>> cs = ConceptSet(torch.rand(64, 4) > 0.5)
        >>> cb = ConceptLabeler("backbone.layer3", cs, every_n_epochs=2, max_length=2)
    """

    def __init__(
        self,
        layer: str,
        concepts: ConceptSet | Callable[[pl.Trainer, pl.LightningModule], ConceptSet],
        dataloader: DataLoader | Callable[[pl.Trainer, pl.LightningModule], DataLoader] | None = None,
        *,
        aggregate: str | Callable = "mean",
        channel_dim: int = 1,
        select: Callable | None = None,
        input_fn: Callable | None = None,
        max_length: int = 3,
        beam_size: int = 3,
        limit_search: int | None = None,
        alpha: float | None = None,
        min_fraction: float | None = None,
        max_fraction: float | None = None,
        mode: str = "positive",
        correction: str | None = "bonferroni",
        n_permutations: int = 200,
        seed: int = 0,
        significance_level: float = 0.05,
        every_n_epochs: int | None = None,
        run_on_fit_end: bool = True,
        neurons: Sequence[int] | None = None,
        max_samples: int | None = None,
        top_k: int = 20,
        dirpath: str | os.PathLike[str] | None = None,
        keep_activations: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(layer, str) or not layer:
            raise TypeError(f"Expected `layer` to be a non-empty dotted module name, but got {layer!r}.")
        if not (isinstance(concepts, ConceptSet) or callable(concepts)):
            raise TypeError(
                f"Expected `concepts` to be a ConceptSet or a callable(trainer, pl_module), got {type(concepts).__name__}."
            )
        if dataloader is not None and not (isinstance(dataloader, DataLoader) or callable(dataloader)):
            raise TypeError(f"Expected `dataloader` to be a DataLoader, a callable or None, got {type(dataloader).__name__}.")
        check_positive_int(every_n_epochs, "every_n_epochs", allow_none=True)
        check_positive_int(max_samples, "max_samples", allow_none=True, minimum=2)
        check_positive_int(top_k, "top_k")
        if not (0.0 < float(significance_level) < 1.0):
            raise ValueError(f"Expected `significance_level` in (0, 1), but got {significance_level!r}.")
        if every_n_epochs is None and not run_on_fit_end:
            raise ValueError("Nothing to do: set `every_n_epochs` or `run_on_fit_end=True`.")
        self.invert_kwargs = dict(
            max_length=max_length, beam_size=beam_size, limit_search=limit_search, alpha=alpha,
            min_fraction=min_fraction, max_fraction=max_fraction, mode=mode, correction=correction,
            n_permutations=n_permutations, seed=seed,
        )
        # validate the search settings now (the ConceptSet may only be known in setup)
        Invert(ConceptSet(torch.tensor([[True], [False]]), warn=False), **self.invert_kwargs)  # type: ignore[arg-type]
        ActivationCollector(layer, aggregate=aggregate, channel_dim=channel_dim, select=select, input_fn=input_fn)
        self.layer = layer
        self.concepts = concepts
        self.dataloader = dataloader
        self.collector_kwargs = dict(aggregate=aggregate, channel_dim=channel_dim, select=select, input_fn=input_fn)
        self.significance_level = float(significance_level)
        self.every_n_epochs = every_n_epochs
        self.run_on_fit_end = run_on_fit_end
        self.neurons = None if neurons is None else list(neurons)
        self.max_samples = max_samples
        self.top_k = top_k
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.keep_activations = keep_activations
        self.seed = seed
        self.runs: list[dict[str, Any]] = []
        self.last_result: InvertResult | None = None
        self._concepts: ConceptSet | None = None
        self._loader: DataLoader | None = None
        self._invert: Invert | None = None
        self._tmpdir: str | None = None
        self._warned_plot = False

    @property
    def state_key(self) -> str:
        return f"ConceptLabeler[layer={self.layer}]"

    # ---------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        get_module(pl_module, self.layer)
        concepts = _resolve(self.concepts, trainer, pl_module)
        if not isinstance(concepts, ConceptSet):
            raise TypeError(f"`concepts` callable must return a ConceptSet, but got {type(concepts).__name__}.")
        loader = _resolve(self.dataloader, trainer, pl_module) if self.dataloader is not None else None
        if loader is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is not None and hasattr(dm, "concept_dataloader"):
                loader = dm.concept_dataloader()
            elif dm is not None and hasattr(dm, "eval_dataloader"):
                loader = dm.eval_dataloader("val")
            else:
                raise ValueError(
                    "ConceptLabeler needs a dataloader: pass `dataloader=` or use a datamodule with "
                    "`concept_dataloader()` or `eval_dataloader(split)`."
                )
        n = len(loader.dataset)
        if n != concepts.num_samples:
            raise ValueError(
                f"The concept loader has {n} samples but the ConceptSet has {concepts.num_samples} rows; row i of "
                "the concepts must be dataset index i of the loader."
            )
        if self.max_samples is not None and self.max_samples < n:
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(n, generator=g)[: self.max_samples].sort().values
            concepts = concepts.subset_rows(idx)
            loader = DataLoader(Subset(loader.dataset, idx.tolist()), batch_size=loader.batch_size or 1,
                                collate_fn=loader.collate_fn, num_workers=loader.num_workers)
        self._concepts = concepts
        self._loader = loader
        self._invert = Invert(concepts, **self.invert_kwargs)  # type: ignore[arg-type]
        if self.dirpath is None:
            base = getattr(trainer, "log_dir", None) or trainer.default_root_dir
            self.dirpath = Path(base) / "concept_labels"

    # ---------------------------------------------------------------------------------------------- hooks
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs is None:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.run_on_fit_end:
            return
        epoch = max(trainer.current_epoch - 1, 0) if trainer.current_epoch > 0 else 0
        if self.runs and self.runs[-1]["epoch"] >= epoch and self.runs[-1]["step"] == trainer.global_step:
            return
        self._run(trainer, pl_module, epoch=epoch)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._cleanup()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"runs": [dict(r) for r in self.runs]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs = [dict(r) for r in state_dict.get("runs", [])]

    # ---------------------------------------------------------------------------------------------- work
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int | None = None) -> None:
        if self._invert is None or self._loader is None:
            raise RuntimeError("ConceptLabeler.setup did not run; add the callback to a Trainer.")
        epoch = trainer.current_epoch if epoch is None else epoch
        layer_dir = Path(self.dirpath) / self.layer  # type: ignore[arg-type]
        if trainer.is_global_zero:
            path = None
            if self.keep_activations:
                path = layer_dir / f"epoch={epoch:04d}.npy"
            collector = ActivationCollector(self.layer, path=path, overwrite=True, **self.collector_kwargs)
            ctx = getattr(getattr(trainer, "precision_plugin", None), "forward_context", None)
            with (ctx() if ctx is not None else contextlib.nullcontext()):
                acts = collector.collect(pl_module, self._loader, device=pl_module.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                result = self._invert.explain(acts.tensor(), neurons=self.neurons)
            self.last_result = result
            self._report(trainer, result, epoch, layer_dir)
        trainer.strategy.barrier("concept_labeler")

    def _report(self, trainer: pl.Trainer, result: InvertResult, epoch: int, layer_dir: Path) -> None:
        layer_dir.mkdir(parents=True, exist_ok=True)
        csv_path = layer_dir / f"epoch={epoch:04d}.csv"
        result.to_csv(csv_path)
        best = result.best()
        labels = {int(d): f for d, f in zip(best.columns["neuron"], best.columns["formula"])}
        aucs = {int(d): float(a) for d, a in zip(best.columns["neuron"], best.columns["auc"])}
        prev = self.runs[-1]["labels"] if self.runs else None
        if prev is not None:
            units = set(prev) | set(labels)
            changed = sum(1 for u in units if prev.get(u) != labels.get(u))
            change = changed / max(len(units), 1)
        else:
            change = float("nan")
        score = best.columns["auc"] if result.params["mode"] == "positive" else 1 - best.columns["auc"]
        metrics = {
            f"concept_labels/{self.layer}/best_auc_mean": float(np.mean(score)) if len(best) else float("nan"),
            f"concept_labels/{self.layer}/significant_fraction": float(
                np.mean(best.columns["p_corrected"] <= self.significance_level)) if len(best) else 0.0,
        }
        if not math.isnan(change):
            metrics[f"concept_labels/{self.layer}/label_change_fraction"] = change
        self.runs.append({"epoch": epoch, "step": trainer.global_step, "csv": str(csv_path), "labels": labels,
                          "aucs": aucs, "label_change_fraction": change})
        table = best.summary(self.top_k)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_text"):
                exp.add_text(f"concept_labels/{self.layer}", table, global_step=trainer.global_step)
        try:
            from reprlens.plotting.common import save_figure
            from reprlens.plotting.invert import plot_concept_labels

            fig = plot_concept_labels(result, top_k=self.top_k, significance_level=self.significance_level,
                                      title=f"{self.layer}, epoch {epoch}")
        except ImportError:
            if not self._warned_plot:
                rank_zero_warn("matplotlib is not installed; ConceptLabeler skips the figure.")
                self._warned_plot = True
            return
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_figure"):
                exp.add_figure(f"concept_labels/{self.layer}", fig, global_step=trainer.global_step, close=False)
        save_figure(fig, layer_dir / f"epoch={epoch:04d}.png")

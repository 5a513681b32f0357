"""RelaxMonitor: watch what the representation attends to while it trains (RELAX maps of a fixed probe batch).

Every ``every_n_epochs`` epochs the callback copies the live encoder's weights into a frozen eval-mode copy,
explains a fixed probe batch with :class:`reprlens.relax.Relax` (same seeded masks every run, so changes
come from the encoder only), and logs overlay grids (importance, uncertainty, U-RELAX) to the trainer's
loggers and as PNG files. The live module (parameters, BN buffers, training flags, grads) and the global RNG
are never touched.
"""

from __future__ import annotations

import copy
import difflib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from reprlens.plotting.relax import relax_overlays
from reprlens.relax import _RELAX_ARGS, Relax, RelaxResult
from reprlens.utils import check_positive_int, get_module, unwrap_model

try:
    from typing_extensions import override
except ImportError:  # pragma: no cover
    def override(f):  # type: ignore[no-redef]
        return f

__all__ = ["RelaxMonitor"]

_KINDS = ("importance", "uncertainty", "u_relax")
_OWN_ARGS = ("num_masks", "batch_size", "seed", "generator", "progress")


def _default_batch_to_images(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("image", "images", "x"):
            if key in batch and isinstance(batch[key], Tensor):
                return batch[key]
    elif isinstance(batch, (tuple, list)) and len(batch) > 0:
        first = batch[0]
        if isinstance(first, Tensor) and first.ndim == 4:
            return first
        return _default_batch_to_images(first)
    raise TypeError(
        f"RelaxMonitor cannot find images in a batch of type {type(batch).__name__} (expected a tensor, a "
        "tuple/list whose first element holds them, or a dict with key 'image', 'images' or 'x'). Pass "
        "`batch_to_images=lambda batch: ...` or a fixed `probe` tensor."
    )


def _clear_hooks(module: nn.Module) -> None:
    """Remove every forward/forward-pre/backward hook on every submodule (a deepcopy keeps them)."""
    for m in module.modules():
        for name in (
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            d = getattr(m, name, None)
            if d is not None:
                d.clear()
        if hasattr(m, "_is_full_backward_hook"):
            m._is_full_backward_hook = None


def _spearman_rows(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation per row of ``(N, P)`` tensors (ranks by argsort; NaNs ranked last)."""
    def ranks(t: Tensor) -> Tensor:
        t = torch.nan_to_num(t.double(), nan=float("inf"))
        return t.argsort(1).argsort(1).double()

    ra, rb = ranks(a), ranks(b)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


class RelaxMonitor(Callback):
    """Explain a fixed probe batch with RELAX every ``every_n_epochs`` epochs and log overlay grids.

    Args:
        probe: ``(N, C, H, W)`` normalised images. None: the first ``num_probe`` images of
            ``trainer.datamodule.eval_dataloader("val")`` when the datamodule has it (un-augmented), else of
            the first training batch (augmented SSL batches make poor probes: pass a fixed probe).
        num_probe: number of probe images taken when ``probe`` is None.
        encoder: dotted attribute path of the encoder in the LightningModule, or ``fn(pl_module) -> nn.Module``;
            None tries ``"encoder"``, then ``"backbone"``.
        every_n_epochs: run at the end of every n-th training epoch.
        run_on_fit_start: also explain the untrained encoder (logged as epoch -1, files ``init``).
        num_masks: masks per probe image.
        batch_size: masked inputs per encoder forward.
        seed: seed of the masks (the same masks every run; the global RNG is never used).
        relax_kwargs: any other :class:`~reprlens.relax.Relax` argument (e.g. ``{"num_cells": 4}``).
        batch_to_images: ``fn(batch) -> (N, C, H, W)`` used when the probe comes from a batch.
        denormalize: ``(mean, std)`` or a callable for displaying the inputs; None: per-image min-max.
        alpha: opacity of the map over the input.
        log_images: log the grids to the trainer's loggers.
        save_png: write ``{dirpath}/epoch={epoch:04d}-{kind}.png`` (``init-{kind}.png`` for epoch -1).
        dirpath: PNG directory; default ``<trainer.log_dir or default_root_dir>/relax``.
        save_results: also ``torch.save`` each result (CPU) as ``.pt`` next to the PNGs.

    Example:
        >>> cb = RelaxMonitor(torch.rand(4, 3, 32, 32), num_masks=500, relax_kwargs={"num_cells": 4})
        >>> cb.every_n_epochs
        1
    """

    def __init__(
        self,
        probe: Tensor | None = None,
        *,
        num_probe: int = 8,
        encoder: str | Callable[[pl.LightningModule], nn.Module] | None = None,
        every_n_epochs: int = 1,
        run_on_fit_start: bool = True,
        num_masks: int = 1000,
        batch_size: int = 100,
        seed: int = 0,
        relax_kwargs: Mapping[str, Any] | None = None,
        batch_to_images: Callable[[Any], Tensor] | None = None,
        denormalize: tuple[Sequence[float], Sequence[float]] | Callable[[Tensor], Tensor] | None = None,
        alpha: float = 0.5,
        log_images: bool = True,
        save_png: bool = True,
        dirpath: str | Path | None = None,
        save_results: bool = False,
    ) -> None:
        super().__init__()
        if probe is not None:
            if not isinstance(probe, Tensor):
                raise TypeError(f"Expected `probe` to be a tensor (N, C, H, W) or None, but got {type(probe).__name__}.")
            if probe.ndim != 4 or not probe.is_floating_point():
                raise ValueError(
                    f"Expected `probe` to be a floating tensor (N, C, H, W), but got shape {tuple(probe.shape)} and "
                    f"dtype {probe.dtype}. Add a batch dimension with `probe[None]` for one image."
                )
        check_positive_int(num_probe, "num_probe")
        check_positive_int(every_n_epochs, "every_n_epochs")
        check_positive_int(num_masks, "num_masks")
        check_positive_int(batch_size, "batch_size")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected `seed` to be an int, but got {type(seed).__name__}.")
        if not (encoder is None or isinstance(encoder, str) or callable(encoder)):
            raise TypeError(f"Expected `encoder` to be a dotted name, a callable or None, got {type(encoder).__name__}.")
        if not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"Expected `alpha` in (0, 1], but got {alpha!r}.")
        if batch_to_images is not None and not callable(batch_to_images):
            raise TypeError("Expected `batch_to_images` to be callable, e.g. `lambda batch: batch['image']`.")
        relax_kwargs = dict(relax_kwargs or {})
        valid = [a for a in _RELAX_ARGS if a not in _OWN_ARGS]
        for name in relax_kwargs:
            if name in _OWN_ARGS:
                raise ValueError(f"Pass `{name}` to RelaxMonitor directly, not in `relax_kwargs`.")
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=3)
                raise ValueError(
                    f"Unknown Relax argument {name!r} in `relax_kwargs`. Closest valid names: {close}; all: {valid}."
                )
        # fail now on invalid Relax arguments rather than after the first epoch
        Relax(nn.Identity(), num_masks=num_masks, batch_size=min(batch_size, num_masks), seed=seed, **relax_kwargs)
        self.probe = probe.detach().cpu().clone() if probe is not None else None
        self.num_probe = num_probe
        self.encoder_spec = encoder
        self.every_n_epochs = every_n_epochs
        self.run_on_fit_start = run_on_fit_start
        self.num_masks = num_masks
        self.batch_size = min(batch_size, num_masks)
        self.seed = seed
        self.relax_kwargs = relax_kwargs
        self.batch_to_images = batch_to_images or _default_batch_to_images
        if denormalize is not None and not callable(denormalize):
            try:  # (mean, std); also accepts Hydra ListConfigs
                mean, std = denormalize
                denormalize = ([float(v) for v in mean], [float(v) for v in std])
            except (TypeError, ValueError):
                raise ValueError(
                    f"Expected `denormalize` to be (mean, std) per channel or a callable, but got {denormalize!r}."
                ) from None
        self.denormalize = denormalize
        self.alpha = float(alpha)
        self.log_images = log_images
        self.save_png = save_png
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.save_results = save_results
        self.last_epoch: int | None = None
        self.last_result: RelaxResult | None = None
        self._prev_importance: Tensor | None = None
        self._encoder: nn.Module | None = None
        self._copy: nn.Module | None = None
        self._stash: dict[str, Any] | None = None
        self._pending_initial = False
        self._epoch_start: float | None = None
        self._warned_slow = False
        self._explainer: Relax | None = None

    # ------------------------------------------------------------------------------------------- setup
    def _resolve_encoder(self, pl_module: pl.LightningModule) -> nn.Module:
        root = unwrap_model(pl_module)
        spec = self.encoder_spec
        if callable(spec) and not isinstance(spec, str):
            enc = spec(pl_module)
            if not isinstance(enc, nn.Module):
                raise TypeError(f"`encoder(pl_module)` must return an nn.Module, but returned {type(enc).__name__}.")
            return enc
        if isinstance(spec, str):
            return get_module(root, spec, what="encoder")
        for name in ("encoder", "backbone"):
            enc = getattr(root, name, None)
            if isinstance(enc, nn.Module):
                return enc
        children = [n for n, _ in root.named_children()]
        raise ValueError(
            f"RelaxMonitor could not find an encoder: {type(root).__name__} has no `encoder` or `backbone` "
            f"submodule. Pass `encoder=` with one of its children {children} (dotted paths work too) or a "
            "callable `lambda module: module.my_encoder`."
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(getattr(trainer, "strategy", None)).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy or "ModelParallel" in strategy:
            raise RuntimeError(
                f"RelaxMonitor needs full parameters on rank 0, but the strategy {strategy} shards them. Use DDP "
                "(or single-device) training, or run `reprlens.relax.Relax` on a consolidated checkpoint."
            )
        self._encoder = self._resolve_encoder(pl_module)
        enc = self._encoder
        enc = getattr(enc, "_orig_mod", enc)
        cp = copy.deepcopy(enc)
        _clear_hooks(cp)
        cp.eval()
        cp.requires_grad_(False)
        self._copy = cp.to(pl_module.device)
        if self._stash is not None:
            st = self._stash
            self._stash = None
            if st.get("probe") is not None and self.probe is None:
                self.probe = st["probe"]
            self.last_epoch = st.get("last_epoch")
            self._prev_importance = st.get("prev_importance")
        self._explainer = Relax(
            self._copy, num_masks=self.num_masks, batch_size=self.batch_size, seed=self.seed, **self.relax_kwargs
        )

    def _free(self) -> None:
        self._copy = None
        self._explainer = None
        self._encoder = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._free()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._free()

    # ------------------------------------------------------------------------------------------- probe
    def _probe_from_datamodule(self, trainer: pl.Trainer) -> Tensor | None:
        dm = getattr(trainer, "datamodule", None)
        fn = getattr(dm, "eval_dataloader", None)
        if fn is None:
            return None
        try:
            loader = fn("val")
        except Exception:  # noqa: BLE001 - a datamodule without that split: fall back to training batches
            return None
        images = []
        count = 0
        for batch in loader:
            x = self.batch_to_images(batch)
            images.append(x[: self.num_probe - count].detach().cpu())
            count += images[-1].shape[0]
            if count >= self.num_probe:
                break
        return torch.cat(images).float().clone() if images else None

    def _set_probe_from_batch(self, batch: Any) -> None:
        x = self.batch_to_images(batch)
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise TypeError(
                f"`batch_to_images` must return a tensor (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}."
            )
        self.probe = x[: self.num_probe].detach().to("cpu", torch.float32).clone()

    # ------------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is None and trainer.is_global_zero:
            self.probe = self._probe_from_datamodule(trainer)
        if self.run_on_fit_start and self.last_epoch is None:
            if self.probe is not None:
                self._run(trainer, pl_module, epoch=-1)
            else:
                self._pending_initial = True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.probe is None:
            self._set_probe_from_batch(batch)
            if self._pending_initial:
                self._pending_initial = False
                self._run(trainer, pl_module, epoch=-1)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs == 0:
            seconds = self._run(trainer, pl_module, epoch=epoch)
            if seconds is not None and self._epoch_start is not None and not self._warned_slow:
                epoch_time = time.perf_counter() - self._epoch_start
                if seconds > 0.25 * epoch_time:
                    self._warned_slow = True
                    rank_zero_warn(
                        f"RelaxMonitor took {seconds:.1f}s, more than 25% of the epoch ({epoch_time:.1f}s). Use fewer "
                        "`num_masks`, fewer probe images or a larger `every_n_epochs`."
                    )

    # ------------------------------------------------------------------------------------------- run
    def explain(self, pl_module: pl.LightningModule) -> RelaxResult:
        """Explain the probe with the current weights of the live encoder (frozen copy); no logging."""
        if self._copy is None or self._encoder is None or self._explainer is None:
            raise RuntimeError("RelaxMonitor.explain needs `setup` to have run (it runs inside `trainer.fit`).")
        if self.probe is None:
            raise RuntimeError("RelaxMonitor has no probe yet: pass `probe=` or let it capture the first batch.")
        with torch.no_grad():
            self._copy.load_state_dict(self._encoder.state_dict())
        return self._explainer.explain(self.probe.to(pl_module.device))

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> float | None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return None
        t0 = time.perf_counter()
        result = self.explain(pl_module)
        seconds = time.perf_counter() - t0
        res_cpu = result.cpu()
        self.last_result = res_cpu
        self.last_epoch = epoch
        step = int(trainer.global_step)
        metrics = {
            "relax/seconds": seconds,
            "relax/num_masks_used": float(res_cpu.num_masks_used.double().mean()),
            "relax/mean_uncertainty": float(torch.nanmean(res_cpu.uncertainty.double())),
        }
        imp = res_cpu.importance.flatten(1).float()
        if self._prev_importance is not None and self._prev_importance.shape == imp.shape:
            metrics["relax/rank_corr_prev"] = float(_spearman_rows(imp, self._prev_importance).mean())
        self._prev_importance = imp
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        grids = relax_overlays(self.probe, res_cpu, denormalize=self.denormalize, alpha=self.alpha)
        if self.log_images:
            self._log_grids(trainer, grids, step)
        if self.save_png or self.save_results:
            from torchvision.io import write_png

            out_dir = self._dir(trainer)
            out_dir.mkdir(parents=True, exist_ok=True)
            stem = "init" if epoch < 0 else f"epoch={epoch:04d}"
            if self.save_png:
                for kind, img in grids.items():
                    write_png(img, str(out_dir / f"{stem}-{kind}.png"))
            if self.save_results:
                torch.save(res_cpu.as_dict(), out_dir / f"{stem}-result.pt")
        return seconds

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        base = getattr(trainer, "log_dir", None) or trainer.default_root_dir
        return Path(base) / "relax"

    @staticmethod
    def _log_grids(trainer: pl.Trainer, grids: dict[str, Tensor], step: int) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            name = type(logger).__name__
            for kind, img in grids.items():
                tag = f"relax/{kind}"
                if hasattr(experiment, "add_image"):  # TensorBoard
                    experiment.add_image(tag, img, step, dataformats="CHW")
                elif "MLFlow" in name and hasattr(experiment, "log_image"):
                    experiment.log_image(logger.run_id, img.permute(1, 2, 0).numpy(), f"{tag}_step{step}.png")
                elif hasattr(logger, "log_image"):  # W&B, Neptune, ...
                    try:
                        logger.log_image(key=tag, images=[img.permute(1, 2, 0).numpy()], step=step)
                    except TypeError:  # pragma: no cover - another signature
                        pass

    # ------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "seed": self.seed,
            "last_epoch": self.last_epoch,
            "prev_importance": self._prev_importance,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stash = dict(state_dict)
        if self.probe is None and state_dict.get("probe") is not None:
            self.probe = state_dict["probe"]
        self.last_epoch = state_dict.get("last_epoch")
        self._prev_importance = state_dict.get("prev_importance")

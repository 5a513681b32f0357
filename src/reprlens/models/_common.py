"""Private helpers shared by the example models: batch unpacking and optimizer set-up."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULERS = (None, "cosine")


def _unpack_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Return ``(images, labels)`` from a reprlens dict batch, an ``(x, y, ...)`` tuple or a bare tensor.

    Labels are ``None`` when the batch carries none.
    """
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(
                f"Expected a dict batch with an 'image' entry (reprlens datamodule convention), but got keys "
                f"{sorted(batch)}. Put the input images under batch['image']."
            )
        return batch["image"], batch.get("label")
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        x = batch[0]
        if not isinstance(x, Tensor):
            raise TypeError(
                f"Expected the first element of a tuple batch to be the image tensor, but got "
                f"{type(x).__name__}. Pass batches as (images, labels) or as dicts with 'image'/'label'."
            )
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return x, y
    raise TypeError(
        f"Expected a batch as a dict with 'image'/'label', an (images, labels) tuple or a tensor, but got "
        f"{type(batch).__name__}."
    )


def _unpack_views(batch: Any) -> tuple[list[Tensor] | None, Tensor | None]:
    """Return ``(views, labels)`` for two-view batches; ``views`` is None when the batch has no views.

    Accepted: dict batches with ``"views"`` (list of tensors) and lightly-style ``(views, labels, ...)``
    tuples where ``views`` is a list/tuple of tensors.
    """
    if isinstance(batch, Mapping):
        views = batch.get("views")
        return (list(views) if views is not None else None), batch.get("label")
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        first = batch[0]
        if isinstance(first, Sequence) and len(first) > 0 and all(isinstance(v, Tensor) for v in first):
            y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
            return list(first), y
    return None, None


def _check_choice(value: Any, name: str, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"Expected argument `{name}` to be one of {list(choices)}, but got {value!r}.")


def _is_finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_positive_float(value: Any, name: str) -> None:
    if not _is_finite_number(value) or value <= 0:
        raise ValueError(f"Expected argument `{name}` to be a finite number > 0, but got {value!r}.")


def _check_nonneg_float(value: Any, name: str) -> None:
    if not _is_finite_number(value) or value < 0:
        raise ValueError(f"Expected argument `{name}` to be a finite number >= 0, but got {value!r}.")


def _check_channels(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if (
        not isinstance(value, Sequence)
        or len(value) == 0
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(
            f"Expected argument `{name}` to be a non-empty sequence of positive ints, but got {value!r}."
        )
    return tuple(int(v) for v in value)


def _make_optimizer(
    module: Any, params: Any, *, optimizer: str, lr: float, weight_decay: float, scheduler: str | None
) -> Any:
    """Build the optimizer (and an optional per-epoch cosine schedule over ``trainer.max_epochs``)."""
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9, nesterov=True)
    if scheduler is None:
        return opt
    trainer = getattr(module, "_trainer", None)
    max_epochs = getattr(trainer, "max_epochs", None) if trainer is not None else None
    if max_epochs is None or max_epochs < 1:
        raise RuntimeError(
            "scheduler='cosine' anneals over trainer.max_epochs, but the Trainer has no finite max_epochs "
            f"(got {max_epochs!r}). Set Trainer(max_epochs=...) or use scheduler=None."
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct argmax predictions, as a 0-dim tensor (no host sync)."""
    return (logits.argmax(dim=1) == y).to(logits.dtype).mean()


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal conv init, unit BN (as torchvision's ResNet)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ExampleModule(pl.LightningModule):
    """Steps and optimizers shared by the example models: each defines ``_shared_step(batch, stage)``."""

    def _shared_step(self, batch: Any, stage: str) -> Tensor | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "train")
        if loss is None:  # the models raise for training batches they cannot use
            raise RuntimeError(f"{type(self).__name__}.training_step produced no loss.")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self._shared_step(batch, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return _make_optimizer(
            self, self.parameters(), optimizer=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay,
            scheduler=hp.scheduler,
        )

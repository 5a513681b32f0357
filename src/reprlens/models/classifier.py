"""A small CNN classifier (no reprlens code inside)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from reprlens.models._common import (
    _ExampleModule,
    _OPTIMIZERS,
    _SCHEDULERS,
    _accuracy,
    _check_channels,
    _check_choice,
    _check_nonneg_float,
    _check_positive_float,
    _init_weights,
    _unpack_batch,
)
from reprlens.utils import check_positive_int

__all__ = ["Classifier"]


class Classifier(_ExampleModule):
    """Small CNN: ``features`` (conv3x3-BN-ReLU-maxpool stages), ``pool`` (global average + flatten), ``fc``.

    ``features`` children are named ``conv1, bn1, relu1, pool1, conv2, ...``; the last stage has no
    max-pool (the global pool follows). ``forward`` returns logits ``(N, num_classes)``. Batches: dicts
    with ``"image"``/``"label"`` or ``(x, y)`` tuples. Logs ``train/loss``, ``train/acc``, ``val/loss``,
    ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        channels: channels per conv stage.
        lr: learning rate.
        weight_decay: weight decay.
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"sgd"``.
        scheduler: ``None`` or ``"cosine"`` over ``trainer.max_epochs``.

    Example:
        >>> import torch
        >>> model = Classifier(in_channels=1, num_classes=4, channels=(8, 16))
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32, 64),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        scheduler: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes", minimum=2)
        chans = _check_channels(channels, "channels")
        _check_positive_float(lr, "lr")
        _check_nonneg_float(weight_decay, "weight_decay")
        _check_choice(optimizer, "optimizer", _OPTIMIZERS)
        _check_choice(scheduler, "scheduler", _SCHEDULERS)
        self.save_hyperparameters()
        feats: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        for i, cout in enumerate(chans, start=1):
            feats[f"conv{i}"] = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            feats[f"bn{i}"] = nn.BatchNorm2d(cout)
            feats[f"relu{i}"] = nn.ReLU(inplace=True)
            if i < len(chans):
                feats[f"pool{i}"] = nn.MaxPool2d(2)
            cin = cout
        self.features = nn.Sequential(feats)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        return self.fc(self.pool(self.features(x)))

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = _unpack_batch(batch)
        if y is None:
            raise ValueError(
                "Classifier needs labels: pass dict batches with 'label' or (images, labels) tuples."
            )
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        n = x.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=n)
        self.log(f"{stage}/acc", _accuracy(logits, y), prog_bar=stage != "train", batch_size=n)
        return loss


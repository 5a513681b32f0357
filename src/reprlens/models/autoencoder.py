"""Convolutional autoencoder with a jointly trained linear classification head (no reprlens code inside).

The setting of the constraint experiment of Bertolini et al. (arXiv 2202.09374): an encoder maps an image
to a K-dimensional embedding ``z``, a decoder reconstructs the image from ``z`` and a linear head
classifies ``z``; the loss is ``cls_weight * cross-entropy + recon_weight * MSE``.
"""

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

__all__ = ["ConvAutoencoder"]


class ConvAutoencoder(_ExampleModule):
    """Conv encoder -> embedding ``z`` (dim K) -> conv decoder, plus a linear classifier on ``z``.

    Modules:
        ``encoder``: ``nn.Sequential`` with children ``conv1, bn1, act1, pool1, conv2, bn2, act2, pool2,
        ..., flatten, fc``; ``encoder(x)`` is the embedding ``z`` ``(N, K)``.
        ``decoder``: ``fc, act0, unflatten, deconv1, act1, ..., deconvL, out`` mapping ``z`` to an image
        ``(N, C, H, W)`` in [0, 1] (sigmoid output).
        ``classifier``: ``Linear(K, num_classes)`` on ``z`` (not detached: the classification loss
        shapes the embedding).

    Batches: reprlens dict batches (``"image"``, ``"label"``) or ``(x, y)`` tuples; without labels only
    the reconstruction loss is used. Logs ``train/loss``, ``train/ce``, ``train/mse``, ``train/acc``,
    ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        in_channels: image channels (1 or 3).
        image_size: input height = width; must be divisible by ``2 ** len(hidden_channels)``.
        embedding_dim: K, the embedding dimension.
        num_classes: classes of the linear head.
        hidden_channels: channels of the conv stages (each conv 3x3 + BN + ReLU + 2x2 max-pool).
        lr: learning rate.
        weight_decay: weight decay.
        recon_weight: weight of the reconstruction MSE.
        cls_weight: weight of the cross-entropy.
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"sgd"``.
        scheduler: ``None`` or ``"cosine"`` over ``trainer.max_epochs``.

    Example:
        >>> import torch
        >>> model = ConvAutoencoder(in_channels=1, image_size=16, embedding_dim=4, num_classes=3)
        >>> model(torch.rand(2, 1, 16, 16)).shape
        torch.Size([2, 4])
        >>> model.decoder(model(torch.rand(2, 1, 16, 16))).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        embedding_dim: int = 10,
        num_classes: int = 10,
        hidden_channels: Sequence[int] = (16, 32),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        recon_weight: float = 1.0,
        cls_weight: float = 1.0,
        optimizer: str = "adam",
        scheduler: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(image_size, "image_size")
        check_positive_int(embedding_dim, "embedding_dim")
        check_positive_int(num_classes, "num_classes", minimum=2)
        channels = _check_channels(hidden_channels, "hidden_channels")
        factor = 2 ** len(channels)
        if image_size % factor != 0:
            raise ValueError(
                f"Expected `image_size` divisible by 2 ** len(hidden_channels) = {factor} (one 2x2 pool per "
                f"stage), but got image_size={image_size}. Resize the images or use fewer stages."
            )
        _check_positive_float(lr, "lr")
        _check_nonneg_float(weight_decay, "weight_decay")
        _check_nonneg_float(recon_weight, "recon_weight")
        _check_nonneg_float(cls_weight, "cls_weight")
        _check_choice(optimizer, "optimizer", _OPTIMIZERS)
        _check_choice(scheduler, "scheduler", _SCHEDULERS)
        self.save_hyperparameters()
        self.embedding_dim = embedding_dim

        side = image_size // factor
        flat = channels[-1] * side * side
        enc: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        for i, cout in enumerate(channels, start=1):
            enc[f"conv{i}"] = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            enc[f"bn{i}"] = nn.BatchNorm2d(cout)
            enc[f"act{i}"] = nn.ReLU(inplace=True)
            enc[f"pool{i}"] = nn.MaxPool2d(2)
            cin = cout
        enc["flatten"] = nn.Flatten()
        enc["fc"] = nn.Linear(flat, embedding_dim)
        self.encoder = nn.Sequential(enc)

        dec: OrderedDict[str, nn.Module] = OrderedDict()
        dec["fc"] = nn.Linear(embedding_dim, flat)
        dec["act0"] = nn.ReLU(inplace=True)
        dec["unflatten"] = nn.Unflatten(1, (channels[-1], side, side))
        rev = list(reversed(channels)) + [in_channels]
        for i in range(len(channels)):
            dec[f"deconv{i + 1}"] = nn.ConvTranspose2d(rev[i], rev[i + 1], 2, stride=2)
            if i < len(channels) - 1:
                dec[f"act{i + 1}"] = nn.ReLU(inplace=True)
        dec["out"] = nn.Sigmoid()
        self.decoder = nn.Sequential(dec)

        self.classifier = nn.Linear(embedding_dim, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Embedding ``z`` ``(N, K)`` of images ``(N, C, H, W)``."""
        return self.encoder(x)

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = _unpack_batch(batch)
        z = self.encoder(x)
        recon = self.decoder(z)
        mse = F.mse_loss(recon, x)
        loss = self.hparams.recon_weight * mse
        n = x.shape[0]
        if y is not None:
            logits = self.classifier(z)
            ce = F.cross_entropy(logits, y)
            loss = loss + self.hparams.cls_weight * ce
            self.log(f"{stage}/ce", ce, batch_size=n)
            self.log(f"{stage}/acc", _accuracy(logits, y), prog_bar=stage != "train", batch_size=n)
        self.log(f"{stage}/mse", mse, batch_size=n)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=n)
        return loss


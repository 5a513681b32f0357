"""SimCLR with a small CIFAR-style ResNet backbone: an ordinary LightningModule with no reprlens code.

Written the way lightly / solo-learn write self-supervised models, so reprlens has to wrap it exactly as
it would wrap a user's own: the backbone is called once per view, ``training_step`` returns a tensor
loss, and the blocks use in-place ReLUs (like torchvision's ResNet).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlens.models._common import (
    _ExampleModule,
    _OPTIMIZERS,
    _SCHEDULERS,
    _check_choice,
    _check_nonneg_float,
    _check_positive_float,
    _init_weights,
    _unpack_views,
)
from reprlens.utils import check_positive_int

__all__ = ["BasicBlock", "SimCLR", "SmallResNet", "nt_xent_loss"]


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy) loss of SimCLR for two views.

    For ``2N`` projections ``z = cat(z1, z2)`` l2-normalised, sample ``i`` and ``i + N`` form a positive
    pair and every other sample of the batch is a negative:
    ``loss = mean_i -log(exp(s_ip / T) / sum_{j != i} exp(s_ij / T))`` with cosine similarities ``s``.
    Computed on the local batch only (no all-gather of negatives under DDP).

    Args:
        z1: ``(N, D)`` projections of the first view.
        z2: ``(N, D)`` projections of the second view (same samples, same order).
        temperature: softmax temperature ``T > 0``.

    Returns:
        The scalar loss (0-dim tensor), differentiable.

    Example:
        >>> z = torch.randn(4, 8)
        >>> float(nt_xent_loss(z, z, temperature=0.5)) > 0
        True
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"Expected z1 and z2 to be (N, D) tensors of the same shape, but got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}. Pass the projections of the two views of the same N samples."
        )
    _check_positive_float(temperature, "temperature")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + BN, identity or 1x1 projection shortcut), in-place ReLUs.

    Example:
        >>> BasicBlock(8, 16, stride=2)(torch.randn(2, 8, 8, 8)).shape
        torch.Size([2, 16, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)  # in-place add, as torchvision does
        return self.relu2(out)


class SmallResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (no max-pool), three stages, global average pool.

    Submodules: ``stem``, ``layer1`` (``channels[0]``, stride 1), ``layer2`` (``channels[1]``, stride 2),
    ``layer3`` (``channels[2]``, stride 2), ``pool`` (``AdaptiveAvgPool2d(1)`` + ``Flatten``).
    ``forward`` returns ``(N, channels[2])`` features.

    Example:
        >>> SmallResNet(3, (8, 16, 32), (1, 1, 1))(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 32])
    """

    def __init__(self, in_channels: int, channels: Sequence[int], num_blocks: Sequence[int]) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
        )
        self.layer1 = self._stage(c1, c1, num_blocks[0], stride=1)
        self.layer2 = self._stage(c1, c2, num_blocks[1], stride=2)
        self.layer3 = self._stage(c2, c3, num_blocks[2], stride=2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c3

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.layer3(self.layer2(self.layer1(self.stem(x)))))


class SimCLR(_ExampleModule):
    """SimCLR: small ResNet backbone, MLP projector, NT-Xent loss on two views.

    Batches: reprlens dict batches with ``"views"`` (list of two ``(N, C, H, W)`` tensors) or
    lightly-style ``(views, labels, ...)`` tuples. The backbone is called once per view (two forward
    calls per step). ``training_step`` returns the tensor loss and logs ``train/loss``; validation and
    test log ``val/loss`` / ``test/loss`` when the batch has views (otherwise they do nothing).

    The projector is ``Linear-ReLU-Linear`` by default (``projector_bn=False``): BatchNorm in the head
    mixes the samples of a batch, so per-sample attributions from the projector outputs back to the
    backbone (the explanation regularizer's target) would depend on the other samples, and differ between
    train and eval mode. ``projector_bn=True`` gives the original SimCLR ``Linear-BN-ReLU-Linear`` head.

    Args:
        in_channels: image channels.
        width: channels of the first stage; stages have ``(width, 2 * width, embedding_dim)`` channels.
        num_blocks: basic blocks per stage (three ints).
        embedding_dim: dimension of the representation ``forward(x)`` returns (= channels of ``layer3``);
            default ``4 * width``.
        projector_hidden_dim: hidden width of the projector.
        projector_out_dim: output dimension of the projector (where NT-Xent is computed).
        projector_bn: BatchNorm in the projector (see above).
        temperature: NT-Xent temperature.
        lr: learning rate.
        weight_decay: weight decay.
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"sgd"`` (momentum 0.9, Nesterov).
        scheduler: ``None`` or ``"cosine"`` (per-epoch cosine annealing over ``trainer.max_epochs``).

    Example:
        >>> model = SimCLR(width=8)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 32])
        >>> views = [torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)]
        >>> model.training_step({"views": views, "label": torch.zeros(4, dtype=torch.long)}, 0).dim()
        0
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 16,
        num_blocks: Sequence[int] = (1, 1, 1),
        embedding_dim: int | None = None,
        projector_hidden_dim: int = 128,
        projector_out_dim: int = 64,
        projector_bn: bool = False,
        temperature: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        optimizer: str = "adam",
        scheduler: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(width, "width")
        check_positive_int(embedding_dim, "embedding_dim", allow_none=True)
        check_positive_int(projector_hidden_dim, "projector_hidden_dim")
        check_positive_int(projector_out_dim, "projector_out_dim")
        num_blocks = tuple(num_blocks)
        if len(num_blocks) != 3:
            raise ValueError(
                f"Expected `num_blocks` to have 3 entries (one per stage), but got {num_blocks!r}."
            )
        for i, b in enumerate(num_blocks):
            check_positive_int(b, f"num_blocks[{i}]")
        _check_positive_float(temperature, "temperature")
        _check_positive_float(lr, "lr")
        _check_nonneg_float(weight_decay, "weight_decay")
        _check_choice(optimizer, "optimizer", _OPTIMIZERS)
        _check_choice(scheduler, "scheduler", _SCHEDULERS)
        self.save_hyperparameters()
        dim = embedding_dim if embedding_dim is not None else 4 * width
        self.backbone = SmallResNet(in_channels, (width, 2 * width, dim), num_blocks)
        head: list[nn.Module] = [nn.Linear(dim, projector_hidden_dim, bias=not projector_bn)]
        if projector_bn:
            head.append(nn.BatchNorm1d(projector_hidden_dim))
        head += [nn.ReLU(inplace=True), nn.Linear(projector_hidden_dim, projector_out_dim)]
        self.projector = nn.Sequential(*head)
        self.embedding_dim = dim
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Backbone representation ``(N, embedding_dim)`` of images ``(N, C, H, W)``."""
        return self.backbone(x)

    def _shared_step(self, batch: Any, stage: str) -> Tensor | None:
        views, _ = _unpack_views(batch)
        if views is None:
            if stage == "train":
                raise ValueError(
                    "SimCLR.training_step needs two views per sample: a dict batch with 'views' (list of 2 "
                    "tensors) or a (views, labels) tuple. Use a datamodule in two-view mode "
                    "(e.g. ShapesDataModule(two_views=True))."
                )
            return None
        if len(views) != 2:
            raise ValueError(f"SimCLR expects exactly 2 views per batch, but got {len(views)}.")
        z1 = self.projector(self.backbone(views[0]))
        z2 = self.projector(self.backbone(views[1]))
        loss = nt_xent_loss(z1, z2, self.hparams.temperature)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=views[0].shape[0])
        return loss


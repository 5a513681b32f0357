"""The paper's mini-batch protocol: class-pure batches plus "ghost" samples for normalisation statistics.

Example:
    >>> import torch
    >>> s = ClassPureBatchSampler(torch.tensor([0, 0, 0, 1, 1, 1]), batch_size=4, ghost_samples=1, seed=0)
    >>> batches = list(s)
    >>> all(len({int(torch.tensor([0, 0, 0, 1, 1, 1])[i]) for i in b[:-1]}) == 1 for b in batches)
    True
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from reprlens.utils import check_positive_int

__all__ = ["ClassPureBatchSampler", "real_rows", "use_ghost_batchnorm"]


class ClassPureBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size − ghost_samples`` examples of one class followed by ``ghost_samples`` ghosts.

    Every example is a non-ghost exactly once per epoch: each class is shuffled and cut into chunks, chunks are
    interleaved at random (a class is drawn with probability proportional to its remaining size). Ghosts are
    drawn uniformly from the whole dataset, distinct within a batch. Deterministic from ``seed`` and
    :meth:`set_epoch`. Under DDP (``num_replicas > 1``) every rank gets a disjoint part of the *same* chunk at
    each step (set ``Trainer(use_distributed_sampler=False)``).

    Args:
        labels: (N,) class labels of the dataset.
        batch_size: per-rank batch size including ghosts.
        ghost_samples: ghosts per batch.
        drop_last: drop short last chunks of each class.
        seed: base seed.
        class_run_length: consecutive batches of the same class (set to ``accumulate_grad_batches``).
        num_replicas, rank: DDP layout (default: read from ``torch.distributed`` if initialised, else 1, 0).
    """

    def __init__(
        self,
        labels: Tensor | Sequence[int],
        batch_size: int,
        ghost_samples: int = 0,
        *,
        drop_last: bool = False,
        seed: int = 0,
        class_run_length: int = 1,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        check_positive_int(batch_size, "batch_size")
        check_positive_int(ghost_samples, "ghost_samples", minimum=0)
        check_positive_int(class_run_length, "class_run_length")
        if ghost_samples >= batch_size:
            raise ValueError(f"Expected ghost_samples < batch_size, got {ghost_samples} >= {batch_size}.")
        self.labels = torch.as_tensor(labels).reshape(-1).cpu()
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Expected 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}.")
        if ghost_samples > len(self.labels):
            raise ValueError(f"ghost_samples={ghost_samples} exceeds the dataset size {len(self.labels)}.")
        self.batch_size = batch_size
        self.ghost_samples = ghost_samples
        self.drop_last = drop_last
        self.seed = seed
        self.class_run_length = class_run_length
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed for ``epoch`` (call it each epoch, like ``DistributedSampler``)."""
        self.epoch = int(epoch)

    @property
    def real_per_rank(self) -> int:
        return self.batch_size - self.ghost_samples

    def _chunks(self) -> list[Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        size = self.real_per_rank * self.num_replicas
        per_class: dict[int, list[Tensor]] = {}
        for c in torch.unique(self.labels).tolist():
            members = torch.nonzero(self.labels == c).reshape(-1)
            members = members[torch.randperm(len(members), generator=gen)]
            chunks = list(members.split(size))
            if self.drop_last and chunks and len(chunks[-1]) < size:
                chunks = chunks[:-1]
            if chunks:
                per_class[c] = chunks
        order: list[Tensor] = []
        remaining = {c: sum(len(ch) for ch in chs) for c, chs in per_class.items()}
        while per_class:
            classes = sorted(per_class)
            weights = torch.tensor([float(remaining[c]) for c in classes])
            c = classes[int(torch.multinomial(weights, 1, generator=gen))]
            for _ in range(self.class_run_length):
                if not per_class.get(c):
                    break
                ch = per_class[c].pop(0)
                remaining[c] -= len(ch)
                order.append(ch)
            if not per_class[c]:
                del per_class[c]
        return order

    def __iter__(self) -> Iterator[list[int]]:
        ghost_gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + self.rank + 1)
        n = len(self.labels)
        for chunk in self._chunks():
            part = chunk[self.rank :: self.num_replicas]
            batch = part.tolist()
            if self.ghost_samples:
                batch += torch.randperm(n, generator=ghost_gen)[: self.ghost_samples].tolist()
            yield batch

    def __len__(self) -> int:
        size = self.real_per_rank * self.num_replicas
        total = 0
        for c in torch.unique(self.labels).tolist():
            k = int((self.labels == c).sum())
            total += k // size if self.drop_last else -(-k // size)
        return total


def real_rows(t: Tensor, ghost_samples: int) -> Tensor:
    """The non-ghost rows of a batch tensor (ghosts are the last ``ghost_samples`` rows).

    Example:
        >>> real_rows(torch.arange(5), 2)
        tensor([0, 1, 2])
    """
    return t[: t.shape[0] - ghost_samples] if ghost_samples else t


def use_ghost_batchnorm(model: nn.Module, ghost_samples: int, *, detach_stats: bool = False) -> nn.Module:
    """Make every BatchNorm1d/2d normalise the whole batch with its ghosts' mean and variance (in training).

    Running statistics are updated from the ghosts only. ``detach_stats=True`` stops gradients through the ghost
    statistics (the reference left this off). Returns ``model`` (modified in place).

    Example:
        >>> net = use_ghost_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), ghost_samples=2)
        >>> net(torch.randn(5, 3)).shape
        torch.Size([5, 3])
    """
    check_positive_int(ghost_samples, "ghost_samples")

    def forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
        if not self.training:
            return type(self).forward(self, x)
        ghosts = x[-ghost_samples:]
        if detach_stats:
            ghosts = ghosts.detach()
        dims = [0] + list(range(2, x.dim()))
        mean = ghosts.mean(dims)
        var = ghosts.var(dims, unbiased=False)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                n = ghosts.numel() / ghosts.shape[1]
                mom = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - mom).add_(mom * mean.detach())
                self.running_var.mul_(1 - mom).add_(mom * var.detach() * n / max(n - 1, 1))
                self.num_batches_tracked += 1
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y

    for mod in model.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            mod.forward = types.MethodType(forward, mod)
    return model


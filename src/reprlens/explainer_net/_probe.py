"""The spec's synthetic probe (D6, section 5.6): one 5x5 part (square or ring) per noisy image, and the toy
performer. Used by tests, the benchmark and the experiment."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["make_part_probe", "probe_performer", "train_performer"]


def make_part_probe(n: int, *, size: int = 32, seed: int = 0) -> dict[str, Tensor]:
    """``n`` images ``(n, 1, size, size)``: N(0, 0.3²) noise plus a 5x5 square (class 0) or ring (class 1)
    at a uniform top-left corner; landmark = part centre ``(r+2, c+2)``.

    Example:
        >>> d = make_part_probe(4)
        >>> d["image"].shape, d["landmarks"].shape
        (torch.Size([4, 1, 32, 32]), torch.Size([4, 1, 2]))
    """
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 1, size, size, generator=g) * 0.3
    label = torch.randint(0, 2, (n,), generator=g)
    corner = torch.randint(0, size - 4, (n, 2), generator=g)
    square = torch.ones(5, 5)
    ring = torch.ones(5, 5)
    ring[1:4, 1:4] = 0
    parts = torch.stack([square, ring])[label]  # (n, 5, 5)
    rows = corner[:, 0, None, None] + torch.arange(5).view(1, 5, 1)
    cols = corner[:, 1, None, None] + torch.arange(5).view(1, 1, 5)
    bidx = torch.arange(n).view(n, 1, 1).expand(n, 5, 5)
    img[bidx, 0, rows.expand(n, 5, 5), cols.expand(n, 5, 5)] += parts
    lm = (corner.float() + 2.0).view(n, 1, 2)
    return {"image": img, "label": label, "landmarks": lm, "index": torch.arange(n)}


def probe_performer(seed: int = 0) -> nn.Sequential:
    """Conv(1→16)-ReLU-MaxPool2-Conv(16→32)-ReLU-MaxPool2-Conv(32→32)-ReLU-GAP-Linear(32→2); target ``"7"``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 2),
    )


def train_performer(net: nn.Module, data: dict[str, Tensor], *, epochs: int = 4, batch_size: int = 64,
                    lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Plain Adam training loop (cross-entropy); returns ``net`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x, y = data["image"], data["label"]
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()

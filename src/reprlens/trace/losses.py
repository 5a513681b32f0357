"""Per-example losses for tracin mode: ``(module, batch) -> (N,)``.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(4, 3)
    >>> per_example_cross_entropy(net, {"image": torch.randn(2, 4), "label": torch.tensor([0, 2])}).shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["per_example_cross_entropy"]


def per_example_cross_entropy(module: nn.Module, batch: Any) -> Tensor:
    """Cross-entropy per example of ``module(batch["image"])`` (logits) against ``batch["label"]``.

    Tuple batches ``(x, y, ...)`` are accepted too. For Captum parity use the same loss with reduction "sum".
    """
    if isinstance(batch, Mapping):
        x, y = batch["image"], batch["label"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise TypeError(f"Expected a dict batch with 'image'/'label' or an (x, y) tuple, got {type(batch).__name__}.")
    return F.cross_entropy(module(x), y, reduction="none")

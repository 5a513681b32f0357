"""Informativeness and disentanglement scores of attribution maps.

* :mod:`reprlens.scores.functional`: pure, differentiable functions (use them in losses).
* :mod:`reprlens.scores.metrics`: torchmetrics classes (accumulate over batches, sync under DDP, log).
"""

from reprlens.scores.functional import (
    disentanglement,
    disentanglement_per_dim,
    informativeness,
    informativeness_per_dim,
    map_similarity,
)
from reprlens.scores.metrics import Disentanglement, Informativeness

__all__ = [
    "Disentanglement",
    "Informativeness",
    "disentanglement",
    "disentanglement_per_dim",
    "informativeness",
    "informativeness_per_dim",
    "map_similarity",
]

"""reprlens: explain, evaluate and enhance learned representations while they are being trained.

reprlens plugs into PyTorch Lightning. Add a callback to a ``Trainer`` and any LightningModule gets
explanation scores logged as torchmetrics, explanation-based regularizers added to its loss, and a
trace of which training examples shaped its representation.

Subpackages (imported lazily, so ``import reprlens`` stays cheap):

* :mod:`reprlens.capture`: forward hooks by dotted module name.
* :mod:`reprlens.attribution`: layer-to-layer attribution maps.
* :mod:`reprlens.scores`: informativeness and disentanglement scores (functional + torchmetrics).
* :mod:`reprlens.regularizer`: the scores as a differentiable loss term.
* :mod:`reprlens.trace`: training trace store and reader.
* :mod:`reprlens.relax`: RELAX masking explanations with uncertainty.
* :mod:`reprlens.invert`: INVERT concept labels for units.
* :mod:`reprlens.explainer_net`: explainer network distilled from a conv layer.
* :mod:`reprlens.callbacks`: the Lightning callbacks.
* :mod:`reprlens.data`, :mod:`reprlens.models`: procedural data and example models.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "capture",
    "attribution",
    "scores",
    "regularizer",
    "trace",
    "relax",
    "invert",
    "explainer_net",
    "callbacks",
    "data",
    "models",
    "plotting",
    "report",
    "utils",
}

__all__ = ["__version__", *sorted(_SUBMODULES)]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'reprlens' has no attribute {name!r}")

"""Explainer network (Zhang et al., "Unsupervised Learning of Neural Networks to Explain Neural Networks").

A small side network, the *explainer*, is distilled from a frozen *performer*'s conv layer: an interpretable
track of masked conv layers (part templates + mutual-information filter loss), an ordinary track, a per-image
gate ``p`` and a decoder that reconstructs the performer's features. The functional core and
:class:`PartExplainer` are plain torch; :class:`ExplainerModule` and :class:`FeatureCache` (Lightning) load
lazily so that torch-only users never import Lightning.
"""

from __future__ import annotations

from typing import Any

from reprlens.explainer_net.functional import (
    LocationInstabilityResult,
    ReceptiveField,
    filter_loss,
    filter_mutual_information,
    location_instability,
    part_mask,
    part_templates,
    peak_positions,
    receptive_field,
    reference_filter_gradient,
)
from reprlens.explainer_net.modules import ExplainerOutput, PartExplainer

_LAZY = {
    "ExplainerModule": "reprlens.explainer_net.lightning",
    "FeatureCache": "reprlens.explainer_net.lightning",
    "LocationInstability": "reprlens.explainer_net.metrics",
    "RelativeReconstructionError": "reprlens.explainer_net.metrics",
    "HeadFidelity": "reprlens.explainer_net.metrics",
    "GateStatistics": "reprlens.explainer_net.metrics",
}

__all__ = [
    "ExplainerModule",
    "ExplainerOutput",
    "FeatureCache",
    "GateStatistics",
    "HeadFidelity",
    "LocationInstability",
    "LocationInstabilityResult",
    "PartExplainer",
    "ReceptiveField",
    "RelativeReconstructionError",
    "filter_loss",
    "filter_mutual_information",
    "location_instability",
    "part_mask",
    "part_templates",
    "peak_positions",
    "receptive_field",
    "reference_filter_gradient",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reprlens.explainer_net' has no attribute {name!r}")

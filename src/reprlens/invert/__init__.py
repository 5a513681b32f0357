"""INVERT: label units with compositional concept formulas by AUC (Bykov et al., NeurIPS 2023).

- :class:`ConceptSet`: N x K boolean concepts with names (label matrix, CSV, class hierarchy, factors).
- :class:`ActivationCollector` / :class:`Activations`: one scalar per unit per example, on disk or in memory.
- :class:`Invert` / :class:`InvertResult`: exact vectorised beam search over all units at once, with
  Mann-Whitney p-values and multiple-testing correction.
- :func:`auroc`: the full D x K AUC matrix (functional core in :mod:`reprlens.invert.functional`).
"""

from reprlens.invert.collector import ActivationCollector, Activations
from reprlens.invert.concepts import ConceptSet
from reprlens.invert.functional import auroc, auroc_exact, mann_whitney, midranks
from reprlens.invert.search import Invert, InvertResult

__all__ = [
    "ActivationCollector",
    "Activations",
    "ConceptSet",
    "Invert",
    "InvertResult",
    "auroc",
    "auroc_exact",
    "mann_whitney",
    "midranks",
]

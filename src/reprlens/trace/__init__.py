"""Training trace (Pfahler & Morik 2021; TracIn): what each training example contributed to chosen layers.

* :class:`TraceRecorder` (plain torch) / ``reprlens.callbacks.TrainingTrace`` (Lightning) record per-example
  factors crash-safely into a store (append-only shards + atomic manifests).
* :class:`TraceReader` answers: per-example contributions to a test input's representation change, top-k
  proponents/opponents, per-class sums, TracIn influence and self-influence, completeness reports.
* :mod:`reprlens.trace.functional` holds the plain-torch factor identities; :mod:`reprlens.trace.sampler` the
  class-pure batch sampler with ghost samples; :mod:`reprlens.trace.ids` example-id adapters.

Example:
    >>> from reprlens.trace import TraceReader, TraceRecorder, ClassPureBatchSampler
"""

from reprlens.trace import functional, ids, projection
from reprlens.trace.functional import (
    LayerSpec,
    factor_dot,
    factor_sq_norm,
    patch_matrix,
    per_example_grads,
    row_contributions,
    row_scores,
    weighted_gaussian_kde,
)
from reprlens.trace.ids import WithIndex
from reprlens.trace.losses import per_example_cross_entropy
from reprlens.trace.projection import projection_matrices
from reprlens.trace.reader import (
    ClassContributions,
    CompletenessReport,
    Contributions,
    Influence,
    TopK,
    TraceCheckpoint,
    TraceReader,
    captum_checkpoint_loader,
)
from reprlens.trace.recorder import TraceRecorder
from reprlens.trace.sampler import ClassPureBatchSampler, real_rows, use_ghost_batchnorm

__all__ = [
    "ClassContributions",
    "ClassPureBatchSampler",
    "CompletenessReport",
    "Contributions",
    "Influence",
    "LayerSpec",
    "TopK",
    "TraceCheckpoint",
    "TraceReader",
    "TraceRecorder",
    "WithIndex",
    "captum_checkpoint_loader",
    "factor_dot",
    "factor_sq_norm",
    "functional",
    "ids",
    "patch_matrix",
    "per_example_cross_entropy",
    "per_example_grads",
    "projection",
    "projection_matrices",
    "real_rows",
    "row_contributions",
    "row_scores",
    "use_ghost_batchnorm",
    "weighted_gaussian_kde",
]

"""Lightning callbacks: add them to a ``Trainer`` and any LightningModule gets reprlens features.

One callback per module (the Lightning pattern); every public name is re-exported here.
"""

from reprlens.callbacks.concept_labeler import *  # noqa: F401,F403
from reprlens.callbacks.explainer_distillation import *  # noqa: F401,F403
from reprlens.callbacks.linear_probe import *  # noqa: F401,F403
from reprlens.callbacks.regularization import *  # noqa: F401,F403
from reprlens.callbacks.relax_monitor import *  # noqa: F401,F403
from reprlens.callbacks.score_monitor import *  # noqa: F401,F403
from reprlens.callbacks.training_trace import *  # noqa: F401,F403
from reprlens.callbacks import (  # noqa: E402
    concept_labeler as _cl,
    explainer_distillation as _ed,
    linear_probe as _lp,
    regularization as _rg,
    relax_monitor as _rm,
    score_monitor as _sm,
    training_trace as _tt,
)

__all__ = sorted({*_cl.__all__, *_ed.__all__, *_lp.__all__, *_rg.__all__, *_rm.__all__, *_sm.__all__, *_tt.__all__})

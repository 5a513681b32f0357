"""Figures shared by callbacks, experiments and the report (matplotlib, optional extra ``plots``).

Every plotting function takes an optional ``ax`` and returns the matplotlib ``Figure``; saving and
logging to Lightning loggers go through :func:`reprlens.plotting.common.log_figure`.
"""

from reprlens.plotting.attribution import *  # noqa: F401,F403
from reprlens.plotting.common import *  # noqa: F401,F403
from reprlens.plotting.explainer import *  # noqa: F401,F403
from reprlens.plotting.invert import *  # noqa: F401,F403
from reprlens.plotting.relax import *  # noqa: F401,F403
from reprlens.plotting.trace import *  # noqa: F401,F403
from reprlens.plotting import (  # noqa: E402
    attribution as _a,
    common as _c,
    explainer as _e,
    invert as _i,
    relax as _r,
    trace as _t,
)

__all__ = sorted({*_a.__all__, *_c.__all__, *_e.__all__, *_i.__all__, *_r.__all__, *_t.__all__})

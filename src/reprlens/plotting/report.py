"""Figures of the HTML run report (:func:`reprlens.report.build_report`): metric curves and run comparisons.

All functions take plain Python data (as read from ``metrics.csv`` / ``summary.json``) and return a matplotlib
figure; :func:`reprlens.plotting.common.figure_to_png` renders it with deterministic PNG metadata.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from reprlens.plotting.common import require_matplotlib

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["plot_metric_curves", "plot_run_comparison"]

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def plot_metric_curves(
    panels: Mapping[str, Series],
    *,
    xlabel: str = "step",
    ncols: int = 2,
    suptitle: str | None = None,
) -> Figure:
    """One axes per panel, one line per series: ``panels[title][name] = (x, y)``.

    Args:
        panels: ``{panel title: {series name: (x values, y values)}}``; panels are drawn in the given order.
        xlabel: label of every x axis.
        ncols: axes per row.
        suptitle: figure title.

    Returns:
        The figure (close it with ``plt.close(fig)`` or render it with ``figure_to_png``).

    Raises:
        ValueError: ``panels`` is empty or ``ncols`` is not positive.

    Example:
        >>> fig = plot_metric_curves({"loss": {"train/loss": ([0, 1, 2], [1.0, 0.5, 0.25])}})
        >>> len(fig.axes)
        1
    """
    if not panels:
        raise ValueError("plot_metric_curves needs at least one panel, but got none.")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"Expected `ncols` to be a positive int, but got {ncols!r}.")
    plt = require_matplotlib()
    n = len(panels)
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.0 * rows), squeeze=False)
    for k, (title, series) in enumerate(panels.items()):
        ax = axes[k // cols][k % cols]
        for name, (x, y) in series.items():
            marker = "o" if len(x) <= 30 else None
            ax.plot(list(x), list(y), marker=marker, markersize=3, linewidth=1.2, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def plot_run_comparison(
    runs: Sequence[str],
    values: Mapping[str, Sequence[float | None]],
    *,
    groups: Sequence[str] | None = None,
    suptitle: str | None = None,
) -> Figure:
    """Bar charts comparing runs: one axes per metric, one bar per run (``None`` values are left out).

    Args:
        runs: run names (x tick labels).
        values: ``{metric: [value per run]}``.
        groups: a group per run (e.g. ``"regularized"`` / ``"baseline"``) that sets the bar colour.
        suptitle: figure title.

    Raises:
        ValueError: no runs or metrics, or a value list whose length differs from ``runs``.

    Example:
        >>> fig = plot_run_comparison(["a", "b"], {"acc": [0.5, 0.7]}, groups=["baseline", "regularized"])
        >>> len(fig.axes)
        1
    """
    if not runs or not values:
        raise ValueError("plot_run_comparison needs at least one run and one metric.")
    for name, vals in values.items():
        if len(vals) != len(runs):
            raise ValueError(
                f"Expected {len(runs)} values for metric {name!r} (one per run), got {len(vals)}."
            )
    if groups is not None and len(groups) != len(runs):
        raise ValueError(f"Expected one group per run ({len(runs)}), got {len(groups)}.")
    plt = require_matplotlib()
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted(set(groups)) if groups is not None else []
    colours = [palette[names.index(g) % len(palette)] for g in groups] if groups is not None else None
    n = len(values)
    fig, axes = plt.subplots(1, n, figsize=(max(3.0, 0.6 * len(runs) + 1.5) * n, 3.2), squeeze=False)
    for k, (metric, vals) in enumerate(values.items()):
        ax = axes[0][k]
        xs = [i for i, v in enumerate(vals) if v is not None and math.isfinite(v)]
        ax.bar(xs, [vals[i] for i in xs], color=[colours[i] for i in xs] if colours else None)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(list(runs), rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    if groups is not None:
        from matplotlib.patches import Patch

        handles = [Patch(color=palette[i % len(palette)], label=g) for i, g in enumerate(names)]
        axes[0][-1].legend(handles=handles, fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig

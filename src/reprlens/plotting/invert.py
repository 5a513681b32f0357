"""Plotting helpers (invert). Matplotlib is optional: `pip install 'reprlens[plots]'`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from reprlens.plotting.common import require_matplotlib

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["plot_concept_labels"]


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plot_concept_labels(
    result: Any,
    top_k: int = 20,
    by: str = "auc",
    ax: Any = None,
    *,
    significance_level: float = 0.05,
    use_descriptions: bool = False,
    inset: bool = True,
    title: str | None = None,
) -> Figure:
    """Horizontal bars of the top units' best labels (AUC, or 1 - AUC in negative mode) measured from 0.5.

    Bars are labelled ``"unit 17: circle & red"`` (at most 60 characters) and annotated with the concept
    fraction and the corrected p-value; units whose ``p_corrected`` exceeds ``significance_level`` are
    grey. An inset histogram shows the best AUCs of all units.

    Args:
        result: an :class:`reprlens.invert.InvertResult`.
        top_k: number of units shown.
        by: ``"auc"`` (objective) or ``"p"`` (smallest corrected log p first).
        ax: optional matplotlib axes.
        significance_level: threshold on ``p_corrected`` for the colouring.
        use_descriptions: label bars with concept descriptions instead of names.
        inset: draw the histogram inset.
        title: axes title.

    Example:
        >>> import torch
        >>> from reprlens.invert import ConceptSet, Invert
        >>> cs = ConceptSet(torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]), names=["a", "b"])
        >>> res = Invert(cs, max_length=1, beam_size=1).explain(torch.tensor([[3.0], [1.0], [4.0], [0.0]]))
        >>> fig = plot_concept_labels(res); len(fig.axes) >= 1
        True
    """
    if by not in ("auc", "p"):
        raise ValueError(f"Expected `by` in ('auc', 'p'), but got {by!r}.")
    plt = require_matplotlib()
    best = result.best()
    negative = result.params.get("mode", "positive") == "negative"
    if ax is None:
        n_show = max(1, min(top_k, len(best)))
        fig, ax = plt.subplots(figsize=(8.0, 0.35 * n_show + 1.4))
    else:
        fig = ax.figure
    if len(best) == 0:
        ax.text(0.5, 0.5, "no labels", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    auc = np.asarray(best.columns["auc"], dtype=np.float64)
    score = 1.0 - auc if negative else auc
    if by == "auc":
        order = np.argsort(-score, kind="stable")[:top_k]
    else:
        order = np.argsort(best.columns["log_p_corrected"], kind="stable")[:top_k]
    pc = np.asarray(best.columns["p_corrected"])
    labels = []
    for i in order:
        formula = best.describe(int(i)) if use_descriptions else best.columns["formula"][i]
        labels.append(_shorten(f"unit {int(best.columns['neuron'][i])}: {formula}"))
    y = np.arange(len(order))[::-1]
    colours = ["tab:blue" if pc[i] <= significance_level else "0.7" for i in order]
    ax.barh(y, score[order] - 0.5, left=0.5, color=colours)
    for yy, i in zip(y, order):
        ax.text(score[i] + 0.005, yy, f"T={best.columns['fraction'][i]:.3f}  p_corr={pc[i]:.2g}", va="center",
                fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlim(0.5, 1.45 if inset and len(best) > 1 else 1.2)
    ax.set_xticks(np.linspace(0.5, 1.0, 6))
    ax.set_xlabel("1 - AUC" if negative else "AUC")
    ax.set_title(title or f"Top {len(order)} units by {'AUC' if by == 'auc' else 'corrected p'} "
                 f"(grey: p_corrected > {significance_level:g})", fontsize=9)
    if inset and len(best) > 1:
        ins = ax.inset_axes([0.8, 0.06, 0.18, 0.22])  # right of the annotations (x > 1.25)
        ins.hist(score, bins=20, range=(0.5, 1.0), color="0.4")
        ins.set_title("all units", fontsize=6)
        ins.tick_params(labelsize=5)
    fig.tight_layout()
    return fig

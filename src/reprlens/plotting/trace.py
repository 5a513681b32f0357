"""Plotting helpers (trace). Matplotlib is optional: `pip install 'reprlens[plots]'`.

Re-exports :func:`reprlens.trace.plots.plot_class_ridges` (per-class ridge plot of contribution cosines,
weighted by contribution norm) and :func:`reprlens.trace.plots.plot_top_examples` (grid of the most
influential training images for a test image).
"""

from __future__ import annotations

from reprlens.trace.plots import plot_class_ridges, plot_top_examples

__all__ = ["plot_class_ridges", "plot_top_examples"]

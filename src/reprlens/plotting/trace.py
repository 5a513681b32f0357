"""Plotting helpers (trace). Matplotlib is optional: `pip install 'reprlens[plots]'`."""

from __future__ import annotations

__all__: list[str] = []

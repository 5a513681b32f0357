"""Placeholder: this callback is not implemented yet (see the issue tracker)."""

from __future__ import annotations

__all__: list[str] = []

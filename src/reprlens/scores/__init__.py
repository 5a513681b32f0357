"""scores (not implemented yet; see the issue tracker)."""

__all__: list[str] = []

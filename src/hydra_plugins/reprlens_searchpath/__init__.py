"""Hydra search-path plugin of reprlens (discovered by Hydra through the ``hydra_plugins`` namespace)."""

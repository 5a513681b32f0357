"""Adds reprlens' configs (``pkg://reprlens.conf``) to the search path of every Hydra app.

With reprlens installed, a user's own Hydra app can compose reprlens configs in its defaults list, e.g.::

    defaults:
      - callbacks: default        # reprlens' conf/callbacks/default.yaml (unless the app has its own)
      - trainer: ddp
      - _self_

The app's own configs come first in the search path, so they take precedence over reprlens'.
The plugin imports only Hydra (no torch), so it costs nothing to apps that do not use reprlens configs.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "reprlens"
SEARCH_PATH = "pkg://reprlens.conf"


class ReprlensSearchPathPlugin(SearchPathPlugin):
    """Appends ``pkg://reprlens.conf`` (provider ``reprlens``) to the config search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        """Append reprlens' configs once (after the app's own, so the app can shadow them)."""
        if not any(element.path == SEARCH_PATH for element in search_path.get_path()):
            search_path.append(provider=PROVIDER, path=SEARCH_PATH)

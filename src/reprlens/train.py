"""``python -m reprlens.train``: the same Hydra main job as ``reprlens-train`` (see :mod:`reprlens.cli`)."""

from __future__ import annotations

from reprlens.cli import run, train

__all__ = ["run", "train"]

if __name__ == "__main__":
    train()

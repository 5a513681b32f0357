"""Trace store: append-only ``.npy`` shards plus per-rank manifests committed atomically.

Layout under ``dirpath``::

    trace.json                          format, version, run id, mode, layers, segments, truncations
    weights/initial.pt                  W_0 of the tracked layers
    weights/step_<s>.pt                 snapshots written with each commit (the last 3 are kept)
    checkpoints/step_<s>.pt             tracin checkpoints {"state_dict", "lr", "step", "epoch"}
    seg_<k>/rank_<r>/manifest.json      committed shards, last_complete_step, status
    seg_<k>/rank_<r>/<layer>/<first>-<end>.<part>.{a,d,rows}.npy
    seg_<k>/rank_<r>/steps/<first>-<end>.steps.npy

Every file is written to ``X.tmp``, flushed, fsynced and ``os.replace``d; the manifest is written last, so a
``kill -9`` at any time leaves every listed shard complete. Files not listed in a manifest are orphans.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> atomic_write_json(os.path.join(d, "x.json"), {"a": 1})
    >>> read_json(os.path.join(d, "x.json"))
    {'a': 1}
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "ROW_DTYPE",
    "STEP_DTYPE",
    "VERSION",
    "TraceWriter",
    "atomic_save_npy",
    "atomic_torch_save",
    "atomic_write_json",
    "check_npy",
    "new_run_id",
    "read_json",
]

FORMAT = "reprlens-trace"
VERSION = 1

ROW_DTYPE = np.dtype(
    [
        ("id", "<i8"),
        ("step", "<i8"),
        ("call", "u1"),
        ("a_exp", "i1"),
        ("d_exp", "i1"),
        ("label", "<i8"),
        ("ghost", "?"),
    ]
)
STEP_DTYPE = np.dtype(
    [
        ("step", "<i8"),
        ("lr", "<f8"),
        ("kappa", "<f8"),
        ("amp_scale", "<f8"),
        ("stepped", "?"),
        ("class", "<i8"),
        ("n_rows", "<i4"),
    ]
)


def new_run_id() -> str:
    """A fresh random run id (hex)."""
    return uuid.uuid4().hex


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt or a full disk: leave no half-written temporary behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write ``arr`` as ``.npy`` atomically (tmp file, fsync, rename)."""
    _atomic(path, lambda fh: np.save(fh, np.ascontiguousarray(arr), allow_pickle=False))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically and fsync the directory."""
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    _atomic(path, lambda fh: fh.write(data))
    _fsync_dir(Path(path).parent)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically."""
    _atomic(path, lambda fh: torch.save(obj, fh))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, "rb") as fh:
        return json.loads(fh.read())


def check_npy(path: str | os.PathLike) -> bool:
    """True if ``path`` is a complete ``.npy`` file (size matches its header)."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            header_end = fh.tell()
        expected = header_end + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return os.path.getsize(path) == expected
    except Exception:
        return False


def _safe(name: str) -> str:
    return name.replace("/", "_") or "root"


class TraceWriter:
    """Writes one rank's shards of one segment and commits them with an atomic manifest.

    Args:
        dirpath: the store root.
        segment: segment index (a new one per resume).
        rank: this process's rank.
        start_step: first step this segment may contain.

    Example:
        >>> import tempfile
        >>> w = TraceWriter(tempfile.mkdtemp(), segment=0, rank=0, start_step=0)
        >>> w.manifest["last_complete_step"]
        0
    """

    def __init__(self, dirpath: str | os.PathLike, *, segment: int, rank: int, start_step: int) -> None:
        self.root = Path(dirpath)
        self.dir = self.root / f"seg_{segment}" / f"rank_{rank}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.segment = segment
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "segment": segment,
            "rank": rank,
            "start_step": int(start_step),
            "last_complete_step": int(start_step),
            "status": "running",
            "shards": [],
            "checks": [],
        }
        self._pause_hook = None  # private test hook: called between shard write and manifest commit
        atomic_write_json(self.dir / "manifest.json", self.manifest)

    def write(
        self,
        first: int,
        end: int,
        layers: dict[str, list[dict[str, np.ndarray]]],
        steps: np.ndarray,
        *,
        checks: list[dict] | None = None,
        snapshot: tuple[str, dict] | None = None,
    ) -> None:
        """Write one flush (steps ``first <= t < end``) and commit it.

        ``layers[name]`` is a list of parts, each a dict of arrays (``a``, ``d``, ``rows`` or ``delta`` ...).
        """
        entry: dict[str, Any] = {"first": int(first), "end": int(end), "layers": {}}
        steps_rel = f"steps/{first}-{end}.steps.npy"
        atomic_save_npy(self.dir / steps_rel, steps)
        entry["steps"] = steps_rel
        for name, parts in layers.items():
            files = []
            for p, arrays in enumerate(parts):
                rec = {}
                for key, arr in arrays.items():
                    rel = f"{_safe(name)}/{first}-{end}.{p}.{key}.npy"
                    atomic_save_npy(self.dir / rel, arr)
                    rec[key] = rel
                rec["n"] = int(len(arrays["rows"])) if "rows" in arrays else 0
                files.append(rec)
            entry["layers"][name] = files
        for sub in {Path(v).parent for f in entry["layers"].values() for rec in f for k, v in rec.items() if k != "n"}:
            _fsync_dir(self.dir / sub)
        _fsync_dir(self.dir / "steps")
        if snapshot is not None:
            atomic_torch_save(self.root / "weights" / snapshot[0], snapshot[1])
            _fsync_dir(self.root / "weights")
        if self._pause_hook is not None:
            self._pause_hook()
        self.manifest["shards"].append(entry)
        self.manifest["last_complete_step"] = int(end)
        if checks:
            self.manifest["checks"].extend(checks)
        atomic_write_json(self.dir / "manifest.json", self.manifest)

    def set_status(self, status: str) -> None:
        """Mark the segment ``running``, ``finished`` or ``interrupted`` (atomic)."""
        self.manifest["status"] = status
        atomic_write_json(self.dir / "manifest.json", self.manifest)


def remove_orphans(rank_dir: str | os.PathLike, manifest: dict) -> int:
    """Delete files of a rank directory that its manifest does not list; returns how many were removed."""
    rank_dir = Path(rank_dir)
    listed = {"manifest.json"}
    for entry in manifest.get("shards", []):
        listed.add(entry["steps"])
        for files in entry["layers"].values():
            for rec in files:
                listed.update(v for k, v in rec.items() if k != "n")
    removed = 0
    for path in rank_dir.rglob("*"):
        if path.is_file() and str(path.relative_to(rank_dir)) not in listed:
            try:
                path.unlink()
                removed += 1
            except OSError:  # pragma: no cover
                warnings.warn(f"Could not remove orphan trace file {path}.", stacklevel=2)
    return removed

"""Shared benchmark helpers: ABAB-paired CPU timing, FLOP counting, JSON output.

Protocol (spec 4.5): one process, ``torch.set_num_threads(1)``, warm-up iterations, then >= 5 ABAB pairs
(each variant iteration immediately preceded by a baseline iteration); the reported ratio is the median of
the per-pair ratios of ``time.process_time()`` (CPU time; wall time is unreliable on shared machines). On
CUDA, CUDA events with synchronisation are used instead and ``max_memory_allocated`` is reported.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["abab", "count_flops", "emit_json", "env_info", "setup_cpu", "time_once"]


def setup_cpu(threads: int = 1) -> None:
    """Pin torch to ``threads`` intra-op threads (1 by default, as the protocol says)."""
    torch.set_num_threads(threads)


def time_once(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds of one call: CPU process time on CPU, CUDA-event time on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def abab(
    baseline: Callable[[], Any],
    variant: Callable[[], Any],
    *,
    pairs: int = 5,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    rewarm: bool = False,
) -> dict[str, float]:
    """Time ``variant`` against ``baseline`` in ABAB pairs; return medians and the median per-pair ratio.

    ``rewarm=True`` runs each function once untimed right before its timed run (removes the cold-start
    penalty, e.g. page faults of a fast function timed right after a long one that used much memory).

    Returns:
        ``{"baseline_s": median, "variant_s": median, "ratio": median(variant / baseline), "pairs": n,
        "ratio_min": ..., "ratio_max": ...}`` (plus ``"max_memory_bytes"`` on CUDA).
    """
    device = torch.device(device)
    for _ in range(warmup):
        baseline()
        variant()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tb, tv, ratios = [], [], []
    for _ in range(pairs):
        if rewarm:
            baseline()
        a = time_once(baseline, device)
        if rewarm:
            variant()
        b = time_once(variant, device)
        tb.append(a)
        tv.append(b)
        ratios.append(b / max(a, 1e-12))
    out = {
        "baseline_s": statistics.median(tb),
        "variant_s": statistics.median(tv),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs": pairs,
        "rewarm": rewarm,
    }
    if device.type == "cuda":
        out["max_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of one call, counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def env_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions and machine facts to store next to every number."""
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import captum

        info["captum"] = captum.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def emit_json(name: str, payload: dict[str, Any], path: str | os.PathLike | None = None) -> str:
    """Print ``payload`` as one JSON line prefixed by ``name`` and optionally write it to ``path``."""
    text = json.dumps({"benchmark": name, **payload}, indent=None, sort_keys=True, default=str)
    print(f"JSON {text}")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"benchmark": name, **payload}, indent=2, sort_keys=True, default=str))
    return text

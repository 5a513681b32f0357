"""Benchmark of reprlens.scores and the ScoreMonitor overhead (ABAB pairs, median of per-pair ratios).

1. ``scores``: batched ``informativeness`` + ``disentanglement`` on ``(N, K, H, W)`` maps against a clean
   re-implementation of the XAI4Embeddings reference *structure* (numpy, one sample at a time, one dim at a
   time for the per-dim min-max normalisation, bug-free). Correctness gate: both give the same scores in
   float64 (rel 1e-10). Reported: ``ratio`` = batched / loop time (lower is better) and its inverse.
2. ``monitor``: the work ScoreMonitor adds to one validation batch (a forward with capture, all-K maps,
   metric updates; the noise maps are computed once per epoch and excluded) against a plain validation
   forward of the same batch (``torch.no_grad``), for the SimCLR example model. Ratio = (plain + monitor
   work) / plain.

Run: ``python benchmarks/bench_scores.py [--device cuda] [--pairs 7] [--small]`` (``--small`` = smoke run).
Prints one JSON line per benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reprlens.scores import disentanglement, informativeness

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import abab  # noqa: E402  (shared ABAB timing)


# ------------------------------------------------------------------------------------------ reference loop
def _minmax(a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    lo, hi, s = a.min(), a.max(), np.abs(a).max()
    return (a - lo) / (hi - lo) if hi - lo > eps * s else np.zeros_like(a)


def reference_loop(maps: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """XAI4Embeddings structure: per explained sample, list of per-dim maps, python loops, numpy ops."""
    ns, vs = [], []
    ref_sum = np.mean([np.array([m for m in r]).sum(axis=0) for r in ref], axis=0)
    ref_norm = _minmax(ref_sum)
    for sample in maps:
        per_dim = [m for m in sample]  # list of K (H, W) maps, as the reference keeps them
        summed = np.array(per_dim).sum(axis=0)
        ns.append(np.mean(np.abs(_minmax(summed) - ref_norm)))
        normalized = [_minmax(m) for m in per_dim]
        vs.append(np.array(normalized).var(axis=0).mean())
    return float(np.mean(ns)), float(np.mean(vs))


def bench_scores(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    n, k, hw, m = (8, 16, 4, 4) if args.small else (64, 128, 8, 8)
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(n, k, hw, hw, generator=g, dtype=torch.float64)
    ref = torch.rand(m, k, hw, hw, generator=g, dtype=torch.float64)
    # correctness gate (float64)
    ns_loop, vs_loop = reference_loop(maps.numpy(), ref.numpy())
    ns, vs = informativeness(maps, ref).item(), disentanglement(maps).item()
    if abs(ns - ns_loop) > 1e-10 * abs(ns_loop) or abs(vs - vs_loop) > 1e-10 * abs(vs_loop):
        raise SystemExit(f"correctness gate failed: ours ({ns}, {vs}) vs loop ({ns_loop}, {vs_loop})")
    maps32, ref32 = maps.float().to(device), ref.float().to(device)
    np_maps, np_ref = maps.float().numpy(), ref.float().numpy()

    def loop() -> None:
        reference_loop(np_maps, np_ref)

    def batched() -> None:
        informativeness(maps32, ref32, validate_args=False)
        disentanglement(maps32, validate_args=False)

    def batched_validated() -> None:
        informativeness(maps32, ref32)
        disentanglement(maps32)

    res = abab(loop, batched, pairs=args.pairs, device=device)
    res_val = abab(loop, batched_validated, pairs=args.pairs, device=device)
    return {"config": {"N": n, "K": k, "P": f"{hw}x{hw}", "M": m, "dtype": "float32"},
            "gate": {"ns": ns, "vs": vs, "ns_loop": ns_loop, "vs_loop": vs_loop},
            "no_validation": {**res, "speedup": 1 / res["ratio"]},
            "validate_args": {**res_val, "speedup": 1 / res_val["ratio"]}}


# ------------------------------------------------------------------------------------------ monitor overhead
def bench_monitor(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from reprlens.callbacks import ScoreMonitor
    from reprlens.models import SimCLR

    batch = 8 if args.small else 64
    torch.manual_seed(0)
    model = SimCLR().to(device).eval()
    x = torch.rand(batch, 3, 32, 32, device=device)
    results = {}
    for source in ("backbone.layer3", "backbone.layer2"):
        monitor = ScoreMonitor(source, "backbone.pool", num_noise=8, plot_every_n_epochs=None)
        for metric in monitor.metrics.values():
            metric.to(device)
        ref_maps = monitor._maps(model, monitor._noise_inputs(x))

        def plain() -> None:
            with torch.no_grad():
                model(x)

        def monitored(monitor=monitor, ref_maps=ref_maps) -> None:
            with torch.no_grad():
                model(x)
                maps = monitor._maps(model, x)
                monitor.metrics["informativeness"].update(maps, ref_maps)
                monitor.metrics["disentanglement"].update(maps)

        k = ref_maps.shape[1]
        timing = abab(plain, monitored, pairs=args.pairs, device=device)
        results[source] = {"K": k, "noise_maps_shape": list(ref_maps.shape), **timing}
    config = {"model": "SimCLR(width=16)", "batch": batch, "input": "3x32x32", "target": "backbone.pool"}
    return {"config": config, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--small", action="store_true", help="tiny sizes (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    for name, fn in (("scores_vs_reference_loop", bench_scores), ("score_monitor_overhead", bench_monitor)):
        print(json.dumps({"benchmark": name, "env": env, **fn(args, device)}, default=str), flush=True)


if __name__ == "__main__":
    main()

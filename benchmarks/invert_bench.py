"""INVERT benchmark: reprlens's vectorised search vs the reference-semantics baseline, side by side.

Targets (spec 4.5):
  T1  FX-2 (N=5000, K=30, L=3, B=3, min_fraction 0.002), one unit per call: >= 100x per unit, same beams.
  T2  FX-2, D=64 units in one call (1 thread): >= 1000x per unit (amortised).
  T3  FX-3 (N=50k, K=1473, D=512, L=3, B=3, Bonferroni): minutes on CPU; per-unit ratio vs the ~80 min
      reference anchor (and vs the baseline's measured per-candidate cost x candidate count).
  T4  FX-3's 256 tie-free units, correction="permutation" (P=200, one shared null) vs Bonferroni.

Protocol: CPU process time (``time.process_time``), ABAB pairs (each reprlens call right after a baseline
call on the same input), median of the per-pair ratios; ``torch.set_num_threads(1)`` unless stated.

Usage:
  python benchmarks/invert_bench.py                 # T1 (1 and 2 threads) + T2
  python benchmarks/invert_bench.py --fx3           # also T3 + T4 on CPU (several minutes)
  python benchmarks/invert_bench.py --fx3-only --device cuda   # T3 + T4 on a GPU
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import warnings

import torch

from reprlens.invert import ConceptSet, Invert
from reprlens.invert._fixtures import fx2, fx3
from reprlens.invert._reference import _evaluate, _metric, reference_explain

SETTINGS = dict(max_length=3, beam_size=3, min_fraction=0.002, max_fraction=0.5)


def _ref(a, c, names, d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference_explain(a[:, d], c, names, **SETTINGS)


def t1(threads: int, pairs: int) -> None:
    torch.set_num_threads(threads)
    a, c, names = fx2(4)
    inv = Invert(ConceptSet(c, names, warn=False), compat="reference", **SETTINGS)
    inv.explain(a[:, 0])
    _ref(a, c, names, 0)
    ratios, t_ref, t_new, same = [], [], [], True
    for p in range(pairs):
        for d in range(4):  # planted c3, c1 & ~c2, c4 | c5, ReLU noise
            t0 = time.process_time()
            ref = _ref(a, c, names, d)
            t_a = time.process_time() - t0
            t0 = time.process_time()
            res = inv.explain(a[:, d])
            t_b = time.process_time() - t0
            same &= [r["formula"] for r in ref] == res.formula and [r["length"] for r in ref] == res.length.tolist()
            ratios.append(t_a / t_b)
            t_ref.append(t_a)
            t_new.append(t_b)
    print(f"T1 FX-2 one unit per call, {threads} thread(s): baseline {statistics.median(t_ref) * 1e3:.1f} ms/unit, "
          f"reprlens {statistics.median(t_new) * 1e3:.2f} ms/unit, median per-pair ratio "
          f"{statistics.median(ratios):.0f}x (min {min(ratios):.0f}x, {len(ratios)} pairs), identical beams: {same}")


def t2(pairs: int, units: int = 64) -> None:
    torch.set_num_threads(1)
    a, c, names = fx2(units)
    inv = Invert(ConceptSet(c, names, warn=False), compat="reference", **SETTINGS)
    inv.explain(a)
    ratios, t_ref, t_new = [], [], []
    same = True
    for p in range(pairs):
        d = p % units
        t0 = time.process_time()
        ref = _ref(a, c, names, d)
        t_a = time.process_time() - t0
        t0 = time.process_time()
        res = inv.explain(a)
        t_b = (time.process_time() - t0) / units
        same &= [r["formula"] for r in ref] == res.for_neuron(d).formula
        ratios.append(t_a / t_b)
        t_ref.append(t_a)
        t_new.append(t_b)
    print(f"T2 FX-2 D={units} in one call, 1 thread: baseline {statistics.median(t_ref) * 1e3:.1f} ms/unit, "
          f"reprlens {statistics.median(t_new) * 1e3:.3f} ms/unit (amortised), median per-pair ratio "
          f"{statistics.median(ratios):.0f}x ({len(ratios)} pairs), identical beams: {same}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def t3_t4(device: torch.device, threads: int, units: int, skip_t4: bool, samples: int = 50_000,
          skip_t3: bool = False) -> None:
    torch.set_num_threads(threads)
    t0 = time.time()
    a, c, names = fx3(num_samples=samples, num_units=units)
    print(f"FX-3 built in {time.time() - t0:.1f}s: N={a.shape[0]}, K={c.shape[1]}, D={a.shape[1]}")
    cs = ConceptSet(c, names, warn=False)
    a = a.to(device)
    inv = Invert(cs, max_length=3, beam_size=3)
    # warm-up: device caches of the concept matrix (one time per device) + kernels
    t0 = time.time()
    inv.explain(a[:, :2])
    _sync(device)
    print(f"  warm-up (concept cache on {device}) {time.time() - t0:.1f}s")
    if skip_t3:
        return _t4(a, cs, device, units)
    w0, p0 = time.time(), time.process_time()
    res = inv.explain(a)
    _sync(device)
    wall, cpu = time.time() - w0, time.process_time() - p0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # CPU: process time (wall is unreliable on a shared machine); CUDA: wall time after synchronisation
    per_unit = (cpu if device.type == "cpu" else wall) / units
    anchor = 80 * 60.0
    print(f"T3 FX-3 D={units} L=3 B=3 Bonferroni on {device} ({threads} threads): wall {wall:.1f}s, CPU {cpu:.1f}s, "
          f"{per_unit * 1e3:.1f} ms/unit ({'CPU' if device.type == 'cpu' else 'wall'}), peak RSS {rss:.2f} GiB; rows {len(res)}; "
          f"per-unit ratio vs the 80-min reference anchor: {anchor / per_unit:,.0f}x")
    if device.type == "cuda":
        print(f"  max CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    # baseline per-candidate cost at N=50k (sympy expression + truth vector + binary_auroc), x candidate count
    torch.set_num_threads(threads)
    import sympy

    act = a[:, 0].float().cpu()
    cols = {nm: c[:, i] for i, nm in enumerate(names[:40])}
    syms = [sympy.Symbol(nm) for nm in names[:40]]
    times = []
    for i in range(20):
        t0 = time.process_time()
        expr = syms[i] | ~syms[i + 1]
        truth = _evaluate(expr, cols)
        float(truth.float().mean())
        _metric(act, truth)
        times.append(time.process_time() - t0)
    per_cand = statistics.median(times)
    k2 = 2 * c.shape[1]
    n_cand = k2 + 2 * 3 * 2 * k2
    est = per_cand * n_cand
    print(f"  baseline per candidate at N=50k: {per_cand * 1e3:.1f} ms CPU x {n_cand} candidates = {est / 60:.0f} "
          f"min/unit -> per-unit ratio vs measured baseline: {est / per_unit:,.0f}x")
    if not skip_t4:
        _t4(a, cs, device, units)


def _t4(a: torch.Tensor, cs: ConceptSet, device: torch.device, units: int) -> None:
    tie_free = a[:, : units // 2]
    inv_b = Invert(cs, max_length=3, beam_size=3, correction="bonferroni")
    inv_p = Invert(cs, max_length=3, beam_size=3, correction="permutation", n_permutations=200)
    ratios = []
    clock = time.process_time if device.type == "cpu" else time.time
    for _ in range(2):
        w0 = clock()
        inv_b.explain(tie_free)
        _sync(device)
        tb = clock() - w0
        w0 = clock()
        rp = inv_p.explain(tie_free)
        _sync(device)
        tp = clock() - w0
        ratios.append(tp / tb)
    print(f"T4 FX-3 {units // 2} tie-free units, permutation P=200 (shared null) vs Bonferroni: "
          f"{tb:.1f}s vs {tp:.1f}s ({'CPU' if device.type == 'cpu' else 'wall'}), ratio {statistics.median(ratios):.2f}x; "
          f"share of best rows with p_corrected <= 0.05: {(rp.best().p_corrected <= 0.05).mean():.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--fx3", action="store_true", help="also run T3/T4 (FX-3)")
    p.add_argument("--fx3-only", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--units", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="threads for T3/T4 (default: all)")
    p.add_argument("--skip-t4", action="store_true")
    p.add_argument("--skip-t3", action="store_true")
    p.add_argument("--samples", type=int, default=50_000, help="N of FX-3 (smaller for a quick T4)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    if not args.fx3_only:
        t1(1, args.pairs)
        t1(2, max(1, args.pairs // 2))
        t2(max(3, args.pairs))
    if args.fx3 or args.fx3_only:
        dev = torch.device(args.device)
        t3_t4(dev, args.threads or torch.get_num_threads(), args.units, args.skip_t4, args.samples, args.skip_t3)


if __name__ == "__main__":
    main()

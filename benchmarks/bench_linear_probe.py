"""Benchmark: reprlens' linear probe and kNN against scikit-learn on the same embeddings (CPU, 1 thread).

Prints per-variant median CPU-time ratios ``reprlens / sklearn`` from ABAB-paired runs (each reprlens
iteration next to a scikit-learn iteration; median of per-pair ratios), plus the accuracies of both so
the speed comparison is between equally good answers.

    python benchmarks/bench_linear_probe.py            # default sizes
    python benchmarks/bench_linear_probe.py --quick    # smaller, for a smoke run
    python benchmarks/bench_linear_probe.py --device cuda --size large   # reprlens on the GPU

With ``--device cuda`` the reprlens side runs on the GPU and both sides are timed by the wall clock
(``perf_counter`` after ``torch.cuda.synchronize``), scikit-learn still on one CPU thread.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression, RidgeClassifier  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402

from reprlens.callbacks.linear_probe import fit_linear_probe, knn_predict  # noqa: E402


def _data(n: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(0)) * 0.6
    y = torch.randint(0, c, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def _refit(x: torch.Tensor, y: torch.Tensor, c: int, wd: float, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's weights (same solver as fit_linear_probe, float64) to report the objective reached."""
    from reprlens.callbacks.linear_probe import _fit_logistic

    return _fit_logistic(x, y, c, 1000, wd, tol)


_CLOCK = time.process_time
_SYNC = lambda: None  # noqa: E731


def _paired(variant, baseline, pairs: int) -> tuple[float, float, float, object, object]:
    """ABAB pairing: returns (median ratio, median variant s, median baseline s, last outputs)."""
    ratios, tv, tb = [], [], []
    out_v = out_b = None
    variant(), baseline()  # warm-up
    for _ in range(pairs):
        _SYNC()
        t0 = _CLOCK()
        out_v = variant()
        _SYNC()
        t1 = _CLOCK()
        out_b = baseline()
        t2 = _CLOCK()
        tv.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t1 - t0) / max(t2 - t1, 1e-9))
    return statistics.median(ratios), statistics.median(tv), statistics.median(tb), out_v, out_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="device of the reprlens side (cpu or cuda)")
    parser.add_argument("--size", choices=["default", "large"], default="default")
    args = parser.parse_args()
    torch.set_num_threads(1)
    global _CLOCK, _SYNC
    device = torch.device(args.device)
    if device.type == "cuda":
        _CLOCK, _SYNC = time.perf_counter, torch.cuda.synchronize
    n, m, d, c = (2000, 500, 32, 10) if args.quick else (10000, 2000, 64, 10)
    if args.size == "large":
        n, m, d, c = 50000, 10000, 256, 10
    tx, ty = _data(n, d, c, 1)
    vx, vy = _data(m, d, c, 2)
    mean, std = tx.mean(0), tx.std(0, unbiased=False)
    txs, vxs = ((tx - mean) / std).numpy(), ((vx - mean) / std).numpy()
    txn, tyn, vxn, vyn = tx.numpy(), ty.numpy(), vx.numpy(), vy.numpy()
    ty_cpu = ty
    tx, ty, vx, vy = tx.to(device), ty.to(device), vx.to(device), vy.to(device)
    clock = "wall" if device.type == "cuda" else "process"
    print(f"N_train={n} N_val={m} D={d} classes={c} threads=1 pairs={args.pairs} reprlens on {device} ({clock} clock)")
    print(f"{'variant':<34}{'reprlens s':>12}{'sklearn s':>12}{'ratio':>8}  accuracy reprlens / sklearn")

    # --- kNN (k=20, cosine, majority vote) vs sklearn brute force
    def ours_knn():
        return knn_predict(tx, ty, vx, 20)

    def sk_knn():
        return KNeighborsClassifier(20, metric="cosine", algorithm="brute").fit(txn, tyn).predict(vxn)

    r, a, b, pv, pb = _paired(ours_knn, sk_knn, args.pairs)
    pv = pv.cpu()
    acc_v, acc_b = float((pv == vy.cpu()).float().mean()), float((pb == vyn).mean())
    agree = float((pv.numpy() == pb).mean())
    print(f"{'kNN k=20 cosine':<34}{a:>12.4f}{b:>12.4f}{r:>8.2f}  {acc_v:.4f} / {acc_b:.4f} (agree {agree:.4f})")

    # --- logistic probe (L-BFGS) vs sklearn LogisticRegression (lbfgs) on the same objective and tolerance:
    #     mean CE + wd/2 ||W||^2  ==  sklearn's (1/N) [sum CE + 1/(2C) ||W||^2] with C = 1 / (wd N)
    wd = 1e-4

    def objective(w: torch.Tensor, b: torch.Tensor) -> float:
        xs = torch.from_numpy(txs).double()
        return float(torch.nn.functional.cross_entropy(xs @ w + b, ty_cpu) + 0.5 * wd * (w * w).sum())

    for tol in (1e-4, 1e-6):

        def ours_log(tol=tol):
            return fit_linear_probe(tx, ty, vx, vy, method="logistic", max_iter=1000, weight_decay=wd, tol=tol)

        def sk_log(tol=tol):
            return LogisticRegression(C=1.0 / (wd * n), max_iter=1000, tol=tol).fit(txs, tyn)

        r, a, b, res, clf = _paired(ours_log, sk_log, args.pairs)
        xs64 = torch.from_numpy(txs).double()
        w, bias = _refit(xs64, ty_cpu, c, wd, tol)
        obj_ours = objective(w, bias)
        obj_sk = objective(torch.from_numpy(clf.coef_.T).double(), torch.from_numpy(clf.intercept_).double())
        name = f"logistic probe (L-BFGS, tol={tol:g})"
        print(
            f"{name:<34}{a:>12.4f}{b:>12.4f}{r:>8.2f}  {res['val_acc']:.4f} / {clf.score(vxs, vyn):.4f}"
            f" (objective {obj_ours:.6f} / {obj_sk:.6f}; sklearn iterations {int(clf.n_iter_[0])})"
        )

    # --- ridge probe (closed form) vs sklearn RidgeClassifier
    def ours_ridge():
        return fit_linear_probe(tx, ty, vx, vy, method="ridge", ridge_alpha=1.0)["val_acc"]

    def sk_ridge():
        return RidgeClassifier(alpha=1.0).fit(txs, tyn).score(vxs, vyn)

    r, a, b, av, ab = _paired(ours_ridge, sk_ridge, args.pairs)
    print(f"{'ridge probe (closed form)':<34}{a:>12.4f}{b:>12.4f}{r:>8.2f}  {av:.4f} / {ab:.4f}")
    print("ratio < 1: reprlens is faster. sklearn timings include its own standardisation-free fit on")
    print("pre-standardised arrays; reprlens timings include standardisation and evaluation.")
    _ = np  # numpy kept imported so thread env vars apply before BLAS loads


if __name__ == "__main__":
    main()

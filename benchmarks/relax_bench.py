"""RELAX: reprlens vs relax-xai 0.0.5 (and a naive per-mask torch loop) on identical masks.

Run:  python benchmarks/relax_bench.py            (all rows, 1 intra-op thread; ~5-10 min on a busy 2-core CPU)
      python benchmarks/relax_bench.py --quick    (headline + scaling only)
      python benchmarks/relax_bench.py --threads 2   (the spec's "default threads" setting; on a shared,
                                                     overloaded machine 2 threads mostly measure spin-waiting)

Per row: device, threads, HxW, encoder, K images per reprlens call, N masks, batch size, seconds per image
(min over repeats) for relax-xai, the naive loop and reprlens, and the speed-up as the MEDIAN OF PER-PAIR
RATIOS of CPU process time (each reprlens call timed right next to the baseline it is compared with; ABAB).
Accuracy: max |dR| (importance) and max relative |dM2| of reprlens against relax-xai over all K images.
The reference runs one call per image (re-seeded, so every image sees the same masks as reprlens's single
call for all K images: mode="reference", seed=1, mask block 100).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from reprlens.relax import MaskBank, Relax

try:
    from relax_xai.relax import RELAX as RefRELAX
except ImportError:  # pragma: no cover
    RefRELAX = None


def avgpool_encoder() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten()).eval()


def conv_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def run_reference(enc, xs, n):
    out = []
    for k in range(xs.shape[0]):
        torch.manual_seed(1)
        with torch.no_grad():
            r = RefRELAX(xs[k : k + 1], enc, batch_size=100, num_batches=n // 100)
            r.forward()
        out.append((r.importance, r.uncertainty))
    return out


def run_naive(enc, xs, n):
    """Per-mask West loop in torch (float64), masks rendered once per image: always-available baseline."""
    out = []
    for k in range(xs.shape[0]):
        x = xs[k : k + 1]
        bank = MaskBank.sample(n, tuple(xs.shape[2:]), seed=1)
        with torch.no_grad():
            h = enc(x)
            R = torch.zeros(xs.shape[2:], dtype=torch.float64)
            U = torch.zeros_like(R)
            S = torch.full_like(R, 1e-10)
            for m in bank.batches(100):
                sims = F.cosine_similarity(h, enc(x * m[:, None]), dim=1).double()
                for s, mi in zip(sims, m.double()):
                    S += mi
                    r_old = R.clone()
                    R += mi * (s - R) / S
                    U += (s - R) * (s - r_old) * mi
        out.append((R, U))
    return out


def run_reprlens(enc, xs, n, batch_size):
    return Relax(enc, num_masks=n, batch_size=batch_size, mode="reference", seed=1).explain(xs)


def timed(fn):
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def bench_row(name, enc, hw, k, n, threads, repeats, batch_size=100, naive=True):
    torch.set_num_threads(threads)
    xs = torch.randn(k, 3, hw, hw, generator=torch.Generator().manual_seed(0))
    have_ref = RefRELAX is not None
    base_fn = (lambda: run_reference(enc, xs, n)) if have_ref else (lambda: run_naive(enc, xs, n))
    ours_fn = lambda: run_reprlens(enc, xs, n, batch_size)  # noqa: E731
    base_fn()
    ours_fn()  # warm-up
    ratios, t_base, t_ours, t_naive, naive_ratios = [], [], [], [], []
    res = base_out = None
    for _ in range(repeats):  # ABAB: each reprlens call next to a baseline call
        tb, base_out = timed(base_fn)
        to, res = timed(ours_fn)
        ratios.append(tb / to)
        t_base.append(tb / k)
        t_ours.append(to / k)
    if naive and have_ref:
        for _ in range(max(1, repeats // 3)):
            tn, _ = timed(lambda: run_naive(enc, xs, n))
            to, _ = timed(ours_fn)
            naive_ratios.append(tn / to)
            t_naive.append(tn / k)
    dr = max(float((res.importance[i] - base_out[i][0]).abs().max()) for i in range(k))
    dm2 = max(float(((res.m2[i] - base_out[i][1]).abs() / base_out[i][1].abs()).max()) for i in range(k))
    row = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "HxW": f"{hw}x{hw}",
        "encoder": name,
        "K": k,
        "N": n,
        "bs": batch_size,
        "ref_s/img": min(t_base) if have_ref else float("nan"),
        "naive_s/img": min(t_naive) if t_naive else (min(t_base) if not have_ref else float("nan")),
        "ours_s/img": min(t_ours),
        "speedup(med ABAB)": statistics.median(ratios),
        "vs_naive": statistics.median(naive_ratios) if naive_ratios else float("nan"),
        "max|dR|": dr,
        "max_rel|dM2|": dm2,
    }
    print(
        "  ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}" for key, val in row.items()),
        flush=True,
    )
    return row


def gpu_rows(num_masks: int = 3000, batch_size: int = 500) -> None:
    """ResNet-50 (random weights) at 224 px on CUDA, bf16 autocast: explain time vs encoder-only time."""
    import torchvision

    dev = torch.device("cuda")
    enc = torchvision.models.resnet50(weights=None).eval().to(dev).to(memory_format=torch.channels_last)
    enc.fc = nn.Identity()
    sync = torch.cuda.synchronize
    for k in (1, 4, 16):
        xs = torch.randn(k, 3, 224, 224, device=dev)
        ex = Relax(enc, num_masks=num_masks, batch_size=batch_size, seed=0, autocast_dtype=torch.bfloat16)
        ex.explain(xs[:1])  # warm-up
        sync()
        t = time.perf_counter()
        res = ex.explain(xs)
        sync()
        t_explain = time.perf_counter() - t
        # encoder alone on the same number of inputs (K * (N + 1)), same batch size and autocast
        xb = torch.randn(batch_size, 3, 224, 224, device=dev)
        n_fw = -(-k * (num_masks + 1) // batch_size)
        sync()
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(n_fw):
                enc(xb)
        sync()
        t_enc = time.perf_counter() - t
        print(
            f"gpu={torch.cuda.get_device_name()}  resnet50 224x224 bf16  K={k}  N={num_masks}  bs={batch_size}  "
            f"explain={t_explain:.2f}s  encoder_only={t_enc:.2f}s  ratio={t_explain / t_enc:.3f} (target <= 1.15)  "
            f"images/s={k / t_explain:.2f}  peak_mem={torch.cuda.max_memory_allocated() / 2**30:.1f}GiB",
            flush=True,
        )
    x1 = torch.randn(2, 3, 224, 224, device=dev)
    fp = Relax(enc, num_masks=1000, batch_size=batch_size, seed=0).explain(x1)
    bf = Relax(enc, num_masks=1000, batch_size=batch_size, seed=0, autocast_dtype=torch.bfloat16).explain(x1)
    for i in range(2):
        a, b = fp.importance[i].flatten().cpu(), bf.importance[i].flatten().cpu()
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        rho = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
        k10 = a.numel() // 10
        overlap = len(set(a.topk(k10).indices.tolist()) & set(b.topk(k10).indices.tolist())) / k10
        print(f"bf16 vs fp32 image {i}: spearman={rho:.4f} top10%-overlap={overlap:.3f} max|dR|={float((a - b).abs().max()):.2e}")


def _peak_rss_child(n: int) -> None:
    import resource

    torch.set_num_threads(1)
    xs = torch.randn(4, 3, 64, 64)
    enc = avgpool_encoder()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Relax(enc, num_masks=100, seed=0).explain(xs)  # warm-up allocations
    warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Relax(enc, num_masks=n, seed=0).explain(xs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{n} {base} {warm} {peak}")


def memory_rows() -> None:
    """Peak RSS growth of one explain call at N = 3000 vs 30000 (64x64, K=4), each in a fresh process."""
    import subprocess
    import sys

    out = {}
    for n in (3000, 30000):
        res = subprocess.run(
            [sys.executable, __file__, "--_memory-child", str(n)], capture_output=True, text=True, check=True
        )
        n_, base, warm, peak = map(int, res.stdout.split()[-4:])
        out[n] = (peak - base) / 1024
        print(f"memory: N={n_}  peak RSS growth {out[n]:.1f} MiB (after warm-up {(warm - base) / 1024:.1f} MiB)")
    print(f"memory: growth ratio N=30000 / N=3000 = {out[30000] / out[3000]:.3f} (target within 5 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="headline and scaling rows only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both implementations")
    parser.add_argument("--gpu", action="store_true", help="only the CUDA rows (ResNet-50, 224 px, bf16)")
    parser.add_argument("--memory", action="store_true", help="only the peak-memory rows (N = 3000 vs 30000)")
    parser.add_argument("--_memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child is not None:
        _peak_rss_child(args._memory_child)
        return
    if args.memory:
        memory_rows()
        return
    if args.gpu:
        gpu_rows()
        return
    th = args.threads
    if RefRELAX is None:
        print("relax-xai not installed (pip install relax-xai==0.0.5): the naive loop is the baseline")
    rep = args.repeats
    print(f"# headline: 32x32 RGB, parameter-free avg-pool encoder (D=48), N=3000, K=16, {th} thread(s)")
    head = bench_row("avgpool4", avgpool_encoder(), 32, 16, 3000, th, rep)
    print("# scaling: same setup, K=1 (per-image time at K=16 should be <= 1/3 of K=1)")
    one = bench_row("avgpool4", avgpool_encoder(), 32, 1, 3000, th, rep)
    print(f"SCALING per-image time K=1 / K=16 = {one['ours_s/img'] / head['ours_s/img']:.2f}x")
    print(
        f"HEADLINE speed-up {head['speedup(med ABAB)']:.1f}x (target >= 20x), max|dR| {head['max|dR|']:.2e} "
        f"(<= 1e-5), max rel|dM2| {head['max_rel|dM2|']:.2e} (<= 1e-4)"
    )
    if args.quick:
        return
    print("# report rows (no gate)")
    bench_row("avgpool4", avgpool_encoder(), 32, 4, 3000, th, max(2, rep // 2), naive=False)
    bench_row("conv3-8", conv_encoder(), 48, 1, 3000, th, max(2, rep // 2), naive=False)
    bench_row("conv3-8", conv_encoder(), 48, 8, 3000, th, max(2, rep // 2), naive=False)
    # 224 px: the reference needs ~25 s/image at N=3000, so these rows use N=300 (ratios are per mask anyway)
    bench_row("avgpool4", avgpool_encoder(), 224, 1, 300, th, 2, naive=False)
    bench_row("avgpool4", avgpool_encoder(), 224, 8, 300, th, 2, naive=False)


if __name__ == "__main__":
    main()

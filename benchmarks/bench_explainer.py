"""Benchmark of the explainer network (spec explainer_network.md section 4), ABAB pairs, median of per-pair
ratios of ``time.process_time()`` (CUDA events on GPU), one process, ``torch.set_num_threads(1)``.

Rows (ratio = baseline / variant, higher = the vectorised variant is faster, unless stated):
1. ``loss_loop_vs_gemm_small``: filter loss fwd+bwd, per-channel Python loop vs the one-GEMM loss, B=64 C=32 8x8
   (target >= 5x).
2. ``loss_loop_vs_gemm_large``: same at B=32 C=512 14x14 (target >= 5x; ``--large``, slow on CPU).
3. ``loss_chan_template_loop_vs_gemm``: per-channel-per-template loop vs GEMM, B=64 C=32 8x8 (target >= 50x).
4. ``uncached_vs_cached_step``: explainer train step with the D6 toy performer forward vs on cached features,
   B=64 (target >= 1.3x).
5. ``filter_loss_share``: filter loss (2 blocks, fwd+bwd) / full explainer step, D6 toy (target <= 0.25;
   here variant/baseline).
6. ``metric_update_vs_eval_forward``: ``LocationInstability.update`` (explainer + performer maps) / explainer
   eval forward, same batch (target <= 0.1; variant/baseline).
7. ``alongside``: (user step with callback work - plain user step) / isolated explainer step (target <= 1.1).

Every row first checks that variant and baseline agree (loss values, float64 where exact).

Run: ``python benchmarks/bench_explainer.py [--pairs 7] [--large] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import abab, emit_json, env_info  # noqa: E402

from reprlens.capture import LayerCapture  # noqa: E402
from reprlens.explainer_net import (  # noqa: E402
    ExplainerModule,
    LocationInstability,
    filter_loss,
    part_templates,
)
from reprlens.explainer_net._probe import make_part_probe, probe_performer  # noqa: E402


def loss_per_channel_loop(x: torch.Tensor) -> torch.Tensor:
    """Reference structure: one channel at a time (still vectorised over images and templates)."""
    b, c, h, w = x.shape
    t, lp = part_templates(h, w, dtype=x.dtype, device=x.device)
    tm = t.reshape(t.shape[0], -1)
    prior = lp.exp()
    tot = x.new_zeros(())
    for ch in range(c):
        sc = x[:, ch].reshape(b, -1) @ tm.T  # (B, M)
        lpx_t = sc - torch.logsumexp(sc, 0, keepdim=True)
        lpx = torch.logsumexp(lp[None] + lpx_t, 1, keepdim=True)
        tot = tot - (prior[None] * lpx_t.exp() * (lpx_t - lpx)).sum()
    return tot / c


def loss_channel_template_loop(x: torch.Tensor) -> torch.Tensor:
    """Loops over channels and templates (the independent prototype's structure)."""
    b, c, h, w = x.shape
    t, lp = part_templates(h, w, dtype=x.dtype, device=x.device)
    m_count = t.shape[0]
    tot = x.new_zeros(())
    for ch in range(c):
        xs = x[:, ch].reshape(b, -1)
        cols = [xs @ t[m].reshape(-1) for m in range(m_count)]
        lpx_t = torch.stack([col - torch.logsumexp(col, 0) for col in cols], 1)  # (B, M)
        lpx = torch.logsumexp(lp[None] + lpx_t, 1)
        mi = x.new_zeros(())
        for m in range(m_count):
            mi = mi + lp[m].exp() * (lpx_t[:, m].exp() * (lpx_t[:, m] - lpx)).sum()
        tot = tot - mi
    return tot / c


def _fwd_bwd(fn, x):
    def run():
        xx = x.detach().requires_grad_()
        fn(xx).backward()

    return run


def bench_loss(b, c, n, pairs, device, baseline_fn, name):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(b, c, n, n, generator=g) * 10).to(device)
    x64 = x.double()
    ok = abs(float(baseline_fn(x64)) - float(filter_loss(x64))) < 1e-9
    if not ok:
        raise RuntimeError(f"{name}: the loop and the GEMM loss disagree")
    r = abab(_fwd_bwd(baseline_fn, x), _fwd_bwd(lambda a: filter_loss(a), x), pairs=pairs, warmup=1, device=device)
    r["speedup"] = 1.0 / r["ratio"]
    r.update(shape=[b, c, n, n], agree_float64=ok)
    return r


def _toy_setup(device):
    torch.manual_seed(0)
    net = probe_performer(0).to(device).eval()
    data = make_part_probe(64, seed=0)
    batch = {k: v.to(device) for k, v in data.items()}
    mod = ExplainerModule(net, "7", example_batch=batch, steps_per_epoch=10).to(device)
    with torch.no_grad():
        feats = mod.features(batch)
    cached = {"target": feats["target"], "y": batch["label"], "landmarks": batch["landmarks"],
              "image_size": torch.tensor([32, 32])}
    opt = torch.optim.Adam(mod.explainer.parameters(), lr=1e-3)
    return net, mod, batch, cached, opt


def bench_cache(pairs, device):
    net, mod, batch, cached, opt = _toy_setup(device)

    def step(b):
        def run():
            loss, _, _ = mod.compute_loss(mod.features(b), 0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return run

    r = abab(step(cached), step(batch), pairs=pairs, warmup=2, device=device)
    r["uncached_over_cached"] = r["ratio"]
    return r


def bench_share(pairs, device):
    net, mod, batch, cached, opt = _toy_setup(device)
    feats = mod.features(cached)

    def full():
        loss, _, _ = mod.compute_loss(feats, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()

    pres = []
    with torch.no_grad():
        h = feats["target"]
        for blk in mod.explainer.blocks:
            h, pre, _ = blk(h)
            pres.append(pre.clone())

    def losses_only():
        tot = 0
        for p in pres:
            pp = p.detach().requires_grad_()
            l = filter_loss(pp, normalize="batch_peak")
            l.backward()
            tot = tot + float(l.detach())

    r = abab(full, losses_only, pairs=pairs, warmup=2, device=device)
    r["share"] = r["ratio"]
    return r


def bench_metric(pairs, device):
    net, mod, batch, cached, opt = _toy_setup(device)
    mod.eval()
    tgt = cached["target"]
    li_e, li_p = LocationInstability(mod.rf).to(device), LocationInstability(mod.rf).to(device)
    with torch.no_grad():
        out = mod.explainer(tgt)

    def fwd():
        with torch.no_grad():
            mod.explainer(tgt)

    def upd():
        li_e.update(out.interpretable, batch["landmarks"], (32, 32))
        li_p.update(tgt, batch["landmarks"], (32, 32))

    r = abab(fwd, upd, pairs=pairs, warmup=2, device=device)
    r["update_over_forward"] = r["ratio"]
    return r


def bench_alongside(pairs, device):
    """A user training step of the D6 classifier (fwd+bwd+Adam) with and without the callback's work
    (capture of the target layer + one explainer step on the detached features), against an isolated
    explainer step on the same features."""
    net, mod, batch, cached, opt = _toy_setup(device)
    user = probe_performer(1).to(device)
    user_opt = torch.optim.Adam(user.parameters(), lr=1e-3)
    side = ExplainerModule(user, "7", example_batch=batch, steps_per_epoch=10, freeze_performer=False).to(device)
    side_opt = torch.optim.Adam(side.explainer.parameters(), lr=1e-3)
    x, y = batch["image"], batch["label"]

    def plain():
        loss = F.cross_entropy(user(x), y)
        user_opt.zero_grad()
        loss.backward()
        user_opt.step()

    def explainer_step(tgt):
        loss, _, _ = side.compute_loss({"target": tgt, "upper": {}}, 0.05)
        side_opt.zero_grad()
        loss.backward()
        side_opt.step()

    def with_cb():
        with LayerCapture(user, ["7"], detach=True) as cap:
            loss = F.cross_entropy(user(x), y)
            user_opt.zero_grad()
            loss.backward()
            user_opt.step()
        explainer_step(cap.get("7"))

    with torch.no_grad():
        tgt0 = user[:8](x)
    iso = abab(plain, lambda: explainer_step(tgt0), pairs=pairs, warmup=2, device=device)
    both = abab(plain, with_cb, pairs=pairs, warmup=2, device=device)
    overhead = (both["variant_s"] - both["baseline_s"]) / iso["variant_s"]
    return {"plain_s": both["baseline_s"], "with_callback_s": both["variant_s"], "isolated_explainer_s": iso["variant_s"],
            "overhead_over_isolated": overhead}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--large", action="store_true", help="also run B=32 C=512 14x14 (slow on CPU)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    info = env_info(device)
    rows = {
        "loss_loop_vs_gemm_small": bench_loss(64, 32, 8, args.pairs, device, loss_per_channel_loop, "small"),
        "loss_chan_template_loop_vs_gemm": bench_loss(64, 32, 8, max(3, args.pairs // 2), device,
                                                      loss_channel_template_loop, "chan x template"),
        "uncached_vs_cached_step": bench_cache(args.pairs, device),
        "filter_loss_share": bench_share(args.pairs, device),
        "metric_update_vs_eval_forward": bench_metric(args.pairs, device),
        "alongside": bench_alongside(args.pairs, device),
    }
    if args.large or device.type == "cuda":
        rows["loss_loop_vs_gemm_large"] = bench_loss(32, 512, 14, 3, device, loss_per_channel_loop, "large")
    for name, r in rows.items():
        emit_json(f"explainer/{name}", {**r, "env": info})
    print("\nsummary (target in brackets):")
    print(f"  filter loss, per-channel loop / GEMM, B=64 C=32 8x8: {rows['loss_loop_vs_gemm_small']['speedup']:.1f}x  [>= 5x]")
    if "loss_loop_vs_gemm_large" in rows:
        print(f"  filter loss, per-channel loop / GEMM, B=32 C=512 14x14: "
              f"{rows['loss_loop_vs_gemm_large']['speedup']:.1f}x  [>= 5x]")
    print(f"  filter loss, channel x template loop / GEMM: {rows['loss_chan_template_loop_vs_gemm']['speedup']:.1f}x  [>= 50x]")
    print(f"  uncached / cached explainer step, D6 B=64: {rows['uncached_vs_cached_step']['uncached_over_cached']:.2f}x  [>= 1.3x]")
    print(f"  filter loss share of the explainer step: {rows['filter_loss_share']['share']:.2f}  [<= 0.25]")
    print(f"  LocationInstability.update / explainer eval forward: "
          f"{rows['metric_update_vs_eval_forward']['update_over_forward']:.3f}  [<= 0.1]")
    print(f"  alongside: (step with callback - plain) / isolated explainer step: "
          f"{rows['alongside']['overhead_over_isolated']:.2f}  [<= 1.1]")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Regularised training step vs plain training step (spec 4.5, targets T1 and T2).

* **T1**: pool-first head A (GAP -> Linear(64, 256) -> ReLU -> Linear(256, K)) on a small CNN (4
  conv+BN+ReLU, 32x32 inputs, h = 64x8x8), K = 128, batch 64, exact informativeness + disentanglement over
  all K dims (8 noise inputs). Variants: factorised (head declared/detected as ``PooledHead``), generic
  (plain head callable, torch.func vmap), graph-only (no head: one ``autograd.grad`` per dim). Target:
  factorised <= 1.5x plain.
* **T2**: heavy conv head B (conv 64->128 -> conv 128->128 stride 2 -> GAP -> Linear), K = 128: exact
  step with the chunked vmap path and the graph-only loop, next to the FLOP bound ``1 + K*f``; target:
  best exact path <= 1.2x the bound; the ``num_dims_sampled`` estimator reported against it.

A plain step is forward + loss + backward; a regularised step adds the noise forward, the maps with
``create_graph=True``, the scores, and backpropagates ``loss - w * score`` in the same single backward.
Protocol: ``torch.set_num_threads(1)``, warm-up, ABAB pairs, median per-pair ratio of process time.

    python benchmarks/bench_regularizer.py            # full sizes (several minutes on one thread)
    python benchmarks/bench_regularizer.py --smoke    # tiny sizes: correctness gate + one pair
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import abab, count_flops, emit_json, env_info, setup_cpu  # noqa: E402
from bench_captum import SmallCNN, head_a, head_b  # noqa: E402

from reprlens.attribution import PooledHead  # noqa: E402
from reprlens.capture import LayerCapture  # noqa: E402
from reprlens.regularizer import ExplanationRegularizer  # noqa: E402
from reprlens.scores.functional import disentanglement, informativeness  # noqa: E402


def plain_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def reg_step(model: nn.Module, x: torch.Tensor, noise: torch.Tensor, reg: ExplanationRegularizer) -> dict:
    """One regularised step: training forward under capture, noise forward, maps + scores, one backward."""
    model.zero_grad(set_to_none=True)
    graph_only = reg.head is None
    layers = {"backbone": "output", "head": "output"} if graph_only else {"backbone": "output"}
    with LayerCapture(model, layers) as cap:
        loss = model(x).square().mean()
    ref_h = ref_z = None
    if reg.w_informativeness > 0:
        with LayerCapture(model, layers) as rcap:
            model(noise)
        ref_h = rcap.get("backbone")
        ref_z = rcap.get("head") if graph_only else None
        if not graph_only:
            ref_h = ref_h.detach().requires_grad_(True)
    out = reg(cap.get("backbone"), cap.get("head") if graph_only else None, reference_source=ref_h,
              reference_target=ref_z)
    (loss + out.loss).backward()
    return out.scores


def _naive_scores(model, x, noise):
    """Independent float64 oracle: one autograd.grad per dim (grad x act, lin), functional scores."""

    def maps(inp):
        h = model.backbone(inp)
        z = model.head(h)
        rows = []
        for k in range(z.shape[1]):
            (g,) = torch.autograd.grad(z[:, k].sum(), h, retain_graph=True)
            rows.append((g * h).sum(1))
        return torch.stack(rows, 1)

    m = maps(x)
    return {"informativeness": informativeness(m, maps(noise)), "disentanglement": disentanglement(m)}


def gate(head_fn, k: int) -> None:
    torch.manual_seed(0)
    model = SmallCNN(head_fn(k)).double().eval()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    want = _naive_scores(model, x, noise)
    for name, head in (("head", model.head), ("graph", None)):
        reg = ExplanationRegularizer(1.0, 1.0, head=head)
        got = reg_step(model, x, noise, reg)
        for score in want:
            if not torch.allclose(got[score], want[score], rtol=1e-9, atol=1e-12):
                raise SystemExit(f"gate failed ({name}, {score}): {got[score]} vs {want[score]}")


def bench_t1(args) -> dict:
    torch.manual_seed(0)
    k, n = args.k, args.batch
    model = SmallCNN(head_a(k), backbone=args.backbone).train()
    x = torch.rand(n, 3, 32, 32)
    noise = torch.rand(args.num_noise, 3, 32, 32)
    mlp = model.head.mlp

    def generic(h):
        return mlp(h.mean((2, 3)))

    variants = {
        "factorised_both": ExplanationRegularizer(0.1, 0.1, head=model.head),
        "factorised_vs_only": ExplanationRegularizer(0.0, 0.1, head=model.head),
        "generic_vmap_both": ExplanationRegularizer(0.1, 0.1, head=generic),
        "graph_only_both": ExplanationRegularizer(0.1, 0.1),
    }
    out = {"config": {"K": k, "batch": n, "num_noise": args.num_noise, "head": "A (GAP, 64-256-K MLP)",
                      "backbone": args.backbone}}
    for name, reg in variants.items():
        if args.smoke and name.startswith("graph"):
            continue
        r = abab(lambda: plain_step(model, x), lambda reg=reg: reg_step(model, x, noise, reg),
                 pairs=args.pairs, warmup=args.warmup)
        out[name] = r
        print(f"T1 head A K={k} N={n}: regularised step [{name}] / plain step = {r['ratio']:.2f}"
              + ("  (target <= 1.5)" if name == "factorised_both" else ""))
    return out


def bench_t2(args) -> dict:
    torch.manual_seed(0)
    k, n = args.k, args.batch
    model = SmallCNN(head_b(k), backbone=args.backbone).train()
    x = torch.rand(n, 3, 32, 32)
    noise = torch.rand(args.num_noise, 3, 32, 32)
    with torch.no_grad():
        h = model.backbone(x)
        f = count_flops(lambda: model.head(h)) / count_flops(lambda: model(x))
    bound = 1 + k * f
    out = {"config": {"K": k, "batch": n, "head": "B (conv 64-128, conv 128-128 s2, GAP, Linear)"}, "f": f,
           "bound": bound}
    variants = {
        "exact_auto": ExplanationRegularizer(0.1, 0.1, head=model.head, chunk_size=args.chunk),
        "exact_vmap": ExplanationRegularizer(0.1, 0.1, head=model.head, chunk_size=args.chunk, path="vmap"),
        "exact_graph_loop": ExplanationRegularizer(0.1, 0.1),
        f"dim_subset_{args.m}": ExplanationRegularizer(0.1, 0.1, head=model.head, num_dims_sampled=args.m),
    }
    for name, reg in variants.items():
        r = abab(lambda: plain_step(model, x), lambda reg=reg: reg_step(model, x, noise, reg),
                 pairs=args.pairs_b, warmup=1)
        r["ratio_over_bound"] = r["ratio"] / bound
        out[name] = r
        print(f"T2 head B K={k} N={n} f={f:.3f} bound 1+K*f={bound:.1f}: regularised step [{name}] / plain = "
              f"{r['ratio']:.1f} ({r['ratio_over_bound']:.2f} of the bound; target <= 1.2 for the exact paths)")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, correctness gate and one pair")
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-noise", type=int, default=8)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--pairs-b", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--m", type=int, default=16, help="dims sampled by the subset estimator")
    p.add_argument("--only", choices=["t1", "t2"], default=None)
    p.add_argument("--backbone", choices=["light", "standard"], default="standard",
                   help="bench_captum.SmallCNN backbone (standard: ~63 MFLOP/sample, the spec's anchor setting)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    setup_cpu(1)
    if args.smoke:
        args.k, args.batch, args.pairs, args.pairs_b, args.warmup, args.num_noise, args.m = 8, 4, 1, 1, 0, 2, 4
    gate(head_a, 6)
    gate(head_b, 6)
    print("correctness gate passed: regulariser scores equal a per-dim autograd loop in float64")
    result = {"env": env_info(args.device)}
    if args.only in (None, "t1"):
        result["T1"] = bench_t1(args)
    if args.only in (None, "t2"):
        result["T2"] = bench_t2(args)
    emit_json("bench_regularizer", result, args.json)


if __name__ == "__main__":
    main()

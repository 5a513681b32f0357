#!/usr/bin/env python
"""Attribution throughput of reprlens against Captum and against the reference's per-dim, per-sample loop.

Three measurements, each after a correctness gate (the variants agree with the loop reference):

* **T3** (spec 4.5): all K = 128 maps of a pool-first head A (GAP -> Linear(64, 256) -> ReLU ->
  Linear(256, K)) on a small CNN (4 conv+BN+ReLU, 32x32 inputs, h = 64x8x8), batch 64, against Captum
  ``LayerGradientXActivation`` looping ``target=k``. Ratio = Captum time / reprlens time (target >= 50x),
  for the generic torch.func path and the factorised PooledHead path.
* **naive loop, K = 10**: the XAI4Embeddings reference model (conv 1->8 5x5, BN without statistics,
  softplus, pool, conv 8->4 5x5, BN, softplus, pool, fc 196->K; source = input of conv2, batch-of-one
  semantics) at batch 64: per dim, per sample batch-of-one forward + ``autograd.grad`` (the reference
  loop's structure) against one forward + per-sample batched VJPs (``head_batchnorm="per_sample"``).
  Ratio = loop time / reprlens time (target >= 40x).
* **head B** (heavy conv head: conv 64->128 -> conv 128->128 stride 2 -> GAP -> Linear, source two conv
  layers below the pooling): all-K maps (no graph) per path, as a multiple of a plain training step, next
  to the FLOP bound ``1 + K*f`` with ``f = FLOPs(head)/FLOPs(forward)`` from ``FlopCounterMode``.

Protocol: ``torch.set_num_threads(1)``, 2 warm-up iterations, ABAB pairs, median of per-pair ratios of
``time.process_time()``. Run from the repository root:

    python benchmarks/bench_captum.py                # full sizes (a few minutes on one CPU thread)
    python benchmarks/bench_captum.py --smoke        # tiny sizes, correctness gates only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import abab, count_flops, emit_json, env_info, setup_cpu  # noqa: E402

from reprlens.attribution import LayerToLayerAttribution, PooledHead, layer_attributions  # noqa: E402
from reprlens.capture import LayerCapture  # noqa: E402


# ----------------------------------------------------------------------------------------------- models
def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """4 conv+BN+ReLU blocks, 32x32 inputs -> h = 64x8x8, then a head."""

    def __init__(self, head: nn.Module, backbone: str = "light"):
        super().__init__()
        if backbone == "light":  # 3-32 @32, 32-64 s2 @16, 64-64 s2 @8, 64-64 @8: ~21 MFLOP/sample
            blocks = [conv_bn(3, 32), conv_bn(32, 64, 2), conv_bn(64, 64, 2), conv_bn(64, 64)]
        else:  # "standard": 3-32 @32, 32-64 @32, 64-64 s2 @16, 64-64 s2 @8: ~63 MFLOP/sample
            blocks = [conv_bn(3, 32), conv_bn(32, 64), conv_bn(64, 64, 2), conv_bn(64, 64, 2)]
        self.backbone = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x):
        return self.head(self.backbone(x))


def head_a(k: int) -> nn.Module:
    return PooledHead(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, k)))


def head_b(k: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(64, 128, 3, 1, 1), nn.ReLU(), nn.Conv2d(128, 128, 3, 2, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, k),
    )


class ReferenceNet(nn.Module):
    """The XAI4Embeddings MNIST encoder (spec 5.5 E1) with z = fc1 output."""

    def __init__(self, k: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8, affine=False, track_running_stats=False, eps=1e-4)
        self.conv2 = nn.Conv2d(8, 4, 5, padding=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4, affine=False, track_running_stats=False, eps=1e-4)
        self.fc1 = nn.Linear(196, k, bias=False)
        self.pool = nn.MaxPool2d(2)

    def head(self, h):  # input of conv2 -> z
        return self.fc1(self.pool(nn.functional.softplus(self.bn2(self.conv2(h)))).flatten(1))

    def forward(self, x):
        return self.head(self.pool(nn.functional.softplus(self.bn1(self.conv1(x)))))


def plain_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


# ----------------------------------------------------------------------------------------------- T3
def captum_maps(model, layer, x, k):
    from captum.attr import LayerGradientXActivation

    lga = LayerGradientXActivation(model, layer)
    # detach: Captum's result keeps the forward graph alive (about 33 MB per target at batch 64)
    return torch.stack([lga.attribute(x, target=j).detach().abs().sum(1) for j in range(k)], 1)


def bench_t3(args, backbone: str) -> dict:
    torch.manual_seed(0)
    k, n = args.k, args.batch
    model = SmallCNN(head_a(k), backbone).eval()
    x = torch.rand(n, 3, 32, 32)
    generic = LayerToLayerAttribution(model, "backbone", "head", head=lambda h: model.head(h))
    factor = LayerToLayerAttribution(model, "backbone", "head", head=model.head)
    run_generic = lambda: generic.attribute(x, transform="abs")  # noqa: E731
    run_factor = lambda: factor.attribute(x, transform="abs")  # noqa: E731
    run_captum = lambda: captum_maps(model, model.backbone, x, k)  # noqa: E731
    # correctness gate (float64 copy, few samples)
    m64 = SmallCNN(head_a(k), backbone).double().eval()
    m64.load_state_dict(model.state_dict())
    x64 = x[:3].double()
    ref = captum_maps(m64, m64.backbone, x64, k)
    for head in (lambda h: m64.head(h), m64.head):
        got = LayerToLayerAttribution(m64, "backbone", "head", head=head).attribute(x64, transform="abs")
        if not torch.allclose(got, ref, rtol=0, atol=1e-10):
            raise SystemExit(f"T3 gate failed: max diff {(got - ref).abs().max()}")
    out = {"config": {"K": k, "batch": n, "backbone": backbone, "head": "A (GAP -> 64-256-K MLP)", "h": "64x8x8", "transform": "abs"}}
    with torch.no_grad():
        out["forward_mflop_per_sample"] = count_flops(lambda: model(x)) / n / 1e6
    warm = dict(pairs=args.pairs, warmup=args.warmup, rewarm=True)
    out["captum_vs_generic"] = abab(run_generic, run_captum, **warm)
    out["captum_vs_factorized"] = abab(run_factor, run_captum, **warm)
    if args.no_plain_ratios:
        nan = {"ratio": float("nan")}
        out["generic_vs_plain"] = out["factorized_vs_plain"] = nan
    else:
        out["generic_vs_plain"] = abab(lambda: plain_step(model, x), run_generic, **warm)
        out["factorized_vs_plain"] = abab(lambda: plain_step(model, x), run_factor, **warm)
    if args.chunks:
        h = model.backbone(x).detach()
        for c in args.chunks:
            r = abab(lambda: plain_step(model, x), lambda c=c: layer_attributions(h, lambda s: model.head(s), transform="abs", chunk_size=c), **warm)
            out[f"generic_maps_chunk_{c}_vs_plain"] = r
            print(f"T3 [{backbone}] generic maps only, chunk_size={c}: {r['ratio']:.2f} x plain step")
    print(
        f"T3 [{backbone} backbone, {out['forward_mflop_per_sample']:.0f} MFLOP/sample] head A K={k} N={n}: "
        f"Captum loop / reprlens generic = {out['captum_vs_generic']['ratio']:.1f}x, "
        f"Captum loop / factorised = {out['captum_vs_factorized']['ratio']:.1f}x (target >= 50x); "
        f"maps / plain step: generic {out['generic_vs_plain']['ratio']:.2f}, "
        f"factorised {out['factorized_vs_plain']['ratio']:.2f}"
    )
    return out


# ----------------------------------------------------------------------------------------------- naive loop
def naive_reference_loop(model: ReferenceNet, x: torch.Tensor, k: int) -> torch.Tensor:
    """Reference structure: for every dim, for every sample, a batch-of-one forward and autograd.grad."""
    rows = []
    for j in range(k):
        cols = []
        for i in range(x.shape[0]):
            with LayerCapture(model, {"conv2": "input"}) as cap:
                z = model(x[i : i + 1])
            h = cap.get("conv2")
            (g,) = torch.autograd.grad(z[0, j], h)
            cols.append((g * h)[0])
        rows.append(torch.stack(cols))
    return torch.stack(rows, 1)


def ours_reference(model: ReferenceNet, x: torch.Tensor) -> torch.Tensor:
    attr = LayerToLayerAttribution(
        model, "conv2", "fc1", attribute_to_source_input=True, head=model.head, head_batchnorm="per_sample"
    )
    return attr.attribute(x)


def bench_naive(args) -> dict:
    torch.manual_seed(0)
    k, n = args.k_ref, args.batch
    model = ReferenceNet(k).train()
    x = torch.rand(n, 1, 28, 28)
    # gate: with the per-sample source activations of the loop, our per-sample maps equal the loop's
    m64 = ReferenceNet(k).double().train()
    m64.load_state_dict(model.state_dict())
    x64 = x[:3].double()
    ref = naive_reference_loop(m64, x64, k)
    hs = []
    for i in range(3):
        with LayerCapture(m64, {"conv2": "input"}, detach=True) as cap:
            m64(x64[i : i + 1])
        hs.append(cap.get("conv2"))
    got = layer_attributions(torch.cat(hs), m64.head, head_batchnorm="per_sample")
    if not torch.allclose(got, ref, rtol=0, atol=1e-10):
        raise SystemExit(f"naive-loop gate failed: max diff {(got - ref).abs().max()}")
    pairs = args.pairs if not args.smoke else 1
    out = {"config": {"K": k, "batch": n, "model": "XAI4Embeddings MNIST encoder", "source": "conv2 input"}}
    out["loop_vs_ours"] = abab(lambda: ours_reference(model, x), lambda: naive_reference_loop(model, x, k), pairs=pairs, warmup=1, rewarm=True)
    out["ours_vs_plain"] = abab(lambda: plain_step(model, x), lambda: ours_reference(model, x), pairs=args.pairs, warmup=args.warmup, rewarm=True)
    print(
        f"naive per-dim per-sample loop K={k} N={n}: loop / reprlens = {out['loop_vs_ours']['ratio']:.1f}x "
        f"(target >= 40x); reprlens maps / plain step = {out['ours_vs_plain']['ratio']:.2f}"
    )
    return out


# ----------------------------------------------------------------------------------------------- head B
def bench_head_b(args) -> dict:
    torch.manual_seed(0)
    k, n = args.k, args.batch
    model = SmallCNN(head_b(k)).eval()
    x = torch.rand(n, 3, 32, 32)
    with torch.no_grad():
        h = model.backbone(x)
        f = count_flops(lambda: model.head(h)) / count_flops(lambda: model(x))
    bound = 1 + k * f
    attr = LayerToLayerAttribution(model, "backbone", "head", head=model.head)
    graph = LayerToLayerAttribution(model, "backbone", "head")
    variants = {
        "auto_chosen_path": lambda: attr.attribute(x, transform="abs"),  # conv head -> "loop"
        "vmap_auto_chunk": lambda: layer_attributions(model.backbone(x), model.head, transform="abs", path="vmap"),
        "loop": lambda: layer_attributions(model.backbone(x), model.head, transform="abs", path="loop"),
        "batched_graph": lambda: graph.attribute(x, transform="abs"),
    }
    for c in args.chunks:
        variants[f"vmap_chunk_{c}"] = (
            lambda c=c: layer_attributions(model.backbone(x), model.head, transform="abs", path="vmap", chunk_size=c)
        )
    # gate: all variants equal on a few float64 samples
    m64 = SmallCNN(head_b(k)).double().eval()
    m64.load_state_dict(model.state_dict())
    x64 = x[:2].double()
    ref = LayerToLayerAttribution(m64, "backbone", "head").attribute(x64, transform="abs", chunk_size=1)
    for path in ("vmap", "loop", "batched"):
        got = layer_attributions(m64.backbone(x64), m64.head, transform="abs", path=path)
        if not torch.allclose(got, ref, rtol=0, atol=1e-10):
            raise SystemExit(f"head-B gate failed for {path}: max diff {(got - ref).abs().max()}")
    out = {"config": {"K": k, "batch": n, "head": "B (conv 64-128, conv 128-128 s2, GAP, Linear)"}, "f": f, "bound": bound}
    pairs = args.pairs_b
    for name, fn in variants.items():
        r = abab(lambda: plain_step(model, x), fn, pairs=pairs, warmup=1, rewarm=True)
        r["ratio_over_bound"] = r["ratio"] / bound
        out[name] = r
        print(
            f"head B K={k} N={n} f={f:.3f} bound 1+K*f={bound:.1f}: maps[{name}] / plain step = {r['ratio']:.1f} "
            f"({r['ratio_over_bound']:.2f} of the bound)"
        )
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: run the correctness gates and one pair")
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--k-ref", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--pairs-b", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="chunk sizes to sweep (head A maps, head B)")
    p.add_argument("--backbones", choices=["light", "standard"], nargs="+", default=["light", "standard"])
    p.add_argument("--only", choices=["t3", "naive", "headb"], nargs="*", default=["t3", "naive", "headb"])
    p.add_argument("--no-plain-ratios", action="store_true", help="T3: skip the maps / plain-step ratios")
    p.add_argument("--json", type=str, default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.smoke:
        args.k, args.k_ref, args.batch, args.pairs, args.pairs_b, args.warmup = 6, 3, 4, 1, 1, 0
        args.backbones, args.chunks = ["light"], [2]
    setup_cpu(1)
    results = {"env": env_info(), "smoke": args.smoke}
    if "t3" in args.only:
        for backbone in args.backbones:
            results["t3" if backbone == args.backbones[0] else f"t3_{backbone}"] = bench_t3(args, backbone)
    if "naive" in args.only:
        results["naive_loop"] = bench_naive(args)
    if "headb" in args.only:
        results["head_b"] = bench_head_b(args)
    emit_json("bench_captum", results, args.json)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Regularised step vs the XAI4Embeddings reference loop structure (spec 4.5, target T4: >= 40x faster).

Model: the reference MNIST autoencoder (spec 5.5 E1): encoder conv1 1->8 5x5 -> BN (no statistics, no
affine, eps 1e-4) -> softplus -> maxpool -> conv2 8->4 5x5 -> BN -> softplus -> maxpool -> fc1 196->K;
decoder Linear(K, 32) -> ReLU -> Linear(32, 784); classifier Linear(K, 10). Loss CE + MSE. Source = input
of conv2 (8x14x14), target = fc1, K = 10, batch 64; informativeness + disentanglement (alpha 0.1 each),
expected gradients with S = 1 (sigma 0.5, zero baseline: x~ = t * (x + sigma * eps)), 64 noise images.

* reference structure: for every explained input, for every dim, a batch-of-one forward of the
  interpolant and one ``autograd.grad(create_graph=True)``, plus batch-of-one forwards and gradients of the
  64 noise images (recomputed per input, as the reference's loop does), then the scores and one backward.
* reprlens: one batched forward of the interpolants and one of the noise images, all K maps in batched
  VJPs with the head's batch-of-one BatchNorm semantics (``head_batchnorm="per_sample"``), one backward.

Correctness gate (float64, shared draws t, eps, noise): both give the same scores when ours is fed the
per-sample source activations the loop sees. Run from the repository root:

    python benchmarks/bench_reference_loop.py           # K=10, batch 64
    python benchmarks/bench_reference_loop.py --smoke   # tiny sizes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import abab, emit_json, env_info, setup_cpu  # noqa: E402
from bench_captum import ReferenceNet  # noqa: E402

from reprlens.capture import LayerCapture  # noqa: E402
from reprlens.regularizer import ExplanationRegularizer  # noqa: E402
from reprlens.scores.functional import disentanglement, informativeness  # noqa: E402

SIGMA = 0.5
ALPHA = 0.1


class ReferenceAE(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.encoder = ReferenceNet(k)
        self.decoder = nn.Sequential(nn.Linear(k, 32), nn.ReLU(), nn.Linear(32, 784))
        self.classifier = nn.Linear(k, 10)

    def task_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return F.cross_entropy(self.classifier(z), y) + F.mse_loss(self.decoder(z), x.flatten(1))


def draws(x: torch.Tensor, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(x.shape[0], 1, 1, 1, generator=g, dtype=x.dtype)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    noise = torch.rand((m, *x.shape[1:]), generator=g, dtype=x.dtype)
    return t * (x + SIGMA * eps), noise


def plain_step(model: ReferenceAE, x, y) -> None:
    model.zero_grad(set_to_none=True)
    model.task_loss(x, y).backward()


def _one_map(enc: ReferenceNet, x1: torch.Tensor, k: int, create_graph: bool) -> torch.Tensor:
    with LayerCapture(enc, {"conv2": "input"}) as cap:
        z = enc(x1)
    h = cap.get("conv2")
    (g,) = torch.autograd.grad(z[0, k], h, create_graph=create_graph)
    return (g * h).sum(1)[0]  # lin transform: channel sum, (14, 14)


def _noise_maps(enc: ReferenceNet, noise, k_dims: int) -> torch.Tensor:
    return torch.stack([
        torch.stack([_one_map(enc, noise[j : j + 1], k, False) for k in range(k_dims)]) for j in range(noise.shape[0])
    ])  # (M, K, P)


def reference_scores(model: ReferenceAE, x_tilde, noise, k_dims: int, noise_once: bool = False):
    enc = model.encoder
    ns, vs = [], []
    shared = _noise_maps(enc, noise, k_dims) if noise_once else None
    for i in range(x_tilde.shape[0]):
        maps = torch.stack([_one_map(enc, x_tilde[i : i + 1], k, True) for k in range(k_dims)])  # (K, P)
        # the reference loop recomputes the noise maps per explained input; noise_once shares them per step
        ref = shared if noise_once else _noise_maps(enc, noise, k_dims)
        ns.append(informativeness(maps[None], ref.detach(), validate_args=False))
        vs.append(disentanglement(maps[None], validate_args=False))
    return torch.stack(ns).mean(), torch.stack(vs).mean()


def reference_step(model: ReferenceAE, x, y, x_tilde, noise, k_dims: int, noise_once: bool = False) -> None:
    model.zero_grad(set_to_none=True)
    loss = model.task_loss(x, y)
    ns, vs = reference_scores(model, x_tilde, noise, k_dims, noise_once)
    (loss - ALPHA * ns - ALPHA * vs).backward()


def ours_scores(model: ReferenceAE, x_tilde, noise, reg: ExplanationRegularizer, per_sample_source: bool = False):
    enc = model.encoder

    def source_of(inp):
        if per_sample_source:  # the loop's batch-of-one forwards (gate only)
            hs = []
            for i in range(inp.shape[0]):
                with LayerCapture(enc, {"conv2": "input"}) as cap:
                    enc(inp[i : i + 1])
                hs.append(cap.get("conv2"))
            return torch.cat(hs)
        with LayerCapture(enc, {"conv2": "input"}) as cap:
            enc(inp)
        return cap.get("conv2")

    h = source_of(x_tilde)
    ref_h = source_of(noise).detach().requires_grad_(True)
    return reg(h, reference_source=ref_h)


def ours_step(model: ReferenceAE, x, y, x_tilde, noise, reg) -> None:
    model.zero_grad(set_to_none=True)
    loss = model.task_loss(x, y)
    out = ours_scores(model, x_tilde, noise, reg)
    (loss + out.loss).backward()


def make_reg(model: ReferenceAE) -> ExplanationRegularizer:
    return ExplanationRegularizer(ALPHA, ALPHA, head=model.encoder.head, head_batchnorm="per_sample")


def gate(k: int) -> None:
    torch.manual_seed(0)
    model = ReferenceAE(k).double()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    x_tilde, noise = draws(x, 4)
    ns, vs = reference_scores(model, x_tilde, noise, k)
    out = ours_scores(model, x_tilde, noise, make_reg(model), per_sample_source=True)
    for name, want in (("informativeness", ns), ("disentanglement", vs)):
        got = out.scores[name]
        if not torch.allclose(got, want.detach(), rtol=1e-9, atol=1e-12):
            raise SystemExit(f"gate failed for {name}: ours {float(got)} vs loop {float(want)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-noise", type=int, default=64)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--skip-full-loop", action="store_true", help="only the loop variant with shared noise maps")
    args = p.parse_args(argv)
    setup_cpu(1)
    if args.smoke:
        args.k, args.batch, args.num_noise, args.pairs = 3, 4, 4, 1
    gate(args.k)
    print("correctness gate passed: batched scores equal the per-dim per-sample loop in float64")
    torch.manual_seed(0)
    model = ReferenceAE(args.k)
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    x_tilde, noise = draws(x, args.num_noise)
    reg = make_reg(model)
    out = {"config": {"K": args.k, "batch": args.batch, "num_noise": args.num_noise, "S": 1, "sigma": SIGMA}}
    out["ours_vs_plain"] = abab(lambda: plain_step(model, x, y), lambda: ours_step(model, x, y, x_tilde, noise, reg),
                                pairs=5 if not args.smoke else 1, warmup=1)
    out["loop_noise_once_vs_ours"] = abab(lambda: ours_step(model, x, y, x_tilde, noise, reg),
                                          lambda: reference_step(model, x, y, x_tilde, noise, args.k, True),
                                          pairs=args.pairs, warmup=0)
    print(f"T4 reference AE K={args.k} N={args.batch}: loop step with noise maps shared per step / reprlens step = "
          f"{out['loop_noise_once_vs_ours']['ratio']:.1f}x (target >= 40x); loop "
          f"{out['loop_noise_once_vs_ours']['variant_s']:.2f} s; reprlens step / plain step = "
          f"{out['ours_vs_plain']['ratio']:.2f}")
    if not args.skip_full_loop:
        out["loop_vs_ours"] = abab(lambda: ours_step(model, x, y, x_tilde, noise, reg),
                                   lambda: reference_step(model, x, y, x_tilde, noise, args.k), pairs=args.pairs,
                                   warmup=0)
        print(f"T4 reference AE K={args.k} N={args.batch}: reference loop step (noise maps per input) / reprlens "
              f"step = {out['loop_vs_ours']['ratio']:.1f}x; loop step {out['loop_vs_ours']['variant_s']:.2f} s, "
              f"reprlens {out['loop_vs_ours']['baseline_s'] * 1000:.0f} ms")
    emit_json("bench_reference_loop", {"env": env_info(), **out}, args.json)


if __name__ == "__main__":
    main()

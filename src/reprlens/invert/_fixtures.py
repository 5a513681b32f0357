"""Deterministic fixtures of the INVERT spec (FX-1, FX-1-clean, FX-2, FX-3) shared by tests and benchmarks."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["fx1", "fx2", "fx3", "splitmix_uniform"]

_M64 = (1 << 64) - 1


def splitmix_uniform(stream: int, n: int) -> np.ndarray:
    """SplitMix64 uniforms ``u(stream, i)`` for ``i = 0..n-1`` (float64 in [0, 1)), no RNG state."""
    with np.errstate(over="ignore"):
        x = (np.uint64(stream) << np.uint64(32)) + np.arange(n, dtype=np.uint64)
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def fx1(clean: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """FX-1 (N = 2000, K = 12, D = 6): returns ``(activations float32 (N, 6), concepts bool (N, 12), names)``."""
    n = 2000
    cols = [splitmix_uniform(k, n) < 0.03 + 0.02 * k for k in range(10)]
    cols.append(cols[4].copy())
    cols.append(np.zeros(n, dtype=bool))
    c = np.stack(cols, 1)
    e = [splitmix_uniform(100 + d, n) - 0.5 for d in range(6)]
    w = 0.2 if clean else 1.2
    cf = c.astype(np.float64)
    a0 = cf[:, 3] + w * e[0]
    a1 = (c[:, 1] & ~c[:, 2]).astype(np.float64) + w * e[1]
    a2 = (c[:, 5] | c[:, 6]).astype(np.float64) + w * e[2]
    a3 = -cf[:, 7] + w * e[3]
    a4 = e[4]
    a5 = np.maximum(0.0, 0.8 * cf[:, 8] + 0.6 * cf[:, 9] - 0.3 + e[5])
    acts = np.stack([a0, a1, a2, a3, a4, a5], 1).astype(np.float32)
    return torch.from_numpy(acts), torch.from_numpy(c), [f"c{k}" for k in range(12)]


def fx2(num_units: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """FX-2 (N = 5000, K = 30): planted units c3, c1 & ~c2, c4 | c5 (+0.1 noise) and ReLU noise, cycled."""
    g = torch.Generator().manual_seed(seed)
    n, k = 5000, 30
    c = torch.rand(n, k, generator=g) < torch.linspace(0.02, 0.30, k)
    cf = c.to(torch.float32)
    base = [cf[:, 3], (c[:, 1] & ~c[:, 2]).float(), (c[:, 4] | c[:, 5]).float(), None]
    cols = []
    for d in range(num_units):
        noise = torch.randn(n, generator=g)
        b = base[d % 4]
        cols.append(torch.relu(noise) if b is None else b + 0.1 * noise)
    return torch.stack(cols, 1), c, [f"c{i}" for i in range(k)]


def fx3(
    num_samples: int = 50_000, num_units: int = 512, num_classes: int = 1000, num_parents: int = 473, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """FX-3: classes + parents (OR of 2-30 random classes); units 0.5 [class in G_d] + N(0,1) (float64), half ReLU."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (num_samples,), generator=g)
    onehot = torch.zeros(num_samples, num_classes, dtype=torch.bool)
    onehot[torch.arange(num_samples), y] = True
    sizes = torch.randint(2, 31, (num_parents,), generator=g)
    member = torch.zeros(num_classes, num_parents, dtype=torch.bool)
    for p in range(num_parents):  # setup only, not a hot path
        member[torch.randperm(num_classes, generator=g)[: int(sizes[p])], p] = True
    parents = member[y]
    c = torch.cat([onehot, parents], 1)
    groups = torch.zeros(num_classes, num_units, dtype=torch.bool)
    for d in range(num_units):
        groups[torch.randperm(num_classes, generator=g)[: int(torch.randint(1, 31, (1,), generator=g))], d] = True
    # float64 so that the Gaussian half is tie-free (50k float32 normals collide ~100 times per unit)
    a = 0.5 * groups[y].double() + torch.randn(num_samples, num_units, generator=g, dtype=torch.float64)
    a[:, num_units // 2 :] = torch.relu(a[:, num_units // 2 :])
    names = [f"class{i}" for i in range(num_classes)] + [f"parent{i}" for i in range(num_parents)]
    return a, c, names

"""Benchmark the procedural shapes generator (CPU, one thread).

Prints:
1. the time and images/s to generate (render + cache) 50k images at 32x32 (and 64x64 with --size64);
2. the speed-up of the batched renderer over a per-image loop of the same renderer (ABAB pairs of
   process-time measurements, median of per-pair ratios);
3. the loader cost of two-view mode (augmentation of both views) relative to plain batches (ABAB).

Usage:  python benchmarks/bench_shapes.py [--num 50000] [--pairs 5] [--size64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from reprlens.data import ShapesDataset
from reprlens.data.shapes import _render_uint8


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=50_000)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--loop-images", type=int, default=256)
    parser.add_argument("--size64", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    for size in (32, 64) if args.size64 else (32,):
        ds = ShapesDataset(args.num, size, seed=0)
        wall = time.perf_counter()
        cpu = _cpu(ds.materialize)
        wall = time.perf_counter() - wall
        print(f"generate {args.num} images {size}x{size}: {cpu:.2f} s CPU ({wall:.2f} s wall), "
              f"{args.num / cpu:,.0f} images/s, cache {4 * args.num * size * size / 2**20:.0f} MiB")

    # batched vs per-image loop of the same renderer (the naive alternative)
    ds = ShapesDataset(args.loop_images, 32, seed=1, cache=False)
    idx = torch.arange(args.loop_images)
    f = ds.factor_values

    def batched() -> None:
        _render_uint8(f, idx, 32, ds.shape_names, ds.colour_names, 1)

    def loop() -> None:
        for i in range(args.loop_images):
            _render_uint8(f[i : i + 1], idx[i : i + 1], 32, ds.shape_names, ds.colour_names, 1)

    ratios = []
    for _ in range(args.pairs):
        ratios.append(_cpu(loop) / _cpu(batched))
    print(f"per-image loop / batched render ({args.loop_images} images, {args.pairs} ABAB pairs): "
          f"median ratio {statistics.median(ratios):.1f}x (min {min(ratios):.1f}, max {max(ratios):.1f})")

    # two-view loader cost relative to plain batches (batch 256, cached images)
    plain = ShapesDataset(4096, 32, seed=2).materialize()
    views = ShapesDataset(4096, 32, seed=2, two_views=True)
    views._store, views._done = plain._store, plain._done  # share the rendered cache
    batch = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:256].tolist()
    ratios = []
    plain_times = []
    for _ in range(args.pairs):
        a = _cpu(lambda: plain.get_batch(batch))
        b = _cpu(lambda: views.get_batch(batch))
        plain_times.append(a)
        ratios.append(b / a)
    print(f"batch of 256: plain {statistics.median(plain_times) * 1e3:.1f} ms; two-view / plain "
          f"({args.pairs} ABAB pairs): median ratio {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()

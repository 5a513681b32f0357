#!/usr/bin/env python
"""Training-trace costs: recording overhead, storage, query time, influence vs Captum TracInCP.

Four measurements (spec §4.4), printed as ratios and one JSON line each:

* **P1 overhead**: blocks of ``flush_every`` plain SGD steps of a small CNN (4 conv+BN+ReLU, GAP, Linear 64->10,
  B = 64, 32x32 random data) with and without a ``TraceRecorder`` on the last Linear (representation mode,
  one flush per block, so the flush is amortised inside the timing). Ratio = recorded / plain (target <= 1.3).
* **P2 storage**: bytes of the ``.a.npy`` + ``.d.npy`` payload per example-step against
  ``(numel(a) + numel(δ)) · itemsize`` for float32 and float16; metadata bytes per row.
* **P3 query**: a synthetic store for Linear 512->10 with N training examples (default 50k) over E epochs,
  written through the recorder; the timed query (one test input) uses the prepared aggregate (memmap, warm
  cache). Reports the aggregate build time, a factor-streaming query, and M = 64 inputs (target < 1 s).
* **P4 influence**: small CNN, N training examples, C = 5 checkpoints, M = 16 test inputs, last Linear:
  ``TraceReader.influence`` (checkpoint loading + test gradients + factor dots) against Captum ``TracInCP``
  (``sample_wise_grads_per_batch=True``, batch 512) on the same checkpoint files, after checking that the
  scores agree (rtol 1e-4). Ratio = Captum / ours (target >= 10). The one-off checkpoint-pass cost is reported
  separately with the break-even number of queries.

Protocol: ``torch.set_num_threads(1)``, warm-ups, ABAB pairs, median of per-pair ratios of
``time.process_time()``. Run from the repository root:

    python benchmarks/bench_trace.py              # full sizes (several minutes on one shared CPU thread)
    python benchmarks/bench_trace.py --smoke      # tiny sizes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import abab, emit_json, env_info, setup_cpu  # noqa: E402

from reprlens.trace import TraceReader, TraceRecorder, captum_checkpoint_loader  # noqa: E402


class SmallCNN(nn.Module):
    def __init__(self, width=64, classes=10):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate([16, 32, 64, width]):
            layers += [nn.Conv2d(c, w, 3, stride=2 if i else 1, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def bench_overhead(args, tmp: Path) -> dict:
    torch.manual_seed(0)
    plain, traced = SmallCNN(), SmallCNN()
    traced.load_state_dict(plain.state_dict())
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.01)
    opt_t = torch.optim.SGD(traced.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    n = args.batch * 8
    x = torch.randn(n, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    rec = TraceRecorder(traced, ["fc"], tmp / "overhead", flush_every_n_steps=args.flush_every,
                        check_every_n_steps=10**6)
    rec.open()
    rec.attach()
    state = {"step": 0}

    def block(model, opt, recorder):
        def run():
            for _ in range(args.flush_every):
                s = state["step"] % 8
                idx = torch.arange(s * args.batch, (s + 1) * args.batch)
                if recorder is not None:
                    recorder.begin_step(idx)
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                if recorder is not None:
                    recorder.before_optimizer_step(opt)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if recorder is not None:
                    recorder.end_step()
                state["step"] += 1
        return run

    res = abab(block(plain, opt_p, None), block(traced, opt_t, rec), pairs=args.pairs, warmup=1)
    rec.close()
    res.update(model="SmallCNN 4conv+BN, Linear 64->10", batch=args.batch, steps_per_block=args.flush_every)
    return res


def bench_storage(tmp: Path) -> dict:
    out = {}
    for dt in ["float32", "float16"]:
        torch.manual_seed(0)
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        d = tmp / f"storage_{dt}"
        with TraceRecorder(model, ["fc"], d, dtype=dt, flush_every_n_steps=4) as rec:
            for _ in range(4):
                rec.begin_step(torch.arange(16))
                nn.functional.cross_entropy(model(torch.randn(16, 3, 16, 16)), torch.randint(0, 10, (16,))).backward()
                rec.before_optimizer_step(opt)
                opt.step()
                opt.zero_grad()
                rec.end_step()
        payload = sum(np.load(p, mmap_mode="r").nbytes for p in d.rglob("*.a.npy")) + sum(
            np.load(p, mmap_mode="r").nbytes for p in d.rglob("*.d.npy"))
        rows = sum(len(np.load(p)) for p in d.rglob("*.rows.npy"))
        meta = sum(np.load(p).nbytes for p in d.rglob("*.rows.npy")) / rows
        expect = (64 + 10) * np.dtype(dt).itemsize
        out[dt] = {"bytes_per_example_step": payload / rows, "expected": expect, "metadata_bytes_per_row": meta}
    return out


def bench_query(args, tmp: Path) -> dict:
    n, epochs, bs = args.n_query, args.epochs, 500
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    d = tmp / "query"
    t0 = time.perf_counter()
    with TraceRecorder(model, ["0"], d, flush_every_n_steps=100, check_every_n_steps=10**6) as rec:
        for ep in range(epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, bs):
                idx = perm[s : s + bs]
                rec.begin_step(idx)
                a = torch.randn(len(idx), 512, generator=g)
                (model(a) * torch.randn(len(idx), 10, generator=g)).sum().div(len(idx)).backward()
                rec.before_optimizer_step(opt)
                opt.step()
                opt.zero_grad()
                rec.end_step()
    write_s = time.perf_counter() - t0
    reader = TraceReader(d)
    xt = torch.randn(1, 512, generator=g)
    x64 = torch.randn(64, 512, generator=g)
    t0 = time.process_time()
    reader.aggregate("0", accumulate_dtype=torch.float32)
    build_s = time.process_time() - t0
    for _ in range(2):  # warm cache
        reader.contributions(layer="0", layer_inputs=xt, use_aggregate=True)
    times = []
    for _ in range(args.pairs):
        t0 = time.process_time()
        res = reader.contributions(layer="0", layer_inputs=xt, use_aggregate=True)
        times.append(time.process_time() - t0)
    t_one = statistics.median(times)
    t0 = time.process_time()
    reader.contributions(layer="0", layer_inputs=x64, use_aggregate=True)
    t_64 = time.process_time() - t0
    t0 = time.process_time()
    res_stream = reader.contributions(layer="0", layer_inputs=xt, use_aggregate=False)
    t_stream = time.process_time() - t0
    agree = float((res_stream.score - res.score).abs().max() / res.score.abs().max())
    # plain memmap bandwidth reference: a sum over the same factor files
    t0 = time.process_time()
    total = 0.0
    for b in reader._blocks["0"]:
        total += float(np.asarray(b.a).sum(dtype=np.float32)) + float(np.asarray(b.d).sum(dtype=np.float32))
    t_sum = time.process_time() - t0
    return {"n_train": n, "epochs": epochs, "rows": n * epochs, "write_wall_s": write_s, "aggregate_build_s": build_s,
            "query_1_s": t_one, "query_64_s": t_64, "stream_query_1_s": t_stream, "memmap_sum_s": t_sum,
            "stream_vs_aggregate_max_rel_diff": agree, "target_s": 1.0}


def bench_influence(args, tmp: Path) -> dict:
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    n, m, c = args.n_influence, 16, 5
    model = SmallCNN(width=32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, args.size // 2, args.size // 2, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    xt, yt = torch.randn(m, 3, args.size // 2, args.size // 2, generator=g), torch.randint(0, 10, (m,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss_fn(mod, batch):
        return nn.functional.cross_entropy(mod(batch["x"]), batch["y"], reduction="none")

    loader = [{"x": x[i : i + 512], "y": y[i : i + 512], "index": torch.arange(i, min(i + 512, n))}
              for i in range(0, n, 512)]
    d = tmp / "influence"
    ckpt_pass = 0.0
    with TraceRecorder(model, ["fc"], d, mode="tracin") as rec:
        for j in range(c):
            for s in range(0, n, 256):  # one cheap "epoch" of training between checkpoints
                rec.begin_step(torch.arange(s, min(s + 256, n)))
                nn.functional.cross_entropy(model(x[s : s + 256]), y[s : s + 256]).backward()
                rec.before_optimizer_step(opt)
                opt.step()
                opt.zero_grad()
                rec.end_step()
            t0 = time.process_time()
            rec.checkpoint(model, loader, loss_fn, lr=0.05)
            ckpt_pass += time.process_time() - t0
    model.eval()
    reader = TraceReader(d)
    ckpts = [ck.path for ck in reader.checkpoints()]
    tracin = TracInCP(model, TensorDataset(x, y), checkpoints=ckpts, checkpoints_load_func=captum_checkpoint_loader,
                      layers=["fc"], loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=512,
                      sample_wise_grads_per_batch=True)
    ours = reader.influence({"x": xt, "y": yt}, model=model, loss_fn=loss_fn).scores
    ref = tracin.influence((xt, yt), k=None)
    rel = float((ours - ref).abs().max() / ref.abs().max())
    if rel > 1e-4:
        raise AssertionError(f"influence disagrees with Captum TracInCP: max rel diff {rel:.2e}")
    res = abab(lambda: tracin.influence((xt, yt), k=None),
               lambda: reader.influence({"x": xt, "y": yt}, model=model, loss_fn=loss_fn),
               pairs=max(3, args.pairs // 2), warmup=1)
    speedup = 1.0 / res["ratio"]
    per_query_gain = res["baseline_s"] - res["variant_s"]
    return {"n_train": n, "m_test": m, "checkpoints": c, "captum_s": res["baseline_s"], "ours_s": res["variant_s"],
            "speedup_captum_over_ours": speedup, "max_rel_diff": rel, "checkpoint_pass_total_s": ckpt_pass,
            "break_even_queries": ckpt_pass / per_query_gain if per_query_gain > 0 else float("inf"),
            "target": 10.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4, help="epochs of the synthetic P3 store")
    p.add_argument("--only", choices=["overhead", "storage", "query", "influence"], default=None)
    args = p.parse_args()
    setup_cpu(args.threads)
    args.batch, args.size, args.flush_every = (64, 32, 25) if not args.smoke else (16, 16, 5)
    args.n_query = 50_000 if not args.smoke else 2_000
    args.n_influence = 10_000 if not args.smoke else 1_000
    if args.smoke:
        args.pairs, args.epochs = 3, 2
    info = env_info("cpu")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if args.only in (None, "overhead"):
            r = bench_overhead(args, tmp)
            print(f"P1 recording overhead (last Linear, representation): {r['ratio']:.3f}x the plain step "
                  f"(target <= 1.3; pairs {r['pairs']}, range {r['ratio_min']:.3f}-{r['ratio_max']:.3f})")
            emit_json("trace_overhead", {**r, "env": info})
        if args.only in (None, "storage"):
            r = bench_storage(tmp)
            for dt, v in r.items():
                print(f"P2 storage {dt}: {v['bytes_per_example_step']:.1f} B per example-step (expected "
                      f"{v['expected']}), metadata {v['metadata_bytes_per_row']:.0f} B/row")
            emit_json("trace_storage", r)
        if args.only in (None, "query"):
            r = bench_query(args, tmp)
            print(f"P3 query, 1 test input vs {r['n_train']} examples ({r['rows']} rows), Linear 512->10: "
                  f"{r['query_1_s']:.3f} s with the aggregate (target < 1 s); M=64: {r['query_64_s']:.3f} s; "
                  f"aggregate build {r['aggregate_build_s']:.2f} s; factor streaming {r['stream_query_1_s']:.2f} s "
                  f"(plain memmap sum {r['memmap_sum_s']:.2f} s)")
            emit_json("trace_query", {**r, "env": info})
        if args.only in (None, "influence"):
            r = bench_influence(args, tmp)
            print(f"P4 influence vs Captum TracInCP (N={r['n_train']}, M={r['m_test']}, C={r['checkpoints']}): "
                  f"{r['speedup_captum_over_ours']:.1f}x faster (target >= 10; max rel diff {r['max_rel_diff']:.1e}); "
                  f"checkpoint passes {r['checkpoint_pass_total_s']:.2f} s, break-even after "
                  f"{r['break_even_queries']:.2f} queries")
            emit_json("trace_vs_captum", {**r, "env": info})


if __name__ == "__main__":
    main()

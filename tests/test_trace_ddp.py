"""DDP: 2 gloo processes write one shard set per rank; the merged trace equals a one-process run."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from reprlens.trace import TraceReader, TraceRecorder


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 8, generator=g, dtype=torch.float64)
    return x, torch.arange(48) % 3


def _batches(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randperm(48, generator=g)[:12]


def _worker(rank, world, port, path, steps):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
        x, y = _data()
        rec = TraceRecorder(ddp, ["0", "2"], path, dtype="float64", rank=rank, world_size=world,
                            flush_every_n_steps=3, run_id="ddp-run")
        if rank == 0:
            rec.open()
        dist.barrier()
        rec.open()
        with rec:
            for step in range(steps):
                idx = _batches(step)[rank::world]  # global batch split over ranks (ids are dataset-level)
                rec.begin_step(idx, y[idx], step=step)
                nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
                rec.before_optimizer_step(opt)
                opt.step()
                opt.zero_grad()
                rec.end_step()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process(tmp_path):
    steps = 5
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), steps), nprocs=2, join=True)
    # one process, the same global batches
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x, y = _data()
    with TraceRecorder(model, ["0", "2"], tmp_path / "one", dtype="float64") as rec:
        for step in range(steps):
            idx = torch.cat([_batches(step)[0::2], _batches(step)[1::2]])
            rec.begin_step(idx, y[idx], step=step)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            rec.before_optimizer_step(opt)
            opt.step()
            opt.zero_grad()
            rec.end_step()
    rd = TraceReader(tmp_path / "ddp", dtype=torch.float64)
    r1 = TraceReader(tmp_path / "one", dtype=torch.float64)
    assert rd.world_size == 2 and rd.last_complete_step == steps
    rep = rd.completeness()
    for name in ["0", "2"]:
        assert rep.weight_error_abs[name] < 1e-10, rep
        torch.testing.assert_close(rd.weights(name)["weight"], r1.weights(name)["weight"], atol=1e-12, rtol=0)
    assert not rep.duplicate_steps
    # per step, the union of ids over ranks is the global batch
    for step in range(steps):
        ids = sorted(int(i) for b in rd._blocks["2"] for i in b.rows["id"][b.rows["step"] == step])
        assert ids == sorted(_batches(step).tolist())
    xt = torch.randn(4, 8, dtype=torch.float64)
    for name in ["0", "2"]:
        sd = rd.contributions(xt, name, model=model)
        s1 = r1.contributions(xt, name, model=model)
        assert torch.equal(sd.ids, s1.ids)
        torch.testing.assert_close(sd.score, s1.score, atol=1e-10, rtol=0)

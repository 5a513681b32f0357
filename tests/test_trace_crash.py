"""Crash safety: SIGKILL mid-run leaves every committed step readable; resume gives exactly the unbroken steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from reprlens.trace import TraceReader, TraceRecorder

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from reprlens.trace import TraceRecorder
    from reprlens.trace.store import atomic_torch_save
    torch.set_num_threads(1)
    out, pause = sys.argv[1], float(sys.argv[2])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64); y = torch.arange(40) % 3
    rec = TraceRecorder(model, ["0", "2"], out + "/trace", dtype="float64", flush_every_n_steps=2)
    if pause:
        rec.open(); rec._writer._pause_hook = lambda: time.sleep(pause)
    with rec:
        for step in range(10**6):
            idx = torch.randint(0, 40, (8,), generator=g)
            rec.begin_step(idx, step=step)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            rec.before_optimizer_step(opt); opt.step(); opt.zero_grad(); rec.end_step()
            if (step + 1) % 2 == 0:
                atomic_torch_save(out + f"/model_{step + 1}.pt", {"model": model.state_dict(), "gen": g.get_state()})
                print("COMMIT", rec.last_complete_step, flush=True)
            time.sleep(0.005)
    """
)


def _run_and_kill(tmp_path, seed, pause=0.0):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(pause)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rng = np.random.default_rng(seed)
    wanted = int(rng.integers(2, 6))
    last = 0
    seen = 0
    try:
        while seen < wanted:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(proc.stderr.read())
            if line.startswith("COMMIT"):
                last = int(line.split()[1])
                seen += 1
        time.sleep(float(rng.uniform(0.0, 0.05)) if not pause else pause / 2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return last


def _check_store(tmp_path, last_seen):
    reader = TraceReader(tmp_path / "trace", dtype=torch.float64)
    assert reader.last_complete_step >= last_seen
    rep = reader.completeness()
    for name in ["0", "2"]:
        assert rep.weight_error_abs[name] <= 1e-10, rep
    return reader


@pytest.mark.parametrize("seed", [0] + [pytest.param(s, marks=pytest.mark.slow) for s in range(1, 5)])
def test_sigkill_leaves_committed_steps_readable(tmp_path, seed):
    last = _run_and_kill(tmp_path, seed)
    _check_store(tmp_path, last)


def test_sigkill_between_shard_write_and_manifest_commit_then_resume(tmp_path):
    last = _run_and_kill(tmp_path, 7, pause=0.4)
    reader = _check_store(tmp_path, last)
    t_star = reader.last_complete_step
    manifest_dir = tmp_path / "trace" / "seg_0" / "rank_0"
    n_files_before = sum(1 for p in manifest_dir.rglob("*.npy"))
    # resume from the model checkpoint at T*
    ckpt = torch.load(tmp_path / f"model_{t_star}.pt", weights_only=False)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    model.load_state_dict(ckpt["model"])
    g = torch.Generator()
    g.set_state(ckpt["gen"])
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(40) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = TraceRecorder(model, ["0", "2"], tmp_path / "trace", dtype="float64", flush_every_n_steps=2)
    rec.load_state_dict({"run_id": reader.meta["run_id"], "layers": ["0", "2"], "last_flushed_step": t_star})
    with rec:
        for step in range(t_star, t_star + 5):
            idx = torch.randint(0, 40, (8,), generator=g)
            rec.begin_step(idx, step=step)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            rec.before_optimizer_step(opt)
            opt.step()
            opt.zero_grad()
            rec.end_step()
    n_files_after = sum(1 for p in manifest_dir.rglob("*.npy"))
    assert n_files_after <= n_files_before  # orphans of the killed run were removed
    r2 = TraceReader(tmp_path / "trace", dtype=torch.float64)
    assert r2.last_complete_step == t_star + 5
    rep = r2.completeness()
    assert rep.truncations and rep.truncations[-1]["step"] == t_star
    for name in ["0", "2"]:
        assert rep.weight_error_abs[name] <= 1e-10, rep
    torch.testing.assert_close(r2.weights("2")["weight"], model[2].weight.detach(), atol=0, rtol=0)
    steps = np.concatenate([s["step"] for s in r2._steps])
    assert sorted(steps.tolist()) == list(range(t_star + 5))  # every step exactly once


def _deterministic_run(path, *, stop_at=None, resume=None, total=12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(30) % 2
    start = 0
    rec = TraceRecorder(model, ["2"], path, dtype="float64", flush_every_n_steps=3)
    if resume is not None:
        model.load_state_dict(resume["model"])
        rec.load_state_dict(resume["trace"])
        start = resume["trace"]["last_flushed_step"]
    saved = None
    try:
        with rec:
            for step in range(start, total):
                idx = torch.arange(step % 6 * 5, step % 6 * 5 + 5)
                rec.begin_step(idx, step=step)
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                rec.before_optimizer_step(opt)
                opt.step()
                opt.zero_grad()
                rec.end_step()
                if step + 1 == 4:  # "ModelCheckpoint" at step 4: the trace state forces a flush
                    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "trace": rec.state_dict()}
                if stop_at is not None and step + 1 == stop_at:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    return saved


def _rows(path):
    r = TraceReader(path, dtype=torch.float64)
    out = []
    for b in r._blocks["2"]:
        keep = b.keep
        out.append((b.rows[keep], np.asarray(b.a)[keep], np.asarray(b.d)[keep]))
    rows = np.concatenate([o[0] for o in out])
    a = np.concatenate([o[1] for o in out])
    d = np.concatenate([o[2] for o in out])
    order = np.lexsort((rows["id"], rows["step"]))
    return rows[order], a[order], d[order], r


def test_resume_gives_bitwise_equal_rows(tmp_path):
    _deterministic_run(tmp_path / "full")
    saved = _deterministic_run(tmp_path / "broken", stop_at=8)  # flushed past 4 (at 6), interrupted at 8
    assert saved["trace"]["last_flushed_step"] == 4
    assert TraceReader(tmp_path / "broken").meta["segments"][0]["start_step"] == 0
    _deterministic_run(tmp_path / "broken", resume=saved)
    ra, aa, da, r_full = _rows(tmp_path / "full")
    rb, ab, db, r_broken = _rows(tmp_path / "broken")
    assert np.array_equal(ra, rb) and np.array_equal(aa, ab) and np.array_equal(da, db)
    assert r_broken.truncations == [{"segment": 1, "step": 4}]
    rep = r_broken.completeness()
    assert rep.weight_error_abs["2"] < 1e-12 and rep.missing_steps == [] and rep.duplicate_steps == []
    status = [m["status"] for m in r_broken._manifests.values()]
    assert status == ["interrupted", "finished"]

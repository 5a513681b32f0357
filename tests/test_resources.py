"""Issue 10, items 6 and 4 (partly): resource bounds, progress bars, clean interruption, device checks.

* The attribution path keeps at most one chunk of raw gradients alive: with ``chunk_size=8``, peak memory
  for K=512 target units exceeds the peak for K=64 by no more than the larger output (measured with
  ``torch.profiler``'s CPU allocation events), far below the (K, N, C, H, W) gradient a non-chunked
  implementation would hold; the same measurement does see a larger chunk.
* Long operations (RELAX, INVERT, trace queries) show tqdm bars when asked.
* A KeyboardInterrupt in the middle of a trace query or of an atomic store write leaves no partial file.
* ``trainer.devices`` beyond the visible GPUs is refused by ``reprlens.cli.run`` with a clear message.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from reprlens.attribution import layer_attributions


# ---------------------------------------------------------------------------------------------------------
# memory of the attribution path
# ---------------------------------------------------------------------------------------------------------
def _peak_bytes(fn):
    """Peak of live CPU bytes allocated while ``fn`` runs (profiler allocation events, replayed in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage  # allocations positive, frees ("[memory]" events) negative
        peak = max(peak, current)
    return peak, out


def _conv_head(c: int, k: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, k)).eval()


def test_profiler_measurement_sees_allocations():
    peak, _ = _peak_bytes(lambda: (torch.ones(1 << 20) * 2).sum())  # two live 4 MiB buffers at once
    assert 2 * 4 * (1 << 20) <= peak < 3 * 4 * (1 << 20)


@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_attribution_peak_memory_bounded_by_chunk(path):
    torch.set_num_threads(1)
    n, c, hw, chunk = 4, 64, 8, 8
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, c, hw, hw, generator=g)
    itemsize = h.element_size()
    chunk_bytes = chunk * n * c * hw * hw * itemsize  # one chunk of raw gradients (N, chunk, C, H, W)
    peaks, outs = {}, {}
    for k in (64, 512):
        head = _conv_head(c, k)
        peaks[k], outs[k] = _peak_bytes(
            lambda: layer_attributions(h, head, chunk_size=chunk, transform="abs", path=path)
        )
        assert outs[k].shape == (n, k, hw, hw) and torch.isfinite(outs[k]).all()
    out_growth = (outs[512].numel() - outs[64].numel()) * itemsize
    full_gradient_512 = 512 * n * c * hw * hw * itemsize  # what an unchunked VJP would hold (32 MiB)
    # growing K 8x adds the output (and its concatenation copy), not gradients
    assert peaks[512] - peaks[64] <= 2 * out_growth + chunk_bytes, (peaks, out_growth, chunk_bytes)
    assert peaks[512] < full_gradient_512 / 8, (peaks[512], full_gradient_512)
    # the measurement is sensitive: 8x larger chunks raise the peak by several raw chunks
    head = _conv_head(c, 512)
    big, out_big = _peak_bytes(lambda: layer_attributions(h, head, chunk_size=64, transform="abs", path=path))
    assert big > peaks[512] + 4 * chunk_bytes, (big, peaks[512])
    # chunking changes memory, not the result
    torch.testing.assert_close(out_big, outs[512], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# progress bars
# ---------------------------------------------------------------------------------------------------------
def test_relax_shows_progress(capsys):
    from reprlens.relax import Relax

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    res = Relax(enc, num_masks=200, seed=0, progress=True).explain(x)
    assert res.importance.shape[0] == 3
    assert "RELAX masks" in capsys.readouterr().err


def test_invert_shows_progress(capsys):
    from reprlens.invert import ConceptSet, Invert
    from reprlens.invert._fixtures import fx1

    a, c, names = fx1()
    res = Invert(ConceptSet(c, names, warn=False), correction=None).explain(a, progress=True)
    assert res is not None
    assert "INVERT" in capsys.readouterr().err


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture()
def small_trace(tmp_path):
    from reprlens.trace import TraceRecorder

    torch.manual_seed(0)
    model = _MLP()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=g), torch.arange(40) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TraceRecorder(model, ["fc2"], tmp_path / "trace", flush_every_n_steps=2) as rec:
        for step, s in enumerate(range(0, 40, 5)):
            idx = torch.arange(s, s + 5)
            rec.begin_step(idx, y[idx], step=step)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            rec.before_optimizer_step(opt)
            opt.step()
            opt.zero_grad()
            rec.end_step()
    return tmp_path / "trace"


def test_trace_query_shows_progress(small_trace, capsys):
    from reprlens.trace import TraceReader

    agg = TraceReader(small_trace).aggregate("fc2", progress=True, batch_rows=5)
    assert agg.shape[0] == 40
    assert "trace rows fc2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# clean interruption
# ---------------------------------------------------------------------------------------------------------
def test_interrupted_trace_query_leaves_no_cache_file(small_trace, monkeypatch):
    from reprlens.trace import TraceReader

    reader = TraceReader(small_trace)
    original = reader._iter_rows

    def interrupted(*args, **kwargs):
        it = original(*args, **kwargs)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(reader, "_iter_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reader.aggregate("fc2", batch_rows=5)
    cache = small_trace / "cache"
    assert not cache.exists() or not any(cache.iterdir()), sorted(os.listdir(cache))
    monkeypatch.undo()
    # the next query starts from scratch and gives the uninterrupted result
    again = np.asarray(TraceReader(small_trace).aggregate("fc2", batch_rows=5))
    fresh = np.asarray(TraceReader(small_trace, cache_dir=small_trace.parent / "other").aggregate("fc2", batch_rows=7))
    np.testing.assert_allclose(again, fresh, rtol=1e-5, atol=1e-7)
    assert np.abs(again).sum() > 0


def test_interrupted_atomic_write_keeps_old_file_and_no_temporary(tmp_path, monkeypatch):
    from reprlens.trace import store

    path = tmp_path / "x.npy"
    store.atomic_save_npy(path, np.arange(10.0))
    before = path.read_bytes()

    def half_written(fh, arr, allow_pickle=False):
        fh.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(store.np, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        store.atomic_save_npy(path, np.arange(1000.0))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):  # json and torch writers share the same path
        monkeypatch.setattr(store.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        store.atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


# ---------------------------------------------------------------------------------------------------------
# devices > available GPUs
# ---------------------------------------------------------------------------------------------------------
def _cfg(tmp_path, *overrides):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("reprlens.conf", version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"])


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    ("gpus", "devices", "expected"),
    [
        (0, "2", ["trainer.devices=2 asks for 2 GPUs", "has 0 visible CUDA GPUs", "trainer=cpu", "trainer=ddp"]),
        (1, "2", ["asks for 2 GPUs", "has 1 visible CUDA GPU ", "trainer.devices=1"]),
        (1, "[0,1]", ["asks for 2 GPUs", "has 1 visible CUDA GPU "]),
        (2, "[3]", ["asks for 1 GPU (up to index 3)", "has 2 visible CUDA GPUs"]),
    ],
)
def test_too_many_gpus_refused_clearly(tmp_path, monkeypatch, gpus, devices, expected):
    from reprlens.cli import run

    _fake_gpus(monkeypatch, gpus)
    cfg = _cfg(tmp_path, "trainer=gpu", f"trainer.devices={devices}")
    with pytest.raises(ValueError) as err:
        run(cfg)
    for text in expected:
        assert text in str(err.value), (text, str(err.value))
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


@pytest.mark.parametrize(
    ("gpus", "overrides"),
    [
        (1, ["trainer=gpu", "trainer.devices=1"]),
        (2, ["trainer=gpu", "trainer.devices=[0,1]"]),
        (0, ["trainer=ddp"]),  # 2 CPU processes
        (0, ["trainer.devices=2"]),  # accelerator=auto without GPUs: CPU processes, as Lightning does
        (1, ["trainer=gpu", "trainer.devices=-1"]),  # all visible GPUs: Lightning resolves it
    ],
)
def test_possible_device_requests_pass_the_check(tmp_path, monkeypatch, gpus, overrides):
    from reprlens.cli import _check_devices

    _fake_gpus(monkeypatch, gpus)
    _check_devices(_cfg(tmp_path, *overrides))


def test_cli_refuses_two_gpus_without_gpus(tmp_path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    proc = subprocess.run(
        [sys.executable, "-m", "reprlens.train", "trainer=gpu", "trainer.devices=2", f"paths.root_dir={tmp_path}",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "asks for 2 GPUs" in proc.stderr and "visible CUDA GPU" in proc.stderr, proc.stderr[-2000:]

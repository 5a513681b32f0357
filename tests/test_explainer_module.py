"""PartExplainer, metrics, FeatureCache and ExplainerModule (fast tests; the full D6 probe is slow)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from reprlens.explainer_net import (
    ExplainerModule,
    FeatureCache,
    LocationInstability,
    PartExplainer,
    ReceptiveField,
    RelativeReconstructionError,
    location_instability,
)
from reprlens.explainer_net._probe import make_part_probe, probe_performer, train_performer
from reprlens.explainer_net.lightning import p_reward_schedule

D = torch.float64

@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads contend badly (20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _batches(d, bs):
    return [{k: v[i : i + bs] for k, v in d.items()} for i in range(0, d["image"].shape[0], bs)]


# ------------------------------------------------------------------------------------------ PartExplainer
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_part_explainer_shapes(layers):
    upper = {"a.conv": (5, 2, 3), "big": (3, 8, 10), "fc": (7,)}
    net = PartExplainer(6, num_interpretable_layers=layers, upper_shapes=upper)
    x = torch.rand(4, 6, 5, 7)
    out = net(x)
    assert out.reconstruction.shape == x.shape and out.interpretable.shape == x.shape
    assert out.p.shape == (4,) and torch.all(out.p == 0.5)
    assert {k: tuple(v.shape) for k, v in out.upper.items()} == {"a.conv": (4, 5, 2, 3), "big": (4, 3, 8, 10),
                                                                  "fc": (4, 7)}
    assert out.filter_loss.ndim == 0 and torch.isfinite(out.filter_loss)
    assert torch.all(out.reconstruction >= 0)  # "auto": x >= 0 -> ReLU output
    assert net.config["output_activation"] == "relu"
    with pytest.raises(ValueError, match="odd"):
        PartExplainer(6, kernel_size=2)
    with pytest.raises(NotImplementedError, match="pseudo-gradient"):
        PartExplainer(6, learnable_beta=True)
    with pytest.raises(ValueError, match="conv"):
        net(torch.rand(4, 6))


def test_part_explainer_norm_gate_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = PartExplainer(4).double()
    x = torch.rand(8, 4, 6, 6, dtype=D) * 3
    net.train()
    out = net(x)
    torch.testing.assert_close(net.norm_ordin.r.double(), out.ordinary.flatten(1).norm(dim=1).mean(), rtol=1e-6, atol=0)
    r_int = net.norm_interp.r.clone()
    torch.testing.assert_close(r_int.double(), out.interpretable.flatten(1).norm(dim=1).mean(), rtol=1e-6, atol=0)
    out2 = net(x * 2)  # second batch: r <- 0.9 r + 0.1 bm
    bm = float(out2.interpretable.detach().flatten(1).norm(dim=1).mean())
    assert float(net.norm_interp.r) == pytest.approx(0.9 * float(r_int) + 0.1 * bm, rel=1e-5)
    assert int(net.norm_interp.count) == 2
    net.eval()
    r_before = net.norm_interp.r.clone()
    e1 = net(x)
    assert torch.equal(net.norm_interp.r, r_before)  # eval uses the stored r
    path = tmp_path / "e.pt"
    net.save(path)
    loaded = PartExplainer.load(path).eval()
    e2 = loaded(x)
    assert torch.equal(e1.reconstruction, e2.reconstruction) and torch.equal(e1.p, e2.p)
    # p forced to 1: the ordinary track gets no gradient from the reconstruction
    net.train()
    with torch.no_grad():
        net.gate.bias.fill_(1e3)
    out = net(x)
    assert torch.all(out.p == 1)
    out.reconstruction.sum().backward()
    assert net.ordinary.weight.grad is None or torch.all(net.ordinary.weight.grad == 0)
    assert net.blocks[0].conv.weight.grad.abs().sum() > 0


def test_part_explainer_compat_modes():
    """Reference filter-loss mode, centroid masks and the unit grid run end to end (values checked in the
    functional tests); the injected gradient reaches the interpretable convs."""
    net = PartExplainer(4, filter_loss_mode="reference", mask_mode="centroid", coords="unit_grid", beta=2.0,
                        filter_loss_normalize="none")
    out = net(torch.rand(8, 4, 5, 5))
    assert torch.isfinite(out.filter_loss)
    out.filter_loss.backward()
    assert net.blocks[0].conv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ metrics
def test_location_instability_metric_streaming_equals_oneshot():
    g = torch.Generator().manual_seed(0)
    maps = torch.relu(torch.randn(64, 3, 4, 4, dtype=D, generator=g))
    lm = torch.rand(64, 2, 2, dtype=D, generator=g) * 15
    lm[::5, 1] = float("nan")
    rf = ReceptiveField((1.5, 1.5), (4.0, 4.0), (18.0, 18.0))
    ref = location_instability(maps, lm, rf, (16, 16), top_k=20)
    for bs in (1, 7, 64):
        m = LocationInstability(rf, top_k=20)
        for i in range(0, 64, bs):
            m.update(maps[i : i + bs], lm[i : i + bs], (16, 16))
        res = m.compute()
        torch.testing.assert_close(res.per_filter, ref.per_filter, atol=1e-12, rtol=0, equal_nan=True)
        assert float(res.value) == pytest.approx(float(ref.value), abs=1e-12)


def test_relative_error_pooled():
    m = RelativeReconstructionError()
    a, b = torch.rand(5, 3), torch.rand(5, 3)
    m.update(a[:2], b[:2])
    m.update(a[2:], b[2:])
    assert float(m.compute()) == pytest.approx(float(((a - b).norm() / b.norm())), rel=1e-6)


# ------------------------------------------------------------------------------------------ module
_TOY: dict[int, dict] = {}


def _toy(seed=0):
    """A briefly trained D6 performer (trained once per session; a fresh copy per call)."""
    import copy

    if seed not in _TOY:
        _TOY[seed] = train_performer(probe_performer(seed), make_part_probe(256, seed=seed), epochs=1).state_dict()
    net = probe_performer(seed)
    net.load_state_dict(copy.deepcopy(_TOY[seed]))
    return net.eval()


def _checksum(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_cache_equals_fresh_pass_and_counts_calls():
    net = _toy()
    data = make_part_probe(48, seed=3)
    calls = {"n": 0}
    h = net.register_forward_hook(lambda m, a, o: calls.__setitem__("n", calls["n"] + a[0].shape[0]))
    cache = FeatureCache.build(net, "7", _batches(data, 16), upper_layers=["10"], progress=False)
    h.remove()
    assert calls["n"] == 48
    with torch.no_grad():
        fresh = net[:8](data["image"])
        torch.testing.assert_close(cache.tensors["target"], fresh, atol=0, rtol=0)
        torch.testing.assert_close(cache.tensors["upper/10"], net(data["image"]), atol=0, rtol=0)
    assert torch.equal(cache.tensors["y"], data["label"]) and cache.tensors["landmarks"].shape == (48, 1, 2)
    # 3 epochs on the cache: the performer runs no more
    mod = ExplainerModule(net, "7", example_batch=_batches(data, 8)[0], steps_per_epoch=3)
    opt = mod.configure_optimizers()
    h = net.register_forward_hook(lambda m, a, o: calls.__setitem__("n", calls["n"] + a[0].shape[0]))
    calls["n"] = 0
    for _ in range(3):
        for b in cache.dataloader(16):
            loss, _, _ = mod.compute_loss(mod.features(b), 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert calls["n"] == 0
    for _ in range(3):  # uncached: one performer call per example and epoch
        for b in _batches(data, 16):
            mod.compute_loss(mod.features(b), 0.0)
    h.remove()
    assert calls["n"] == 3 * 48
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache.build(net, "7", _batches(data, 16), max_bytes=1000, progress=False)


def test_reward_gradient_schedule_and_guard():
    net = _toy()
    data = make_part_probe(32, seed=1)
    mod = ExplainerModule(net, "7", example_batch=data, filter_loss_weight=0.0, p_cap=0.9)
    feats = mod.features(data)
    with torch.no_grad():
        mod.explainer.gate.bias.fill_(5.0)  # p ~ 0.993 > p_cap
    loss_r, out, _ = mod.compute_loss(feats, 0.05)
    g_r = torch.autograd.grad(loss_r, mod.explainer.gate.bias)[0]
    loss_0, _, _ = mod.compute_loss(feats, 0.0)
    g_0 = torch.autograd.grad(loss_0, mod.explainer.gate.bias)[0]
    assert torch.all(out.p > 0.9)
    torch.testing.assert_close(g_r, g_0, atol=1e-7, rtol=0)  # the capped reward adds no gradient
    with torch.no_grad():
        mod.explainer.gate.bias.fill_(-1.0)
    loss_r, out, _ = mod.compute_loss(feats, 0.05)
    g_r = torch.autograd.grad(loss_r, mod.explainer.gate.bias)[0]
    loss_0, _, _ = mod.compute_loss(feats, 0.0)
    g_0 = torch.autograd.grad(loss_0, mod.explainer.gate.bias)[0]
    assert float(g_r) < float(g_0)  # below the cap the reward pushes p up
    assert p_reward_schedule(0.99, 0.05, 1.0, 2.0) == 0.0 and p_reward_schedule(3.0, 0.05, 1.0, 2.0) == 0.05
    assert p_reward_schedule(2.0, 0.05, 1.0, 2.0) == pytest.approx(0.025)
    assert p_reward_schedule(1.0, 0.05, 1.0, 0.0) == 0.05
    for direction, pm in ((1, 0.99), (-1, 0.01)):
        m = ExplainerModule(net, "7", explainer=mod.explainer)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            states = [m.collapse_guard(p, e) for p, e in [(0.5, 0.2), (pm, 0.25), (pm, 0.3), (0.5, 0.3)]]
        assert states == [0, direction, direction, 0]
        assert sum("collapsed" in str(w.message) for w in rec) == 1


def test_bad_inputs():
    net = _toy()
    data = make_part_probe(16, seed=2)
    with pytest.raises(ValueError, match="conv feature map"):
        ExplainerModule(net, "10", example_batch=data)
    with pytest.raises(ValueError, match="Closest"):
        ExplainerModule(net, "77")
    net.train()
    with pytest.warns(UserWarning, match="eval mode"):
        mod = ExplainerModule(net, "7", example_batch=data)
    assert not net.training
    bad = {**data, "image": data["image"].clone()}
    bad["image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mod.update_metrics(bad)
    with pytest.raises(ValueError, match="outside"):
        mod.update_metrics({**data, "landmarks": data["landmarks"] + 100})


def test_lightning_smoke_frozen_performer(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    net = _toy()
    before = _checksum(net)
    from torch.utils.data import DataLoader

    tr, te = make_part_probe(128, seed=5), make_part_probe(32, seed=6)
    cache = FeatureCache.build(net, "7", _batches(tr, 64), progress=False)
    mod = ExplainerModule(net, "7", example_batch=_batches(tr, 8)[0])
    trainer = pl.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(mod, cache.dataloader(32), DataLoader(_batches(te, 16), batch_size=None))
    m = trainer.callback_metrics
    for key in ("explainer/rel_err", "explainer/p_mean", "explainer/acc_original", "explainer/acc_reconstructed",
                "explainer/location_instability/explainer", "explainer/location_instability/performer",
                "explainer/filter_loss", "explainer/p_collapsed"):
        assert key in m and math.isfinite(float(m[key])), key
    assert 0 < float(m["explainer/p_mean"]) < 1
    after = _checksum(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not net.training and all(p.grad is None for p in net.parameters())
    out = mod.explain(te["image"][:4])
    assert out.reconstruction.shape == (4, 32, 8, 8) and torch.all((out.p > 0) & (out.p < 1))
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    sd = torch.load(ckpt, weights_only=False)["state_dict"]
    assert sd and not any(k.startswith("performer.") for k in sd)


@pytest.mark.slow
def test_probe_end_to_end_directions():
    """Spec 5.6 (D6): fixed seeds, directions only."""
    torch.manual_seed(0)
    tr, te = make_part_probe(2048, seed=0), make_part_probe(512, seed=1)
    net = train_performer(probe_performer(0), tr)
    acc = float((net(te["image"]).argmax(1) == te["label"]).float().mean())
    assert acc >= 0.95

    def run(p_cap):
        cache = FeatureCache.build(net, "7", _batches(tr, 256), progress=False)
        mod = ExplainerModule(net, "7", example_batch=_batches(tr, 8)[0], steps_per_epoch=32, p_cap=p_cap)
        opt = mod.configure_optimizers()
        step = 0
        torch.manual_seed(0)
        for ep in range(8):
            mod.train()
            for b in cache.dataloader(64, generator=torch.Generator().manual_seed(ep)):
                loss, _, _ = mod.compute_loss(mod.features(b), mod.current_p_reward_weight(step))
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
        mod.eval()
        for b in _batches(te, 128):
            mod.update_metrics(b)
        return mod.compute_metrics()

    res = run(0.9)
    assert all(math.isfinite(v) for v in res.values())
    assert res["acc_reconstructed"] >= res["acc_original"] - 0.15
    assert 0 < res["p_mean"] < 1 and res["rel_err"] < 0.5
    assert res["location_instability/explainer"] < res["location_instability/performer"]
    uncapped = run(None)
    assert res["p_mean"] < uncapped["p_mean"]


# ------------------------------------------------------------------------------------------ DDP
def _li_data():
    g = torch.Generator().manual_seed(7)
    maps = torch.relu(torch.randn(60, 3, 4, 4, dtype=D, generator=g))
    lm = torch.rand(60, 2, 2, dtype=D, generator=g) * 15
    return maps, lm


def _ddp_li_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        maps, lm = _li_data()
        m = LocationInstability(ReceptiveField((1.5, 1.5), (4.0, 4.0), (18.0, 18.0)), top_k=15)
        for i in range(0, 60, 6):
            if (i // 6) % world_size == rank:  # interleaved shards
                m.update(maps[i : i + 6], lm[i : i + 6], (16, 16))
        res = m.compute()
        torch.save({"value": res.value, "per_filter": res.per_filter}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_location_instability_ddp_two_processes(tmp_path):
    import torch.multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_li_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method=method)
    maps, lm = _li_data()
    ref = location_instability(maps, lm, ReceptiveField((1.5, 1.5), (4.0, 4.0), (18.0, 18.0)), (16, 16), top_k=15)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(out["per_filter"], ref.per_filter, atol=1e-12, rtol=0)
        assert float(out["value"]) == pytest.approx(float(ref.value), abs=1e-12)

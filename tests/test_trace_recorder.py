"""Representation-mode recorder + reader: completeness identities, isolation known answer, guards, storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from reprlens.trace import TraceReader, TraceRecorder
from reprlens.trace import functional as TF


class MLP(nn.Module):
    def __init__(self, d=8, h=16, k=3, bias1=True):
        super().__init__()
        self.fc1 = nn.Linear(d, h, bias=bias1)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(h, k)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def blobs(n=60, d=8, k=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    centers = torch.randn(k, d, generator=g, dtype=dtype) * 3
    x = centers[y] + torch.randn(n, d, generator=g, dtype=dtype)
    return x, y


def train(rec_kwargs, tmp_path, *, epochs=3, n=60, batch=10, accumulate=1, twice=False, dtype=torch.float64,
          lr=0.1, opt_kwargs=None, model=None, x=None, y=None, sched=True, steps_limit=None):
    torch.manual_seed(0)
    model = model or MLP().to(dtype)
    if x is None:
        x, y = blobs(n, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, **(opt_kwargs or {}))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5) if sched else None
    g = torch.Generator().manual_seed(1)
    rec = TraceRecorder(model, **rec_kwargs, dirpath=tmp_path)
    step = 0
    with rec:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for bi, s in enumerate(range(0, n, batch)):
                idx = perm[s : s + batch]
                rec.begin_step(idx, y[idx], step=step)
                out = model(x[idx])
                if twice:
                    out = out + model(x[idx] * 0.5)
                loss = nn.functional.cross_entropy(out, y[idx]) / accumulate
                loss.backward()
                if (bi + 1) % accumulate:
                    rec.pause()
                    continue
                rec.before_optimizer_step(opt)
                opt.step()
                opt.zero_grad()
                rec.end_step()
                step += 1
                if steps_limit and step >= steps_limit:
                    return model, x, y, rec
            if scheduler:
                scheduler.step()
    return model, x, y, rec


@pytest.mark.parametrize("variant", ["plain", "accumulate", "twice"])
def test_weight_and_representation_completeness_float64(tmp_path, variant):
    kw = dict(accumulate=3) if variant == "accumulate" else dict(twice=variant == "twice")
    model, x, y, rec = train(dict(layers=["fc1", "fc2"], dtype="float64", flush_every_n_steps=4), tmp_path,
                             epochs=4, **kw)
    reader = TraceReader(tmp_path, dtype=torch.float64)
    assert reader.last_complete_step == rec.last_complete_step > 0
    report = reader.completeness()
    for name in ["fc1", "fc2"]:
        assert report.weight_error_abs[name] <= 1e-12, report
    # the trace's final snapshot equals the model
    torch.testing.assert_close(reader.weights("fc2")["weight"], model.fc2.weight.detach(), atol=0, rtol=0)
    xt = torch.randn(16, 8, dtype=torch.float64)
    for name in ["fc1", "fc2"]:
        res = reader.contributions(xt, name, model=model, return_vectors=True)
        assert res.vectors.shape == (16, 60, *res.delta_z.shape[1:])
        torch.testing.assert_close(res.vectors.sum(1), res.delta_z, atol=1e-10, rtol=0)
        torch.testing.assert_close(res.score.sum(1), res.delta_z_norm, atol=1e-10, rtol=0)
        # independent Δz: run the layer with W_T and W_0
        w0 = reader.weights(name, "initial")
        layer = getattr(model, name)
        a = x.new_zeros(0)
        captured = []
        h = layer.register_forward_hook(lambda m, i, o: captured.append(i[0]))
        model.eval()
        with torch.no_grad():
            model(xt)
        h.remove()
        a = captured[0]
        dz = layer(a) - nn.functional.linear(a, w0["weight"], w0["bias"])
        torch.testing.assert_close(res.delta_z, dz.detach(), atol=1e-10, rtol=0)
        cc = reader.class_contributions(res)
        torch.testing.assert_close(cc.score.sum(1), res.delta_z_norm, atol=1e-10, rtol=0)
        assert res.completeness_error.max() < 1e-10


def test_float32_completeness_and_storage_variants_agree(tmp_path):
    xt = torch.randn(5, 8)
    scores = {}
    for fact in ["low_rank", "full"]:
        d = tmp_path / fact
        model, *_ = train(dict(layers=["fc2"], factorization=fact, flush_every_n_steps=3), d, dtype=torch.float32)
        reader = TraceReader(d)
        rep = reader.completeness()
        assert rep.weight_error_rel["fc2"] < 1e-5, rep
        res = reader.contributions(xt, "fc2", model=model)
        torch.testing.assert_close(res.score.sum(1), res.delta_z_norm, rtol=1e-5, atol=1e-6)
        scores[fact] = res.score
        if fact == "low_rank":
            agg = reader.aggregate("fc2")
            assert agg.shape == (60, 3 * 16 + 3)
            res_agg = reader.contributions(xt, "fc2", model=model, use_aggregate=True)
            torch.testing.assert_close(res_agg.score, res.score, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores["low_rank"], scores["full"], rtol=1e-4, atol=1e-5)


def test_isolation_known_answer(tmp_path):
    """One-hot inputs, bias-free first layer: for x = e_j only example j moves fc1's pre-activation."""
    n = 8
    x = torch.eye(n, dtype=torch.float64)
    y = torch.arange(n) % 3
    model = MLP(bias1=False).double()
    train(dict(layers=["fc1"], dtype="float64"), tmp_path, model=model, x=x, y=y, n=n, batch=4, epochs=5)
    reader = TraceReader(tmp_path, dtype=torch.float64)
    res = reader.contributions(layer="fc1", layer_inputs=x, return_vectors=True)
    ids = res.ids.tolist()
    assert ids == list(range(n))
    for j in range(n):
        others = [i for i in range(n) if i != j]
        assert torch.all(res.vectors[j, others] == 0)
        assert torch.all(res.score[j, others] == 0)
        assert reader.top_k(res, 1).ids[j, 0] == j
        assert res.score[j, j] > 0
        torch.testing.assert_close(res.score[j, j], res.delta_z_norm[j], atol=1e-12, rtol=0)


def test_per_step_link_to_gradient_dot(tmp_path):
    """<ΔW_r, ∇ℓ(w_t; x)> == −(η/B)<g_i, g_x> for every row of one step (float64)."""
    torch.manual_seed(0)
    model = MLP().double()
    x, y = blobs(10)
    xt, yt = blobs(3, seed=5)
    w_t = model.fc2.weight.detach().clone()
    lr = 0.3
    train(dict(layers=["fc2"], dtype="float64"), tmp_path, model=model, x=x, y=y, n=10, batch=10, epochs=1, lr=lr,
          sched=False)
    model.fc2.weight.data.copy_(w_t)  # not needed for fc2 inputs but keep the pre-step state explicit
    reader = TraceReader(tmp_path, dtype=torch.float64)
    blk = reader._blocks["fc2"][0]
    rows = blk.rows
    rid = torch.from_numpy(rows["id"].copy())
    A, U = reader._factors(blk, np.arange(len(rows)), rows, torch.from_numpy(np.asarray(blk.a)),
                           torch.from_numpy(np.asarray(blk.d)))
    # gradients at w_t: recompute with the initial model
    torch.manual_seed(0)
    init = MLP().double()
    spec = TF.layer_spec(init.fc2)
    cap = {}
    init.fc2.register_forward_hook(lambda m, i, o: cap.update(a=i[0].detach(), z=o))
    lx = nn.functional.cross_entropy(init(xt), yt, reduction="sum")
    gx = torch.autograd.grad(lx, cap["z"])[0]
    a_x = cap["a"]
    link = TF.factor_dot(spec, A, U, a_x, gx)  # <ΔW_r, g_x>
    cap2 = {}
    init.fc2._forward_hooks.clear()
    init.fc2.register_forward_hook(lambda m, i, o: cap2.update(a=i[0].detach(), z=o))
    li = nn.functional.cross_entropy(init(x[rid]), y[rid], reduction="none")
    gi = torch.autograd.grad(li.sum(), cap2["z"])[0]
    expect = -(lr / 10) * TF.factor_dot(spec, cap2["a"], gi, a_x, gx)
    torch.testing.assert_close(link, expect, atol=1e-12, rtol=0)


def test_guards(tmp_path):
    with pytest.raises(ValueError, match="momentum"):
        train(dict(layers=["fc2"]), tmp_path / "a", opt_kwargs=dict(momentum=0.9), epochs=1)
    with pytest.raises(ValueError, match="weight_decay"):
        train(dict(layers=["fc2"]), tmp_path / "b", opt_kwargs=dict(weight_decay=0.1), epochs=1)
    with pytest.warns(UserWarning, match="momentum"):
        train(dict(layers=["fc2"], strict=False), tmp_path / "c", opt_kwargs=dict(momentum=0.9), epochs=1)
    r = TraceReader(tmp_path / "c")
    assert r.exact is False and any("momentum" in a for a in r.approximations)
    # maximize=True stays exact
    model, *_ = train(dict(layers=["fc2"], dtype="float64"), tmp_path / "d", opt_kwargs=dict(maximize=True), epochs=1)
    assert TraceReader(tmp_path / "d").completeness().weight_error_abs["fc2"] < 1e-12
    with pytest.raises(ValueError, match="Closest valid names.*fc2"):
        TraceRecorder(MLP(), ["fc3"], tmp_path / "e")
    with pytest.raises(NotImplementedError, match="Linear"):
        TraceRecorder(MLP(), ["act"], tmp_path / "e")


def test_tied_weight_fails_factor_check(tmp_path):
    class Tied(MLP):
        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h) + nn.functional.linear(h, self.fc2.weight)  # second, unhooked use of W

    with pytest.raises(RuntimeError, match="factor:fc2"):
        train(dict(layers=["fc2"], check_every_n_steps=1), tmp_path, model=Tied().double(), epochs=1)


def test_missing_ids_and_row_mismatch(tmp_path):
    from reprlens.trace.ids import default_example_ids

    with pytest.raises(ValueError, match="index"):
        default_example_ids({"image": torch.zeros(2)})
    with pytest.raises(ValueError, match="WithIndex"):
        default_example_ids((torch.zeros(2), torch.zeros(2)))
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="per-row `example_id_fn`"):
        with TraceRecorder(model, ["fc2"], tmp_path) as rec:
            rec.begin_step(torch.arange(3))
            model(torch.randn(5, 8, dtype=torch.float64)).sum().backward()
            rec.before_optimizer_step(opt)
            rec.end_step()


def test_other_run_refused_unless_overwrite(tmp_path):
    train(dict(layers=["fc2"]), tmp_path, epochs=1)
    with pytest.raises(ValueError, match="overwrite=True"):
        train(dict(layers=["fc2"]), tmp_path, epochs=1)
    train(dict(layers=["fc2"], overwrite=True), tmp_path, epochs=1)
    assert TraceReader(tmp_path).last_complete_step == 6


def test_storage_sizes_and_float16(tmp_path):
    xt = torch.randn(4, 8)
    res = {}
    for dt in ["float32", "float16"]:
        model, *_ = train(dict(layers=["fc2"], dtype=dt, factorization="low_rank", flush_every_n_steps=100),
                          tmp_path / dt, dtype=torch.float32, epochs=2)
        files_a = list((tmp_path / dt).rglob("*.a.npy"))
        files_d = list((tmp_path / dt).rglob("*.d.npy"))
        arr_a, arr_d = np.load(files_a[0]), np.load(files_d[0])
        assert arr_a.shape == (120, 16) and arr_d.shape == (120, 3)
        item = np.dtype(dt).itemsize
        assert arr_a.nbytes + arr_d.nbytes == 120 * (16 + 3) * item
        rows = list((tmp_path / dt).rglob("*.rows.npy"))
        assert np.load(rows[0]).dtype.itemsize <= 32
        res[dt] = TraceReader(tmp_path / dt).contributions(xt, "fc2", model=model).score
    torch.testing.assert_close(res["float16"], res["float32"], rtol=2e-3, atol=2e-3 * res["float32"].abs().max())
    # a tiny row survives float16 thanks to the power-of-two row scaling
    from reprlens.trace.recorder import _frexp_scale

    tiny = torch.full((1, 4), 1e-7)
    s, e = _frexp_scale(tiny)
    back = torch.ldexp(s.half().float(), e.float().reshape(-1, 1))
    torch.testing.assert_close(back, tiny, rtol=1e-3, atol=0)


def test_truncated_shard_is_skipped_and_reported(tmp_path):
    train(dict(layers=["fc2"], flush_every_n_steps=2), tmp_path, epochs=1)
    files = sorted((tmp_path / "seg_0" / "rank_0" / "fc2").glob("2-4.*.a.npy"))
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="damaged"):
        reader = TraceReader(tmp_path)
    assert reader.last_complete_step == 2
    assert reader.damaged
    assert reader.completeness().weight_error_rel["fc2"] < 1e-5


def test_conv_layer_completeness(tmp_path):
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    model = ConvNet().double()
    x = torch.randn(30, 2, 6, 6, dtype=torch.float64)
    y = torch.arange(30) % 3
    train(dict(layers=["conv"], dtype="float64", factorization="low_rank"), tmp_path, model=model, x=x, y=y, n=30,
          epochs=2)
    reader = TraceReader(tmp_path, dtype=torch.float64)
    assert reader.completeness().weight_error_abs["conv"] < 1e-12
    res = reader.contributions(torch.randn(3, 2, 6, 6, dtype=torch.float64), "conv", model=model, return_vectors=True)
    torch.testing.assert_close(res.vectors.sum(1), res.delta_z, atol=1e-10, rtol=0)
    assert "conv (Conv2d, low_rank)" in reader.summary()


def test_amp_grad_scaler_factors_unscaled_and_skipped_step(tmp_path):
    """GradScaler: stored G carries the loss scale, κ divides it out; an inf step is skipped with no rows."""
    torch.manual_seed(0)
    model = MLP()
    x, y = blobs(40, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with TraceRecorder(model, ["fc2"], tmp_path, check_every_n_steps=1) as rec:
        for step in range(6):
            idx = torch.arange(step % 4 * 10, step % 4 * 10 + 10)
            rec.begin_step(idx, step=step)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if step == 3:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            before = scaler._scale.detach().clone()
            rec.before_optimizer_step(opt, loss_scale=before)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec.end_step(stepped=scaler._scale >= before)
    reader = TraceReader(tmp_path)
    rep = reader.completeness()
    assert rep.skipped_steps == [3]
    assert rep.weight_error_rel["fc2"] < 1e-5, rep
    steps = np.concatenate([b.rows["step"] for b in reader._blocks["fc2"]])
    assert 3 not in steps.tolist() and len(steps) == 50
    assert reader._steps[0]["amp_scale"][0] == 2.0**10


def test_inplace_relu_and_step_granularity(tmp_path):
    class InplaceMLP(MLP):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU(inplace=True)

    model, x, y, rec = train(dict(layers=["fc1", "fc2"], dtype="float64", check_every_n_steps=1), tmp_path,
                             model=InplaceMLP().double(), epochs=2)
    reader = TraceReader(tmp_path, dtype=torch.float64)
    rep = reader.completeness()
    assert rep.weight_error_abs["fc1"] < 1e-12 and rep.weight_error_abs["fc2"] < 1e-12, rep
    xt = torch.randn(3, 8, dtype=torch.float64)
    ex = reader.contributions(xt, "fc1", model=model)
    st = reader.contributions(xt, "fc1", model=model, granularity="step")
    assert st.score.shape == (3, 120) and st.step.shape == (120,)
    per_id = torch.zeros(3, 60, dtype=torch.float64).index_add_(1, st.ids, st.score)
    torch.testing.assert_close(per_id, ex.score, atol=1e-10, rtol=0)
    # top-k by cosine / norm, and the weight-mismatch warning with reference="trace"
    assert reader.top_k(ex, 3, by="cosine").ids.shape == (3, 3)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    with pytest.warns(UserWarning, match="reference='model'"):
        reader.contributions(xt, "fc1", model=model)
    dense = ex.to_dense(100)
    assert dense.shape == (3, 100) and torch.all(dense[:, 60:] == 0)


def test_strided_recording_is_marked_approximate(tmp_path):
    model, *_ = train(dict(layers=["fc2"], every_n_steps=2), tmp_path, epochs=2, sched=False)
    reader = TraceReader(tmp_path)
    assert reader.exact is False and any("strided" in a for a in reader.approximations)
    steps = sorted({int(s) for b in reader._blocks["fc2"] for s in b.rows["step"]})
    assert steps == [0, 2, 4, 6, 8, 10]
    # weighted by n: the strided sum approximates the full update (same order of magnitude)
    rep = reader.completeness()
    assert rep.weight_error_rel["fc2"] < 1.0


def test_bf16_autocast_factor_check_tolerance(tmp_path):
    """bf16 autocast on CPU: the factor check uses a bf16 tolerance; completeness holds to bf16 accuracy."""
    torch.manual_seed(0)
    model = MLP()
    x, y = blobs(40, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TraceRecorder(model, ["fc2"], tmp_path, check_every_n_steps=1) as rec:
        for step in range(4):
            idx = torch.arange(step * 10, step * 10 + 10)
            rec.begin_step(idx, step=step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x[idx]).float(), y[idx])
            loss.backward()
            rec.before_optimizer_step(opt)
            opt.step()
            opt.zero_grad()
            rec.end_step()
    rep = TraceReader(tmp_path).completeness()
    assert rep.weight_error_rel["fc2"] < 2e-2, rep


def test_rank_local_ids_are_detected_and_steps_accounted(tmp_path):
    """Two recorders as rank 0/1 of a 2-process run: positions-as-ids collide across ranks and are flagged."""
    torch.manual_seed(0)
    x, y = blobs(40)
    models = [MLP().double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    recs = [TraceRecorder(m, ["fc2"], tmp_path, rank=r, world_size=2, run_id="r") for r, m in enumerate(models)]
    for rec in recs:
        rec.open()
        rec.attach()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for step in range(4):
        for r, (m, rec, opt) in enumerate(zip(models, recs, opts)):
            idx = torch.arange(10) + 20 * r + 0 * step
            rec.begin_step(torch.arange(10), step=step)  # rank-local positions: the bug to detect
            nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            rec.before_optimizer_step(opt)
            opt.zero_grad()
            rec.end_step()
    for rec in recs:
        rec.close()
    with pytest.warns(UserWarning, match="rank-local ids"):
        reader = TraceReader(tmp_path)
    assert reader.id_overlap_fraction == 1.0
    rep = reader.completeness()
    assert rep.steps_per_rank == {0: 4, 1: 4} and rep.missing_steps == [] and rep.duplicate_steps == []

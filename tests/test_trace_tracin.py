"""Tracin mode: Captum TracInCP oracle, closed form, full-batch trajectory sum, mislabelled examples."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from reprlens.trace import TraceReader, TraceRecorder, captum_checkpoint_loader
from reprlens.trace import functional as TF

captum_influence = pytest.importorskip("captum.influence")


class MLP(nn.Module):
    def __init__(self, d=8, h=16, k=3, bias2=True):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(h, k, bias=bias2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(h.mean((2, 3)))


def per_example_ce(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def loader(x, y, bs):
    ds = [{"x": x[i : i + bs], "y": y[i : i + bs], "index": torch.arange(i, min(i + bs, len(x)))}
          for i in range(0, len(x), bs)]
    return ds


def run_tracin(model, x, y, tmp_path, layers, *, epochs=3, lr=0.2, batch=8, momentum=0.0, ckpt_every_epoch=True):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    n = len(x)
    with TraceRecorder(model, layers, tmp_path, mode="tracin", dtype="float64") as rec:
        step = 0
        for ep in range(epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, batch):
                idx = perm[s : s + batch]
                rec.begin_step(idx, step=step)
                model.train()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                rec.before_optimizer_step(opt)
                opt.step()
                opt.zero_grad()
                rec.end_step()
                step += 1
            if ckpt_every_epoch:
                rec.checkpoint(model, loader(x, y, 16), per_example_ce, lr=opt.param_groups[0]["lr"], step=step,
                               epoch=ep)
    return TraceReader(tmp_path, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_tracin_equals_captum_tracincp(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP().double()
        x = torch.randn(40, 8, dtype=torch.float64)
        layer_sets = [["fc2"], ["fc1", "fc2"]]
    else:
        model = ConvNet().double()
        x = torch.randn(24, 1, 6, 6, dtype=torch.float64)
        layer_sets = [["fc2"], ["conv2", "fc2"]]
    y = torch.arange(len(x)) % 3
    xt, yt = x[:5] + 0.1, y[:5]
    reader = run_tracin(model, x, y, tmp_path, layer_sets[1], epochs=3)
    ckpts = reader.checkpoints()
    assert len(ckpts) == 3
    model.eval()
    for layers in layer_sets:
        ours = reader.influence({"x": xt, "y": yt}, model=model, loss_fn=per_example_ce, layers=layers)
        tracin = captum_influence.TracInCP(
            model, TensorDataset(x, y), checkpoints=[c.path for c in ckpts],
            checkpoints_load_func=captum_checkpoint_loader, layers=layers,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=64, sample_wise_grads_per_batch=True,
        )
        ref = tracin.influence((xt, yt), k=None)
        assert ours.ids.tolist() == list(range(len(x)))
        torch.testing.assert_close(ours.scores, ref, atol=1e-10, rtol=0)
        self_ref = tracin.self_influence(show_progress=False)
        torch.testing.assert_close(reader.self_influence(layers).scores, self_ref, atol=1e-10, rtol=0)
        agg = reader.influence({"x": xt, "y": yt}, model=model, loss_fn=per_example_ce, layers=layers, aggregate=True)
        torch.testing.assert_close(agg.scores, ref.sum(0, keepdim=True), atol=1e-10, rtol=0)
        assert agg.T.shape == (len(x), 1)


def test_tracin_bias_free_equals_tracincpfast(tmp_path):
    torch.manual_seed(1)
    model = MLP(bias2=False).double()
    x = torch.randn(30, 8, dtype=torch.float64)
    y = torch.arange(30) % 3
    reader = run_tracin(model, x, y, tmp_path, ["fc2"], epochs=2)
    model.eval()
    fast = captum_influence.TracInCPFast(
        model, "fc2", TensorDataset(x, y), checkpoints=[c.path for c in reader.checkpoints()],
        checkpoints_load_func=captum_checkpoint_loader, loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=64,
    )
    ref = fast.influence((x[:4], y[:4]), k=None)
    ours = reader.influence({"x": x[:4], "y": y[:4]}, model=model, loss_fn=per_example_ce)
    torch.testing.assert_close(ours.scores, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(reader.self_influence().scores, fast.self_influence(), atol=1e-10, rtol=0)


def test_closed_form_linear_regression(tmp_path):
    """y = w·x, x_i = i, label = x, MSE(sum): score(i, j) = Σ_ckpt lr·4 i² j² (w_ckpt − 1)²."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(0.3)
    x = torch.arange(1, 6, dtype=torch.float64)[:, None]
    lr = 0.01

    def loss_fn(m, batch):
        return (m(batch["x"]) - batch["x"]).pow(2).reshape(-1)

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ws = []
    with TraceRecorder(model, ["0"], tmp_path, mode="tracin", dtype="float64") as rec:
        for t in range(3):
            ws.append(model[0].weight.detach().item())
            rec.checkpoint(model, [{"x": x, "index": torch.arange(5)}], loss_fn, lr=lr, step=t)
            rec.begin_step(torch.arange(5), step=t)
            loss_fn(model, {"x": x}).mean().backward()
            rec.before_optimizer_step(opt)
            opt.step()
            opt.zero_grad()
            rec.end_step()
    reader = TraceReader(tmp_path, dtype=torch.float64)
    xt = torch.tensor([[2.0], [7.0]], dtype=torch.float64)
    got = reader.influence({"x": xt}, model=model, loss_fn=loss_fn).scores
    i = torch.arange(1, 6, dtype=torch.float64)
    expect = sum(lr * 4 * (xt**2) * (i**2)[None] * (w - 1) ** 2 for w in ws)
    torch.testing.assert_close(got, expect, atol=1e-10, rtol=0)


def test_full_batch_trajectory_sum(tmp_path):
    """B = N and a checkpoint before every step: tracin == Σ_t η_t ⟨g_x, g_i⟩ computed directly."""
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(12, 8, dtype=torch.float64)
    y = torch.arange(12) % 3
    xt, yt = torch.randn(2, 8, dtype=torch.float64), torch.tensor([0, 2])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    direct = torch.zeros(2, 12, dtype=torch.float64)
    spec = TF.layer_spec(model.fc2)
    with TraceRecorder(model, ["fc2"], tmp_path, mode="tracin", dtype="float64") as rec:
        for t in range(4):
            lr = 0.5 / (t + 1)
            opt.param_groups[0]["lr"] = lr
            rec.checkpoint(model, loader(x, y, 5), per_example_ce, lr=lr, step=t)
            # direct per-example parameter gradients with autograd
            gi = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum"),
                [model.fc2.weight, model.fc2.bias])]) for i in range(12)])
            gx = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                nn.functional.cross_entropy(model(xt[i : i + 1]), yt[i : i + 1], reduction="sum"),
                [model.fc2.weight, model.fc2.bias])]) for i in range(2)])
            direct += lr * gx @ gi.T
            rec.begin_step(torch.arange(12), step=t)
            nn.functional.cross_entropy(model(x), y).backward()
            rec.before_optimizer_step(opt)
            opt.step()
            opt.zero_grad()
            rec.end_step()
    reader = TraceReader(tmp_path, dtype=torch.float64)
    got = reader.influence({"x": xt, "y": yt}, model=model, loss_fn=per_example_ce).scores
    torch.testing.assert_close(got, direct, atol=1e-10, rtol=0)
    assert spec.kind == "Linear"
    # TracIn-cos: normalised scores lie in [-C, C] for C checkpoints weighted by lr
    cos = reader.influence({"x": xt, "y": yt}, model=model, loss_fn=per_example_ce, normalize=True).scores
    assert cos.abs().max() <= sum(0.5 / (t + 1) for t in range(4)) + 1e-9


def test_mislabelled_examples_rank_first_by_self_influence(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, k = 90, 3
    y_true = torch.arange(n) % k
    centers = torch.randn(k, 8, generator=g, dtype=torch.float64) * 3
    x = centers[y_true] + torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = y_true.clone()
    flipped = [4, 40, 77]
    for i in flipped:
        y[i] = (y[i] + 1) % k
    torch.manual_seed(0)
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TraceRecorder(model, ["fc1", "fc2"], tmp_path, mode="tracin", dtype="float64") as rec:
        step = 0
        for ep in range(40):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, 10):
                idx = perm[s : s + 10]
                rec.begin_step(idx, step=step)
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                rec.before_optimizer_step(opt)
                opt.step()
                opt.zero_grad()
                rec.end_step()
                step += 1
            if ep % 4 == 3:
                rec.checkpoint(model, loader(x, y, 30), per_example_ce, lr=0.1, step=step)
    reader = TraceReader(tmp_path, dtype=torch.float64)
    si = reader.self_influence()
    assert si.scores.shape == (n,)
    top5 = reader.ids_top = reader.top_k(si, 5).ids[0].tolist()
    assert set(flipped) <= set(top5), top5


def test_checkpoint_pass_restores_rng_and_mode(tmp_path):
    model = MLP().double()
    model.train()
    x = torch.randn(6, 8, dtype=torch.float64)
    y = torch.arange(6) % 3
    with TraceRecorder(model, ["fc2"], tmp_path, mode="tracin", dtype="float64") as rec:
        torch.manual_seed(3)
        rec.checkpoint(model, loader(x, y, 3), per_example_ce, lr=0.1, step=0)
        after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="tracin"):
        TraceReader(tmp_path).contributions(layer="fc2", layer_inputs=torch.zeros(1, 16))

"""TrainingTrace under Lightning: completeness, gating, ids, guards, state, resume, tracin, class batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning.pytorch as L
from reprlens.callbacks import TrainingTrace
from reprlens.trace import ClassPureBatchSampler, TraceReader


class Blobs(Dataset):
    def __init__(self, n=48, d=8, k=3, seed=0, with_index=True):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % k
        centers = torch.randn(k, d, generator=g) * 3
        self.x = (centers[self.y] + torch.randn(n, d, generator=g)).double()
        self.with_index = with_index

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        item = {"x": self.x[i], "label": self.y[i]}
        if self.with_index:
            item["index"] = i
        return item


def make_net_class(base):
    class _Net(base):
        def __init__(self, lr=0.1, momentum=0.0, fail_at=None):
            base.__init__(self)
            _init(self, lr, momentum, fail_at)

    for k, v in _Methods.__dict__.items():
        if callable(v) and not k.startswith("__"):
            setattr(_Net, k, v)
    return _Net


def _init(self, lr, momentum, fail_at):
    self.fc1 = nn.Linear(8, 16)
    self.fc2 = nn.Linear(16, 3)
    self.lr, self.momentum, self.fail_at = lr, momentum, fail_at
    self.double()


class _Methods:
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("simulated crash")
        return nn.functional.cross_entropy(self(batch["x"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["x"]), batch["label"])

    def configure_optimizers(self):
        if self.momentum == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)]


Net = make_net_class(L.LightningModule)


def trainer(tmp_path, callbacks, module=L, **kw):
    args = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    args.update(kw)
    return module.Trainer(callbacks=callbacks, **args)


def loader(ds, shuffle=True, bs=8):
    return DataLoader(ds, batch_size=bs, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def test_representation_completeness_and_validation_gating(tmp_path):
    ds = Blobs()
    model = Net()
    cb = TrainingTrace(["fc1", "fc2"], dirpath=tmp_path / "trace", dtype="float64", flush_every_n_steps=4)
    tr = trainer(tmp_path, [cb], num_sanity_val_steps=2, accumulate_grad_batches=2)
    tr.fit(model, loader(ds), loader(ds, shuffle=False))
    reader = cb.reader(dtype=torch.float64)
    assert reader.last_complete_step == tr.global_step == 6
    rows = sum(int(b.keep.sum()) for b in reader._blocks["fc2"])
    assert rows == 2 * len(ds)  # 2 epochs, no rows from the sanity check or validation
    rep = reader.completeness()
    assert rep.weight_error_abs["fc2"] < 1e-12 and rep.weight_error_abs["fc1"] < 1e-12, rep
    xt = ds.x[:6]
    res = reader.contributions(xt, "fc2", model=model, reference="model")
    torch.testing.assert_close(res.score.sum(1), res.delta_z_norm, atol=1e-10, rtol=0)
    cc = reader.class_contributions(res)
    assert cc.classes.tolist() == [0, 1, 2]
    # separated blobs: the test point's own class carries the largest share
    assert (cc.score.argmax(1) == ds.y[:6]).float().mean() >= 0.8


def test_pytorch_lightning_trainer_accepts_callback(tmp_path):
    pl_mod = pytest.importorskip("pytorch_lightning")
    ds = Blobs(n=24)
    cb = TrainingTrace("fc2", dirpath=tmp_path / "trace", dtype="float64")
    tr = trainer(tmp_path, [cb], module=pl_mod, max_epochs=1)
    tr.fit(make_net_class(pl_mod.LightningModule)(), loader(ds))
    assert TraceReader(tmp_path / "trace").last_complete_step == 3


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="Closest valid names"):
        trainer(tmp_path, [TrainingTrace("fc3", dirpath=tmp_path / "a")]).fit(Net(), loader(Blobs(n=16)))
    with pytest.raises(ValueError, match="index"):
        trainer(tmp_path, [TrainingTrace("fc2", dirpath=tmp_path / "b")]).fit(Net(), loader(Blobs(16, with_index=False)))
    with pytest.raises(ValueError, match="momentum"):
        trainer(tmp_path, [TrainingTrace("fc2", dirpath=tmp_path / "c")]).fit(Net(momentum=0.9), loader(Blobs(n=16)))
    with pytest.raises(ValueError, match="loss_fn"):
        TrainingTrace("fc2", mode="tracin")
    with pytest.raises(ValueError, match="every_n_steps"):
        TrainingTrace("fc2", mode="class_batches", every_n_steps=2)
    with pytest.raises(ValueError, match="projection"):
        TrainingTrace("fc2", projection=0)
    with pytest.raises(NotImplementedError, match="aggregate"):
        TrainingTrace("fc2", aggregate=True)
    with pytest.raises(ValueError, match="flush_every_n_steps"):
        TrainingTrace("fc2", flush_every_n_steps=0)
    assert TrainingTrace("fc2", dirpath="a").state_key != TrainingTrace("fc1", dirpath="a").state_key


def test_resume_from_checkpoint_every_step_once(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ds = Blobs()
    ckpt_dir = tmp_path / "ckpt"

    def run(fail_at=None, ckpt_path=None, name="broken"):
        cb = TrainingTrace("fc2", dirpath=tmp_path / name, dtype="float64", flush_every_n_steps=4)
        mc = ModelCheckpoint(dirpath=ckpt_dir / name, every_n_train_steps=6, save_top_k=-1)
        tr = trainer(tmp_path, [cb, mc], enable_checkpointing=True, max_epochs=3)
        model = Net(fail_at=fail_at)
        torch.manual_seed(0)
        if fail_at is None:
            tr.fit(model, loader(ds, shuffle=False), ckpt_path=ckpt_path)
        else:
            with pytest.raises(RuntimeError, match="simulated crash"):
                tr.fit(model, loader(ds, shuffle=False))
        return model

    full = run(name="full")
    torch.manual_seed(0)
    run(fail_at=10, name="broken")
    ckpt = ckpt_dir / "broken" / "epoch=0-step=6.ckpt"  # trace flushed past it (at 8), crash at 10
    assert ckpt.exists(), list((ckpt_dir / "broken").iterdir())
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any(v.get("last_flushed_step") == 6 for v in state.values())
    resumed = run(ckpt_path=str(ckpt), name="broken")
    r = TraceReader(tmp_path / "broken", dtype=torch.float64)
    rf = TraceReader(tmp_path / "full", dtype=torch.float64)
    steps = np.concatenate([s["step"] for s in r._steps])
    assert sorted(steps.tolist()) == list(range(18))
    assert r.truncations == [{"segment": 1, "step": 6}]
    assert r.completeness().weight_error_abs["fc2"] < 1e-12
    torch.testing.assert_close(resumed.fc2.weight, full.fc2.weight, atol=1e-12, rtol=0)
    x = ds.x[:4]
    torch.testing.assert_close(r.contributions(x, "fc2", model=resumed).score,
                               rf.contributions(x, "fc2", model=full).score, atol=1e-10, rtol=0)


def per_example_ce(module, batch):
    return nn.functional.cross_entropy(module(batch["x"]), batch["label"], reduction="none")


def test_tracin_callback_matches_reader_self_influence(tmp_path):
    ds = Blobs(n=24)
    cb = TrainingTrace("fc2", mode="tracin", dirpath=tmp_path / "t", dtype="float64", loss_fn=per_example_ce,
                       tracin_dataloader=loader(ds, shuffle=False))
    model = Net()
    trainer(tmp_path, [cb], max_epochs=2).fit(model, loader(ds))
    reader = cb.reader(dtype=torch.float64)
    ck = reader.checkpoints()
    assert [c.step for c in ck] == [3, 6] and [c.lr for c in ck] == pytest.approx([0.1, 0.05])  # lr of each interval's steps
    si = reader.self_influence()
    # oracle: per-example parameter gradients at each checkpoint with autograd
    expect = torch.zeros(24, dtype=torch.float64)
    for c in ck:
        net = Net()
        net.load_state_dict(torch.load(c.path, weights_only=False)["state_dict"])
        net.eval()
        for i in range(24):
            gs = torch.autograd.grad(per_example_ce(net, {"x": ds.x[i : i + 1], "label": ds.y[i : i + 1]}).sum(),
                                     [net.fc2.weight, net.fc2.bias])
            expect[i] += c.lr * sum((g**2).sum() for g in gs)
    torch.testing.assert_close(si.scores, expect, atol=1e-10, rtol=0)


@pytest.mark.parametrize("opt", [0.0, 0.9, "adamw"])
def test_class_batches_callback_completeness_any_optimizer(tmp_path, opt):
    ds = Blobs(n=48)
    sampler = ClassPureBatchSampler(ds.y, batch_size=8, ghost_samples=2, seed=0)
    dl = DataLoader(ds, batch_sampler=sampler)
    cb = TrainingTrace("fc2", mode="class_batches", dirpath=tmp_path / "c", dtype="float64")
    model = Net(momentum=opt)
    trainer(tmp_path, [cb], max_epochs=2).fit(model, dl)
    reader = cb.reader(dtype=torch.float64)
    assert reader.completeness().weight_error_abs["fc2"] < 1e-12
    x = torch.stack([ds.x[ds.y == c].mean(0) for c in range(3)])
    res = reader.contributions(x, "fc2", model=model, reference="model")
    cc = reader.class_contributions(res)
    torch.testing.assert_close(cc.score.sum(1) + cc.drift, res.delta_z_norm, atol=1e-10, rtol=0)
    if opt == 0.0:  # plain SGD: each class's steps pull its own centroid
        assert cc.score.argmax(1).tolist() == [0, 1, 2]
    # per-example projection scores split each step over its non-ghosts
    torch.testing.assert_close(res.score.sum(1), cc.score.sum(1), atol=1e-10, rtol=0)


def test_tracin_interval_sum_lr_weighting(tmp_path):
    ds = Blobs(n=24)
    cb = TrainingTrace("fc2", mode="tracin", dirpath=tmp_path / "t", dtype="float64", loss_fn=per_example_ce,
                       tracin_dataloader=loader(ds, shuffle=False), lr_weighting="interval_sum")
    trainer(tmp_path, [cb], max_epochs=2).fit(Net(), loader(ds))
    # 3 steps per epoch at lr 0.1, then 3 steps at 0.05 (StepLR per epoch)
    assert [c.lr for c in cb.reader().checkpoints()] == pytest.approx([0.3, 0.15])

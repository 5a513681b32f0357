"""ExplanationRegularizer and the ExplanationRegularization callback.

The oracle for the parameter gradients is an independent computation: maps from a naive per-dim loop of
``torch.autograd.grad(create_graph=True)``, scores from the (separately tested) functional API, and one
manual backward of ``task_loss - w * score`` on a deep copy of the model.
"""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from reprlens.callbacks import ExplanationRegularization
from reprlens.regularizer import ExplanationRegularizer
from reprlens.scores.functional import disentanglement, informativeness

# ----------------------------------------------------------------------------------------------- fixtures


class TinyNet(pl.LightningModule):
    """BN-free conv net: backbone -> (pool + MLP) head; tensor or dict returns."""

    def __init__(self, k: int = 4, return_dict: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 5, 3, padding=1), nn.Tanh())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, k))
        self.return_dict = return_dict
        self.lr = lr

    def forward(self, x):
        return self.head(self.pool(self.backbone(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        if self.return_dict:
            return {"loss": loss, "extra": 7}
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class GradRecorder(pl.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _data(n=8, k=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 6, 6, generator=g, dtype=dtype)
    y = torch.randn(n, k, generator=g, dtype=dtype)
    return x, y


def _loader(x, y, batch_size):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def _trainer(callbacks, **kw):
    defaults = dict(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )
    defaults.update(kw)
    return pl.Trainer(callbacks=callbacks, **defaults)


def _naive_maps(h, z):
    """grad x act, lin transform: one autograd.grad per dim (create_graph), independent of our engine."""
    maps = []
    for k in range(z.shape[1]):
        (g,) = torch.autograd.grad(z[:, k].sum(), h, create_graph=True, retain_graph=True)
        maps.append((g * h).sum(1))
    return torch.stack(maps, 1)


def _manual_grads(model, x, y, w_ns, w_vs, noise=None):
    model = copy.deepcopy(model)
    h = model.backbone(x)
    z = model.head(model.pool(h))
    loss = ((z - y) ** 2).mean()
    maps = _naive_maps(h, z)
    total = 0.0
    if w_vs:
        total = total + w_vs * disentanglement(maps)
    if w_ns:
        hr = model.backbone(noise)
        zr = model.head(model.pool(hr))
        ref = _naive_maps(hr, zr).detach()
        total = total + w_ns * informativeness(maps, ref)
    (loss - total).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------- module


def test_regularizer_validates_arguments():
    with pytest.raises(ValueError, match="finite weight >= 0"):
        ExplanationRegularizer(informativeness=-0.1)
    with pytest.raises(ValueError, match="finite weight >= 0"):
        ExplanationRegularizer(disentanglement=float("nan"))
    with pytest.raises(TypeError, match="number"):
        ExplanationRegularizer(disentanglement="a lot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="transform"):
        ExplanationRegularizer(disentanglement=0.1, transform="none")
    with pytest.raises(ValueError, match="num_dims_sampled"):
        ExplanationRegularizer(disentanglement=0.1, num_dims_sampled=1)
    with pytest.raises(ValueError, match="reference_source"):
        ExplanationRegularizer(informativeness=0.1, head=nn.Flatten())(torch.randn(2, 3, 4, 4))


def test_regularizer_zero_weights_is_zero_and_cheap():
    reg = ExplanationRegularizer()
    out = reg(torch.randn(2, 3, 4, 4, requires_grad=True))
    assert float(out.loss) == 0.0 and set(out.scores) == {"total"}


@pytest.mark.parametrize("use_head", [False, True])
def test_regularizer_loss_equals_negative_weighted_scores(use_head):
    torch.manual_seed(0)
    net = TinyNet().double()
    x, _ = _data()
    noise = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    h = net.backbone(x)
    z = net.head(net.pool(h))
    hr = net.backbone(noise)
    zr = net.head(net.pool(hr))
    head = (lambda t: net.head(net.pool(t))) if use_head else None
    reg = ExplanationRegularizer(informativeness=0.3, disentanglement=0.7, head=head)
    out = reg(h, None if use_head else z, reference_source=hr, reference_target=None if use_head else zr)
    maps = _naive_maps(h, z)
    ns = informativeness(maps, _naive_maps(hr, zr))
    vs = disentanglement(maps)
    torch.testing.assert_close(out.scores["informativeness"], ns.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.scores["disentanglement"], vs.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, -(0.3 * ns + 0.7 * vs), rtol=1e-10, atol=1e-12)
    # and it is differentiable w.r.t. the parameters
    g = torch.autograd.grad(out.loss, list(net.head.parameters()), allow_unused=True)
    assert all(torch.isfinite(t).all() for t in g if t is not None)
    assert g[0] is not None and g[0].abs().sum() > 0  # the first head layer shapes the maps


def test_dim_subset_estimator_unbiased_and_exact_at_full_size():
    torch.manual_seed(1)
    head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 6)).double()
    h = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    exact = ExplanationRegularizer(disentanglement=1.0, head=head)(h).scores["disentanglement"]
    full = ExplanationRegularizer(disentanglement=1.0, head=head, num_dims_sampled=6)(h).scores["disentanglement"]
    torch.testing.assert_close(full, exact, rtol=1e-12, atol=1e-14)
    reg = ExplanationRegularizer(disentanglement=1.0, head=head, num_dims_sampled=3)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([reg(h, generator=gen).scores["disentanglement"] for _ in range(600)])
    se = draws.std() / draws.numel() ** 0.5
    assert abs(float(draws.mean() - exact)) < 4 * float(se) + 1e-12


# ----------------------------------------------------------------------------------------------- callback: exactness


@pytest.mark.parametrize("return_dict", [False, True])
@pytest.mark.parametrize("head_mode", ["graph", "detected", "pooled"])
def test_gradients_equal_manual_computation(return_dict, head_mode):
    torch.manual_seed(0)
    model = TinyNet(return_dict=return_dict).double()
    x, y = _data()
    noise = torch.rand(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = _manual_grads(model, x, y, w_ns=0.2, w_vs=0.5, noise=noise)
    kw = dict(informativeness=0.2, disentanglement=0.5, noise=noise)
    if head_mode == "graph":
        kw["detect_head"] = False
    if head_mode == "pooled":
        kw["pooled_head"] = "head"
    cb = ExplanationRegularization("backbone", "head", **kw)
    rec = GradRecorder()
    _trainer([cb, rec], precision="64-true").fit(model, _loader(x, y, 8))
    assert len(rec.grads) == 1
    for name, g in expected.items():
        torch.testing.assert_close(rec.grads[0][name], g, rtol=1e-10, atol=1e-12, msg=name)
    if head_mode == "detected":
        from reprlens.attribution import PooledHead

        assert isinstance(cb._head, PooledHead), "pool + MLP head should be detected and use the factorised path"
    if head_mode == "graph":
        assert cb._head is None
    assert "training_step" not in vars(model)


def test_accumulation_halves_the_term_per_micro_batch():
    torch.manual_seed(0)
    model = TinyNet().double()
    x, y = _data(n=8)
    exp_a = _manual_grads(model, x[:4], y[:4], 0.0, 0.5)
    exp_b = _manual_grads(model, x[4:], y[4:], 0.0, 0.5)
    cb = ExplanationRegularization("backbone", "head", disentanglement=0.5)
    rec = GradRecorder()
    _trainer([cb, rec], precision="64-true", accumulate_grad_batches=2).fit(model, _loader(x, y, 4))
    for name in exp_a:
        torch.testing.assert_close(rec.grads[0][name], (exp_a[name] + exp_b[name]) / 2, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------- callback: mechanics


def test_dict_return_keeps_other_keys_and_logs_scores():
    seen = {}

    class Model(TinyNet):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen.update(outputs)

    model = Model(return_dict=True)
    x, y = _data(dtype=torch.float32)
    cb = ExplanationRegularization("backbone", "head", informativeness=0.1, disentanglement=0.1, log_prefix="r/")
    trainer = _trainer([cb])
    trainer.fit(model, _loader(x, y, 8))
    assert seen["extra"] == 7
    for key in ("r/informativeness", "r/disentanglement", "r/total"):
        assert key in trainer.callback_metrics, key
        assert torch.isfinite(trainer.callback_metrics[key])


def test_every_n_steps_and_restoration_after_fit():
    calls = []

    class Model(TinyNet):
        def training_step(self, batch, batch_idx):
            calls.append(batch_idx)
            return super().training_step(batch, batch_idx)

    model = Model()
    x, y = _data(n=16, dtype=torch.float32)
    cb = ExplanationRegularization("backbone", "head", disentanglement=0.1, every_n_steps=2)
    _trainer([cb], max_steps=4).fit(model, _loader(x, y, 4))
    assert calls == [0, 1, 2, 3], "the original training_step runs exactly once per batch"
    assert cb.num_regularized_steps == 2
    assert "training_step" not in vars(model)
    # a second fit works and restores again
    _trainer([cb], max_steps=2).fit(model, _loader(x, y, 4))
    assert "training_step" not in vars(model)


def test_restored_and_hooks_removed_after_exception():
    class Boom(TinyNet):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Boom()
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    x, y = _data(n=16, dtype=torch.float32)
    cb = ExplanationRegularization("backbone", "head", disentanglement=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer([cb], max_steps=3).fit(model, _loader(x, y, 4))
    assert "training_step" not in vars(model)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks


def test_two_instances_on_different_layer_pairs_chain():
    model = TinyNet()
    x, y = _data(dtype=torch.float32)
    a = ExplanationRegularization("backbone", "head", disentanglement=0.1, log_prefix="a/")
    b = ExplanationRegularization("backbone.1", "head", disentanglement=0.1, log_prefix="b/")
    assert a.state_key != b.state_key
    trainer = _trainer([a, b])
    trainer.fit(model, _loader(x, y, 8))
    assert "a/disentanglement" in trainer.callback_metrics and "b/disentanglement" in trainer.callback_metrics
    assert "training_step" not in vars(model)


def test_warmup_scales_the_weights():
    model = TinyNet()
    x, y = _data(n=16, dtype=torch.float32)
    cb = ExplanationRegularization("backbone", "head", disentanglement=1.0, warmup_steps=4)
    assert cb._weight_multiplier(0) == pytest.approx(0.25)
    assert cb._weight_multiplier(3) == pytest.approx(1.0)
    trainer = _trainer([cb], max_steps=1)
    trainer.fit(model, _loader(x, y, 4))
    m = trainer.callback_metrics
    torch.testing.assert_close(m["reg/total"], 0.25 * m["reg/disentanglement"])


def test_multi_view_calls_all_averages():
    class TwoViews(TinyNet):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return ((self(x) - y) ** 2).mean() + ((self(x.flip(-1)) - y) ** 2).mean()

    x, y = _data(dtype=torch.float32)
    results = {}
    for calls in ("first", "all", 1):
        torch.manual_seed(0)
        model = TwoViews()
        cb = ExplanationRegularization("backbone", "head", disentanglement=1.0, calls=calls)
        trainer = _trainer([cb])
        trainer.fit(model, _loader(x, y, 8))
        results[calls] = float(trainer.callback_metrics["reg/disentanglement"])
    assert results["all"] == pytest.approx((results["first"] + results[1]) / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one weight > 0"):
        ExplanationRegularization("a", "b")
    with pytest.raises(ValueError, match="finite weight >= 0"):
        ExplanationRegularization("a", "b", informativeness=-1.0)
    with pytest.raises(ValueError, match="finite weight >= 0"):
        ExplanationRegularization("a", "b", disentanglement=float("nan"))
    with pytest.raises(ValueError, match="every_n_steps"):
        ExplanationRegularization("a", "b", disentanglement=0.1, every_n_steps=0)
    with pytest.raises(ValueError, match="not both"):
        ExplanationRegularization("a", "b", disentanglement=0.1, regularizer=ExplanationRegularizer(0.1))
    with pytest.raises(ValueError, match="nonfinite"):
        ExplanationRegularization("a", "b", disentanglement=0.1, nonfinite="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calls"):
        ExplanationRegularization("a", "b", disentanglement=0.1, calls="second")  # type: ignore[arg-type]


def test_unknown_layer_lists_closest_names():
    model = TinyNet()
    x, y = _data(dtype=torch.float32)
    cb = ExplanationRegularization("backbon", "head", disentanglement=0.1)
    with pytest.raises(ValueError, match=r"Closest valid names: 'backbone'"):
        _trainer([cb]).fit(model, _loader(x, y, 8))
    assert "training_step" not in vars(model)


def test_manual_optimization_is_refused():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    class Manual(TinyNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    x, y = _data(dtype=torch.float32)
    cb = ExplanationRegularization("backbone", "head", disentanglement=0.1)
    with pytest.raises(MisconfigurationException, match="automatic optimization"):
        _trainer([cb]).fit(Manual(), _loader(x, y, 8))


def test_loss_without_grad_and_wrong_return_type():
    class NoGrad(TinyNet):
        def training_step(self, batch, batch_idx):
            return torch.tensor(1.0)

    class Weird(TinyNet):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)
            return "loss"

    x, y = _data(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="does not require grad"):
        _trainer([ExplanationRegularization("backbone", "head", disentanglement=0.1)]).fit(NoGrad(), _loader(x, y, 8))
    with pytest.raises(TypeError, match="must return a Tensor"):
        _trainer([ExplanationRegularization("backbone", "head", disentanglement=0.1)]).fit(Weird(), _loader(x, y, 8))


def test_none_passes_through():
    class Skip(TinyNet):
        def training_step(self, batch, batch_idx):
            self(batch[0])
            return None

    x, y = _data(dtype=torch.float32)
    model = Skip()
    before = [p.detach().clone() for p in model.parameters()]
    _trainer([ExplanationRegularization("backbone", "head", disentanglement=0.1)]).fit(model, _loader(x, y, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nonfinite_score_skips_the_term_and_weights_stay_finite():
    x, y = _data(dtype=torch.float32)
    x[0, 0, 0, 0] = float("nan")
    model = TinyNet()
    cb = ExplanationRegularization("backbone", "head", disentanglement=0.1, nonfinite="skip_step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer([cb]).fit(model, _loader(x, y, 8))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_num_samples_larger_than_batch_warns():
    model = TinyNet()
    x, y = _data(dtype=torch.float32)
    cb = ExplanationRegularization("backbone", "head", disentanglement=0.1, num_samples=100)
    with pytest.warns(UserWarning, match="larger than the batch"):
        _trainer([cb]).fit(model, _loader(x, y, 8))


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = _data(dtype=torch.float32)
    rec32, rec16 = GradRecorder(), GradRecorder()
    _trainer([ExplanationRegularization("backbone", "head", disentanglement=1.0), rec32]).fit(
        copy.deepcopy(model), _loader(x, y, 8)
    )
    _trainer([ExplanationRegularization("backbone", "head", disentanglement=1.0), rec16], precision="bf16-mixed").fit(
        copy.deepcopy(model), _loader(x, y, 8)
    )
    for name, g in rec32.grads[0].items():
        g16 = rec16.grads[0][name]
        assert torch.isfinite(g16).all()
        assert (g16 - g).norm() <= 5e-2 * g.norm() + 1e-4, name


def test_pytorch_lightning_namespace_trainer():
    pl_old = pytest.importorskip("pytorch_lightning")

    class OldModel(pl_old.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return ((self.head(self.backbone(x)) - y[:, :3]) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = _data(dtype=torch.float32)
    cb = ExplanationRegularization("backbone", "head", disentanglement=0.1)
    trainer = pl_old.Trainer(callbacks=[cb], max_steps=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(OldModel(), _loader(x, y, 4))
    assert cb.num_regularized_steps == 2
    assert "reg/disentanglement" in trainer.callback_metrics


def test_torchvision_resnet18_inplace_relu():
    tv = pytest.importorskip("torchvision")

    class ResNetModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tv.models.resnet18(num_classes=8)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return ((self.net(x)[:, :4] - y) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x, y = _data(n=4, dtype=torch.float32)
    x = torch.nn.functional.interpolate(x, size=32)
    model = ResNetModule()
    cb = ExplanationRegularization("net.layer4", "net.fc", disentanglement=0.1)
    trainer = _trainer([cb])
    trainer.fit(model, _loader(x, y, 4))
    assert torch.isfinite(trainer.callback_metrics["reg/disentanglement"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_extra_forwards_leave_batchnorm_buffers_untouched():
    class BNNet(TinyNet):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(inplace=True))

    x, y = _data(dtype=torch.float32)
    model = BNNet()
    plain = copy.deepcopy(model)
    _trainer([]).fit(plain, _loader(x, y, 8))
    cb = ExplanationRegularization("backbone", "head", informativeness=0.5, disentanglement=0.5, num_noise=4)
    _trainer([cb]).fit(model, _loader(x, y, 8))
    bn, bn_plain = model.backbone[1], plain.backbone[1]
    # the regularized run's statistics come from the one training forward only, as in the plain run
    assert torch.equal(bn.running_mean, bn_plain.running_mean)
    assert torch.equal(bn.running_var, bn_plain.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_example_simclr_and_autoencoder_unchanged():
    from reprlens.attribution import PooledHead
    from reprlens.data import DigitsDataModule, ShapesDataModule
    from reprlens.models import ConvAutoencoder, SimCLR

    simclr = SimCLR(width=8, projector_hidden_dim=32, projector_out_dim=16)
    cb = ExplanationRegularization("backbone.layer3", "projector", informativeness=0.1, disentanglement=0.1)
    dm = ShapesDataModule(num_train=32, num_val=16, num_test=16, batch_size=16, two_views=True)
    trainer = _trainer([cb], max_steps=2, limit_val_batches=0)
    trainer.fit(simclr, datamodule=dm)
    assert isinstance(cb._head, PooledHead)
    assert torch.isfinite(trainer.callback_metrics["reg/informativeness"])
    assert "training_step" not in vars(simclr)

    ae = ConvAutoencoder(in_channels=1, embedding_dim=5, hidden_channels=(4, 8))
    cb = ExplanationRegularization("encoder.act2", "encoder.fc", disentanglement=0.1, informativeness=0.1)
    trainer = _trainer([cb], max_steps=2, limit_val_batches=0)
    trainer.fit(ae, datamodule=DigitsDataModule(batch_size=16))
    assert cb._head is not None, "maxpool + flatten + linear head should be detected"
    assert torch.isfinite(trainer.callback_metrics["reg/disentanglement"])


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    """Gradients equal on both ranks and equal the mean of the two shards' single-process gradients."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "ddp_regularization.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "ddp"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    g0 = torch.load(tmp_path / "rank0.pt")
    g1 = torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(0)
    model = TinyNet().double()
    x, y = _data(n=8)
    noise = torch.rand(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # DistributedSampler without shuffling: rank r gets rows r, r+2, r+4, r+6
    e0 = _manual_grads(model, x[0::2], y[0::2], 0.2, 0.5, noise)
    e1 = _manual_grads(model, x[1::2], y[1::2], 0.2, 0.5, noise)
    for name in e0:
        torch.testing.assert_close(g0[name], g1[name], rtol=0, atol=0)
        torch.testing.assert_close(g0[name], (e0[name] + e1[name]) / 2, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("head_mode", ["graph", "detected"])
def test_trace_and_regularizer_together_stay_exact(tmp_path, head_mode):
    """The regularizer's extra forwards (noise reference, head re-runs, inner VJPs) are invisible to
    TrainingTrace. A backbone layer below the source stays exact (W_0 + sum_i A_i = W_T: the score reaches it
    only through the output gradient). A layer inside the regularizer's head gets a second-order gradient that
    no per-example factor pair describes: the strict trace refuses it with its consistency error."""
    from reprlens.callbacks import TrainingTrace
    from reprlens.trace import TraceReader

    class Indexed(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"image": self.x[i], "y": self.y[i], "index": i}

    class DictNet(TinyNet):
        def training_step(self, batch, batch_idx):
            return ((self(batch["image"]) - batch["y"]) ** 2).mean()

    torch.manual_seed(0)
    x, y = _data(n=16)
    loader = torch.utils.data.DataLoader(Indexed(x, y), batch_size=8, shuffle=False)

    def fit(layer, where):
        trace = TrainingTrace([layer], mode="representation", dirpath=tmp_path / where, dtype="float64",
                              flush_every_n_steps=1)
        reg = ExplanationRegularization("backbone", "head", informativeness=0.2, disentanglement=0.5,
                                        detect_head=head_mode == "detected", num_noise=4)
        _trainer([reg, trace], precision="64-true", max_steps=4).fit(DictNet().double(), loader)
        return reg

    reg = fit("backbone.2", "ok")
    assert reg.num_regularized_steps == 4
    report = TraceReader(tmp_path / "ok").completeness("backbone.2")
    assert report.missing_steps == [] and report.duplicate_steps == []
    assert max(report.weight_error_rel.values()) < 1e-10, report
    with pytest.raises(RuntimeError, match="consistency check"):
        fit("head.2", "head")


def test_fp16_mixed_with_grad_scaler_on_cpu_stays_finite():
    """16-mixed on CPU through an explicit MixedPrecision plugin with a GradScaler: finite weights and scores
    once the scaler has settled (the head is re-run in fp32, so the inner gradients are fp32)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    model = TinyNet()
    x, y = _data(n=32, dtype=torch.float32)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    cb = ExplanationRegularization("backbone", "head", informativeness=0.1, disentanglement=0.1)
    trainer = _trainer([cb], max_steps=6, plugins=[plugin])
    trainer.fit(model, _loader(x, y, 8))
    assert cb.num_regularized_steps == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(trainer.callback_metrics["reg/total"])

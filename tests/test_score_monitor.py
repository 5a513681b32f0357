"""Tests of reprlens.callbacks.ScoreMonitor on a tiny CNN (CPU, a few batches)."""

from __future__ import annotations

import glob
import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from reprlens.callbacks import ScoreMonitor
from reprlens.callbacks.score_monitor import _default_inputs_fn
from reprlens.scores import disentanglement, informativeness


class TinyNet(pl.LightningModule):
    """conv1 -> act1 -> conv2 -> bn -> act2 (source) -> pool (GAP + flatten) -> fc (target, K=5)."""

    def __init__(self, dict_batches: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.Tanh()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act2 = nn.Softplus()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(6, 5)
        self.dict_batches = dict_batches

    def forward(self, x):
        return self.fc(self.pool(self.act2(self.bn(self.conv2(self.act1(self.conv1(x)))))))

    def _x(self, batch):
        return batch["image"] if self.dict_batches else batch[0]

    def training_step(self, batch, batch_idx):
        return self(self._x(batch)).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self(self._x(batch)).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DictData(torch.utils.data.Dataset):
    def __init__(self, n: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 6, 6, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": torch.tensor(0), "index": torch.tensor(i)}


def _loaders(batch_size: int = 4):
    return (torch.utils.data.DataLoader(DictData(8, seed=1), batch_size=batch_size),
            torch.utils.data.DataLoader(DictData(12, seed=2), batch_size=batch_size))


def _trainer(tmp_path, callbacks, *, trainer_cls=pl.Trainer, max_epochs=1, logger=False, devices=1, **kwargs):
    return trainer_cls(
        accelerator="cpu", devices=devices, max_epochs=max_epochs, callbacks=callbacks, logger=logger,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, default_root_dir=str(tmp_path), **{"inference_mode": False, **kwargs},
    )


def _captum_maps(model: TinyNet, x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Independent oracle: Captum LayerGradientXActivation per target unit, |.| summed over channels."""
    LayerGradientXActivation = pytest.importorskip("captum.attr").LayerGradientXActivation

    attr = LayerGradientXActivation(model, model.act2)
    return torch.stack([attr.attribute(x, target=j).abs().sum(1) for j in range(k)], dim=1)


def _expected_scores(model: TinyNet, val_x: torch.Tensor, first_batch: torch.Tensor, *, num_noise: int, seed: int):
    model.eval()
    g = torch.Generator().manual_seed(seed)
    lo = first_batch.amin(dim=(0, 2, 3)).view(1, 3, 1, 1)
    hi = first_batch.amax(dim=(0, 2, 3)).view(1, 3, 1, 1)
    noise = lo + (hi - lo) * torch.rand((num_noise, *val_x.shape[1:]), generator=g)
    maps, ref = _captum_maps(model, val_x), _captum_maps(model, noise)
    return informativeness(maps, ref).item(), disentanglement(maps).item()


# ----------------------------------------------------------------------------------------------------------
# logged values against an independent oracle; no effect on training
# ----------------------------------------------------------------------------------------------------------


def test_logged_scores_match_captum_oracle_and_training_unaffected(tmp_path):
    train, val = _loaders()
    torch.manual_seed(0)
    plain = TinyNet()
    torch.manual_seed(0)
    model = TinyNet()
    monitor = ScoreMonitor("act2", "fc", num_noise=3, seed=7, plot_every_n_epochs=None)
    _trainer(tmp_path, [monitor]).fit(model, train, val)
    _trainer(tmp_path, []).fit(plain, train, val)
    # the monitor never changes training: parameters and BatchNorm buffers are bit-identical
    for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    val_x = val.dataset.x
    ns, vs = _expected_scores(model, val_x, val_x[:4], num_noise=3, seed=7)
    logged = model.trainer.callback_metrics
    assert logged["val/informativeness"].item() == pytest.approx(ns, rel=1e-5)
    assert logged["val/disentanglement"].item() == pytest.approx(vs, rel=1e-5)
    assert 0 < ns <= 1 and 0 < vs <= 0.25


def test_inference_mode_raises_documented_error(tmp_path):
    train, val = _loaders()
    monitor = ScoreMonitor("act2", "fc", plot_every_n_epochs=None)
    trainer = _trainer(tmp_path, [monitor], inference_mode=True)
    with pytest.raises(RuntimeError, match="create the Trainer with inference_mode=False"):
        trainer.validate(TinyNet(), val, verbose=False)


def test_heads_give_the_same_scores(tmp_path):
    _, val = _loaders()
    torch.manual_seed(0)
    model = TinyNet()
    configs = [
        ("act2", {}),  # graph-only path
        ("act2", {"head": lambda m, h: m.fc(m.pool(h))}),  # head callable
        ("act2", {"pooled_head": "fc"}),  # factorised pool-first head
        ("pool", {"attribute_to_source_input": True}),  # input of pool == output of act2
    ]
    results = []
    for source, kwargs in configs:
        monitor = ScoreMonitor(source, "fc", num_noise=2, plot_every_n_epochs=None, **kwargs)
        (res,) = _trainer(tmp_path, [monitor]).validate(model, val, verbose=False)
        results.append((res["val/informativeness"], res["val/disentanglement"]))
    for ns, vs in results[1:]:
        assert ns == pytest.approx(results[0][0], rel=1e-5) and vs == pytest.approx(results[0][1], rel=1e-5)


def test_integrated_and_expected_gradients_run(tmp_path):
    _, val = _loaders()
    torch.manual_seed(0)
    model = TinyNet()
    for kwargs in ({"method": "integrated_gradients", "pooled_head": "fc", "attribution_kwargs": {"n_steps": 4}},
                   {"method": "expected_gradients", "attribution_kwargs": {"n_samples": 2, "stdevs": 0.1}}):
        monitor = ScoreMonitor("act2", "fc", num_noise=2, max_batches=1, plot_every_n_epochs=None, **kwargs)
        (res,) = _trainer(tmp_path, [monitor]).validate(model, val, verbose=False)
        assert 0 < res["val/informativeness"] <= 1 and 0 < res["val/disentanglement"] <= 0.25


# ----------------------------------------------------------------------------------------------------------
# schedule, sampling, images, state
# ----------------------------------------------------------------------------------------------------------


def test_schedule_max_batches_num_samples_and_images(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    train, val = _loaders()
    monitor = ScoreMonitor("act2", "fc", every_n_epochs=2, max_batches=2, num_samples=3, num_noise=2, num_probe=2,
                           max_plot_dims=3)
    calls: list[tuple[int, int]] = []
    original = monitor._maps

    def spy(pl_module, x):
        calls.append((pl_module.current_epoch, x.shape[0]))
        return original(pl_module, x)

    monitor._maps = spy
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = _trainer(tmp_path, [monitor], max_epochs=4, logger=logger)
    trainer.fit(TinyNet(), train, val)
    # epochs 1 and 3 monitored: 2 batches of 3 samples + 2 noise inputs + the 2-sample probe grid
    assert calls == [(1, 3), (1, 2), (1, 3), (1, 2), (3, 3), (3, 2), (3, 3), (3, 2)]
    assert monitor.num_monitored_epochs == 2
    pngs = sorted(glob.glob(os.path.join(logger.log_dir, "figures", "*.png")))
    assert len(pngs) == 2 and all(os.path.getsize(p) > 1000 for p in pngs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "val/attribution_maps" in events.Tags()["images"]
    assert {"val/informativeness", "val/disentanglement"} <= set(events.Tags()["scalars"])
    assert monitor._probe.shape == (2, 3, 6, 6)
    torch.testing.assert_close(monitor._probe, val.dataset.x[:2])
    # a standalone validate() is always monitored, whatever every_n_epochs says
    calls.clear()
    trainer.validate(trainer.lightning_module, val, verbose=False)
    assert calls == [(4, 3), (4, 2), (4, 3), (4, 2)]


def test_extra_forwards_leave_batchnorm_buffers_and_grads_untouched():
    torch.manual_seed(0)
    model = TinyNet().train()  # even in train mode (a custom forward_fn could run it so)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = ScoreMonitor("act2", "fc", num_noise=2)
    x = torch.rand(4, 3, 6, 6)
    maps = monitor._maps(model, x)
    monitor._maps(model, monitor._noise_inputs(x))
    assert maps.shape == (4, 5, 6, 6) and not maps.requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())  # gradients w.r.t. activations only
    assert model.training  # mode untouched


def test_noise_reference_is_seeded_and_fixed():
    monitor = ScoreMonitor("act2", "fc", num_noise=5, seed=3)
    x = torch.stack([torch.rand(4, 6, 6) * 0.5, torch.rand(4, 6, 6) + 2.0, torch.rand(4, 6, 6) - 1.0], dim=1)
    a, b = monitor._noise_inputs(x), monitor._noise_inputs(x)
    assert a.shape == (5, 3, 6, 6) and torch.equal(a, b)  # the same noise every epoch
    lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
    assert (a.amin(dim=(0, 2, 3)) >= lo).all() and (a.amax(dim=(0, 2, 3)) <= hi).all()
    assert not torch.equal(a, ScoreMonitor("act2", "fc", num_noise=5, seed=4)._noise_inputs(x))
    big = torch.randn(64, 3, 8, 8) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([0.0, 5.0, -1.0]).view(1, 3, 1, 1)
    g = ScoreMonitor("act2", "fc", num_noise=64, noise="gaussian")._noise_inputs(big)
    torch.testing.assert_close(g.mean(dim=(0, 2, 3)), big.mean(dim=(0, 2, 3)), atol=0.1, rtol=0)
    torch.testing.assert_close(g.std(dim=(0, 2, 3)), big.std(dim=(0, 2, 3)), atol=0.1, rtol=0.05)
    fixed = torch.zeros(2, 3, 6, 6)
    assert torch.equal(ScoreMonitor("act2", "fc", noise=fixed)._noise_inputs(x), fixed)
    fn = ScoreMonitor("act2", "fc", noise=lambda inp, gen: torch.rand(inp.shape, generator=gen))
    assert torch.equal(fn._noise_inputs(x), fn._noise_inputs(x))


def test_default_inputs_fn_layouts():
    x = torch.rand(2, 3, 4, 4)
    v = torch.rand(2, 3, 4, 4)
    assert _default_inputs_fn(x) is x
    assert _default_inputs_fn({"image": x, "views": [v, v]}) is x
    assert _default_inputs_fn({"views": [v, x]}) is v
    assert _default_inputs_fn((x, torch.zeros(2))) is x
    assert _default_inputs_fn([[v, x], torch.zeros(2)]) is v
    for bad in ({"img": x}, 3, (), ["a"], {"views": []}):
        with pytest.raises(TypeError, match="inputs_fn"):
            _default_inputs_fn(bad)


def test_tuple_batches_and_custom_inputs_fn(tmp_path):
    data = torch.utils.data.TensorDataset(DictData(8, seed=2).x, torch.zeros(8))
    model = TinyNet(dict_batches=False)
    val = torch.utils.data.DataLoader(data, batch_size=4)
    (res,) = _trainer(tmp_path, [ScoreMonitor("act2", "fc", num_noise=2, plot_every_n_epochs=None)]).validate(
        model, val, verbose=False)
    monitor = ScoreMonitor("act2", "fc", num_noise=2, plot_every_n_epochs=None, inputs_fn=lambda b: b[0],
                           forward_fn=lambda m, x: m(x))
    (res2,) = _trainer(tmp_path, [monitor]).validate(model, val, verbose=False)
    assert res == pytest.approx(res2, rel=1e-6)
    bad = ScoreMonitor("act2", "fc", plot_every_n_epochs=None, inputs_fn=lambda b: b[1].tolist())
    with pytest.raises(TypeError, match="must return a Tensor"):
        _trainer(tmp_path, [bad]).validate(model, val, verbose=False)


def test_state_dict_and_checkpoint(tmp_path):
    train, val = _loaders()
    monitor = ScoreMonitor("act2", "fc", num_noise=2, max_batches=1, plot_every_n_epochs=None)
    trainer = _trainer(tmp_path, [monitor])
    trainer.fit(TinyNet(), train, val)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["callbacks"][monitor.state_key]
    assert torch.equal(state["probe"], val.dataset.x[:4]) and state["num_monitored_epochs"] == 1
    resumed = ScoreMonitor("act2", "fc", num_noise=2, max_batches=1, plot_every_n_epochs=None)
    _trainer(tmp_path, [resumed], max_epochs=2).fit(TinyNet(), train, val, ckpt_path=path)
    assert resumed.num_monitored_epochs == 2 and torch.equal(resumed._probe, val.dataset.x[:4])
    assert resumed._reference_maps is None  # released in teardown


def test_pytorch_lightning_namespace(tmp_path):
    import pytorch_lightning

    _, val = _loaders()

    class PLNet(pytorch_lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyNet()

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self(batch["image"]).mean())

    monitor = ScoreMonitor("net.act2", "net.fc", num_noise=2, plot_every_n_epochs=None)
    (res,) = _trainer(tmp_path, [monitor], trainer_cls=pytorch_lightning.Trainer).validate(PLNet(), val, verbose=False)
    assert 0 < res["val/disentanglement"] <= 0.25


# ----------------------------------------------------------------------------------------------------------
# bad arguments
# ----------------------------------------------------------------------------------------------------------


def test_invalid_arguments_raise_eagerly(tmp_path):
    cases = [
        (TypeError, dict(source_layer=3)),
        (ValueError, dict(scores=("informativeness", "sharpness"))),
        (ValueError, dict(scores=())),
        (ValueError, dict(method="lrp")),
        (ValueError, dict(transform="square")),
        (ValueError, dict(every_n_epochs=0)),
        (ValueError, dict(max_batches=0)),
        (ValueError, dict(num_noise=0)),
        (ValueError, dict(noise="pink")),
        (ValueError, dict(noise=torch.zeros(2, 3, dtype=torch.long))),
        (ValueError, dict(head="fc", pooled_head="fc")),
        (TypeError, dict(head=3)),
        (ValueError, dict(method="integrated_gradients")),
        (TypeError, dict(inputs_fn="image")),
        (ValueError, dict(eps=-1.0)),
        (ValueError, dict(plot_every_n_epochs=0)),
    ]
    for error, kwargs in cases:
        args = {"source_layer": "act2", "target_layer": "fc", **kwargs}
        with pytest.raises(error):
            ScoreMonitor(args.pop("source_layer"), args.pop("target_layer"), **args)
    _, val = _loaders()
    with pytest.raises(ValueError, match="act2"):
        _trainer(tmp_path, [ScoreMonitor("act_2", "fc")]).validate(TinyNet(), val, verbose=False)
    with pytest.raises(ValueError, match="at least 2 target dims"):
        model = TinyNet()
        model.fc = nn.Linear(6, 1)
        _trainer(tmp_path, [ScoreMonitor("act2", "fc", plot_every_n_epochs=None)]).validate(model, val, verbose=False)


# ----------------------------------------------------------------------------------------------------------
# DDP (2 CPU processes, gloo) and GPU
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_spawn_two_processes_equals_single_process(tmp_path):
    """Metrics are synced across ranks: the DDP epoch value equals the single-process value on all samples."""
    torch.manual_seed(0)
    model = TinyNet()
    model.eval()
    val = torch.utils.data.DataLoader(DictData(12, seed=2), batch_size=3)
    noise = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(5))  # fixed reference on every rank
    single = ScoreMonitor("act2", "fc", noise=noise, plot_every_n_epochs=None)
    (expected,) = _trainer(tmp_path, [single]).validate(model, val, verbose=False)
    monitor = ScoreMonitor("act2", "fc", noise=noise, plot_every_n_epochs=None)
    trainer = _trainer(tmp_path, [monitor], devices=2, strategy="ddp_spawn")
    (got,) = trainer.validate(model, val, verbose=False)
    assert got["val/informativeness"] == pytest.approx(expected["val/informativeness"], rel=1e-5)
    assert got["val/disentanglement"] == pytest.approx(expected["val/disentanglement"], rel=1e-5)
    # rank 0 alone sees only half of the samples: its local value differs (the check can fail)
    half = torch.utils.data.DataLoader(torch.utils.data.Subset(DictData(12, seed=2), range(0, 12, 2)), batch_size=3)
    (local,) = _trainer(tmp_path, [ScoreMonitor("act2", "fc", noise=noise, plot_every_n_epochs=None)]).validate(
        model, half, verbose=False)
    assert abs(local["val/disentanglement"] - expected["val/disentanglement"]) > 1e-4


@pytest.mark.gpu
def test_score_monitor_on_gpu_matches_cpu(tmp_path, cuda_device):
    _, val = _loaders()
    torch.manual_seed(0)
    model = TinyNet()
    results = []
    devices: list[str] = []

    class Spy(pl.Callback):  # runs after the monitor: metrics live on the module's device during validation
        def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs):
            devices.extend(m.device.type for m in monitor.metrics.values())

    for accelerator in ("cpu", "gpu"):
        devices.clear()
        monitor = ScoreMonitor("act2", "fc", num_noise=3, plot_every_n_epochs=1)
        trainer = pl.Trainer(accelerator=accelerator, devices=1, callbacks=[monitor, Spy()], logger=False,
                             enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                             default_root_dir=str(tmp_path / accelerator))
        (res,) = trainer.validate(model, val, verbose=False)
        results.append(res)
        assert devices and set(devices) == {"cuda" if accelerator == "gpu" else "cpu"}
    for key in ("val/informativeness", "val/disentanglement"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-4)
    assert glob.glob(str(tmp_path / "gpu" / "figures" / "*.png"))

"""Example models: fast_dev_run on dict and tuple batches, module names, losses against independent oracles."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from reprlens.models import Classifier, ConvAutoencoder, SimCLR, nt_xent_loss
from reprlens.models._common import _unpack_batch, _unpack_views


class DictImages(Dataset):
    """Random images as reprlens dict samples (optionally with two views)."""

    def __init__(self, n: int = 16, channels: int = 3, size: int = 16, classes: int = 3, views: bool = False):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, channels, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.views = views

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        out = {"image": self.x[i], "label": self.y[i], "index": torch.tensor(i)}
        if self.views:
            out["views"] = [self.x[i].flip(-1), (self.x[i] * 0.9).clamp(0, 1)]
        return out


class TupleImages(DictImages):
    def __getitem__(self, i: int):
        if self.views:
            return [self.x[i].flip(-1), self.x[i]], self.y[i]
        return self.x[i], self.y[i]


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


# ----------------------------------------------------------------------------------------------- helpers
def test_unpack_batch_accepts_dicts_tuples_tensors():
    x, y = torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])
    assert _unpack_batch({"image": x, "label": y})[0] is x
    assert _unpack_batch((x, y))[1] is y
    assert _unpack_batch(x) == (x, None)
    assert _unpack_batch({"image": x})[1] is None
    with pytest.raises(ValueError, match="'image'"):
        _unpack_batch({"img": x})
    views, lab = _unpack_views(([x, x + 1], y))
    assert len(views) == 2 and lab is y
    assert _unpack_views((x, y)) == (None, None)
    assert _unpack_views({"image": x, "label": y})[0] is None


# ----------------------------------------------------------------------------------------------- NT-Xent
def _nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Per-anchor loop in float64 (SimCLR paper, eq. 1)."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        sims = [math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / sum(sims))
    return total / n2


def test_nt_xent_matches_float64_loop():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.5, 1.0):
        assert float(nt_xent_loss(z1, z2, t)) == pytest.approx(_nt_xent_reference(z1, z2, t), rel=1e-5)


def test_nt_xent_known_value_and_invariances():
    # Orthonormal pairs: positive similarity 1, the two negatives 0 -> -log(e^{1/T} / (e^{1/T} + 2)).
    z = torch.eye(2)
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert float(nt_xent_loss(z, z, t)) == pytest.approx(expected, rel=1e-6)
    # Scale invariance (projections are l2-normalised) and symmetry in the two views.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert torch.allclose(nt_xent_loss(a, b), nt_xent_loss(3 * a, 0.5 * b), atol=1e-6)
    assert torch.allclose(nt_xent_loss(a, b), nt_xent_loss(b, a), atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(a, b[:3])
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(a, b, temperature=0.0)


# ----------------------------------------------------------------------------------------------- SimCLR
def test_simclr_structure_and_forward():
    model = SimCLR(width=4, embedding_dim=24)
    names = dict(model.named_modules())
    for name in ("backbone.stem", "backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.pool"):
        assert name in names
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.backbone.layer1.modules())
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.projector.modules())
    assert any(isinstance(m, nn.BatchNorm1d) for m in SimCLR(width=4, projector_bn=True).projector.modules())
    assert model(torch.rand(3, 3, 16, 16)).shape == (3, 24)
    assert SimCLR(width=4)(torch.rand(2, 3, 16, 16)).shape == (2, 16)
    assert model.hparams.width == 4 and model.hparams.temperature == 0.5


def test_simclr_step_calls_backbone_once_per_view_and_matches_loss():
    model = SimCLR(width=4, temperature=0.2)
    model.eval()  # deterministic BN so the independent recomputation matches
    calls = []
    handle = model.backbone.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    v1, v2 = torch.rand(5, 3, 16, 16), torch.rand(5, 3, 16, 16)
    with pytest.warns(UserWarning):  # self.log without a trainer
        loss = model.training_step({"views": [v1, v2], "label": torch.zeros(5, dtype=torch.long)}, 0)
    handle.remove()
    assert len(calls) == 2
    with torch.no_grad():
        expected = _nt_xent_reference(model.projector(model(v1)), model.projector(model(v2)), 0.2)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    assert loss.requires_grad


@pytest.mark.parametrize("dataset_cls", [DictImages, TupleImages])
def test_simclr_fast_dev_run(dataset_cls):
    model = SimCLR(width=4, projector_hidden_dim=16, projector_out_dim=8)
    before = [p.detach().clone() for p in model.parameters()]
    ds = dataset_cls(n=8, views=True)
    loader = DataLoader(ds, batch_size=4)
    _trainer().fit(model, loader, loader)
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())]
    assert any(changed)


def test_simclr_validation_without_views_is_a_noop_and_train_requires_views():
    model = SimCLR(width=4)
    batch = {"image": torch.rand(2, 3, 8, 8), "label": torch.zeros(2, dtype=torch.long)}
    assert model.validation_step(batch, 0) is None
    with pytest.raises(ValueError, match="two views"):
        model.training_step(batch, 0)
    with pytest.raises(ValueError, match="exactly 2 views"):
        model.training_step({"views": [batch["image"]] * 3}, 0)


def test_simclr_cosine_schedule_anneals_over_max_epochs():
    model = SimCLR(width=4, scheduler="cosine", optimizer="sgd", lr=0.1)
    loader = DataLoader(DictImages(n=4, views=True), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    assert trainer.lr_scheduler_configs[0].scheduler.T_max == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # end of the cosine
    endless = pl.Trainer(max_epochs=-1, max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="max_epochs"):
        endless.fit(SimCLR(width=4, scheduler="cosine"), loader)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"width": 0}, "width"),
        ({"num_blocks": (1, 1)}, "num_blocks"),
        ({"temperature": -1.0}, "temperature"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"scheduler": "step"}, "scheduler"),
    ],
)
def test_simclr_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimCLR(**kwargs)


# ----------------------------------------------------------------------------------------------- autoencoder
def test_autoencoder_structure_and_loss_matches_independent_computation():
    model = ConvAutoencoder(in_channels=1, image_size=16, embedding_dim=5, num_classes=3, hidden_channels=(4, 8))
    children = [n for n, _ in model.encoder.named_children()]
    assert children == [
        "conv1", "bn1", "act1", "pool1", "conv2", "bn2", "act2", "pool2", "flatten", "fc",
    ]
    assert model.classifier.in_features == 5 and model.classifier.out_features == 3
    model.eval()
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 1])
    z = model(x)
    assert z.shape == (4, 5)
    recon = model.decoder(z)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    expected = F.cross_entropy(model.classifier(z), y) + 0.5 * ((recon - x) ** 2).mean()
    model.hparams.recon_weight = 0.5
    with pytest.warns(UserWarning):
        loss = model.training_step((x, y), 0)
    assert torch.allclose(loss, expected, atol=1e-6)
    # the classification loss reaches the encoder (z is not detached)
    model.zero_grad()
    F.cross_entropy(model.classifier(model(x)), y).backward()
    assert model.encoder.conv1.weight.grad is not None and model.encoder.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dataset_cls", [DictImages, TupleImages])
def test_autoencoder_fast_dev_run(dataset_cls):
    model = ConvAutoencoder(in_channels=3, image_size=16, embedding_dim=4, num_classes=3, hidden_channels=(4, 8))
    loader = DataLoader(dataset_cls(n=8), batch_size=4)
    trainer = _trainer()
    trainer.fit(model, loader, loader)
    for key in ("train/loss", "train/ce", "train/mse", "train/acc", "val/acc", "val/loss"):
        assert key in trainer.callback_metrics, key
    trainer.test(model, loader, verbose=False)
    assert "test/acc" in trainer.callback_metrics


def test_autoencoder_validates_image_size():
    with pytest.raises(ValueError, match="divisible"):
        ConvAutoencoder(image_size=30, hidden_channels=(8, 8))
    with pytest.raises(ValueError, match="hidden_channels"):
        ConvAutoencoder(hidden_channels=())


# ----------------------------------------------------------------------------------------------- classifier
@pytest.mark.parametrize("dataset_cls", [DictImages, TupleImages])
def test_classifier_fast_dev_run(dataset_cls):
    model = Classifier(in_channels=3, num_classes=3, channels=(4, 8))
    assert [n for n, _ in model.features.named_children()] == ["conv1", "bn1", "relu1", "pool1", "conv2", "bn2", "relu2"]
    loader = DataLoader(dataset_cls(n=8), batch_size=4)
    trainer = _trainer()
    trainer.fit(model, loader, loader)
    assert {"train/acc", "val/acc", "train/loss"} <= set(trainer.callback_metrics)


def test_classifier_learns_a_separable_task():
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (64,), generator=g)
    x = torch.rand(64, 1, 8, 8, generator=g) * 0.3 + y.view(-1, 1, 1, 1) * 0.7  # bright vs dark images
    loader = DataLoader(list(zip(x, y)), batch_size=16, shuffle=True, generator=g)
    model = Classifier(in_channels=1, num_classes=2, channels=(4,), lr=1e-2)
    trainer = pl.Trainer(
        max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean()
    assert acc > 0.95


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_models_fast_dev_run_on_gpu(cuda_device, precision):
    models = [
        (SimCLR(width=4, projector_hidden_dim=16, projector_out_dim=8), DictImages(n=8, views=True)),
        (ConvAutoencoder(in_channels=3, image_size=16, embedding_dim=4, num_classes=3, hidden_channels=(4, 8)),
         DictImages(n=8)),
        (Classifier(in_channels=3, num_classes=3, channels=(4, 8)), TupleImages(n=8)),
    ]
    for model, ds in models:
        loader = DataLoader(ds, batch_size=4)
        trainer = pl.Trainer(
            fast_dev_run=True, accelerator="gpu", devices=1, precision=precision, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(model, loader, loader)
        assert torch.isfinite(trainer.callback_metrics["train/loss"]).item()
    z1, z2 = torch.randn(8, 5, device=cuda_device), torch.randn(8, 5, device=cuda_device)
    assert torch.allclose(nt_xent_loss(z1, z2).cpu(), nt_xent_loss(z1.cpu(), z2.cpu()), atol=1e-5)

"""ConceptLabeler callback on a BoringModel-style module with planted unit concepts."""

from __future__ import annotations

import csv
import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reprlens.callbacks import ConceptLabeler
from reprlens.invert import ConceptSet
from reprlens.invert.concepts import datamodule_concepts

N = 240


class _Boring(pl.LightningModule):
    """encoder (frozen, unit d = x_d) -> head (trained)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        with torch.no_grad():
            self.encoder.weight.copy_(torch.eye(4))
            self.encoder.bias.zero_()
        self.encoder.requires_grad_(False)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).squeeze(1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.01)


@pytest.fixture
def setup_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g)
    y = x.sum(1)
    concepts = ConceptSet(x > 0.3, names=[f"f{i}" for i in range(4)])
    train = DataLoader(TensorDataset(x, y), batch_size=60)
    eval_loader = DataLoader(TensorDataset(x, y), batch_size=100)
    return concepts, train, eval_loader


def _trainer(tmp_path, cb, epochs=2, loggers=None):
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=loggers if loggers is not None else False,
                      callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=tmp_path)


def test_runs_every_n_epochs_writes_csv_png_and_logs(setup_data, tmp_path):
    concepts, train, eval_loader = setup_data
    cb = ConceptLabeler("encoder", concepts, eval_loader, every_n_epochs=1, max_length=2, beam_size=2,
                        dirpath=tmp_path / "labels")
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    model = _Boring()
    _trainer(tmp_path, cb, epochs=2, loggers=loggers).fit(model, train)
    assert [r["epoch"] for r in cb.runs] == [0, 1]  # fit end does not repeat epoch 1
    layer_dir = tmp_path / "labels" / "encoder"
    for e in (0, 1):
        assert (layer_dir / f"epoch={e:04d}.csv").exists() and (layer_dir / f"epoch={e:04d}.png").exists()
    lines = (layer_dir / "epoch=0001.csv").read_text().splitlines()
    assert lines[0].startswith("# max_length: 2")
    rows = list(csv.DictReader([ln for ln in lines if not ln.startswith("#")]))
    assert list(rows[0])[:5] == ["neuron", "rank", "formula", "length", "auc"]
    best = {int(r["neuron"]): r["formula"] for r in rows if r["rank"] == "0"}
    assert best == {d: f"f{d}" for d in range(4)}  # planted: unit d is feature d
    assert cb.last_result is not None and (cb.last_result.best().auc > 0.95).all()
    assert cb.runs[1]["label_change_fraction"] == 0.0
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "concept_labels/encoder/best_auc_mean" in metrics and "label_change_fraction" in metrics
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))


def test_fit_end_only_state_dict_and_untouched_model(setup_data, tmp_path):
    concepts, train, eval_loader = setup_data
    cb = ConceptLabeler("encoder", concepts, eval_loader, max_length=1, beam_size=1, max_samples=120,
                        dirpath=tmp_path / "l")
    model = _Boring()
    trainer = _trainer(tmp_path, cb, epochs=1)
    trainer.fit(model, train)
    assert len(cb.runs) == 1 and cb.last_result is not None and len(cb.last_result) == 4
    assert cb.last_result.params["num_samples"] == 120
    # a direct run leaves parameters, gradients and training flags untouched
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb._run(trainer, model, epoch=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.encoder.parameters())
    # resumable history
    state = cb.state_dict()
    other = ConceptLabeler("encoder", concepts, eval_loader)
    other.load_state_dict(state)
    assert other.runs == cb.runs and other.runs[-1]["labels"] == {d: f"f{d}" for d in range(4)}


def test_validation_and_setup_errors(setup_data, tmp_path):
    concepts, train, eval_loader = setup_data
    with pytest.raises(ValueError, match="every_n_epochs"):
        ConceptLabeler("encoder", concepts, eval_loader, every_n_epochs=0)
    with pytest.raises(ValueError, match="max_length"):
        ConceptLabeler("encoder", concepts, eval_loader, max_length=0)
    with pytest.raises(TypeError, match="ConceptSet"):
        ConceptLabeler("encoder", "concepts", eval_loader)
    with pytest.raises(ValueError, match="Nothing to do"):
        ConceptLabeler("encoder", concepts, eval_loader, run_on_fit_end=False)
    short = ConceptSet(torch.rand(10, 2) > 0.5, warn=False)
    with pytest.raises(ValueError, match="row i of the concepts"):
        _trainer(tmp_path, ConceptLabeler("encoder", short, eval_loader), epochs=1).fit(_Boring(), train)
    with pytest.raises(ValueError, match="Closest"):
        _trainer(tmp_path, ConceptLabeler("encodr", concepts, eval_loader), epochs=1).fit(_Boring(), train)


class _ShapesNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_default_loader_and_concepts_from_shapes_datamodule(tmp_path):
    data = pytest.importorskip("reprlens.data")
    dm = data.ShapesDataModule(num_train=64, num_val=96, num_test=0, image_size=16, batch_size=32)
    cb = ConceptLabeler("features", functools.partial(datamodule_concepts, split="val"), aggregate="max",
                        max_length=2, beam_size=1, dirpath=tmp_path / "l")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(_ShapesNet(), datamodule=dm)
    res = cb.last_result
    assert res is not None and len(res.best()) == 8
    assert res.params["num_samples"] == 96
    # the labels are formulas over the shapes concepts
    names = set(dm.concept_names)
    assert all(tok.strip("~()") in names for f in res.formula for tok in f.split() if tok not in "&|")


def test_works_with_pytorch_lightning_trainer(setup_data, tmp_path):
    ptl = pytest.importorskip("pytorch_lightning")
    concepts, train, eval_loader = setup_data

    class _PTLBoring(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _Boring()

        def forward(self, x):
            return self.inner(x)

        def training_step(self, batch, batch_idx):
            return self.inner.training_step(batch, batch_idx)

        def configure_optimizers(self):
            return self.inner.configure_optimizers()

    cb = ConceptLabeler("inner.encoder", concepts, eval_loader, max_length=1, beam_size=1, dirpath=tmp_path / "l")
    trainer = ptl.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[cb], enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(_PTLBoring(), train)
    assert cb.last_result is not None and cb.last_result.best().formula == [f"f{d}" for d in range(4)]


def test_hydra_config_instantiates():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "callbacks" / "concept_labeler.yaml")
    cb = instantiate(cfg.concept_labeler)
    assert isinstance(cb, ConceptLabeler) and cb.layer == "backbone.pool"
    assert callable(cb.concepts)

"""Tests of the RelaxMonitor callback and the RELAX plotting helpers (small CPU runs)."""

from __future__ import annotations

import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reprlens.callbacks import RelaxMonitor
from reprlens.plotting import plot_relax, relax_overlays
from reprlens.relax import relax

SIZE = 16


class EncModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.head = nn.Linear(32, 2)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(self.encoder(x)), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))


def _trainer(tmp_path: Path, callbacks, logger, epochs: int = 2) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, limit_train_batches=2,
    )


def _monitor(**kw) -> RelaxMonitor:
    kw.setdefault("num_masks", 100)
    kw.setdefault("relax_kwargs", {"num_cells": 4})
    return RelaxMonitor(**kw)


def test_runs_logs_and_leaves_live_model_untouched(tmp_path):
    probe = torch.rand(3, 3, SIZE, SIZE)
    pl.seed_everything(0)
    plain = EncModel()
    _trainer(tmp_path / "a", [], False).fit(plain, _loader())

    pl.seed_everything(0)
    model = EncModel()
    calls = []
    model.encoder[0].register_forward_hook(lambda *a: calls.append(1))  # stands in for a LayerCapture hook
    cb = _monitor(probe=probe, every_n_epochs=1)
    logger = TensorBoardLogger(tmp_path / "b", name="tb")
    trainer = _trainer(tmp_path / "b", [cb], logger)
    trainer.fit(model, _loader())
    assert model.losses == plain.losses  # the callback consumes no training randomness
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(model.encoder[1].running_mean, plain.encoder[1].running_mean)
    assert len(calls) == 2 * 2 * 1  # only training forwards (2 epochs x 2 batches), none from the callback
    assert model.training == plain.training and model.encoder[3].training == plain.encoder[3].training
    files = sorted(p.name for p in Path(logger.log_dir, "relax").glob("*.png"))
    assert files == sorted(
        f"{stem}-{k}.png" for stem in ("init", "epoch=0000", "epoch=0001") for k in ("importance", "uncertainty", "u_relax")
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert {"relax/importance", "relax/uncertainty", "relax/u_relax"} <= set(acc.Tags()["images"])
    assert "relax/rank_corr_prev" in acc.Tags()["scalars"]
    assert cb.last_result is not None and cb.last_result.importance.shape == (3, SIZE, SIZE)
    assert cb._copy is None  # freed in teardown


def test_csv_logger_pngs_every_n_epochs_and_probe_from_batch(tmp_path):
    model = EncModel()
    cb = _monitor(every_n_epochs=2, num_probe=5, run_on_fit_start=True)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, [cb], logger, epochs=3)
    trainer.fit(model, _loader())
    out = Path(logger.log_dir, "relax")
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(f"{s}-{k}.png" for s in ("init", "epoch=0001") for k in ("importance", "uncertainty", "u_relax"))
    from torchvision.io import read_image

    img = read_image(str(out / "epoch=0001-importance.png"))
    assert img.shape[0] == 3 and img.shape[1] == SIZE + 4  # one row of tiles with 2 px padding
    assert img.shape[2] == 5 * (SIZE + 2) + 2
    assert cb.probe.shape == (5, 3, SIZE, SIZE)
    assert (Path(logger.log_dir) / "metrics.csv").read_text().count("relax/seconds") == 1


def test_state_dict_round_trip(tmp_path):
    cb = _monitor(probe=torch.rand(2, 3, SIZE, SIZE))
    trainer = _trainer(tmp_path, [cb], False, epochs=1)
    trainer.fit(EncModel(), _loader())
    state = cb.state_dict()
    fresh = _monitor()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.probe, cb.probe) and fresh.last_epoch == 0
    assert torch.equal(fresh._prev_importance, cb._prev_importance)


def test_validation_and_errors():
    with pytest.raises(ValueError, match="every_n_epochs"):
        RelaxMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        RelaxMonitor(torch.rand(3, SIZE, SIZE))
    with pytest.raises(ValueError, match="alpha"):
        RelaxMonitor(alpha=0.0)
    with pytest.raises(ValueError, match="num_cells"):
        RelaxMonitor(relax_kwargs={"num_cell": 4})
    with pytest.raises(ValueError, match="reference"):
        RelaxMonitor(relax_kwargs={"mode": "reference", "shift": "rise"})

    class NoEnc(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(2, 2)

    trainer = types.SimpleNamespace(strategy=object())
    with pytest.raises(ValueError, match="trunk"):
        RelaxMonitor().setup(trainer, NoEnc(), "fit")

    class FSDPStrategy:
        pass

    with pytest.raises(RuntimeError, match="full parameters"):
        RelaxMonitor().setup(types.SimpleNamespace(strategy=FSDPStrategy()), EncModel(), "fit")
    cb = RelaxMonitor(encoder="encoder.0")
    cb.setup(types.SimpleNamespace(strategy=object()), EncModel(), "fit")
    assert isinstance(cb._copy, nn.Conv2d) and not any(p.requires_grad for p in cb._copy.parameters())


def test_overlays_and_figure():
    x = torch.rand(2, 1, 12, 10)
    res = relax(lambda z: torch.cat([z[:, :, :6].mean((2, 3)), torch.ones(z.shape[0], 1)], 1), x,
                num_masks=100, num_cells=3, seed=0)
    grids = relax_overlays(x, res, alpha=1.0)
    assert set(grids) == {"importance", "uncertainty", "u_relax"}
    for g in grids.values():
        assert g.dtype == torch.uint8 and g.shape == (3, 12 + 4, 2 * (10 + 2) + 2)
    # alpha=1: the importance tile is the colormap of the min-max scaled map; removed U-RELAX pixels are grey
    tile = grids["u_relax"][:, 2 : 2 + 12, 2 : 2 + 10]
    removed = ~res.u_relax_mask[0]
    assert (tile[0][removed] == tile[1][removed]).all() and (tile[1][removed] == tile[2][removed]).all()
    with pytest.raises(ValueError, match="alpha"):
        relax_overlays(x, res, alpha=0)
    fig = plot_relax(x, res)
    assert len(fig.axes) >= 8


def test_non_zero_rank_and_sanity_check_do_nothing(tmp_path):
    cb = _monitor(probe=torch.rand(2, 3, SIZE, SIZE), dirpath=tmp_path / "relax")
    model = EncModel()
    cb.setup(types.SimpleNamespace(strategy=object()), model, "fit")
    for trainer in (
        types.SimpleNamespace(sanity_checking=False, is_global_zero=False),
        types.SimpleNamespace(sanity_checking=True, is_global_zero=True),
    ):
        assert cb._run(trainer, model, epoch=0) is None
    assert not (tmp_path / "relax").exists() and cb.last_result is None
    res = cb.explain(model)  # the functional entry point works on any rank
    assert res.importance.shape == (2, SIZE, SIZE)

"""ExplainerDistillation callback: after_fit and alongside on a tiny conv LightningModule."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from reprlens.callbacks import ExplainerDistillation
from reprlens.explainer_net import PartExplainer
from reprlens.explainer_net._probe import make_part_probe, probe_performer

KEYS = ["rel_err", "p_mean", "p_std", "acc_original", "acc_reconstructed", "acc_gap", "agreement",
        "location_instability/explainer", "location_instability/performer", "num_active/explainer",
        "num_active/performer", "filter_loss", "p_reward_weight", "p_collapsed"]

@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads contend badly (20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



class _Data(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.d = make_part_probe(n, seed=seed)

    def __len__(self):
        return self.d["image"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.d.items()}


class ConvNet(pl.LightningModule):
    """BoringModel-style: the D6 performer, dict batches."""

    def __init__(self, n_train=96, n_val=32):
        super().__init__()
        self.net = probe_performer(0)
        self.n_train, self.n_val = n_train, n_val

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["image"]), batch["label"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(_Data(self.n_train, 0), batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_Data(self.n_val, 1), batch_size=32)


def _trainer(tmp_path, cb, **kw):
    kw.setdefault("max_epochs", 1)
    return pl.Trainer(callbacks=[cb], logger=CSVLogger(tmp_path, name="t"), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, **kw)


def _read_csv(trainer):
    with open(f"{trainer.logger.log_dir}/metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_after_fit_logs_all_keys_and_leaves_performer(tmp_path):
    model = ConvNet()
    cb = ExplainerDistillation("net.7", max_epochs=2, batch_size=16, dataloader="train", eval_dataloader="val",
                               save_path="auto")
    trainer = _trainer(tmp_path, cb)
    trainer.fit(model)
    rows = _read_csv(trainer)
    cols = set(rows[0])
    for key in KEYS:
        assert f"explainer/{key}" in cols, key
    last = [r for r in rows if r.get("explainer/rel_err")][-1]
    assert all(math.isfinite(float(last[f"explainer/{k}"])) for k in KEYS)
    assert 0 < float(last["explainer/p_mean"]) < 1
    assert cb.epoch == 2 and len(cb.history) == 2
    assert all(p.requires_grad for p in model.parameters())  # grad flags restored
    saved = PartExplainer.load(f"{trainer.log_dir}/explainer.pt")
    assert saved.config["in_channels"] == 32
    # resume: the state continues the explainer epoch
    state = cb.state_dict()
    cb2 = ExplainerDistillation("net.7", max_epochs=3, batch_size=16)
    cb2.load_state_dict(state)
    assert cb2.epoch == 2
    trainer2 = _trainer(tmp_path / "b", cb2)
    trainer2.fit(ConvNet())
    assert cb2.epoch == 3 and len(cb2.history) == 1


def test_after_fit_frozen_performer_bitwise(tmp_path):
    model = ConvNet()
    cb = ExplainerDistillation("net.7", max_epochs=1, batch_size=16)
    snap = {}

    class Snap(pl.Callback):
        def on_fit_end(self, trainer, pl_module):  # runs before ExplainerDistillation (callback order)
            snap.update({k: v.clone() for k, v in pl_module.state_dict().items()})
            snap["training"] = pl_module.training

    trainer = pl.Trainer(max_epochs=1, callbacks=[Snap(), cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(model)
    after = model.state_dict()
    assert all(torch.equal(snap[k], after[k]) for k in after)
    assert model.training == snap["training"]
    assert cb.metrics and math.isfinite(cb.metrics["rel_err"])


def test_pytorch_lightning_namespace(tmp_path):
    ptl = pytest.importorskip("pytorch_lightning")
    from reprlens.explainer_net._probe import probe_performer as _pp

    class PModel(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _pp(0)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["image"]), batch["label"])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    cb = ExplainerDistillation("net.7", max_epochs=1, batch_size=16,
                               dataloader=lambda tr: DataLoader(_Data(48, 0), batch_size=16),
                               eval_dataloader=lambda tr: DataLoader(_Data(32, 1), batch_size=16))
    trainer = ptl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(PModel(), DataLoader(_Data(48, 0), batch_size=16))
    assert math.isfinite(cb.metrics["rel_err"])


def test_alongside_smoke(tmp_path):
    model = ConvNet()
    cb = ExplainerDistillation("net.7", mode="alongside")
    trainer = _trainer(tmp_path, cb, max_epochs=2)
    trainer.fit(model)
    m = trainer.callback_metrics
    for key in ("rel_err", "p_mean", "acc_reconstructed", "filter_loss", "location_instability/explainer"):
        assert f"explainer/{key}" in m and math.isfinite(float(m[f"explainer/{key}"])), key
    assert cb.step == 2 * 3 and cb.epoch == 2
    assert all(p.requires_grad for p in model.parameters())


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        ExplainerDistillation("net.7", mode="during")
    with pytest.raises(ValueError, match="batch_size"):
        ExplainerDistillation("net.7", batch_size=1)
    with pytest.raises(TypeError, match="Unknown ExplainerModule option"):
        ExplainerDistillation("net.7", lr_typo=1e-3)
    with pytest.raises(ValueError, match="Closest"):
        _trainer(tmp_path, ExplainerDistillation("net.77", max_epochs=1)).fit(ConvNet())
    with pytest.raises(ValueError, match="conv feature map"):
        _trainer(tmp_path, ExplainerDistillation("net.10", max_epochs=1)).fit(ConvNet())
    bad_lm = lambda b: b["landmarks"][:, :, :1]  # noqa: E731  (N, K, 1): wrong shape
    with pytest.raises(ValueError, match="landmarks"):
        _trainer(tmp_path, ExplainerDistillation("net.7", max_epochs=1, batch_size=16, landmark_fn=bad_lm)).fit(ConvNet())
    one = ExplainerDistillation("net.7", max_epochs=1, batch_size=16, cache_features=False,
                                dataloader=lambda tr: DataLoader(_Data(17, 0), batch_size=16))
    with pytest.raises(ValueError, match=">= 2 examples"):
        _trainer(tmp_path, one).fit(ConvNet())

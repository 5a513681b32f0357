"""LinearProbe: functional core against scikit-learn / brute force, callback inside a Trainer."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from reprlens.callbacks import LinearProbe
from reprlens.callbacks.linear_probe import collect_embeddings, fit_linear_probe, knn_accuracy, knn_predict

sklearn_neighbors = pytest.importorskip("sklearn.neighbors")
sklearn_linear = pytest.importorskip("sklearn.linear_model")


def _clusters(n: int, d: int, c: int, sep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(1234)) * sep
    y = torch.randint(0, c, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


# ------------------------------------------------------------------------------------------------ linear probe
@pytest.mark.parametrize("method", ["logistic", "ridge"])
def test_probe_separates_clusters_and_is_chance_on_random_labels(method):
    tx, ty = _clusters(300, 8, 4, sep=6.0, seed=0)
    vx, vy = _clusters(300, 8, 4, sep=6.0, seed=1)
    res = fit_linear_probe(tx, ty, vx, vy, method=method)
    assert res["train_acc"] > 0.99 and res["val_acc"] > 0.99
    g = torch.Generator().manual_seed(5)
    rx, ry = torch.randn(300, 8, generator=g), torch.randint(0, 4, (300,), generator=g)
    qx, qy = torch.randn(600, 8, generator=g), torch.randint(0, 4, (600,), generator=g)
    res = fit_linear_probe(rx, ry, qx, qy, method=method)
    assert 0.15 < res["val_acc"] < 0.36  # chance is 0.25
    assert set(res) == {"train_acc", "val_acc"}


def test_logistic_probe_matches_sklearn_logistic_regression():
    tx, ty = _clusters(200, 6, 3, sep=1.0, seed=2)  # overlapping clusters: the optimum matters
    vx, vy = _clusters(400, 6, 3, sep=1.0, seed=3)
    wd = 1e-2
    res = fit_linear_probe(tx.double(), ty, vx.double(), vy, weight_decay=wd, max_iter=500, tol=1e-9)
    mean, std = tx.double().mean(0), tx.double().std(0, unbiased=False)
    # sklearn minimises 0.5 ||W||^2 + C * sum CE, ours mean CE + 0.5 wd ||W||^2  ->  C = 1 / (wd N)
    clf = sklearn_linear.LogisticRegression(C=1.0 / (wd * len(tx)), tol=1e-10, max_iter=5000)
    clf.fit(((tx.double() - mean) / std).numpy(), ty.numpy())
    expected = clf.score(((vx.double() - mean) / std).numpy(), vy.numpy())
    assert res["val_acc"] == pytest.approx(expected, abs=1.0 / len(vx) + 1e-12)


@pytest.mark.parametrize("n,d", [(120, 5), (20, 40)])  # primal and dual ridge systems
def test_ridge_probe_matches_sklearn_ridge_classifier(n, d):
    tx, ty = _clusters(n, d, 3, sep=0.7, seed=4)
    vx, vy = _clusters(300, d, 3, sep=0.7, seed=5)
    res = fit_linear_probe(tx.double(), ty, vx.double(), vy, method="ridge", ridge_alpha=2.0)
    mean, std = tx.double().mean(0), tx.double().std(0, unbiased=False)
    clf = sklearn_linear.RidgeClassifier(alpha=2.0).fit(((tx.double() - mean) / std).numpy(), ty.numpy())
    assert res["val_acc"] == pytest.approx(clf.score(((vx.double() - mean) / std).numpy(), vy.numpy()), abs=1e-12)
    assert res["train_acc"] == pytest.approx(clf.score(((tx.double() - mean) / std).numpy(), ty.numpy()), abs=1e-12)


def test_probe_validates_inputs():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(ValueError, match="method"):
        fit_linear_probe(x, y, method="svm")
    with pytest.raises(ValueError, match="both"):
        fit_linear_probe(x, y, val_x=x)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fit_linear_probe(x, y[:5])
    with pytest.raises(TypeError, match="integer class labels"):
        fit_linear_probe(x, y.float())
    with pytest.raises(ValueError, match="3 features"):
        fit_linear_probe(x, y, torch.randn(4, 2), y[:4])


def test_probe_under_inference_mode_and_constant_features():
    x, y = _clusters(60, 4, 2, sep=5.0, seed=7)
    x = torch.cat([x, torch.ones(60, 1)], dim=1)  # a constant feature must not blow up standardisation
    with torch.inference_mode():
        res = fit_linear_probe(x, y, x + 0.01, y)
    assert res["val_acc"] > 0.95


# ------------------------------------------------------------------------------------------------ kNN
@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_sklearn_cosine_brute_force(k):
    g = torch.Generator().manual_seed(k)
    tx, ty = torch.randn(150, 7, generator=g), torch.randint(0, 5, (150,), generator=g)
    qx = torch.randn(90, 7, generator=g)
    ref = sklearn_neighbors.KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    expected = ref.fit(tx.numpy(), ty.numpy()).predict(qx.numpy())
    got = knn_predict(tx, ty, qx, k, chunk_size=32)  # several chunks
    np.testing.assert_array_equal(got.numpy(), expected)
    qy = torch.randint(0, 5, (90,), generator=g)
    assert knn_accuracy(tx, ty, qx, qy, k) == pytest.approx(float((torch.from_numpy(expected) == qy).float().mean()))


def test_knn_exp_weights_match_numpy_loop():
    g = torch.Generator().manual_seed(0)
    tx, ty = torch.randn(40, 4, generator=g).double(), torch.randint(0, 3, (40,), generator=g)
    qx = torch.randn(15, 4, generator=g).double()
    t, k = 0.2, 6
    a = tx.numpy() / np.linalg.norm(tx.numpy(), axis=1, keepdims=True)
    expected = []
    for q in qx.numpy():
        s = a @ (q / np.linalg.norm(q))
        idx = np.argsort(-s)[:k]
        votes = np.zeros(3)
        for i in idx:
            votes[ty[i]] += np.exp(s[i] / t)
        expected.append(int(np.argmax(votes)))
    got = knn_predict(tx, ty, qx, k, weights="exp", temperature=t)
    assert got.tolist() == expected


def test_knn_clamps_k_and_separates_clusters():
    tx, ty = _clusters(50, 6, 3, sep=6.0, seed=0)
    vx, vy = _clusters(50, 6, 3, sep=6.0, seed=1)
    assert knn_accuracy(tx, ty, vx, vy, k=20) > 0.98
    assert knn_predict(tx[:3], ty[:3], vx, k=20).shape == (50,)
    with pytest.raises(ValueError, match="weights"):
        knn_predict(tx, ty, vx, weights="cosine")
    with pytest.raises(ValueError, match=r"labels in \[0, 2\)"):
        knn_predict(tx, ty, vx, num_classes=2)


# ------------------------------------------------------------------------------------------------ embeddings
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.drop(self.pool(self.conv(x))))


def test_collect_embeddings_layer_fn_default_and_training_flags():
    net = _Net()
    net.train()
    net.fc.eval()  # a mixed state must be restored exactly
    x, y = torch.randn(10, 1, 4, 4), torch.arange(10)
    loader = DataLoader(list(zip(x, y)), batch_size=4)
    emb, lab = collect_embeddings(net, loader, layer="conv")
    assert torch.allclose(emb, net.conv(x).mean(dim=(2, 3)), atol=1e-6)
    assert lab.tolist() == list(range(10))
    assert net.training and net.conv.training and not net.fc.training
    emb2, _ = collect_embeddings(net, loader)  # eval mode: dropout off, deterministic
    net.eval()
    assert torch.allclose(emb2, net(x), atol=1e-6)
    emb3, lab3 = collect_embeddings(net, loader, embedding_fn=lambda m, x: m.pool(m.conv(x)) * 2, max_batches=2)
    assert emb3.shape == (8, 3) and lab3.shape == (8,)
    with pytest.raises(ValueError, match="Closest valid names"):
        collect_embeddings(net, loader, layer="convv")
    with pytest.raises(ValueError, match="labels"):
        collect_embeddings(net, DataLoader(x, batch_size=4))
    assert not net.conv._forward_hooks


# ------------------------------------------------------------------------------------------------ callback
class _Dict(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "index": torch.tensor(i)}


def _images(n: int, seed: int, classes: int = 3, size: int = 8):
    """Images whose class sets the brightness of one of `classes` horizontal bands (linearly separable)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.rand(n, 1, size, size, generator=g) * 0.2
    band = size // classes
    rows = torch.arange(size)
    mask = (rows[None, :] // band == y[:, None]).float()  # (n, size)
    x = x + 0.8 * mask[:, None, :, None]
    return x, y


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d((4, 1)), nn.Flatten())
        self.head = nn.Linear(32, 1)
        self.mode_during_probe: list[bool] = []

    def forward(self, x):
        return self.pool(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return self.head(self(batch["image"])).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _DataModule(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.data = {s: _images(60, seed) for s, seed in (("train", 0), ("val", 1), ("test", 2))}
        self.calls: list[str] = []

    def train_dataloader(self):
        return DataLoader(_Dict(*self.data["train"]), batch_size=20)

    def eval_dataloader(self, split):
        self.calls.append(split)
        return DataLoader(_Dict(*self.data[split]), batch_size=25)


def _trainer(tmp_path, **kw):
    kw.setdefault("max_epochs", 2)
    return pl.Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="probe"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_callback_logs_probe_metrics_at_fit_end(tmp_path):
    probe = LinearProbe(knn_k=5, progress_bar=False, layer="pool")
    dm = _DataModule()
    model = _Module()
    trainer = _trainer(tmp_path, callbacks=[probe])
    trainer.fit(model, datamodule=dm)
    assert dm.calls == ["train", "val", "test"]
    assert set(probe.results) == {
        "linear_train_acc", "linear_val_acc", "linear_test_acc", "knn_val_acc", "knn_test_acc",
    }
    assert probe.results["linear_val_acc"] > 0.95 and probe.results["knn_test_acc"] > 0.95
    assert model.training  # training mode restored
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("probe/linear_val_acc")]
    assert len(logged) == 1 and float(logged[0]["probe/linear_val_acc"]) == probe.results["linear_val_acc"]
    assert int(logged[0]["step"]) == trainer.global_step
    assert float(trainer.callback_metrics["probe/knn_val_acc"]) == pytest.approx(probe.results["knn_val_acc"])


def test_callback_every_n_epochs_explicit_loaders_and_state_dict(tmp_path):
    tx, ty = _images(40, 3)
    vx, vy = _images(40, 4)
    calls = []

    def embed(module, x):
        calls.append(module.training)
        return module(x)

    probe = LinearProbe(
        every_n_epochs=1, embedding_fn=embed, probe="ridge", knn_k=0, progress_bar=False, max_batches=2,
        train_dataloader=DataLoader(list(zip(tx, ty)), batch_size=16),
        val_dataloader=DataLoader(list(zip(vx, vy)), batch_size=16),
    )
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[probe])
    trainer.fit(_Module(), DataLoader(_Dict(tx, ty), batch_size=20))
    # one evaluation per epoch; the one at the end of training reuses the last epoch's (same global step)
    assert [h["epoch"] for h in probe.history] == [0.0, 1.0, 2.0]
    assert set(probe.results) == {"linear_train_acc", "linear_val_acc"}
    assert len(calls) == 3 * (2 + 2)  # 3 evaluations x (2 train + 2 val batches, capped by max_batches)
    assert not any(calls)  # embeddings are computed in eval mode
    state = probe.state_dict()
    restored = LinearProbe(progress_bar=False)
    restored.load_state_dict(state)
    assert restored.results == probe.results and restored.history == probe.history


def test_callback_fast_dev_run_and_errors(tmp_path):
    probe = LinearProbe(knn_k=3, progress_bar=False)
    trainer = pl.Trainer(
        fast_dev_run=True, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, callbacks=[probe]
    )
    trainer.fit(_Module(), datamodule=_DataModule())
    assert set(probe.results) >= {"linear_val_acc", "knn_val_acc", "knn_test_acc"}

    no_data = pl.Trainer(fast_dev_run=True, accelerator="cpu", callbacks=[LinearProbe()], enable_progress_bar=False)
    with pytest.raises(ValueError, match="eval_dataloader"):
        no_data.fit(_Module(), DataLoader(_Dict(*_images(8, 0)), batch_size=4))
    bad_layer = pl.Trainer(
        fast_dev_run=True, accelerator="cpu", callbacks=[LinearProbe(layer="encodr.0")], enable_progress_bar=False
    )
    with pytest.raises(ValueError, match="encoder.0"):
        bad_layer.fit(_Module(), datamodule=_DataModule())


def test_callback_resumes_history_from_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def make(max_epochs):
        probes = [LinearProbe(every_n_epochs=1, knn_k=3, progress_bar=False),
                  LinearProbe(every_n_epochs=1, knn_k=0, layer="encoder.0", prefix="probe_conv/", progress_bar=False)]
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = pl.Trainer(
            max_epochs=max_epochs, accelerator="cpu", callbacks=[*probes, ckpt], logger=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        return trainer, probes

    trainer, probes = make(1)
    trainer.fit(_Module(), datamodule=_DataModule())
    assert probes[0].state_key != probes[1].state_key
    first = [dict(p.history[0]) for p in probes]
    trainer, probes = make(2)
    trainer.fit(_Module(), datamodule=_DataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for probe, hist in zip(probes, first):
        assert [h["epoch"] for h in probe.history] == [0.0, 1.0]
        assert probe.history[0] == hist  # restored from the checkpoint, per probe
    assert "knn_val_acc" in probes[0].results and "knn_val_acc" not in probes[1].results


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"every_n_epochs": 0}, ValueError, "every_n_epochs"),
        ({"probe": "svm"}, ValueError, "probe"),
        ({"layer": "a", "embedding_fn": lambda m, x: x}, ValueError, "not both"),
        ({"on_fit_end": False}, ValueError, "never run"),
        ({"knn_weights": "cos"}, ValueError, "knn_weights"),
        ({"embedding_fn": 3}, TypeError, "callable"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
    ],
)
def test_callback_validates_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        LinearProbe(**kwargs)


def test_callback_works_with_pytorch_lightning_trainer(tmp_path):
    ptl = pytest.importorskip("pytorch_lightning")

    class PTLModule(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return self(batch["image"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class PTLDataModule(ptl.LightningDataModule):
        train_dataloader = _DataModule.train_dataloader
        eval_dataloader = _DataModule.eval_dataloader

        def __init__(self):
            super().__init__()
            self.data = {s: _images(60, seed) for s, seed in (("train", 0), ("val", 1), ("test", 2))}
            self.calls = []

    probe = LinearProbe(knn_k=3, progress_bar=False)
    trainer = ptl.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=[probe], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(PTLModule(), datamodule=PTLDataModule())
    assert probe.results["linear_val_acc"] > 0.9


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_probe_on_gpu_matches_cpu(cuda_device):
    tx, ty = _clusters(400, 16, 5, sep=1.0, seed=0)
    vx, vy = _clusters(300, 16, 5, sep=1.0, seed=1)
    for method in ("logistic", "ridge"):
        cpu = fit_linear_probe(tx.double(), ty, vx.double(), vy, method=method, tol=1e-9, max_iter=500)
        gpu = fit_linear_probe(
            tx.double().to(cuda_device), ty.to(cuda_device), vx.double().to(cuda_device), vy.to(cuda_device),
            method=method, tol=1e-9, max_iter=500,
        )
        assert gpu["val_acc"] == pytest.approx(cpu["val_acc"], abs=1.0 / 300 + 1e-12)
    pred_cpu = knn_predict(tx, ty, vx, 20)
    pred_gpu = knn_predict(tx.to(cuda_device), ty.to(cuda_device), vx.to(cuda_device), 20)
    assert pred_gpu.device.type == "cuda"
    assert (pred_gpu.cpu() == pred_cpu).float().mean() > 0.99  # float32 ties/rounding may flip a rare vote


@pytest.mark.gpu
def test_callback_on_gpu_keeps_embeddings_on_device(cuda_device, tmp_path):
    devices = []

    def embed(module, x):
        devices.append(x.device.type)
        return module(x)

    probe = LinearProbe(embedding_fn=embed, knn_k=5, progress_bar=False)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="gpu", devices=1, callbacks=[probe], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(_Module(), datamodule=_DataModule())
    assert devices and set(devices) == {"cuda"}
    assert probe.results["linear_val_acc"] > 0.9


# ------------------------------------------------------------------------------------------------ DDP
class _RanksAgree(pl.Callback):
    """Runs after LinearProbe.on_train_end on every rank: do all ranks hold the same (non-empty) results?"""

    def on_train_end(self, trainer, pl_module):
        probe = next(cb for cb in trainer.callbacks if isinstance(cb, LinearProbe))
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, probe.results)
        agree = bool(gathered[0]) and all(g == gathered[0] for g in gathered)
        trainer.callback_metrics["ranks_agree"] = torch.tensor(float(agree))
        trainer.callback_metrics["num_ranks"] = torch.tensor(float(len(gathered)))


@pytest.mark.slow
def test_callback_under_two_process_ddp(tmp_path):
    """Rank zero computes, the result is broadcast: every rank ends with the same callback metrics."""
    probe = LinearProbe(knn_k=5, progress_bar=False)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", callbacks=[probe, _RanksAgree()],
        logger=CSVLogger(tmp_path, name="ddp"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Module(), datamodule=_DataModule())
    # ddp_spawn copies rank zero's callback_metrics back to this process
    assert float(trainer.callback_metrics["probe/linear_val_acc"]) > 0.9
    assert float(trainer.callback_metrics["num_ranks"]) == 2 and float(trainer.callback_metrics["ranks_agree"]) == 1
    files = list(Path(tmp_path).rglob("metrics.csv"))  # written by the spawned rank zero
    assert len(files) == 1
    rows = list(csv.DictReader(open(files[0])))
    assert sum(1 for r in rows if r.get("probe/linear_val_acc")) == 1  # logged once (rank zero)


# ------------------------------------------------------------------------------------------------ integration
@pytest.mark.parametrize("model_name", ["simclr", "autoencoder"])
def test_callback_with_shapes_datamodule_and_example_models(model_name, tmp_path):
    data = pytest.importorskip("reprlens.data")
    from reprlens.models import ConvAutoencoder, SimCLR

    pl.seed_everything(0, verbose=False)
    dm = data.ShapesDataModule(
        num_train=64, num_val=32, num_test=32, batch_size=32, two_views=model_name == "simclr", seed=0,
        image_size=16,
    )
    if model_name == "simclr":
        model, probe = SimCLR(width=4, projector_hidden_dim=16, projector_out_dim=8), LinearProbe(knn_k=5)
    else:
        model = ConvAutoencoder(image_size=16, embedding_dim=6, num_classes=5, hidden_channels=(4, 8))
        probe = LinearProbe(layer="encoder.fc", knn_k=5, probe="ridge")
    probe.progress_bar = False
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[probe], limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    for key in ("linear_train_acc", "linear_val_acc", "linear_test_acc", "knn_val_acc", "knn_test_acc"):
        assert 0.0 <= probe.results[key] <= 1.0
    assert probe.results["linear_train_acc"] > 0.2  # 5 classes: above chance on the data it was fit on

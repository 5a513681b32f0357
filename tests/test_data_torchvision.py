"""TorchvisionDataModule on tiny fake datasets in torchvision's on-disk format, and the missing-files error."""

from __future__ import annotations

import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from reprlens.data import TorchvisionDataModule


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim  # ubyte data
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        fh.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, folder: str = "MNIST", n_train: int = 50, n_test: int = 20) -> dict[str, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in data.items():
        _write_idx(raw / name, arr)
    return data


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("FashionMNIST", "FashionMNIST")])
def test_fake_dataset_roundtrip(tmp_path, name, folder):
    data = _fake_mnist(tmp_path, folder)
    dm = TorchvisionDataModule(name, root=tmp_path, val_fraction=0.2, batch_size=16, seed=3)
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [40, 10, 20]
    assert dm.image_shape == (1, 28, 28) and dm.num_classes == 10
    train_x = torch.as_tensor(data["train-images-idx3-ubyte"], dtype=torch.float32) / 255
    train_y = torch.as_tensor(data["train-labels-idx1-ubyte"])
    # train + val partition the official train file; each image keeps its label
    got = torch.cat([dm.dataset(s).get_batch(range(len(dm.dataset(s))))["image"] for s in ("train", "val")])
    labels = torch.cat([dm.dataset(s).get_batch(range(len(dm.dataset(s))))["label"] for s in ("train", "val")])
    match = (got[:, 0].flatten(1)[:, None] == train_x.flatten(1)[None]).all(-1)  # (50, 50)
    assert torch.equal(match.sum(1), torch.ones(50, dtype=torch.long)) and match.sum(0).eq(1).all()
    assert torch.equal(labels, train_y[match.long().argmax(1)])
    test = next(iter(dm.eval_dataloader("test", batch_size=20)))
    torch.testing.assert_close(test["image"][:, 0], torch.as_tensor(data["t10k-images-idx3-ubyte"]).float() / 255)
    assert torch.equal(test["label"], torch.as_tensor(data["t10k-labels-idx1-ubyte"]))
    assert torch.equal(test["index"], torch.arange(20))
    # same seed -> same split
    dm2 = TorchvisionDataModule(name, root=tmp_path, val_fraction=0.2, seed=3)
    assert torch.equal(dm2.dataset("val").get_batch(range(10))["image"], dm.dataset("val").get_batch(range(10))["image"])


def test_resize_channels_and_views(tmp_path):
    _fake_mnist(tmp_path)
    dm = TorchvisionDataModule("mnist", root=tmp_path, image_size=32, channels=3, two_views=True, batch_size=8)
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (8, 3, 32, 32) and dm.image_shape == (3, 32, 32)
    assert len(b["views"]) == 2 and b["views"][0].shape == (8, 3, 32, 32)
    assert b["image"].min() >= 0 and b["image"].max() <= 1


@pytest.mark.parametrize("name,folder,fname", [("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
                                               ("cifar10", "cifar-10-batches-py", "data_batch_1")])
def test_missing_files_error(tmp_path, name, folder, fname):
    dm = TorchvisionDataModule(name, root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert str((tmp_path / "nowhere" / folder).resolve()) in msg
    assert fname in msg and "download=True" in msg


def test_partially_missing_files_are_named(tmp_path):
    _fake_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        TorchvisionDataModule("mnist", root=tmp_path).setup()
    assert "train-images" not in str(info.value)


def test_failed_download_gives_the_same_guidance(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    dm = TorchvisionDataModule("mnist", root=tmp_path, download=True)
    with pytest.raises(FileNotFoundError, match="download failed.*URLError"):
        dm.prepare_data()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cifar10"):
        TorchvisionDataModule("svhn")
    with pytest.raises(ValueError, match="channels"):
        TorchvisionDataModule("cifar10", channels=1)
    with pytest.raises(ValueError, match="val_fraction"):
        TorchvisionDataModule("mnist", val_fraction=1.0)


def test_indexed_dataset_wraps_pairs_and_dicts():
    from torch.utils.data import DataLoader, TensorDataset

    from reprlens.data import IndexedDataset, collate_dict_batch

    x = torch.rand(10, 1, 4, 4)
    y = torch.arange(10) % 3
    ds = IndexedDataset(TensorDataset(x, y))
    b = next(iter(DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_dict_batch)))
    assert torch.equal(b["image"], x[:4]) and torch.equal(b["label"], y[:4]) and torch.equal(b["index"], torch.arange(4))
    dicts = IndexedDataset([{"image": x[i], "label": int(y[i])} for i in range(10)])
    assert int(dicts[7]["index"]) == 7 and torch.equal(dicts[7]["image"], x[7])
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(5)

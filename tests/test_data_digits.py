"""Digits datamodule: sklearn oracle, bilinear upsampling oracle (float64 numpy), seed-fixed splits, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from reprlens.data import DigitsDataModule
from reprlens.data.digits import load_digits_tensors


def _bilinear_numpy(img: np.ndarray, size: int) -> np.ndarray:
    """Independent half-pixel-centre bilinear resize (align_corners=False), float64."""
    n = img.shape[0]
    src = (np.arange(size) + 0.5) * (n / size) - 0.5
    src = np.clip(src, 0, None)
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w = src - i0
    rows = img[i0] * (1 - w)[:, None] + img[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]


def test_load_digits_tensors_matches_sklearn():
    bunch = load_digits()
    x8, y = load_digits_tensors(8)
    np.testing.assert_array_equal(x8[:, 0].numpy(), (bunch.images / 16.0).astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), bunch.target)
    x32, _ = load_digits_tensors(32)
    assert x32.shape == (1797, 1, 32, 32) and x32.min() >= 0 and x32.max() <= 1
    for i in (0, 17, 1796):
        ref = _bilinear_numpy(bunch.images[i] / 16.0, 32)
        np.testing.assert_allclose(x32[i, 0].numpy(), ref, atol=1e-6)


def test_splits_are_fixed_by_seed_disjoint_and_complete():
    dm = DigitsDataModule(image_size=16, seed=0)
    dm.setup()
    sizes = [len(dm.dataset(s)) for s in ("train", "val", "test")]
    assert sizes == [1257, 270, 270]
    src = torch.cat([dm.source_indices(s) for s in ("train", "val", "test")])
    assert sorted(src.tolist()) == list(range(1797))
    again = DigitsDataModule(image_size=16, seed=0)
    other = DigitsDataModule(image_size=16, seed=1)
    assert torch.equal(again.source_indices("val"), dm.source_indices("val"))
    assert not torch.equal(other.source_indices("val"), dm.source_indices("val"))
    # labels and images of the split are the sklearn rows it names
    bunch = load_digits()
    b = dm.dataset("val").get_batch(range(270))
    np.testing.assert_array_equal(b["label"].numpy(), bunch.target[dm.source_indices("val").numpy()])
    x16, _ = load_digits_tensors(16)
    assert torch.equal(b["image"], x16[dm.source_indices("val")])
    assert torch.equal(b["index"], torch.arange(270))


def test_batches_channels_and_loaders():
    dm = DigitsDataModule(image_size=28, channels=3, val_fraction=0.2, test_fraction=0.0, batch_size=100)
    assert dm.image_shape == (3, 28, 28) and dm.num_classes == 10
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (100, 3, 28, 28) and b["label"].dtype == torch.long
    assert torch.equal(b["image"][:, 0], b["image"][:, 2])
    ev = list(dm.eval_dataloader("val"))
    assert torch.equal(torch.cat([e["index"] for e in ev]), torch.arange(359))
    with pytest.raises(ValueError, match="test split"):
        dm.test_dataloader()


def test_two_views_without_flips():
    dm = DigitsDataModule(image_size=16, two_views=True, batch_size=16)
    b = next(iter(dm.train_dataloader()))
    v0, v1 = b["views"]
    assert v0.shape == b["image"].shape and not torch.equal(v0, v1)
    assert v0.min() >= 0 and v0.max() <= 1
    assert dm.augment.flip_prob == 0.0
    assert "views" not in next(iter(dm.eval_dataloader("train")))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"val_fraction": 1.2}, "val_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "train split"),
        ({"val_fraction": 0.0001}, "val split is empty"),
        ({"channels": 2}, "channels"),
        ({"image_size": 4}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)

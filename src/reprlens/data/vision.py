"""CIFAR10 / MNIST / FashionMNIST from torchvision's on-disk format, as dict-batch datamodules.

Nothing is downloaded unless ``download=True``. When the files are missing, a ``FileNotFoundError``
names the directory and files torchvision expects and how to get them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reprlens.data._common import DictDataModule, TensorImageDataset, split_counts
from reprlens.data.augment import AugmentConfig
from reprlens.data.digits import DIGITS_AUGMENT
from reprlens.utils import require

__all__ = ["TORCHVISION_DATASETS", "TorchvisionDataModule"]

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")

#: name -> (torchvision class, folder under root, files, channels, size, download URL hint)
TORCHVISION_DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "cls": "CIFAR10",
        "folder": "cifar-10-batches-py",
        "files": tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        "channels": 3,
        "size": 32,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it into `root`)",
        "augment": AugmentConfig(),
    },
    "mnist": {
        "cls": "MNIST",
        "folder": os.path.join("MNIST", "raw"),
        "files": _MNIST_FILES,
        "channels": 1,
        "size": 28,
        "url": "the MNIST idx files (e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/, gunzipped)",
        "augment": DIGITS_AUGMENT,
    },
    "fashionmnist": {
        "cls": "FashionMNIST",
        "folder": os.path.join("FashionMNIST", "raw"),
        "files": _MNIST_FILES,
        "channels": 1,
        "size": 28,
        "url": "the Fashion-MNIST idx files (https://github.com/zalandoresearch/fashion-mnist, gunzipped)",
        "augment": AugmentConfig(flip_prob=0.5, saturation=0.0, grayscale_prob=0.0),
    },
}


class TorchvisionDataModule(DictDataModule):
    """CIFAR10, MNIST or FashionMNIST (torchvision files) as dict batches with seed-fixed val split.

    The whole split is loaded into memory once (uint8) and batches are built with tensor ops
    (no PIL, no per-example transform). ``"index"`` is the position in the split's dataset.

    Args:
        name: "cifar10", "mnist" or "fashionmnist" (case-insensitive).
        root: directory holding torchvision's files (see ``expected_files``).
        download: let torchvision download missing files (in ``prepare_data``, rank 0 only).
        val_fraction: fraction of the official train set held out as "val" (by ``seed``); 0 disables.
        image_size: resize to this size (bilinear) per batch; None keeps the native size.
        channels: 1 or 3 (MNIST repeated to RGB with 3); None keeps the native channels.
        batch_size, eval_batch_size, num_workers, seed, two_views, pin_memory, drop_last,
        predict_split, augment: as in :class:`reprlens.data.ShapesDataModule`.

    Raises:
        FileNotFoundError: in ``setup`` when the files are missing and ``download=False``.

    Example:
        >>> dm = TorchvisionDataModule("mnist", root="/nonexistent")
        >>> try:
        ...     dm.setup()
        ... except FileNotFoundError as err:
        ...     print("download=True" in str(err))
        True
    """

    def __init__(
        self,
        name: str = "cifar10",
        root: str | os.PathLike = "data",
        download: bool = False,
        val_fraction: float = 0.1,
        image_size: int | None = None,
        channels: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        two_views: bool = False,
        *,
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        predict_split: str = "test",
        augment: AugmentConfig | None = None,
    ) -> None:
        if not isinstance(name, str) or name.lower() not in TORCHVISION_DATASETS:
            raise ValueError(f"Unknown dataset {name!r}: expected one of {sorted(TORCHVISION_DATASETS)}.")
        spec = TORCHVISION_DATASETS[name.lower()]
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, drop_last=drop_last, seed=seed, two_views=two_views,
                         predict_split=predict_split, augment=augment or spec["augment"])
        if channels not in (None, 1, 3):
            raise ValueError(f"Expected `channels` to be 1, 3 or None, but got {channels!r}.")
        if channels == 1 and spec["channels"] == 3:
            raise ValueError(f"{name} images are RGB: use channels=3 or None, not 1.")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ValueError(f"Expected `image_size` to be a positive int or None, but got {image_size!r}.")
        split_counts(10, val_fraction, 0.0)  # validates the fraction
        self.name = name.lower()
        self.root = Path(root)
        self.download = bool(download)
        self.val_fraction = val_fraction
        self.image_size = image_size
        self.channels = channels or spec["channels"]
        self._spec = spec
        self.save_hyperparameters(ignore=["augment"])

    # -- files --------------------------------------------------------------------------------------
    @property
    def expected_dir(self) -> Path:
        """The directory torchvision reads the files from."""
        return self.root / self._spec["folder"]

    def expected_files(self) -> list[Path]:
        """The files torchvision needs (MNIST-style datasets: uncompressed idx files)."""
        return [self.expected_dir / f for f in self._spec["files"]]

    def missing_files(self) -> list[Path]:
        return [p for p in self.expected_files() if not p.is_file()]

    def _missing_error(self, missing: list[Path], cause: str = "") -> FileNotFoundError:
        names = ", ".join(p.name for p in missing)
        return FileNotFoundError(
            f"{self._spec['cls']} files not found: expected {names} in {self.expected_dir.resolve()}{cause}. "
            f"Fix: pass `download=True` (needs internet access), or put {self._spec['url']} there "
            f"(i.e. set `root` to the directory that contains `{self._spec['folder']}`)."
        )

    def _torchvision_cls(self) -> Any:
        datasets = require("torchvision.datasets", extra="all", purpose="TorchvisionDataModule")
        return getattr(datasets, self._spec["cls"])

    def prepare_data(self) -> None:
        if not self.download or not self.missing_files():
            return
        cls = self._torchvision_cls()
        try:
            for train in (True, False):
                cls(str(self.root), train=train, download=True)
        except Exception as err:  # network errors, refused connections, bad archives
            raise self._missing_error(self.missing_files(), f" (download failed: {type(err).__name__}: {err})") \
                from err

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        cls = self._torchvision_cls()
        try:
            ds = cls(str(self.root), train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise self._missing_error(self.missing_files() or self.expected_files(),
                                      f" (torchvision: {err})") from err
        data = ds.data
        x = torch.as_tensor(np.asarray(data)) if not isinstance(data, Tensor) else data
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
        y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
        return x.contiguous(), y

    def _build(self) -> dict[str, TensorImageDataset | None]:  # type: ignore[override]
        if self.download:
            self.prepare_data()
        missing = self.missing_files()
        if missing:
            raise self._missing_error(missing)
        x, y = self._load(train=True)
        xt, yt = self._load(train=False)
        _, n_val, _ = split_counts(len(y), self.val_fraction, 0.0)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        make = lambda xs, ys: TensorImageDataset(xs, ys, image_size=self.image_size, channels=self.channels)  # noqa: E731
        return {
            "train": make(x[train_idx], y[train_idx]),
            "val": make(x[val_idx], y[val_idx]) if n_val else None,
            "test": make(xt, yt),
        }

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = self.image_size or self._spec["size"]
        return (self.channels, s, s)

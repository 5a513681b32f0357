"""Shared machinery of the reprlens datasets and datamodules.

* :class:`BatchedDictDataset`: map-style dataset whose items are dicts of tensors and which builds a
  whole batch at once (``__getitems__``, used by ``torch.utils.data.DataLoader`` since torch 2.1), so
  no per-sample Python work runs in the loader. Works with the default collate function too.
* :class:`IndexedDataset`: turns any ``(x, y)`` dataset into ``{"image", "label", "index"}`` items.
* :class:`DictDataModule`: the Lightning datamodule base (splits, loaders, ``eval_dataloader``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data._utils.collate import default_collate

from reprlens.data._random import seed_key
from reprlens.data.augment import AugmentConfig, augment_batch
from reprlens.utils import check_positive_int

__all__ = [
    "SPLITS",
    "BatchedDictDataset",
    "DictDataModule",
    "EpochSampler",
    "IndexedDataset",
    "TensorImageDataset",
    "collate_dict_batch",
    "split_counts",
]

SPLITS = ("train", "val", "test")


class _BatchItems(Sequence):
    """The items of one batch, built together; ``collate_dict_batch`` returns the batch unchanged.

    Indexing gives per-item dicts, so the default collate function (which stacks them) also works.
    """

    def __init__(self, batch: dict[str, Any], size: int) -> None:
        self.batch = batch
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if not -self._size <= i < self._size:
            raise IndexError(i)
        return _select_item(self.batch, i)


def _select_item(batch: dict[str, Any], i: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            out[k] = v[i]
        elif isinstance(v, list):
            out[k] = [t[i] for t in v]
        else:
            out[k] = v
    return out


def collate_dict_batch(items: Any) -> Any:
    """Collate function for reprlens datasets: returns a batch built by ``__getitems__`` as is.

    Falls back to ``torch.utils.data.default_collate`` for anything else (e.g. per-item dicts).

    Example:
        >>> import torch
        >>> collate_dict_batch([{"x": torch.tensor(1)}, {"x": torch.tensor(2)}])["x"]
        tensor([1, 2])
    """
    if isinstance(items, _BatchItems):
        return items.batch
    return default_collate(items)


class BatchedDictDataset(Dataset):
    """Base class: subclasses implement ``__len__`` and ``_fetch(index: LongTensor) -> dict``.

    ``two_views=True`` adds ``"views"`` (a list of two augmented ``(N, C, H, W)`` images) built with
    :func:`reprlens.data.augment.augment_batch`, seeded by ``(augment_seed, epoch, index, view)``;
    the epoch is set with :meth:`set_epoch` (the datamodules' train sampler does this every epoch
    when Lightning calls ``sampler.set_epoch``; with ``persistent_workers=True`` workers keep the
    epoch they were started with). If the batch has ``"landmarks"``, ``"view_landmarks"`` (a list of
    two ``(N, L, 2)`` tensors, NaN outside the view) follows the crops and flips.
    """

    two_views: bool = False
    augment_config: AugmentConfig | None = None
    _augment_key: int = 0
    epoch: int = 0

    def configure_views(self, two_views: bool, augment_seed: int = 0, config: AugmentConfig | None = None) -> None:
        """Turn two-view mode on or off (in place)."""
        if not isinstance(two_views, bool):
            raise TypeError(f"Expected `two_views` to be a bool, but got {type(two_views).__name__}.")
        self.two_views = two_views
        self.augment_config = config
        self._augment_key = seed_key(augment_seed, 0xA06)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of an epoch (no effect without two views)."""
        self.epoch = int(epoch)

    def without_views(self) -> BatchedDictDataset:
        """A shallow copy (sharing any cache) that yields un-augmented items."""
        other = copy.copy(self)
        other.two_views = False
        return other

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fetch(self, index: Tensor) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_index(self, index: Tensor) -> Tensor:
        n = len(self)
        if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"Index out of range for a dataset of {n} examples: got values in "
                             f"[{int(index.min())}, {int(index.max())}].")
        return torch.remainder(index, n) if n else index

    def get_batch(self, indices: Sequence[int] | Tensor) -> dict[str, Any]:
        """The batch of the examples ``indices`` (one vectorised call, no per-example loop)."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        index = self._check_index(index)
        batch = self._fetch(index)
        if self.two_views:
            views, view_lms = [], []
            lms = batch.get("landmarks")
            for v in range(2):
                img, lm = augment_batch(batch["image"], index, self._augment_key, epoch=self.epoch, view=v,
                                        config=self.augment_config, landmarks=lms)
                views.append(img)
                view_lms.append(lm)
            batch["views"] = views
            if lms is not None:
                batch["view_landmarks"] = view_lms
        return batch

    def __getitems__(self, indices: list[int]) -> _BatchItems:
        return _BatchItems(self.get_batch(indices), len(indices))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if isinstance(i, Tensor):
            i = int(i)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"Expected an integer index, but got {type(i).__name__}.")
        return _select_item(self.get_batch([int(i)]), 0)


class IndexedDataset(BatchedDictDataset):
    """Wrap any dataset of ``(x, y)`` pairs (or of dicts with an ``"image"``) into dict items.

    Items are ``{"image": x, "label": y (int64), "index": i (int64)}``; dict items get ``"index"``
    added. Used for users' own data and by the training trace, which needs example ids.

    Args:
        dataset: a map-style dataset of ``(x, y)`` tuples, of single tensors (label -1), or of dicts.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(5, 1, 4, 4), torch.arange(5)))
        >>> item = ds[3]
        >>> int(item["index"]), int(item["label"]), tuple(item["image"].shape)
        (3, 3, (1, 4, 4))
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"Expected a map-style dataset (with __getitem__ and __len__), but got {type(dataset).__name__}."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _item(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if isinstance(item, dict):
            if "image" not in item:
                raise ValueError(f"Dict items need an 'image' key; got keys {sorted(item)}.")
            out = dict(item)
        elif isinstance(item, (tuple, list)):
            if len(item) < 2:
                raise ValueError(f"Expected (x, y) items, but got a {type(item).__name__} of length {len(item)}.")
            out = {"image": item[0], "label": item[1]}
        else:
            out = {"image": item, "label": -1}
        if not isinstance(out["image"], Tensor):
            out["image"] = torch.as_tensor(np.asarray(out["image"]))
        out["label"] = torch.as_tensor(out.get("label", -1), dtype=torch.long)
        out["index"] = torch.tensor(i, dtype=torch.long)
        return out

    def _fetch(self, index: Tensor) -> dict[str, Any]:
        # user datasets are per-item by nature; stacking is the default collate's job
        return default_collate([self._item(int(i)) for i in index.tolist()])


class EpochSampler(DistributedSampler):
    """Shuffling sampler seeded by ``seed + epoch`` that also tells the dataset the epoch.

    It subclasses ``DistributedSampler`` (``num_replicas=1`` outside DDP) so Lightning keeps it under
    DDP instead of wrapping it, and forwards ``set_epoch`` to the dataset (augmentation stream).
    """

    def __init__(self, dataset: BatchedDictDataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        set_ds = getattr(self.dataset, "set_epoch", None)
        if callable(set_ds):
            set_ds(epoch)


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Split sizes (train, val, test) for fractions; validated (no empty split with a positive fraction)."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 <= f < 1:
            raise ValueError(f"Expected `{name}` to be a number in [0, 1), but got {f!r}.")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"Expected val_fraction + test_fraction < 1 so the train split is not empty, but got "
            f"{val_fraction} + {test_fraction}."
        )
    n_val = int(round(n * val_fraction))
    n_test = int(round(n * test_fraction))
    n_train = n - n_val - n_test
    for name, f, k in (("val", val_fraction, n_val), ("test", test_fraction, n_test), ("train", 1.0, n_train)):
        if f > 0 and k == 0:
            raise ValueError(
                f"The {name} split is empty: {n} examples with fractions val={val_fraction}, test={test_fraction} "
                f"give 0 {name} examples. Increase the fraction (or use 0 to disable the split explicitly)."
            )
    return n_train, n_val, n_test


class DictDataModule(pl.LightningDataModule):
    """Base datamodule for dict batches: subclasses fill ``self._datasets`` in :meth:`_build`.

    Provides ``train/val/test/predict_dataloader``, ``eval_dataloader(split)`` (un-augmented, not
    shuffled), ``dataset(split)``, ``num_classes`` and ``image_shape``.
    """

    def __init__(self, *, batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0,
                 pin_memory: bool = False, drop_last: bool = False, seed: int = 0, two_views: bool = False,
                 predict_split: str = "test", augment: AugmentConfig | None = None) -> None:
        super().__init__()
        check_positive_int(batch_size, "batch_size")
        check_positive_int(eval_batch_size, "eval_batch_size", allow_none=True)
        check_positive_int(num_workers, "num_workers", minimum=0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected `seed` to be an int, but got {type(seed).__name__}.")
        if not isinstance(two_views, bool):
            raise TypeError(f"Expected `two_views` to be a bool, but got {type(two_views).__name__}.")
        if predict_split not in SPLITS:
            raise ValueError(f"Expected `predict_split` in {SPLITS}, but got {predict_split!r}.")
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"Expected `augment` to be an AugmentConfig or None, but got {type(augment).__name__}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.seed = seed
        self.two_views = two_views
        self.predict_split = predict_split
        self.augment = augment
        self._datasets: dict[str, BatchedDictDataset | None] | None = None

    # -- subclass API -------------------------------------------------------------------------------
    def _build(self) -> dict[str, BatchedDictDataset | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_classes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- common -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._datasets is None:
            datasets = self._build()
            for split, ds in datasets.items():
                if ds is not None:
                    ds.configure_views(self.two_views, seed_key(self.seed, SPLITS.index(split), 0xA06),
                                       self.augment)
            self._datasets = datasets

    def dataset(self, split: str) -> BatchedDictDataset:
        """The dataset of ``split`` ("train", "val" or "test"); two-view mode as configured."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}: expected one of {SPLITS}.")
        self.setup()
        assert self._datasets is not None
        ds = self._datasets.get(split)
        if ds is None or len(ds) == 0:
            raise ValueError(
                f"The {split} split of {type(self).__name__} is empty (disabled by its size/fraction argument). "
                f"Give it a positive size to use it."
            )
        return ds

    def _loader(self, ds: Dataset, *, batch_size: int, sampler: Any = None, shuffle: bool = False,
                drop_last: bool = False) -> DataLoader:
        return DataLoader(
            ds, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
            num_workers=self.num_workers, collate_fn=collate_dict_batch, pin_memory=self.pin_memory,
            drop_last=drop_last,
        )

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(getattr(trainer, "world_size", 1)), int(getattr(trainer, "global_rank", 0))

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        world, rank = self._world()
        sampler = EpochSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                               drop_last=self.drop_last)
        return self._loader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.predict_split)

    def eval_dataloader(self, split: str = "val", batch_size: int | None = None) -> DataLoader:
        """Un-augmented (no views), not shuffled loader over ``split``, for evaluation and analysis."""
        check_positive_int(batch_size, "batch_size", allow_none=True)
        ds = self.dataset(split).without_views()
        return self._loader(ds, batch_size=batch_size or self.eval_batch_size)

    def concept_dataloader(self) -> DataLoader:
        """Loader used by ``ConceptLabeler`` by default: ``eval_dataloader("val")``."""
        return self.eval_dataloader("val")


class TensorImageDataset(BatchedDictDataset):
    """In-memory images and labels as dict items, fetched a whole batch at a time.

    Args:
        images: ``(N, C, H, W)`` uint8 (scaled by 1/255) or float in [0, 1].
        labels: ``(N,)`` integer labels.
        image_size: optional output size; images are bilinearly resized per batch when it differs.
        channels: 1 or 3 output channels (a 1-channel source is repeated to 3); None keeps the source.
        ids: optional ``(N,)`` int64 ids reported as ``"index"`` (default ``arange(N)``, i.e. the
            position in this dataset; the datamodules keep positions so ``"index"`` addresses the split).

    Example:
        >>> import torch
        >>> ds = TensorImageDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4), image_size=16,
        ...                         channels=3)
        >>> ds.get_batch([0, 2])["image"].shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, images: Tensor, labels: Tensor, *, image_size: int | None = None, channels: int | None = None,
                 ids: Tensor | None = None) -> None:
        if images.ndim != 4:
            raise ValueError(f"Expected images of shape (N, C, H, W), but got {tuple(images.shape)}.")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"Expected labels of shape ({images.shape[0]},), but got {tuple(labels.shape)}.")
        check_positive_int(image_size, "image_size", allow_none=True)
        if channels not in (None, 1, 3):
            raise ValueError(f"Expected `channels` in (1, 3) or None, but got {channels!r}.")
        if channels == 1 and images.shape[1] != 1:
            raise ValueError(f"Cannot make 1-channel images from {images.shape[1]}-channel ones; use channels=3.")
        self.images = images
        self.labels = labels.long()
        self.image_size = image_size
        self.channels = channels or images.shape[1]
        self.ids = ids

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w = self.images.shape[-2:]
        if self.image_size is not None:
            h = w = self.image_size
        return (self.channels, int(h), int(w))

    def _fetch(self, index: Tensor) -> dict[str, Any]:
        x = self.images[index]
        x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                align_corners=False, antialias=x.shape[-1] > self.image_size)
            x = x.clamp(0, 1)
        if self.channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        return {
            "image": x,
            "label": self.labels[index],
            "index": index.clone() if self.ids is None else self.ids[index],
        }

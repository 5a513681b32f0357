"""Example-id adapters: where a batch keeps the dataset index of each example.

The trace needs global, dataset-level example ids in every training batch. reprlens datamodules put them in
``batch["index"]``; other pipelines use an adapter from this module, or wrap the dataset with
:class:`WithIndex`.

Example:
    >>> import torch
    >>> default_example_ids({"image": torch.zeros(2, 3), "index": torch.tensor([4, 7])})
    tensor([4, 7])
    >>> position(0)((torch.tensor([1, 2]), torch.zeros(2, 3)))
    tensor([1, 2])
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "MISSING_IDS_HELP",
    "WithIndex",
    "bolts",
    "default_example_ids",
    "hash_id",
    "index_key",
    "lightly",
    "position",
    "solo_learn",
    "to_id_tensor",
]

MISSING_IDS_HELP = (
    "The training trace needs the dataset index of every example in each batch. Fix: return dict batches "
    "with an 'index' entry (reprlens datamodules do; `reprlens.data.IndexedDataset` or "
    "`reprlens.trace.ids.WithIndex(dataset)` adds it), or pass `example_id_fn=` (e.g. "
    "`reprlens.trace.ids.position(0)` for (index, x, y) tuples, `index_key('idx')`, `solo_learn`, `lightly()`)."
)


def hash_id(name: str) -> int:
    """63-bit blake2b hash of a string id (non-negative int64).

    Example:
        >>> hash_id("a.png") == hash_id("a.png") and hash_id("a.png") >= 0
        True
    """
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def to_id_tensor(ids: Any, device: torch.device | None = None) -> Tensor:
    """Turn ids (tensor, ints or strings) into an int64 tensor of non-negative ids.

    Raises:
        TypeError: for anything else.
    """
    if isinstance(ids, Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"Expected integer example ids, but got a {ids.dtype} tensor. {MISSING_IDS_HELP}")
        return ids.reshape(-1).to(device=device, dtype=torch.int64)
    if isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        if len(ids) and isinstance(ids[0], str):
            return torch.tensor([hash_id(s) for s in ids], dtype=torch.int64, device=device)
        return torch.as_tensor(list(ids), dtype=torch.int64, device=device)
    raise TypeError(f"Expected example ids as a tensor or a sequence of ints/strings, but got {type(ids).__name__}.")


def default_example_ids(batch: Any) -> Tensor:
    """Ids from ``batch["index"]`` (or ``batch["idx"]``) of a dict batch; anything else raises ``ValueError``."""
    if isinstance(batch, Mapping):
        for key in ("index", "idx"):
            if key in batch:
                return to_id_tensor(batch[key])
        raise ValueError(f"The batch is a dict with keys {sorted(map(str, batch))} but no 'index'. {MISSING_IDS_HELP}")
    raise ValueError(f"Cannot find example ids in a batch of type {type(batch).__name__}. {MISSING_IDS_HELP}")


def index_key(key: str) -> Callable[[Any], Tensor]:
    """Adapter reading ``batch[key]``."""

    def fn(batch: Any) -> Tensor:
        try:
            return to_id_tensor(batch[key])
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"Batch has no entry {key!r} for example ids. {MISSING_IDS_HELP}") from err

    return fn


def position(i: int) -> Callable[[Any], Tensor]:
    """Adapter reading ``batch[i]`` of a tuple batch (``WithIndex`` puts the index at position 0)."""

    def fn(batch: Any) -> Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) <= i:
            raise ValueError(f"Expected a tuple batch with the ids at position {i}. {MISSING_IDS_HELP}")
        return to_id_tensor(batch[i])

    return fn


solo_learn = position(0)
"""solo-learn batches are ``(indexes, [views...], targets)``."""

bolts = position(0)
"""pl_bolts datamodules need ``WithIndex`` around the dataset; the index is then at position 0."""


def lightly(name_to_id: Mapping[str, int] | None = None) -> Callable[[Any], Tensor]:
    """lightly batches are ``(views, targets, filenames)``; filenames are hashed unless a mapping is given."""

    def fn(batch: Any) -> Tensor:
        names = batch[-1]
        if name_to_id is not None:
            return torch.tensor([name_to_id[n] for n in names], dtype=torch.int64)
        return to_id_tensor(list(names))

    return fn


class WithIndex(Dataset):
    """Dataset wrapper adding the index: ``(index, *item)`` for tuple items, ``{**item, key: index}`` for dicts.

    Example:
        >>> ds = WithIndex([(1.0, 0), (2.0, 1)])
        >>> ds[1]
        (1, 2.0, 1)
    """

    def __init__(self, dataset: Any, key: str | None = None) -> None:
        self.dataset = dataset
        self.key = key or "index"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            return {**item, self.key: i}
        if isinstance(item, tuple):
            return (i, *item)
        return (i, item)

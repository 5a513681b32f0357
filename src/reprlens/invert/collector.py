"""``ActivationCollector``: one scalar per unit per example, streamed as float32 ``[N, D]`` (memmap or memory)."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from reprlens.utils import get_module, unwrap_model

__all__ = ["ActivationCollector", "Activations", "aggregate_output"]

_AGGREGATES = ("mean", "max", "none")


def aggregate_output(out: Tensor, aggregate: str | Callable[[Tensor], Tensor], channel_dim: int = 1) -> Tensor:
    """Reduce a layer output ``(batch, C, *spatial)`` to ``(batch, D)`` float32.

    ``"mean"`` / ``"max"`` reduce all dims except batch and ``channel_dim``; ``"none"`` flattens all
    non-batch dims (row-major); a callable maps the raw output to ``(batch, D)``.

    Example:
        >>> aggregate_output(torch.arange(8.0).reshape(1, 2, 2, 2), "max").tolist()
        [[3.0, 7.0]]
    """
    if callable(aggregate) and not isinstance(aggregate, str):
        res = aggregate(out)
        if not isinstance(res, Tensor) or res.dim() != 2 or res.shape[0] != out.shape[0]:
            raise ValueError(
                f"Expected the aggregate callable to return a (batch, D) tensor, but got "
                f"{tuple(res.shape) if isinstance(res, Tensor) else type(res).__name__}."
            )
        return res.detach().to(torch.float32)
    if out.dim() == 1:
        return out.detach().to(torch.float32)[:, None]
    if out.dim() == 2 or aggregate == "none":
        return out.detach().reshape(out.shape[0], -1).to(torch.float32)
    cd = channel_dim % out.dim()
    if cd == 0:
        raise ValueError("`channel_dim` must not be the batch dimension (0).")
    moved = out.detach().movedim(cd, 1).reshape(out.shape[0], out.shape[cd], -1)
    if aggregate == "mean":
        return moved.to(torch.float32).mean(2)
    return moved.amax(2).to(torch.float32)


class Activations:
    """Collected activations ``[N, D]`` float32: a ``.npy`` memmap with a JSON sidecar, or an in-memory tensor.

    Example:
        >>> acts = Activations(torch.zeros(4, 2), meta={"layer": "fc"})
        >>> acts.shape, acts.tensor(neurons=[1]).shape
        ((4, 2), torch.Size([4, 1]))
    """

    def __init__(self, array: np.ndarray | Tensor, path: Path | None = None, meta: dict[str, Any] | None = None):
        self.array = array
        self.path = path
        self.meta = dict(meta or {})

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, D)``."""
        return (int(self.array.shape[0]), int(self.array.shape[1]))

    def tensor(self, neurons: Sequence[int] | None = None, device: str | torch.device | None = None) -> Tensor:
        """The activations (optionally a subset of units) as a float32 tensor."""
        arr = self.array
        if isinstance(arr, Tensor):
            t = arr if neurons is None else arr[:, torch.as_tensor(list(neurons), dtype=torch.long)]
        else:
            t = torch.from_numpy(np.array(arr if neurons is None else arr[:, list(neurons)], dtype=np.float32))
        return t.to(device) if device is not None else t

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Activations:
        """Open a collected ``.npy`` file; refuses files whose sidecar does not say ``complete: true``."""
        path = Path(path)
        side = Path(str(path) + ".json")
        meta: dict[str, Any] = {}
        if side.exists():
            meta = json.loads(side.read_text())
            if not meta.get("complete", False):
                raise RuntimeError(f"Activation file {path} is incomplete (collection did not finish); recollect it.")
        arr = np.load(path, mmap_mode="r")
        return cls(arr, path, meta)

    def __repr__(self) -> str:
        return f"Activations(shape={self.shape}, path={self.path})"


class _IndexRecorder:
    """Wraps a batch sampler; remembers each yielded index list (FIFO, works with workers and prefetching)."""

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler
        self.queue: collections.deque[list[int]] = collections.deque()

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.batch_sampler:
            idx = list(idx)
            self.queue.append(idx)
            yield idx

    def __len__(self) -> int:
        return len(self.batch_sampler)


def _default_input(batch: Any) -> Any:
    if isinstance(batch, dict):
        for key in ("image", "input", "x"):
            if key in batch:
                return batch[key]
        raise ValueError(f"Cannot find the model input in a dict batch with keys {list(batch)}; pass `input_fn`.")
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ActivationCollector:
    """Collect one scalar per unit per example from a layer over a dataloader.

    Args:
        layer: dotted module name (``"backbone.layer3"``).
        aggregate: ``"mean"`` / ``"max"`` over all dims but batch and ``channel_dim``, ``"none"`` (flatten),
            or a callable mapping the raw output to ``(batch, D)``.
        channel_dim: channel dim of feature maps (``-1`` for tokens).
        select: maps a non-tensor layer output (tuple, dict) to the tensor to aggregate.
        input_fn: maps a batch to the model input (default: ``batch["image"]`` or ``batch[0]``).
        path: ``.npy`` file to stream to (memory-mapped); ``None`` keeps the result in memory.
        overwrite: replace an existing file at ``path``.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> loader = DataLoader(TensorDataset(torch.rand(10, 3, 8, 8)), batch_size=4)
        >>> ActivationCollector("0").collect(model, loader).shape
        (10, 4)
    """

    def __init__(
        self,
        layer: str,
        *,
        aggregate: str | Callable[[Tensor], Tensor] = "mean",
        channel_dim: int = 1,
        select: Callable[[Any], Tensor] | None = None,
        input_fn: Callable[[Any], Any] | None = None,
        path: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(layer, str) or not layer:
            raise TypeError(f"Expected `layer` to be a non-empty dotted module name, but got {layer!r}.")
        if not (callable(aggregate) or aggregate in _AGGREGATES):
            raise ValueError(f"Expected `aggregate` in {_AGGREGATES} or a callable, but got {aggregate!r}.")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise TypeError(f"Expected `channel_dim` to be an int, but got {channel_dim!r}.")
        self.layer = layer
        self.aggregate = aggregate
        self.channel_dim = channel_dim
        self.select = select
        self.input_fn = input_fn or _default_input
        self.path = Path(path) if path is not None else None
        self.overwrite = overwrite
        if self.path is not None and self.path.exists() and not overwrite:
            raise ValueError(f"{self.path} exists; pass overwrite=True or another path.")
        self._reset()

    def _reset(self) -> None:
        self._buffer: Any = None
        self._written: Tensor | None = None
        self._feature_shape: list[int] | None = None
        self._pending: list[Tensor] = []
        self._n = 0
        self._handle: Any = None

    # ---- hook and storage (shared with ActivationWriter)
    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        out = self.select(output) if self.select is not None else output
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Layer {self.layer!r} returned {type(output).__name__}; pass `select` to pick the tensor to aggregate."
            )
        if self._feature_shape is None:
            self._feature_shape = list(out.shape[1:])
        self._pending.append(aggregate_output(out, self.aggregate, self.channel_dim))

    def _attach(self, model: nn.Module) -> None:
        mod = get_module(model, self.layer)
        self._handle = mod.register_forward_hook(self._hook)

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _allocate(self, n: int, d: int, meta: dict[str, Any]) -> None:
        rank, world = _dist()
        self._n = n
        if self.path is None:
            self._buffer = torch.zeros(n, d, dtype=torch.float32)
        else:
            if rank == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                arr = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(n, d))
                del arr
                Path(str(self.path) + ".json").write_text(json.dumps({**meta, "complete": False}, indent=1))
            if world > 1:
                torch.distributed.barrier()
            self._buffer = np.load(self.path, mmap_mode="r+")
        self._written = torch.zeros(n, dtype=torch.bool)

    def _write(self, index: Tensor | Sequence[int], meta: dict[str, Any]) -> None:
        if not self._pending:
            raise RuntimeError(f"Layer {self.layer!r} was not called during the forward pass of this batch.")
        rows = torch.cat(self._pending, 0) if len(self._pending) > 1 else self._pending[0]
        self._pending = []
        idx = torch.as_tensor(index, dtype=torch.long).flatten().cpu()
        if rows.shape[0] != idx.numel():
            raise RuntimeError(f"Got {rows.shape[0]} activation rows for {idx.numel()} dataset indices in a batch.")
        if self._buffer is None:
            meta = {**meta, "D": int(rows.shape[1]), "feature_shape": self._feature_shape}
            self._meta = meta
            self._allocate(int(meta["N"]), int(rows.shape[1]), meta)
        rows_cpu = rows.to("cpu")
        if torch.isnan(rows_cpu).any():
            bad = torch.isnan(rows_cpu).any(0).nonzero().flatten().tolist()
            raise ValueError(f"NaN activations in units {bad[:20]} of layer {self.layer!r}.")
        if idx.numel() and (int(idx.max()) >= self._n or int(idx.min()) < 0):
            raise RuntimeError(f"Dataset index {int(idx.max())} out of range for N = {self._n}.")
        if isinstance(self._buffer, Tensor):
            self._buffer[idx] = rows_cpu
        else:
            self._buffer[idx.numpy()] = rows_cpu.numpy()
        self._written[idx] = True

    def _finish(self) -> Activations:
        rank, world = _dist()
        if self._buffer is None:
            raise RuntimeError("No batches were seen; nothing was collected.")
        written = self._written.clone()
        if world > 1:
            w = written.to(torch.int32)
            if torch.distributed.get_backend() == "nccl":
                w = w.cuda()
            torch.distributed.all_reduce(w)
            written = w.cpu() > 0
            if isinstance(self._buffer, Tensor):
                buf = self._buffer.cuda() if torch.distributed.get_backend() == "nccl" else self._buffer
                mine = self._written.to(buf.device)[:, None]
                buf = buf * mine
                cnt = mine.to(torch.float32).expand(-1, 1).clone()
                torch.distributed.all_reduce(buf)
                torch.distributed.all_reduce(cnt)
                self._buffer = (buf / cnt.clamp(min=1)).cpu()
        missing = int((~written).sum())
        if missing:
            raise RuntimeError(
                f"{missing} of {self._n} dataset rows were never written (loader skipped samples, e.g. "
                "drop_last=True or a subset sampler); use a loader that visits every index once."
            )
        meta = dict(self._meta)
        if self.path is not None:
            self._buffer.flush()
            if world > 1:
                torch.distributed.barrier()
            if rank == 0:
                meta["complete"] = True
                Path(str(self.path) + ".json").write_text(json.dumps(meta, indent=1))
            if world > 1:
                torch.distributed.barrier()
            return Activations(np.load(self.path, mmap_mode="r"), self.path, meta)
        return Activations(self._buffer, None, meta)

    def _meta_for(self, model: nn.Module, dataset: Any, n: int) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("reprlens")
        except PackageNotFoundError:  # pragma: no cover
            ver = "unknown"
        agg = self.aggregate if isinstance(self.aggregate, str) else getattr(self.aggregate, "__name__", "callable")
        return {
            "layer": self.layer, "aggregate": agg, "channel_dim": self.channel_dim, "N": int(n),
            "dtype": "float32", "model": type(unwrap_model(model)).__name__,
            "dataset": type(dataset).__name__ if dataset is not None else None,
            "transform": repr(getattr(dataset, "transform", None)) if hasattr(dataset, "transform") else None,
            "reprlens_version": ver,
        }

    # ---- plain loop
    def collect(
        self,
        model: nn.Module,
        dataloader: DataLoader | Any,
        *,
        device: str | torch.device | None = None,
        num_samples: int | None = None,
        progress: bool = False,
    ) -> Activations:
        """Run ``model`` over ``dataloader`` in eval/inference mode and return the activations.

        Rows land at their dataset index whatever the sampler (the batch sampler is wrapped by an index
        recorder); an ``IterableDataset`` needs ``num_samples`` and is read in order.
        """
        self._reset()
        if self.path is not None and self.path.exists() and not self.overwrite:
            raise ValueError(f"{self.path} exists; pass overwrite=True or another path.")
        dev = torch.device(device) if device is not None else next(
            (p.device for p in model.parameters()), torch.device("cpu")
        )
        dataset = getattr(dataloader, "dataset", None)
        recorder: _IndexRecorder | None = None
        loader: Any = dataloader
        if isinstance(dataloader, DataLoader) and not isinstance(dataset, IterableDataset):
            n = len(dataset) if num_samples is None else int(num_samples)
            recorder = _IndexRecorder(dataloader.batch_sampler)
            loader = DataLoader(
                dataset, batch_sampler=recorder, num_workers=dataloader.num_workers,
                collate_fn=dataloader.collate_fn, pin_memory=dataloader.pin_memory,
                worker_init_fn=dataloader.worker_init_fn, generator=dataloader.generator,
                prefetch_factor=dataloader.prefetch_factor if dataloader.num_workers > 0 else None,
                persistent_workers=False,
            )
        else:
            if num_samples is None:
                raise ValueError("An IterableDataset (or a non-DataLoader iterable) needs `num_samples`.")
            n = int(num_samples)
        meta = self._meta_for(model, dataset, n)
        flags = [(m, m.training) for m in model.modules()]
        offset = 0
        it: Any = loader
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(loader, desc=f"collect {self.layer}", unit="batch")
        self._attach(model)
        try:
            model.eval()
            with torch.inference_mode():
                for batch in it:
                    x = _to_device(self.input_fn(batch), dev)
                    model(x)
                    if recorder is not None:
                        idx = recorder.queue.popleft()
                    else:
                        bsz = self._pending[0].shape[0] if self._pending else 0
                        idx = list(range(offset, offset + bsz))
                        offset += bsz
                    self._write(idx, meta)
            return self._finish()
        finally:
            self._detach()
            for m, f in flags:
                m.training = f

    def callback(self) -> Any:
        """A Lightning ``ActivationWriter`` for ``trainer.predict(...)``; read ``.result`` afterwards."""
        from reprlens.callbacks.concept_labeler import ActivationWriter

        return ActivationWriter(self)

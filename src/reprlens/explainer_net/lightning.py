"""Lightning side of the explainer network: :class:`FeatureCache` and :class:`ExplainerModule` (spec 2.7, 2.8, 3).

The performer is frozen (``requires_grad_(False)``, eval mode, ``torch.no_grad``); only the explainer trains.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from reprlens.capture import LayerCapture
from reprlens.explainer_net.functional import ReceptiveField, receptive_field
from reprlens.explainer_net.metrics import GateStatistics, HeadFidelity, LocationInstability, RelativeReconstructionError
from reprlens.explainer_net.modules import ExplainerOutput, PartExplainer
from reprlens.utils import get_module, unwrap_model

__all__ = ["ExplainerModule", "FeatureCache", "default_input_fn", "default_landmark_fn", "default_target_fn",
           "default_output_to_logits", "p_reward_schedule"]


# ----------------------------------------------------------------------------------------- batch helpers
def default_input_fn(batch: Any) -> Tensor:
    """Images of a batch: ``batch["image"]``, ``batch[0]`` of a tuple, or the tensor itself."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(f"Expected a dict batch with key 'image', but got keys {sorted(batch)}; pass `input_fn`.")
        return batch["image"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"Cannot find the images in a batch of type {type(batch).__name__}; pass `input_fn`.")


def default_target_fn(batch: Any) -> Tensor | None:
    """Labels of a batch (``"label"`` / ``"y"`` / second tuple element) or None."""
    if isinstance(batch, Mapping):
        return batch.get("label", batch.get("y"))
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


def default_landmark_fn(batch: Any) -> Tensor | None:
    """``batch["landmarks"]`` or None."""
    return batch.get("landmarks") if isinstance(batch, Mapping) else None


def default_output_to_logits(output: Any) -> Tensor:
    """Unpack tuple/list (first element) and dict (``"logits"`` or the first value) outputs."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return output["logits"] if "logits" in output else next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"Cannot turn a performer output of type {type(output).__name__} into logits; "
                    "pass `output_to_logits`.")


def p_reward_schedule(epoch: float, eta_max: float, warmup: float, ramp: float) -> float:
    """``η(t) = η_max·clip((t − w)/r, 0, 1)`` (``r = 0``: a step at ``w``)."""
    if ramp <= 0:
        return eta_max if epoch >= warmup else 0.0
    return eta_max * min(max((epoch - warmup) / ramp, 0.0), 1.0)


def _check_finite(x: Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"Expected finite {what}, but found NaN/inf values; check the performer and its inputs "
                         "(e.g. a diverged checkpoint or unnormalised images).")


def _capture_features(performer: nn.Module, layers: Sequence[str], x: Tensor, call_index: int | None
                      ) -> tuple[dict[str, Tensor], Any]:
    """Run the performer under ``no_grad`` and return ({layer: features}, output)."""
    with torch.no_grad(), LayerCapture(performer, list(layers), clone=False, detach=True) as cap:
        out = performer(x)
    feats = {}
    for name in layers:
        n_calls = cap.num_calls(name)
        if n_calls > 1 and call_index is None:
            raise ValueError(f"Layer {name!r} ran {n_calls} times in one forward (multi-view); pass `call_index`.")
        t = cap.get(name, call_index or 0)
        if not isinstance(t, Tensor):
            raise ValueError(f"Expected layer {name!r} to output a tensor, but got {type(t).__name__}.")
        feats[name] = t
    return feats, out


def _default_rf(performer: nn.Module, layer: str, input_size: tuple[int, int]) -> ReceptiveField:
    """Probe (exact for any architecture, skips included); analytic when the map is too small to probe."""
    try:
        return receptive_field(performer, layer, method="probe", input_size=input_size)
    except ValueError:
        return receptive_field(performer, layer)


# ----------------------------------------------------------------------------------------- feature cache
class _Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class FeatureCache:
    """Performer features computed once per example (eval mode, ``no_grad``), for explainer epochs that cost
    explainer steps only. One augmentation per example is frozen into the cache (use
    ``cache_features=False`` in the callback to keep augmentation).

    Items: ``"target"``, ``"upper/<name>"``, ``"y"``, ``"landmarks"``, ``"index"``, ``"image_size"``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        >>> loader = DataLoader([(torch.rand(1, 6, 6), 0) for _ in range(5)], batch_size=2)
        >>> cache = FeatureCache.build(net, "1", loader, progress=False)
        >>> len(cache), next(iter(cache.dataloader(4, shuffle=False)))["target"].shape
        (5, torch.Size([4, 4, 6, 6]))
    """

    def __init__(self, tensors: dict[str, Tensor], target_layer: str, upper_layers: Sequence[str]) -> None:
        self.tensors = tensors
        self.target_layer = target_layer
        self.upper_layers = list(upper_layers)

    def __len__(self) -> int:
        return self.tensors["target"].shape[0]

    @classmethod
    def build(cls, performer: nn.Module, target_layer: str, dataloader: Iterable, *, upper_layers: Sequence[str] = (),
              input_fn: Callable[[Any], Tensor] | None = None, target_fn: Callable[[Any], Tensor | None] | None = None,
              landmark_fn: Callable[[Any], Tensor | None] | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu", max_bytes: int = 4 * 2**30, progress: bool = True,
              call_index: int | None = None) -> FeatureCache:
        """One pass of ``performer`` over ``dataloader``; raises before allocating more than ``max_bytes``."""
        input_fn = input_fn or default_input_fn
        target_fn = target_fn or default_target_fn
        landmark_fn = landmark_fn or default_landmark_fn
        layers = [target_layer, *upper_layers]
        for name in layers:
            get_module(performer, name)
        was_training = performer.training
        performer.eval()
        dev = next((p.device for p in performer.parameters()), torch.device("cpu"))
        try:
            n_total = len(dataloader.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            n_total = None
        store: dict[str, Tensor] = {}
        pos = 0
        it = dataloader
        if progress:
            try:
                from tqdm.auto import tqdm

                it = tqdm(dataloader, desc="explainer: caching performer features", leave=False)
            except ImportError:  # pragma: no cover
                pass
        chunks: dict[str, list[Tensor]] = {}
        try:
            for batch in it:
                x = input_fn(batch).to(dev)
                feats, _ = _capture_features(performer, layers, x, call_index)
                tgt = feats[target_layer]
                if tgt.ndim != 4:
                    raise ValueError(f"Expected target layer {target_layer!r} to output a conv feature map "
                                     f"(N, C, H, W), but got shape {tuple(tgt.shape)}.")
                _check_finite(tgt, f"features of {target_layer!r}")
                n = x.shape[0]
                item = {"target": tgt}
                for name in upper_layers:
                    item[f"upper/{name}"] = feats[name].flatten(1) if feats[name].ndim == 2 else feats[name]
                y = target_fn(batch)
                if y is not None:
                    item["y"] = torch.as_tensor(y).view(n)
                lm = landmark_fn(batch)
                if lm is not None:
                    item["landmarks"] = torch.as_tensor(lm).float()
                idx = batch.get("index") if isinstance(batch, Mapping) else None
                item["index"] = torch.as_tensor(idx) if idx is not None else torch.arange(pos, pos + n)
                item["image_size"] = torch.tensor([x.shape[-2], x.shape[-1]]).expand(n, 2)
                if not store and not chunks:
                    per_ex = sum(v[0].numel() * (torch.empty((), dtype=dtype).element_size()
                                                 if dtype is not None and v.is_floating_point() else v.element_size())
                                 for v in item.values())
                    est = per_ex * (n_total if n_total is not None else n)
                    if est > max_bytes:
                        raise ValueError(
                            f"FeatureCache would need {est / 2**20:.1f} MiB (> max_bytes = {max_bytes / 2**20:.1f} "
                            "MiB). Fixes: dtype=torch.float16, fewer upper layers, a subset of the data, or a "
                            "larger `max_bytes`."
                        )
                for k, v in item.items():
                    v = v.detach().to(device)
                    if dtype is not None and v.is_floating_point() and k != "landmarks":
                        v = v.to(dtype)
                    chunks.setdefault(k, []).append(v)
                pos += n
        finally:
            performer.train(was_training)
        if not chunks:
            raise ValueError("FeatureCache.build got an empty dataloader.")
        store = {k: torch.cat(v) for k, v in chunks.items()}
        return cls(store, target_layer, upper_layers)

    def nbytes(self) -> int:
        """Memory of the cache in bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _collate(self, idx: list[int]) -> dict[str, Tensor]:
        i = torch.as_tensor(idx)
        return {k: v[i] for k, v in self.tensors.items()}

    def dataloader(self, batch_size: int = 64, *, shuffle: bool = True, generator: torch.Generator | None = None
                   ) -> DataLoader:
        """Dict batches of cached items (vectorised gather, no per-example collation)."""
        if shuffle and generator is None:
            generator = torch.Generator().manual_seed(0)
        return DataLoader(_Indices(len(self)), batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=self._collate)


# ----------------------------------------------------------------------------------------- module
class ExplainerModule(pl.LightningModule):
    """Train a :class:`PartExplainer` by distillation against a frozen performer (spec 2.7).

    ``L = Σ_l λ_l·RSE_l + λ_f·FilterLoss − η(t)·mean_b log(min(p_b, p_cap))``. Batches are raw batches (the
    performer then runs under ``no_grad``) or cached dicts from :meth:`FeatureCache.dataloader`.
    Validation logs ``explainer/rel_err``, ``p_mean``/``p_std``, head fidelity (``acc_original``,
    ``acc_reconstructed``, ``acc_gap``, ``agreement`` or ``output_cosine``), location instability of explainer
    vs performer filters (with landmarks), ``filter_loss``, ``p_reward_weight`` and ``p_collapsed``.

    Head check by substitution: the performer reruns on the images while a forward hook on ``target_layer``
    returns the reconstruction. A skip connection that bypasses the target layer still carries the original
    features, so there the check is optimistic; pass ``head`` for an exact check.

    Args:
        performer: the frozen model (switched to eval mode, with a warning if it was training).
        target_layer: dotted name of the conv layer to explain.
        upper_layers: higher layers to reconstruct as well.
        explainer: a ready :class:`PartExplainer` (else built from a dry run on ``example_batch`` or the first
            batch seen in ``setup``).
        explainer_kwargs: keyword arguments of :class:`PartExplainer`.
        lr, weight_decay: Adam settings.
        reconstruction_weights: ``{layer: λ}`` (default 1 each).
        filter_loss_weight: ``λ_f``.
        p_reward, p_reward_weight, p_cap, p_reward_warmup_epochs, p_reward_ramp_epochs: the gate reward.
        collapse_threshold: p-collapse guard threshold.
        head: callable features -> logits for the head check (default: substitution).
        input_fn, target_fn, landmark_fn, output_to_logits: batch/output accessors.
        receptive_field: grid geometry of the target layer (default: probe, which handles skip connections).
        call_index: which call of the target layer to use when it runs several times per forward.
        save_performer_in_checkpoint: keep ``performer.*`` keys in checkpoints.
        example_batch: a raw batch for the dry run that sizes the explainer.
        steps_per_epoch: optimiser steps per epoch for ``η(t)`` (default: from the trainer).
        freeze_performer: put the performer in eval mode with ``requires_grad_(False)`` (default). The
            callback's ``alongside`` mode passes False: the user's model keeps training untouched.
        head_task: ``"classification"`` (accuracies with labels), ``"embedding"`` (``output_cosine`` only) or
            ``"auto"``: classification when the performer's output comes straight from an ``nn.Linear`` (a
            logits layer) and labels exist; an embedder such as SimCLR's backbone gets ``output_cosine``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> net = net.eval()
        >>> module = ExplainerModule(net, "1", example_batch=torch.rand(2, 1, 8, 8))
        >>> module.explain(torch.rand(3, 1, 8, 8)).reconstruction.shape
        torch.Size([3, 4, 8, 8])
    """

    def __init__(
        self,
        performer: nn.Module,
        target_layer: str,
        *,
        upper_layers: Sequence[str] = (),
        explainer: PartExplainer | None = None,
        explainer_kwargs: Mapping[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        reconstruction_weights: Mapping[str, float] | None = None,
        filter_loss_weight: float = 0.5,
        p_reward: str = "log",
        p_reward_weight: float = 0.05,
        p_cap: float | None = 0.9,
        p_reward_warmup_epochs: float = 1.0,
        p_reward_ramp_epochs: float = 2.0,
        collapse_threshold: float = 0.98,
        head: Callable[[Tensor], Tensor] | None = None,
        input_fn: Callable[[Any], Tensor] | None = None,
        target_fn: Callable[[Any], Tensor | None] | None = None,
        landmark_fn: Callable[[Any], Tensor | None] | None = None,
        output_to_logits: Callable[[Any], Tensor] | None = None,
        receptive_field: ReceptiveField | None = None,
        call_index: int | None = None,
        save_performer_in_checkpoint: bool = False,
        example_batch: Any = None,
        steps_per_epoch: int | None = None,
        freeze_performer: bool = True,
        head_task: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(performer, nn.Module):
            raise TypeError(f"Expected `performer` to be an nn.Module, but got {type(performer).__name__}.")
        performer = unwrap_model(performer)
        get_module(performer, target_layer)
        for name in upper_layers:
            get_module(performer, name)
        if p_reward not in ("log", "none"):
            raise ValueError(f"Expected `p_reward` in ('log', 'none'), but got {p_reward!r}.")
        for v, n in ((lr, "lr"), (filter_loss_weight, "filter_loss_weight"), (p_reward_weight, "p_reward_weight"),
                     (weight_decay, "weight_decay"), (p_reward_warmup_epochs, "p_reward_warmup_epochs"),
                     (p_reward_ramp_epochs, "p_reward_ramp_epochs")):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Expected `{n}` to be a finite number >= 0, but got {v!r}.")
        if p_cap is not None and not 0 < p_cap <= 1:
            raise ValueError(f"Expected `p_cap` in (0, 1] or None, but got {p_cap!r}.")
        if not 0.5 < collapse_threshold < 1:
            raise ValueError(f"Expected `collapse_threshold` in (0.5, 1), but got {collapse_threshold!r}.")
        self.freeze_performer = bool(freeze_performer)
        if head_task not in ("auto", "classification", "embedding"):
            raise ValueError(f"Expected `head_task` in ('auto', 'classification', 'embedding'), but got {head_task!r}.")
        self.head_task = head_task
        self._is_classifier: bool | None = {"auto": None, "classification": True, "embedding": False}[head_task]
        if performer.training and self.freeze_performer:
            warnings.warn("ExplainerModule: the performer was in training mode; switching it to eval mode so its "
                          "BatchNorm statistics and dropout stay fixed.", UserWarning, stacklevel=2)
        self.performer = performer
        if self.freeze_performer:
            self.performer.eval()
            self.performer.requires_grad_(False)
        self.target_layer = target_layer
        self.upper_layers = list(upper_layers)
        self.explainer_kwargs = dict(explainer_kwargs or {})
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.reconstruction_weights = {name: 1.0 for name in [target_layer, *self.upper_layers]}
        self.reconstruction_weights.update(dict(reconstruction_weights or {}))
        self.filter_loss_weight = float(filter_loss_weight)
        self.p_reward = p_reward
        self.p_reward_weight = float(p_reward_weight)
        self.p_cap = p_cap
        self.p_reward_warmup_epochs = float(p_reward_warmup_epochs)
        self.p_reward_ramp_epochs = float(p_reward_ramp_epochs)
        self.collapse_threshold = float(collapse_threshold)
        self.head = head
        self.input_fn = input_fn or default_input_fn
        self.target_fn = target_fn or default_target_fn
        self.landmark_fn = landmark_fn or default_landmark_fn
        self.output_to_logits = output_to_logits or default_output_to_logits
        self.rf = receptive_field
        self.call_index = call_index
        self.save_performer_in_checkpoint = save_performer_in_checkpoint
        self.strict_loading = False
        self.steps_per_epoch = steps_per_epoch
        self.explainer: PartExplainer | None = explainer
        self._input_size: tuple[int, int] | None = None
        self._best_rel_err = math.inf
        self._collapse_warned = False
        self._summary: dict[str, float] = {}
        self._checked_first = False
        self._fl_sum: Tensor | None = None
        self._fl_count = 0
        self._init_metrics()
        if explainer is None and example_batch is not None:
            self.build_explainer(example_batch)

    # ------------------------------------------------------------------ construction
    def _init_metrics(self) -> None:
        self.rel_err_metrics = nn.ModuleDict(
            {name.replace(".", "__"): RelativeReconstructionError() for name in [self.target_layer, *self.upper_layers]}
        )
        self.gate_metric = GateStatistics()
        self.head_metric = HeadFidelity()
        self.li_explainer: LocationInstability | None = None
        self.li_performer: LocationInstability | None = None

    def build_explainer(self, batch: Any) -> PartExplainer:
        """Size the explainer from one dry run of the performer on a raw batch (also resolves ``"auto"``)."""
        x = self.input_fn(batch)
        dev = next((p.device for p in self.performer.parameters()), x.device)
        feats, _ = _capture_features(self.performer, [self.target_layer, *self.upper_layers], x.to(dev),
                                     self.call_index)
        tgt = feats[self.target_layer]
        if tgt.ndim != 4:
            raise ValueError(f"Expected target layer {self.target_layer!r} to output a conv feature map (N, C, H, W), "
                             f"but got shape {tuple(tgt.shape)}; pick a convolutional layer.")
        _check_finite(tgt, f"features of {self.target_layer!r}")
        self._input_size = (int(x.shape[-2]), int(x.shape[-1]))
        if self.explainer is None:
            upper = {n: tuple(feats[n].shape[1:]) if feats[n].ndim == 4 else (int(feats[n][0].numel()),)
                     for n in self.upper_layers}
            kw = dict(self.explainer_kwargs)
            kw.setdefault("upper_shapes", upper)
            self.explainer = PartExplainer(int(tgt.shape[1]), **kw).to(tgt.device)
            self.explainer.resolve_output_activation(tgt)
        if self.rf is None:
            self.rf = _default_rf(self.performer, self.target_layer, self._input_size)
        return self.explainer

    def _ensure_li(self) -> None:
        if self.li_explainer is None and self.rf is not None:
            self.li_explainer = LocationInstability(self.rf).to(self.device)
            self.li_performer = LocationInstability(self.rf).to(self.device)

    def setup(self, stage: str) -> None:
        if self.freeze_performer:
            self.performer.eval()
        if self.explainer is None:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if dm is None:
                raise RuntimeError("ExplainerModule has no explainer yet: pass `explainer=` or `example_batch=`, "
                                   "or fit with a datamodule so setup can take a dry-run batch.")
            dm.setup("fit")
            self.build_explainer(next(iter(dm.train_dataloader())))

    def train(self, mode: bool = True) -> ExplainerModule:
        if not self.freeze_performer:  # alongside the user's fit: leave the user's model alone
            if self.explainer is not None:
                self.explainer.train(mode)
            for m in self.children():
                if m is not self.performer and m is not self.explainer:
                    m.train(mode)
            self.training = mode
            return self
        super().train(mode)
        self.performer.eval()  # never changes: BatchNorm statistics and dropout stay fixed
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.explainer is None:
            raise RuntimeError("ExplainerModule: the explainer is not built; pass `explainer` or `example_batch`.")
        return torch.optim.Adam(self.explainer.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ features and loss
    def features(self, batch: Any) -> dict[str, Any]:
        """Target/upper features, labels, landmarks and image size of a raw or cached batch."""
        if isinstance(batch, Mapping) and "target" in batch:
            out: dict[str, Any] = {"target": batch["target"].float() if batch["target"].dtype in (torch.float16,
                                   torch.bfloat16) else batch["target"]}
            out["upper"] = {n: batch[f"upper/{n}"] for n in self.upper_layers}
            out["y"] = batch.get("y")
            out["landmarks"] = batch.get("landmarks")
            isz = batch.get("image_size")
            out["image_size"] = isz if isz is not None else self._input_size
            out["images"] = None
            out["output"] = None
            return out
        x = self.input_fn(batch)
        feats, output = _capture_features(self.performer, [self.target_layer, *self.upper_layers], x, self.call_index)
        tgt = feats[self.target_layer]
        if not self._checked_first:
            if tgt.ndim != 4:
                raise ValueError(f"Expected target layer {self.target_layer!r} to output (N, C, H, W), but got "
                                 f"{tuple(tgt.shape)}.")
            _check_finite(tgt, f"features of {self.target_layer!r}")
            self._checked_first = True
        upper = {n: (feats[n].flatten(1) if feats[n].ndim != 4 else feats[n]) for n in self.upper_layers}
        return {"target": tgt, "upper": upper, "y": self.target_fn(batch), "landmarks": self.landmark_fn(batch),
                "image_size": (int(x.shape[-2]), int(x.shape[-1])), "images": x, "output": output}

    def current_p_reward_weight(self, step: int | None = None) -> float:
        """``η(t)`` at optimiser step ``step`` (default: the trainer's global step)."""
        step = self.global_step if step is None else step
        spe = self.steps_per_epoch
        if spe is None:
            spe = int(self.trainer.num_training_batches) if self._trainer is not None else 1
            spe = max(1, spe if math.isfinite(spe) else 1)
        return p_reward_schedule(step / spe, self.p_reward_weight, self.p_reward_warmup_epochs,
                                 self.p_reward_ramp_epochs)

    def compute_loss(self, feats: Mapping[str, Any], eta: float) -> tuple[Tensor, ExplainerOutput, dict[str, Tensor]]:
        """Training objective (spec 2.7) on features; returns (loss, explainer output, detached log values)."""
        assert self.explainer is not None
        out = self.explainer(feats["target"])
        logs: dict[str, Tensor] = {}
        loss = out.reconstruction.new_zeros((), dtype=torch.float32)
        pairs = [(self.target_layer, out.reconstruction, feats["target"])]
        pairs += [(n, out.upper[n], feats["upper"][n]) for n in self.upper_layers]
        for name, rec, ref in pairs:
            ref = ref.to(rec.dtype)
            rse = (rec - ref).float().pow(2).sum() / (ref.float().pow(2).sum() + 1e-12)
            loss = loss + self.reconstruction_weights[name] * rse
            logs["rse" if name == self.target_layer else f"rse/{name}"] = rse.detach()
        loss = loss + self.filter_loss_weight * out.filter_loss.float()
        p = out.p.float()
        if self.p_reward == "log" and eta > 0:
            pc = p.clamp(max=self.p_cap) if self.p_cap is not None else p
            loss = loss - eta * pc.clamp_min(1e-12).log().mean()
        logs["filter_loss"] = out.filter_loss.detach().float()
        logs["p_mean"] = p.detach().mean()
        logs["loss"] = loss.detach()
        return loss, out, logs

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        feats = self.features(batch)
        eta = self.current_p_reward_weight()
        loss, _, logs = self.compute_loss(feats, eta)
        n = feats["target"].shape[0]
        if n < 16 and not getattr(self, "_warned_small", False):
            self._warned_small = True
            rank_zero_warn(f"ExplainerModule: batch size {n} < 16 gives a coarse MI estimate for the filter loss.")
        self.log_dict({f"explainer/train_{k}": v for k, v in logs.items()}, on_step=False, on_epoch=True,
                      batch_size=n)
        self.log("explainer/filter_loss", logs["filter_loss"], on_step=False, on_epoch=True, batch_size=n)
        self.log("explainer/p_reward_weight", float(eta), on_step=False, on_epoch=True, batch_size=n)
        return loss

    # ------------------------------------------------------------------ evaluation
    def _substituted_logits(self, images: Tensor, reconstruction: Tensor) -> Tensor:
        module = get_module(self.performer, self.target_layer)
        calls = {"n": 0}

        def hook(_m, _a, output):
            i = calls["n"]
            calls["n"] += 1
            if i == (self.call_index or 0):
                return reconstruction.to(output.dtype)
            return None

        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return self.output_to_logits(self.performer(images))
        finally:
            handle.remove()

    def _detect_classifier(self, images: Tensor) -> bool:
        """Whether the performer's output is produced directly by an ``nn.Linear`` (logits)."""
        outs: list[Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _a, o: outs.append(o)) for m in self.performer.modules()
                   if isinstance(m, nn.Linear)]
        try:
            with torch.no_grad():
                out = self.output_to_logits(self.performer(images[:2]))
        finally:
            for h in handles:
                h.remove()
        return any(o is out for o in outs)

    @torch.no_grad()
    def update_metrics(self, batch: Any) -> None:
        """Update all evaluation metrics with one batch (raw batches also get the head check)."""
        feats = self.features(batch)
        tgt = feats["target"]
        _check_finite(tgt, f"features of {self.target_layer!r}")
        assert self.explainer is not None
        out = self.explainer(tgt)
        self.rel_err_metrics[self.target_layer.replace(".", "__")].update(out.reconstruction, tgt)
        for n in self.upper_layers:
            self.rel_err_metrics[n.replace(".", "__")].update(out.upper[n], feats["upper"][n])
        y = feats["y"]
        self.gate_metric.update(out.p, y if y is not None and y.ndim == 1 else None)
        if self.head is not None:
            self.head_metric.update(self.head(tgt), self.head(out.reconstruction), y)
        elif feats["images"] is not None:
            if self._is_classifier is None:
                self._is_classifier = self._detect_classifier(feats["images"])
            orig = self.output_to_logits(feats["output"])
            rec = self._substituted_logits(feats["images"], out.reconstruction)
            labelled = self._is_classifier and y is not None and orig.ndim == 2 and orig.shape[1] > 1
            self.head_metric.update(orig, rec, y if labelled else None)
        lm = feats["landmarks"]
        if lm is not None and self.rf is not None:
            self._ensure_li()
            isz = feats["image_size"]
            lm = lm.to(tgt.device)
            self.li_explainer.update(out.interpretable.float(), lm, isz)  # type: ignore[union-attr]
            self.li_performer.update(tgt.float(), lm, isz)  # type: ignore[union-attr]
        elif lm is None and not getattr(self, "_told_no_landmarks", False):
            self._told_no_landmarks = True
            rank_zero_info("ExplainerModule: batches have no landmarks; location instability is skipped.")

    def compute_metrics(self, reset: bool = True) -> dict[str, float]:
        """All evaluation values (plain floats) plus the p-collapse guard; resets the metrics."""
        res: dict[str, float] = {}
        for name in [self.target_layer, *self.upper_layers]:
            m = self.rel_err_metrics[name.replace(".", "__")]
            key = "rel_err" if name == self.target_layer else f"rel_err/{name}"
            res[key] = float(m.compute())
        g = self.gate_metric.compute()
        for k in ("p_mean", "p_std", "p_q05", "p_q50", "p_q95"):
            res[k] = float(g[k])
        if self.head_metric.total > 0:
            res.update({k: float(v) for k, v in self.head_metric.compute().items()})
        if self.li_explainer is not None and self.li_explainer.scores:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                e, p = self.li_explainer.compute(), self.li_performer.compute()  # type: ignore[union-attr]
            res["location_instability/explainer"] = float(e.value)
            res["location_instability/performer"] = float(p.value)
            res["num_active/explainer"] = float(e.num_active)
            res["num_active/performer"] = float(p.num_active)
        if self._fl_count:
            res["filter_loss"] = float(self._fl_sum) / self._fl_count  # type: ignore[arg-type]
        res["p_collapsed"] = float(self.collapse_guard(res["p_mean"], res["rel_err"]))
        self._summary = dict(res)
        if reset:
            for m in [*self.rel_err_metrics.values(), self.gate_metric, self.head_metric]:
                m.reset()
            if self.li_explainer is not None:
                self.li_explainer.reset()
                self.li_performer.reset()  # type: ignore[union-attr]
            self._fl_sum, self._fl_count = None, 0
        return res

    def collapse_guard(self, p_mean: float, rel_err: float) -> int:
        """+1 / −1 when ``p`` collapsed up / down and ``rel_err`` is ≥ 1.02× its best (warns once), else 0."""
        worse = rel_err >= 1.02 * self._best_rel_err
        self._best_rel_err = min(self._best_rel_err, rel_err)
        state = 0
        if worse and p_mean >= self.collapse_threshold:
            state = 1
        elif worse and p_mean <= 1 - self.collapse_threshold:
            state = -1
        if state and not self._collapse_warned:
            self._collapse_warned = True
            rank_zero_warn(
                f"ExplainerModule: the gate p collapsed {'up' if state > 0 else 'down'} (p_mean = {p_mean:.4f}) while "
                f"rel_err = {rel_err:.4f} got worse than its best ({self._best_rel_err:.4f}); change "
                "`p_reward_weight` (η_max) or `p_cap`."
            )
        return state

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.update_metrics(batch)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        if self.gate_metric.p == [] or (isinstance(self.gate_metric.p, list) and not self.gate_metric.p):
            return
        if self.trainer.sanity_checking:
            for m in [*self.rel_err_metrics.values(), self.gate_metric, self.head_metric]:
                m.reset()
            return
        fl = self.trainer.callback_metrics.get("explainer/filter_loss")
        if fl is not None:
            self._fl_sum, self._fl_count = fl.detach().cpu(), 1
        res = self.compute_metrics()
        res.pop("filter_loss", None)  # logged by the training step (epoch mean)
        self.log_dict({f"explainer/{k}": v for k, v in res.items() if math.isfinite(v)}, sync_dist=False)

    def summary(self) -> dict[str, float]:
        """The last evaluation (``p_mean`` and ``rel_err`` side by side)."""
        return dict(self._summary)

    def explain(self, batch_or_images: Any) -> ExplainerOutput:
        """Explainer output for a raw batch or images (eval mode, no grad)."""
        if self.explainer is None:
            self.build_explainer(batch_or_images)
        was = self.explainer.training  # type: ignore[union-attr]
        self.explainer.eval()  # type: ignore[union-attr]
        try:
            with torch.no_grad():
                return self.explainer(self.features(batch_or_images)["target"])  # type: ignore[misc]
        finally:
            self.explainer.train(was)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.save_performer_in_checkpoint:
            sd = checkpoint.get("state_dict", {})
            for k in [k for k in sd if k.startswith("performer.")]:
                del sd[k]
        checkpoint["explainer_config"] = dict(self.explainer.config) if self.explainer is not None else None
        checkpoint["explainer_best_rel_err"] = self._best_rel_err

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cfg = checkpoint.get("explainer_config")
        if self.explainer is None and cfg is not None:
            self.explainer = PartExplainer(**cfg)
        self._best_rel_err = checkpoint.get("explainer_best_rel_err", self._best_rel_err)

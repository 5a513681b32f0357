"""ScoreMonitor: informativeness and disentanglement of a representation, logged during validation.

On validation batches the callback re-runs the model on the batch inputs with gradients enabled, computes
the attribution maps of every unit of ``target_layer`` w.r.t. ``source_layer`` (all units in batched VJPs,
:func:`reprlens.attribution.layer_attributions`), and updates two torchmetrics
(:class:`~reprlens.scores.Informativeness`, :class:`~reprlens.scores.Disentanglement`) that Lightning
logs at the epoch end (synchronised across DDP ranks). Every ``plot_every_n_epochs`` epochs it also logs an
image grid of the maps of a fixed probe batch (TensorBoard images and PNG files).

The extra work never touches training: it runs inside validation (model in eval mode), takes gradients with
respect to activations only (never parameters, so ``.grad`` is untouched), restores every BatchNorm buffer
after its forwards and draws noise from its own seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from reprlens.callbacks import _shared
from reprlens.scores.metrics import Disentanglement, Informativeness
from reprlens.utils import check_positive_int, get_module, unwrap_model

try:
    from typing_extensions import override
except ImportError:  # pragma: no cover
    def override(f):  # type: ignore[no-redef]
        return f

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["ScoreMonitor"]

_SCORES = ("informativeness", "disentanglement")
_METHODS = ("grad", "grad_x_act", "integrated_gradients", "expected_gradients")
_TRANSFORMS = ("abs", "lin", "sqrt")
_NOISE = ("uniform", "gaussian")
_INFERENCE_ERROR = "ScoreMonitor needs gradients in validation: create the Trainer with inference_mode=False"

InputsFn = Callable[[Any], Tensor]
ForwardFn = Callable[[Any, Tensor], Any]
NoiseFn = Callable[[Tensor, torch.Generator], Tensor]


def _default_inputs_fn(batch: Any) -> Tensor:
    """Model inputs of a batch: ``batch["image"]`` (else ``batch["views"][0]``) for dicts, the batch itself
    for tensors, the first element of tuples/lists (or its first view when it is a list of views)."""
    return _shared.default_inputs_fn(batch, prefer_views=False, owner="ScoreMonitor")


class ScoreMonitor(Callback):
    """Log the informativeness and disentanglement of a representation on validation batches.

    For each monitored validation batch (dataloader 0) the callback runs ``forward_fn(pl_module, x)`` once
    under a :class:`~reprlens.capture.LayerCapture` with gradients enabled, computes the maps of all
    ``K`` units of ``target_layer`` w.r.t. ``source_layer`` (``create_graph=False``) and updates the metrics
    ``f"{prefix}informativeness"`` and ``f"{prefix}disentanglement"``, logged with ``on_epoch=True``.
    Informativeness compares the batch's maps with those of ``num_noise`` reference inputs drawn once per
    validation epoch from the first monitored batch with a generator seeded by ``seed`` (the same noise
    inputs every epoch, so epochs are comparable; spec 2.5). Under DDP each rank draws its noise from the
    channel range of its own first batch (the same ``U(0, 1)`` for [0, 1] images); pass a fixed ``noise``
    tensor for bit-identical references on every rank. Only validation dataloader 0 is monitored, during
    ``fit`` on epochs selected by ``every_n_epochs`` and always in a standalone ``trainer.validate``.

    Every ``plot_every_n_epochs`` monitored epochs, rank 0 logs an image grid (rows: probe samples;
    columns: input, the maps of the first ``max_plot_dims`` units, and the variance-over-dims map that
    disentanglement averages) of a probe batch fixed at the first monitored validation batch (the first
    ``num_probe`` samples; kept in :meth:`state_dict`), via :func:`reprlens.plotting.common.log_figure`
    (TensorBoard ``add_figure`` and a PNG under ``<log_dir>/figures``). Without matplotlib it warns once
    and logs scalars only.

    The Trainer must be created with ``inference_mode=False`` (Lightning's default ``True`` disables autograd
    in validation); otherwise the first monitored batch raises ``RuntimeError``.

    Args:
        source_layer: dotted name of the source module (its output, or its input with
            ``attribute_to_source_input=True``), e.g. ``"backbone.layer2"``.
        target_layer: dotted name of the target module whose output is the representation ``(N, K)``
            (outputs with more dims are reduced to channels by a spatial mean).
        scores: which scores to log, a subset of ``("informativeness", "disentanglement")``.
        method: ``"grad_x_act"`` (default), ``"grad"``, ``"integrated_gradients"`` (needs ``head`` or
            ``pooled_head``) or ``"expected_gradients"`` (runs the whole model on interpolated inputs through
            :class:`~reprlens.attribution.LayerToLayerAttribution`; ``forward_fn`` is not used then).
        transform: channel aggregation of the maps: ``"abs"`` (default, evaluation), ``"lin"`` or ``"sqrt"``.
        ddof: delta degrees of freedom of the variance over dims (disentanglement).
        every_n_epochs: monitor validation epochs with ``(epoch + 1) % every_n_epochs == 0``.
        max_batches: monitor only the first ``max_batches`` validation batches of an epoch (default all).
        num_samples: explain only the first ``num_samples`` rows of each batch (default all).
        num_noise: number of reference (noise) inputs for informativeness.
        noise: ``"uniform"`` (``U(lo_c, hi_c)`` with the per-channel min/max of the batch inputs; ``U(0, 1)``
            for [0, 1] images), ``"gaussian"`` (per-channel mean/std), a fixed Tensor of reference inputs,
            or a callable ``(inputs, generator) -> Tensor``.
        attribute_to_source_input: attribute to the first positional input of ``source_layer``.
        head: optional head ``h -> z`` re-evaluated at the captured source: a dotted module name or a
            callable ``(pl_module, h) -> z``. Without it the maps use the recorded graph.
        pooled_head: dotted name of the MLP applied after global average pooling of the source (fast path).
        inputs_fn: ``batch -> Tensor`` of model inputs. Default: ``batch["image"]`` (else
            ``batch["views"][0]``) for dicts, the batch for tensors, the first element (or first view) of
            tuples/lists.
        forward_fn: ``(pl_module, x) -> Any`` running the model (default ``pl_module(x)``).
        prefix: prefix of the logged metric names and the image tag.
        seed: seed of the noise generator.
        eps: flatness threshold of the map normalisation.
        plot_every_n_epochs: log the probe image grid every this many monitored epochs; ``None`` disables it.
        num_probe: number of probe samples in the grid.
        max_plot_dims: number of units shown in the grid.
        attribution_kwargs: extra keyword arguments for the attribution (e.g. ``{"n_steps": 32}`` for
            integrated gradients, ``{"n_samples": 8, "stdevs": 0.5}`` for expected gradients,
            ``{"chunk_size": 16}``).

    Raises:
        ValueError / TypeError: invalid arguments (eagerly, in ``__init__``); unknown layer names (in
            ``setup``, listing the closest names).
        RuntimeError: validation under ``torch.inference_mode`` (``Trainer(inference_mode=True)``).

    Example:
        >>> import lightning.pytorch as pl
        >>> monitor = ScoreMonitor("backbone.layer2", "backbone.pool", num_noise=4, max_batches=2)
        >>> trainer = pl.Trainer(callbacks=[monitor], inference_mode=False, max_epochs=1)  # doctest: +SKIP
    """

    def __init__(
        self,
        source_layer: str,
        target_layer: str,
        *,
        scores: Sequence[str] = ("informativeness", "disentanglement"),
        method: str = "grad_x_act",
        transform: str = "abs",
        ddof: int = 0,
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        num_samples: int | None = None,
        num_noise: int = 8,
        noise: str | Tensor | NoiseFn = "uniform",
        attribute_to_source_input: bool = False,
        head: str | Callable[[Any, Tensor], Tensor] | None = None,
        pooled_head: str | None = None,
        inputs_fn: InputsFn | None = None,
        forward_fn: ForwardFn | None = None,
        prefix: str = "val/",
        seed: int = 0,
        eps: float = 1e-6,
        plot_every_n_epochs: int | None = 1,
        num_probe: int = 4,
        max_plot_dims: int = 8,
        attribution_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for value, name in ((source_layer, "source_layer"), (target_layer, "target_layer")):
            if not isinstance(value, str) or not value:
                raise TypeError(
                    f"Expected argument `{name}` to be a dotted module name (str), but got {value!r}."
                )
        if isinstance(scores, str):
            scores = (scores,)
        if not isinstance(scores, Sequence) or not scores or any(s not in _SCORES for s in scores):
            raise ValueError(
                f"Expected argument `scores` to be a non-empty subset of {_SCORES}, but got {scores!r}."
            )
        if len(set(scores)) != len(scores):
            raise ValueError(f"Expected argument `scores` to hold each score once, but got {scores!r}.")
        if method not in _METHODS:
            raise ValueError(f"Expected argument `method` to be one of {_METHODS}, but got {method!r}.")
        if transform not in _TRANSFORMS:
            raise ValueError(
                f"Expected argument `transform` to be one of {_TRANSFORMS}, but got {transform!r}."
            )
        check_positive_int(ddof, "ddof", minimum=0)
        check_positive_int(every_n_epochs, "every_n_epochs")
        check_positive_int(max_batches, "max_batches", allow_none=True)
        check_positive_int(num_samples, "num_samples", allow_none=True)
        check_positive_int(num_noise, "num_noise")
        check_positive_int(plot_every_n_epochs, "plot_every_n_epochs", allow_none=True)
        check_positive_int(num_probe, "num_probe")
        check_positive_int(max_plot_dims, "max_plot_dims")
        if isinstance(noise, Tensor):
            if not noise.is_floating_point() or noise.ndim < 1 or noise.shape[0] < 1:
                raise ValueError(
                    "Expected a `noise` tensor to be a floating point batch of reference inputs (M, *input "
                    f"shape), but got dtype {noise.dtype} and shape {tuple(noise.shape)}."
                )
        elif not (callable(noise) or (isinstance(noise, str) and noise in _NOISE)):
            raise ValueError(
                f"Expected argument `noise` to be one of {_NOISE}, a Tensor of reference inputs or a "
                f"callable (inputs, generator) -> Tensor, but got {noise!r}."
            )
        for fn, name in ((inputs_fn, "inputs_fn"), (forward_fn, "forward_fn")):
            if fn is not None and not callable(fn):
                raise TypeError(f"Expected argument `{name}` to be callable, but got {type(fn).__name__}.")
        if head is not None and pooled_head is not None:
            raise ValueError(
                "Pass at most one of `head` (module name or callable) and `pooled_head` (module name)."
            )
        if head is not None and not (isinstance(head, str) or callable(head)):
            raise TypeError(
                "Expected argument `head` to be a dotted module name or a callable (pl_module, h) -> z, but "
                f"got {type(head).__name__}."
            )
        if pooled_head is not None and not isinstance(pooled_head, str):
            raise TypeError(
                f"Expected argument `pooled_head` to be a dotted module name, but got {pooled_head!r}."
            )
        if method == "integrated_gradients" and head is None and pooled_head is None:
            raise ValueError(
                "method='integrated_gradients' re-evaluates the head at interpolated source points: pass "
                "`head` (dotted module name or callable (pl_module, h) -> z) or `pooled_head`."
            )
        if not isinstance(prefix, str):
            raise TypeError(f"Expected argument `prefix` to be a str, but got {type(prefix).__name__}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected argument `seed` to be an int, but got {seed!r}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise ValueError(f"Expected argument `eps` to be a finite float >= 0, but got {eps!r}.")
        if attribution_kwargs is not None and not isinstance(attribution_kwargs, Mapping):
            raise TypeError(
                f"Expected `attribution_kwargs` to be a mapping, but got {type(attribution_kwargs).__name__}."
            )
        self.source_layer = source_layer
        self.target_layer = target_layer
        self.scores = tuple(scores)
        self.method = method
        self.transform = transform
        self.ddof = ddof
        self.every_n_epochs = every_n_epochs
        self.max_batches = max_batches
        self.num_samples = num_samples
        self.num_noise = num_noise
        self.noise = noise
        self.attribute_to_source_input = bool(attribute_to_source_input)
        self.head = head
        self.pooled_head = pooled_head
        self.inputs_fn: InputsFn = inputs_fn or _default_inputs_fn
        self.forward_fn: ForwardFn = forward_fn or _shared.default_forward_fn
        self.prefix = prefix
        self.seed = seed
        self.eps = float(eps)
        self.plot_every_n_epochs = plot_every_n_epochs
        self.num_probe = num_probe
        self.max_plot_dims = max_plot_dims
        self.attribution_kwargs = dict(attribution_kwargs or {})

        self.metrics: dict[str, Informativeness | Disentanglement] = {}
        if "informativeness" in self.scores:
            self.metrics["informativeness"] = Informativeness(eps=self.eps, validate_args=False)
        if "disentanglement" in self.scores:
            self.metrics["disentanglement"] = Disentanglement(ddof=ddof, eps=self.eps, validate_args=False)
        self._head_fn: Callable[[Tensor], Tensor] | None = None
        self._attributor: Any = None
        self._reference_maps: Tensor | None = None
        self._probe: Tensor | None = None
        self._monitored_epoch = False
        self._plot_disabled = False
        self.num_monitored_epochs = 0

    # ------------------------------------------------------------------ names and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(source_layer=self.source_layer, target_layer=self.target_layer,
                                        prefix=self.prefix)

    def metric_name(self, score: str) -> str:
        """The logged key of ``score`` (``f"{prefix}{score}"``)."""
        return f"{self.prefix}{score}"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": None if self._probe is None else self._probe.detach().cpu(),
            "num_monitored_epochs": self.num_monitored_epochs,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        probe = state_dict.get("probe")
        self._probe = probe.clone() if isinstance(probe, Tensor) else None
        self.num_monitored_epochs = int(state_dict.get("num_monitored_epochs", 0))

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = unwrap_model(pl_module)
        get_module(root, self.source_layer, what="source layer")
        get_module(root, self.target_layer, what="target layer")
        self._head_fn = _shared.resolve_head(pl_module, self.head, self.pooled_head)
        if self.method == "expected_gradients":
            self._attributor = self._make_attributor(pl_module)
        self._move_metrics(pl_module)

    def _make_attributor(self, pl_module: Any) -> Any:
        try:
            from reprlens.attribution import LayerToLayerAttribution
        except ImportError as err:  # pragma: no cover - depends on the state of reprlens.attribution
            raise NotImplementedError(
                "ScoreMonitor(method='expected_gradients') needs "
                "reprlens.attribution.LayerToLayerAttribution, which is not available in this version; use "
                "'grad_x_act' or 'integrated_gradients'."
            ) from err
        return LayerToLayerAttribution(
            pl_module,
            self.source_layer,
            self.target_layer,
            attribute_to_source_input=self.attribute_to_source_input,
            head=self._head_fn,
        )

    def _move_metrics(self, pl_module: Any) -> None:
        device = getattr(pl_module, "device", None)
        if device is not None:
            for metric in self.metrics.values():
                if metric.device != torch.device(device):
                    metric.to(device)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    def _release(self) -> None:
        self._reference_maps = None
        self._head_fn = None
        self._attributor = None
        self._monitored_epoch = False
        for metric in self.metrics.values():
            metric.reset()

    # ------------------------------------------------------------------ validation hooks
    def _epoch_selected(self, trainer: Any) -> bool:
        if trainer.sanity_checking:
            return False
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        if fn is not None and fn != "fit":  # TrainerFn is a str enum
            return True  # a standalone `trainer.validate(...)` is always monitored
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reference_maps = None
        self._monitored_epoch = False
        for metric in self.metrics.values():
            metric.reset()
        self._move_metrics(pl_module)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or not self._epoch_selected(trainer):
            return
        if self.max_batches is not None and batch_idx >= self.max_batches:
            return
        if torch.is_inference_mode_enabled():
            raise RuntimeError(_INFERENCE_ERROR)
        x = self.inputs_fn(batch)
        if not isinstance(x, Tensor):
            raise TypeError(
                f"`inputs_fn` must return a Tensor of model inputs, but returned {type(x).__name__}."
            )
        if self.num_samples is not None:
            x = x[: self.num_samples]
        if self._probe is None:
            self._probe = x[: self.num_probe].detach().cpu().clone()
        maps = self._maps(pl_module, x)
        self._check_maps(maps)
        n = maps.shape[0]
        if "informativeness" in self.metrics:
            if self._reference_maps is None:
                self._reference_maps = self._maps(pl_module, self._noise_inputs(x))
                self._check_maps(self._reference_maps, reference=True)
            self.metrics["informativeness"].update(maps, self._reference_maps)
        if "disentanglement" in self.metrics:
            if maps.shape[1] < 2:
                raise ValueError(
                    f"disentanglement needs at least 2 target dims, got K={maps.shape[1]} for target layer "
                    f"{self.target_layer!r}; monitor only scores=('informativeness',)."
                )
            self.metrics["disentanglement"].update(maps)
        for score, metric in self.metrics.items():
            name = self.metric_name(score)
            pl_module.log(name, metric, metric_attribute=name, on_step=False, on_epoch=True, batch_size=n)
        self._monitored_epoch = True

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._monitored_epoch:
            return
        self.num_monitored_epochs += 1
        if (
            self.plot_every_n_epochs is None
            or self._plot_disabled
            or self._probe is None
            or (self.num_monitored_epochs - 1) % self.plot_every_n_epochs != 0
            or not trainer.is_global_zero
        ):
            return
        try:
            from reprlens.plotting.common import log_figure, require_matplotlib

            require_matplotlib()
        except ImportError as err:
            self._plot_disabled = True
            rank_zero_warn(f"ScoreMonitor: not logging attribution map images ({err}).")
            return
        probe = self._probe.to(pl_module.device)
        maps = self._maps(pl_module, probe)
        fig = self._figure(probe, maps)
        log_figure(trainer, f"{self.prefix}attribution_maps", fig, step=trainer.global_step)

    # ------------------------------------------------------------------ maps
    def _capture_spec(self) -> dict[str, str]:
        spec = {self.source_layer: "input" if self.attribute_to_source_input else "output"}
        if self._head_fn is None:
            spec[self.target_layer] = "output"
        return spec

    def _maps(self, pl_module: Any, x: Tensor) -> Tensor:
        """``(N, K, *P)`` channel-aggregated maps of the inputs ``x`` (no graph kept)."""
        from reprlens.attribution import layer_attributions, preserve_batchnorm_buffers
        from reprlens.capture import LayerCapture

        if self.method == "expected_gradients":
            if self._attributor is None:
                self._attributor = self._make_attributor(pl_module)
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
            with preserve_batchnorm_buffers(pl_module), torch.enable_grad():
                maps = self._attributor.attribute(
                    x, method="expected_gradients", transform=self.transform, generator=generator,
                    **self.attribution_kwargs,
                )
            return maps.detach()
        with preserve_batchnorm_buffers(pl_module), torch.enable_grad():
            with LayerCapture(pl_module, self._capture_spec(), requires_grad=True) as cap:
                self.forward_fn(pl_module, x)
            h = cap.get(self.source_layer)
            target = self._head_fn if self._head_fn is not None else cap.get(self.target_layer)
            maps = layer_attributions(
                h,
                target,
                method=self.method,
                transform=self.transform,
                create_graph=False,
                **self.attribution_kwargs,
            )
        return maps.detach()

    def _check_maps(self, maps: Tensor, reference: bool = False) -> None:
        what = "reference (noise) inputs" if reference else "validation inputs"
        if maps.ndim < 3:
            raise ValueError(
                f"ScoreMonitor needs maps with positions (N, K, *P), but the maps of the {what} have shape "
                f"{tuple(maps.shape)}: choose a source layer with spatial positions (a conv feature map)."
            )

    def _noise_inputs(self, x: Tensor) -> Tensor:
        """Reference inputs for informativeness (spec 2.5), drawn with a generator seeded by ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)  # CPU draws: identical on every device
        return _shared.noise_inputs(x, self.noise, self.num_noise, generator)

    # ------------------------------------------------------------------ figure
    def _figure(self, probe: Tensor, maps: Tensor) -> Figure:
        from reprlens.attribution import normalize_maps
        from reprlens.plotting.common import image_grid
        from reprlens.scores import disentanglement

        k = min(maps.shape[1], self.max_plot_dims)
        shown = normalize_maps(maps[:, :k].float(), eps=self.eps).cpu()
        variance = None
        if maps.shape[1] >= 2:
            variance = disentanglement(maps.float(), ddof=self.ddof, eps=self.eps, spatial_reduction="none",
                                       reduction="none", validate_args=False).cpu()
            variance = normalize_maps(variance.unsqueeze(1), eps=self.eps)[:, 0]
        images = probe.detach().float().cpu()
        show_input = images.ndim == 4 and images.shape[1] in (1, 3)
        rows = []
        for i in range(maps.shape[0]):
            row = [images[i]] if show_input else []
            row += [_as_image(shown[i, j]) for j in range(k)]
            if variance is not None:
                row.append(_as_image(variance[i]))
            rows.append(row)
        cols = (["input"] if show_input else []) + [f"dim {j}" for j in range(k)]
        if variance is not None:
            cols.append("var over dims")
        return image_grid(rows, col_titles=cols, row_titles=[f"probe {i}" for i in range(len(rows))],
                          suptitle=f"{self.target_layer} -> {self.source_layer} maps "
                                   f"({self.method}, {self.transform})")


def _as_image(m: Tensor) -> Tensor:
    """A map with any number of position axes as a 2D image (1D maps become one row)."""
    if m.ndim == 2:
        return m
    if m.ndim == 1:
        return m.unsqueeze(0)
    return m.reshape(m.shape[0], -1)


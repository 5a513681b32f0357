"""``ExplanationRegularization``: add explanation scores to the loss of an unchanged ``training_step``.

The callback wraps ``pl_module.training_step`` (an instance attribute installed in ``setup`` and removed in
``teardown``/``on_exception``). The original step runs exactly once with a :class:`~reprlens.capture.
LayerCapture` active; afterwards the captured source activation ``h`` and target ``z`` give the attribution
maps of all target dims (one batched VJP, ``create_graph=True``), and the returned loss becomes
``loss - sum_i w_i * score_i``. Lightning then normalises for accumulation, scales for AMP and runs the one
ordinary backward, so DDP's reducer sees nothing unusual.

Note:
    A callback that changes the loss departs from Lightning's guideline that callbacks be non-essential:
    the module trains differently with it. While the wrapper is installed the module holds a closure and is
    not picklable; it is removed at the end of ``fit``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from reprlens.attribution import preserve_batchnorm_buffers
from reprlens.callbacks import _shared
from reprlens.utils import check_positive_int, extra_forward, get_module, unwrap_model

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

    from reprlens.regularizer import ExplanationRegularizer

__all__ = ["ExplanationRegularization", "default_inputs_fn"]

_NONFINITE = ("skip_term", "skip_step", "raise")


def default_inputs_fn(batch: Any) -> Tensor:
    """Model inputs of a training batch (the first view of a two-view batch); see
    :func:`reprlens.callbacks._shared.default_inputs_fn` for the layouts.

    Example:
        >>> import torch
        >>> default_inputs_fn({"image": torch.zeros(2, 3, 4, 4), "label": torch.zeros(2)}).shape
        torch.Size([2, 3, 4, 4])
    """
    return _shared.default_inputs_fn(batch, prefer_views=True, owner="ExplanationRegularization")


class ExplanationRegularization(Callback):
    """Train any LightningModule with explanation constraints (informativeness, disentanglement).

    Args:
        source_layer: dotted name of the source module (its output, or input with
            ``attribute_to_source_input=True``), e.g. ``"backbone.layer3"``.
        target_layer: dotted name of the target module (the embedding), e.g. ``"projector"``.
        informativeness: weight of the informativeness score (>= 0).
        disentanglement: weight of the disentanglement score (>= 0). At least one weight must be > 0.
        regularizer: a configured :class:`~reprlens.regularizer.ExplanationRegularizer` instead of weights.
        every_n_steps: regularise optimizer steps with ``global_step % every_n_steps == 0`` (all
            micro-batches of an accumulated step share the decision).
        num_samples: explain only the first ``num_samples`` rows of the batch (saves work with a head
            callable; on the graph-only path the VJP still costs the full batch).
        num_noise: number of noise reference inputs for informativeness.
        noise: ``"uniform"`` (per-channel range of the batch), ``"gaussian"`` (per-channel mean/std), a fixed
            Tensor of reference inputs, or a callable ``(inputs, generator) -> Tensor``.
        calls: which forward calls of the layers to use when the backbone runs several times per step
            (one per view): ``"first"``, ``"all"`` (scores averaged) or an int call index.
        attribute_to_source_input: attribute to the input of the source module instead of its output.
        head: optional head ``h -> z``: a dotted module name or ``callable(pl_module, h)``. Without it the
            callback detects a sequential head from the module execution order and verifies it numerically,
            falling back to the recorded graph.
        pooled_head: dotted name of the MLP applied after global average pooling of the source (fast path).
        inputs_fn: ``batch -> Tensor`` of model inputs (default :func:`default_inputs_fn`).
        forward_fn: ``(pl_module, x) -> Any`` used for the extra noise forwards (default ``pl_module(x)``).
        log_prefix: prefix of the logged keys (``reg/informativeness``, ``reg/disentanglement``, ``reg/total``).
        seed: seed of the noise and dim-sampling generator.
        warmup_steps: ramp the weights linearly from 0 over this many optimizer steps.
        schedule: optional ``step -> multiplier`` applied to the weights (after the warm-up).
        nonfinite: what to do with a non-finite score: ``"skip_term"`` (drop the term for that step; counted
            in ``reg/nonfinite_count`` and warned about at epoch end), ``"skip_step"`` (skip the optimizer step
            when the loss or the score is not finite, consistently on all ranks) or ``"raise"``.
        method, transform, normalization, ddof, num_dims_sampled, chunk_size, head_batchnorm: passed to
            :class:`~reprlens.regularizer.ExplanationRegularizer` when ``regularizer`` is not given.

    Example:
        >>> import lightning.pytorch as pl
        >>> cb = ExplanationRegularization("backbone.layer3", "projector", disentanglement=0.1)
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=1, logger=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        source_layer: str,
        target_layer: str,
        *,
        informativeness: float = 0.0,
        disentanglement: float = 0.0,
        regularizer: ExplanationRegularizer | None = None,
        every_n_steps: int = 1,
        num_samples: int | None = None,
        num_noise: int = 8,
        noise: str | Tensor | Callable[[Tensor, torch.Generator], Tensor] = "uniform",
        calls: Literal["first", "all"] | int = "first",
        attribute_to_source_input: bool = False,
        head: str | Callable[[Any, Tensor], Tensor] | None = None,
        pooled_head: str | None = None,
        inputs_fn: Callable[[Any], Tensor] | None = None,
        forward_fn: Callable[[Any, Tensor], Any] | None = None,
        log_prefix: str = "reg/",
        seed: int = 0,
        warmup_steps: int = 0,
        schedule: Callable[[int], float] | None = None,
        nonfinite: Literal["skip_term", "skip_step", "raise"] = "skip_term",
        method: str = "grad_x_act",
        transform: str = "lin",
        normalization: str = "minmax",
        ddof: int = 0,
        num_dims_sampled: int | None = None,
        chunk_size: int | None = None,
        head_batchnorm: str = "auto",
        detect_head: bool = True,
    ) -> None:
        from reprlens.regularizer import ExplanationRegularizer

        for value, name in ((source_layer, "source_layer"), (target_layer, "target_layer")):
            if not isinstance(value, str) or not value:
                raise TypeError(f"Expected argument `{name}` to be a dotted module name, but got {value!r}.")
        if regularizer is not None:
            if informativeness or disentanglement:
                raise ValueError(
                    "Pass either `regularizer` or the weights `informativeness`/`disentanglement`, not both."
                )
            if not isinstance(regularizer, ExplanationRegularizer):
                raise TypeError(
                    f"Expected `regularizer` to be an ExplanationRegularizer, but got {type(regularizer).__name__}."
                )
            self.regularizer = regularizer
        else:
            self.regularizer = ExplanationRegularizer(
                informativeness, disentanglement, method=method, transform=transform,
                normalization=normalization, ddof=ddof, num_dims_sampled=num_dims_sampled,
                chunk_size=chunk_size, head_batchnorm=head_batchnorm,
            )
            if not self.regularizer.weights:
                raise ValueError(
                    "ExplanationRegularization needs at least one weight > 0: got informativeness="
                    f"{informativeness!r} and disentanglement={disentanglement!r}."
                )
        if self.regularizer.method == "integrated_gradients" and head is None and pooled_head is None:
            # IG needs a head callable; detection may provide one, checked at the first step.
            pass
        check_positive_int(every_n_steps, "every_n_steps")
        check_positive_int(num_samples, "num_samples", allow_none=True)
        check_positive_int(num_noise, "num_noise")
        check_positive_int(warmup_steps, "warmup_steps", minimum=0)
        if calls not in ("first", "all") and (isinstance(calls, bool) or not isinstance(calls, int) or calls < 0):
            raise ValueError(f"Expected argument `calls` to be 'first', 'all' or a call index >= 0, but got {calls!r}.")
        if not (isinstance(noise, Tensor) or callable(noise) or noise in ("uniform", "gaussian")):
            raise ValueError(
                f"Expected argument `noise` to be 'uniform', 'gaussian', a Tensor or a callable, but got {noise!r}."
            )
        if nonfinite not in _NONFINITE:
            raise ValueError(f"Expected argument `nonfinite` to be one of {_NONFINITE}, but got {nonfinite!r}.")
        for fn, name in ((inputs_fn, "inputs_fn"), (forward_fn, "forward_fn"), (schedule, "schedule")):
            if fn is not None and not callable(fn):
                raise TypeError(f"Expected argument `{name}` to be callable, but got {type(fn).__name__}.")
        if head is not None and pooled_head is not None:
            raise ValueError("Pass at most one of `head` and `pooled_head`.")
        if head is not None and not (isinstance(head, str) or callable(head)):
            raise TypeError(f"Expected `head` to be a dotted module name or a callable, but got {type(head).__name__}.")
        self.source_layer = source_layer
        self.target_layer = target_layer
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.num_noise = num_noise
        self.noise = noise
        self.calls = calls
        self.attribute_to_source_input = bool(attribute_to_source_input)
        self.head_spec = head
        self.pooled_head = pooled_head
        self.inputs_fn = inputs_fn or default_inputs_fn
        self.forward_fn = forward_fn or _shared.default_forward_fn
        self.log_prefix = log_prefix
        self.seed = int(seed)
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.nonfinite = nonfinite
        self.detect_head = detect_head
        self._base_weights = dict(
            informativeness=self.regularizer.w_informativeness, disentanglement=self.regularizer.w_disentanglement
        )
        self._module: Any = None
        self._trainer: Any = None
        self._previous: Any = None
        self._installed: Callable[..., Any] | None = None
        self._head: Callable[[Tensor], Tensor] | None = None
        self._head_checked = False
        self._generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None
        self.num_regularized_steps = 0
        self._nonfinite_count: Tensor | None = None
        self._bad_step: Tensor | None = None
        self._warned_num_samples = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(source_layer=self.source_layer, target_layer=self.target_layer)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            raise MisconfigurationException(
                "ExplanationRegularization needs automatic optimization; call ExplanationRegularizer inside your"
                " training_step and before manual_backward instead."
            )
        precision = str(getattr(trainer, "precision", ""))
        if precision in ("16-true", "bf16-true"):
            rank_zero_warn(
                f"ExplanationRegularization: precision={precision!r} is not supported (inner gradients in half"
                " precision are unreliable); use '16-mixed' or 'bf16-mixed'."
            )
        self._trainer = trainer
        self._module = pl_module
        if self._installed is not None and vars(pl_module).get("training_step") is self._installed:
            return
        self._previous = vars(pl_module).get("training_step")
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._wrapped_step(original, *args, **kwargs)

        self._installed = training_step
        pl_module.training_step = training_step  # type: ignore[method-assign]
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = unwrap_model(pl_module)
        get_module(root, self.source_layer, what="source layer")
        get_module(root, self.target_layer, what="target layer")
        self._head = _shared.resolve_head(pl_module, self.head_spec, self.pooled_head)
        if self._generator is None or self._generator.device != pl_module.device:
            state = self._generator.get_state() if self._generator is not None else None
            self._generator = torch.Generator(device=pl_module.device)
            if state is not None and pl_module.device.type == "cpu":
                self._generator.set_state(state)
            else:
                self._generator.manual_seed(self.seed)
        self._nonfinite_count = torch.zeros((), device=pl_module.device, dtype=torch.long)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore(pl_module)

    def _restore(self, pl_module: Any) -> None:
        if self._installed is None:
            return
        current = vars(pl_module).get("training_step")
        if current is self._installed:
            if self._previous is None:
                del pl_module.training_step
            else:
                pl_module.training_step = self._previous
        elif current is not None and self._splice_out_of_chain():
            pass
        elif current is not None:
            warnings.warn(
                "ExplanationRegularization: `training_step` was replaced by someone else after this callback"
                " wrapped it; leaving it as it is.",
                stacklevel=2,
            )
        self._installed = None
        self._previous = None

    def _splice_out_of_chain(self) -> bool:
        """Another ExplanationRegularization wrapped our wrapper: make it restore to what we replaced."""
        for cb in getattr(self._trainer, "callbacks", []) or []:
            if isinstance(cb, ExplanationRegularization) and cb is not self and cb._previous is self._installed:
                cb._previous = self._previous
                return True
        return False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._nonfinite_count is not None:
            count = int(self._nonfinite_count)  # one sync per epoch, outside the step
            if count:
                rank_zero_warn(
                    f"ExplanationRegularization: the explanation score was not finite in {count} step(s) so far;"
                    " the regularization term was skipped there (nonfinite='skip_term')."
                )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.nonfinite != "skip_step" or self._bad_step is None:
            return
        bad = bool(trainer.strategy.reduce_boolean_decision(bool(self._bad_step), all=False))
        self._bad_step = None
        if bad:
            rank_zero_warn(
                f"ExplanationRegularization: skipping optimizer step {trainer.global_step}: the task loss or the"
                " explanation score was not finite (nonfinite='skip_step')."
            )
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_regularized_steps": self.num_regularized_steps,
            "generator_state": self._generator.get_state().cpu() if self._generator is not None else None,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
        if self._generator is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        self.num_regularized_steps = int(state.get("num_regularized_steps", 0))
        gen_state = state.get("generator_state")
        if gen_state is not None:
            if self._generator is None:
                self._generator = torch.Generator()
            try:
                self._generator.set_state(gen_state)
            except RuntimeError:  # generator on another device type: reseed deterministically
                self._generator.manual_seed(self.seed + self.num_regularized_steps)

    # ------------------------------------------------------------------ the step
    def _should_regularize(self, trainer: Any) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    def _weight_multiplier(self, step: int) -> float:
        mult = 1.0
        if self.warmup_steps > 0:
            mult = min(1.0, (step + 1) / self.warmup_steps)
        if self.schedule is not None:
            mult *= float(self.schedule(step))
        if not math.isfinite(mult) or mult < 0:
            raise ValueError(f"The weight schedule returned {mult!r} at step {step}; it must be finite and >= 0.")
        return mult

    def _capture_layers(self) -> dict[str, str]:
        layers = {self.source_layer: "input" if self.attribute_to_source_input else "output"}
        layers[self.target_layer] = "output"
        return layers

    def _call_indices(self, num_calls: int) -> list[int]:
        if self.calls == "first":
            return [0]
        if self.calls == "all":
            return list(range(num_calls))
        if self.calls >= num_calls:
            raise RuntimeError(
                f"ExplanationRegularization(calls={self.calls}) but the layers ran only {num_calls} time(s) this step."
            )
        return [int(self.calls)]

    def _wrapped_step(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from reprlens.capture import LayerCapture

        trainer, pl_module = self._trainer, self._module
        if trainer is None or not self._should_regularize(trainer):
            return original(*args, **kwargs)
        detect = self._head is None and self.detect_head and not self._head_checked
        capture = LayerCapture(pl_module, self._capture_layers(), record_order=detect)
        with capture:
            output = original(*args, **kwargs)
        if output is None:
            return None
        if isinstance(output, Tensor):
            loss = output
        elif isinstance(output, Mapping):
            if "loss" not in output:
                raise TypeError(
                    "ExplanationRegularization: training_step returned a dict without a 'loss' key; return the"
                    " loss as a Tensor or under 'loss'."
                )
            loss = output["loss"]
        else:
            raise TypeError(
                "ExplanationRegularization: training_step must return a Tensor, a dict with 'loss' or None, but"
                f" returned {type(output).__name__}."
            )
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise RuntimeError(
                "ExplanationRegularization: the loss returned by training_step does not require grad, so the"
                " explanation term cannot be trained. Return a loss computed from the model's outputs."
            )
        sources = capture.activations.get(self.source_layer, [])
        targets = capture.activations.get(self.target_layer, [])
        if not sources or not targets:
            raise RuntimeError(
                f"ExplanationRegularization: the layers {self.source_layer!r} and/or {self.target_layer!r} did not"
                " run during training_step; check the layer names against the module's forward."
            )
        with extra_forward():  # invisible to other recorders (TrainingTrace)
            return self._regularize(output, loss, capture, sources, targets, detect, pl_module, trainer, args, kwargs)

    def _regularize(self, output: Any, loss: Tensor, capture: Any, sources: list[Tensor], targets: list[Tensor],
                    detect: bool, pl_module: Any, trainer: Any, args: tuple, kwargs: dict) -> Any:
        if detect:
            self._head_checked = True
            self._head = self._detect_head(capture, sources[0], targets[0])
        batch = args[0] if args else kwargs.get("batch")
        step = int(trainer.global_step)
        mult = self._weight_multiplier(step)
        reg = self.regularizer
        reg.set_weights(
            informativeness=self._base_weights["informativeness"] * mult,
            disentanglement=self._base_weights["disentanglement"] * mult,
        )
        reg.set_head(self._head)
        indices = self._call_indices(min(len(sources), len(targets)))
        ref_source = ref_target = None
        if reg.w_informativeness > 0:
            ref_source, ref_target = self._reference(batch, pl_module)
        terms, score_sums = [], {}
        n = sources[0].shape[0]
        for i in indices:
            h, z = sources[i], targets[i]
            if self.num_samples is not None and self.num_samples < h.shape[0]:
                if self._head is not None:
                    h = h[: self.num_samples]
                elif not self._warned_num_samples:
                    rank_zero_warn(
                        "ExplanationRegularization: `num_samples` needs a head callable (`head=` or `pooled_head=`,"
                        " or a detectable sequential head); on the graph-only path the whole batch is explained."
                    )
                    self._warned_num_samples = True
            if self.num_samples is not None and self.num_samples > h.shape[0] and not self._warned_num_samples:
                rank_zero_warn(
                    f"ExplanationRegularization: num_samples={self.num_samples} is larger than the batch"
                    f" ({h.shape[0]} rows); explaining the whole batch."
                )
                self._warned_num_samples = True
            out = reg(h, None if self._head is not None else z, reference_source=ref_source,
                      reference_target=ref_target, generator=self._generator)
            terms.append(out.loss)
            for k, v in out.scores.items():
                score_sums[k] = score_sums.get(k, 0) + v
            n = h.shape[0]
        term = sum(terms) / len(terms)
        scores = {k: v / len(indices) for k, v in score_sums.items()}
        finite = torch.isfinite(term)
        if self.nonfinite == "raise":
            if not bool(finite):
                bad = [k for k, v in scores.items() if not torch.isfinite(v)]
                raise FloatingPointError(
                    f"ExplanationRegularization: non-finite explanation term at step {step} (scores {bad});"
                    " nonfinite='raise'. Check the inputs and activations for NaN/Inf."
                )
        else:
            term = torch.where(finite, term, torch.zeros_like(term))
            if self._nonfinite_count is not None:
                self._nonfinite_count += (~finite).long()
            if self.nonfinite == "skip_step":
                bad = ~(finite & torch.isfinite(loss.detach()))
                self._bad_step = bad if self._bad_step is None else (self._bad_step | bad)
        new_loss = loss + term.to(loss.dtype)
        self.num_regularized_steps += 1
        for name, value in scores.items():
            pl_module.log(f"{self.log_prefix}{name}", value, on_step=True, on_epoch=False, batch_size=n)
        if self._nonfinite_count is not None and self.nonfinite != "raise":
            pl_module.log(f"{self.log_prefix}nonfinite_count", self._nonfinite_count.float(), on_step=True,
                          on_epoch=False, batch_size=n)
        if isinstance(output, Tensor):
            return new_loss
        new_output = dict(output)
        new_output["loss"] = new_loss
        return new_output

    # ------------------------------------------------------------------ noise reference
    def _noise_inputs(self, x: Tensor) -> Tensor:
        return _shared.noise_inputs(x, self.noise, self.num_noise, self._generator)

    def _reference(self, batch: Any, pl_module: Any) -> tuple[Tensor, Tensor | None]:
        from reprlens.capture import LayerCapture

        x = self.inputs_fn(batch)
        if not isinstance(x, Tensor):
            raise TypeError(f"`inputs_fn` must return a Tensor, but returned {type(x).__name__}.")
        noise = self._noise_inputs(x)
        with preserve_batchnorm_buffers(pl_module), torch.enable_grad(), LayerCapture(pl_module, self._capture_layers()) as cap:
            self.forward_fn(pl_module, noise)
        ref_h = cap.activations[self.source_layer][0]
        ref_z = cap.activations[self.target_layer][0] if self._head is None else None
        if self._head is not None:
            ref_h = ref_h.detach().requires_grad_(True)
        return ref_h, ref_z

    # ------------------------------------------------------------------ head detection
    def _detect_head(self, capture: Any, h: Tensor, z: Tensor) -> Callable[[Tensor], Tensor] | None:
        """Build a sequential head from the leaf modules that ran between source and target; keep it only
        if it recomputes z from h (relative error <= 1e-4)."""
        from reprlens.attribution import PooledHead

        order: list[str] = list(getattr(capture, "execution_order", []) or [])
        root = unwrap_model(self._module)
        modules = dict(root.named_modules())
        src = self.source_layer
        if src not in order or self.target_layer not in order:
            return None
        start = order.index(src)
        end = order.index(self.target_layer)
        if end <= start:
            return None
        leaves = []
        for name in order[start + 1 : end + 1]:
            mod = modules.get(name)
            if mod is None or len(list(mod.children())) > 0:
                continue
            if name.startswith(src + ".") or name == src:
                continue
            leaves.append(mod)
        if self.attribute_to_source_input:
            leaves.insert(0, modules[src])  # h is the input of the source module: the head starts with it
        if not leaves or len(leaves) > 64:
            return None
        head: Callable[[Tensor], Tensor]
        pool_types = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)
        if isinstance(leaves[0], pool_types) and all(
            (s == 1) for s in torch.nn.modules.utils._ntuple(2)(leaves[0].output_size)
        ):
            rest = [m for m in leaves[1:] if not isinstance(m, nn.Flatten)]
            head = PooledHead(nn.Sequential(*rest)) if rest else PooledHead(nn.Identity())
        else:
            head = nn.Sequential(*leaves)
        try:
            with torch.no_grad(), preserve_batchnorm_buffers(root):
                z_hat = head(h.detach())
            zz = z.detach()
            if z_hat.shape != zz.shape:
                return None
            err = (z_hat.float() - zz.float()).norm() / zz.float().norm().clamp_min(1e-12)
            if not bool(err <= 1e-4):  # one sync, first step only
                return None
        except Exception:  # noqa: BLE001 - any failure means "not a sequential head"
            return None
        return head

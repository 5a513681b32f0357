"""Forward hooks by dotted module name, as a context manager.

:class:`LayerCapture` keeps the output (or the first positional input) of named submodules for every
forward call while it is active and always removes its hooks on exit. Output capture stores the module's
own output tensor and passes a *clone* downstream, so in-place operations after the layer (torchvision's
``ReLU(inplace=True)``) rewrite the clone, never the stored tensor, whose autograd history is intact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from reprlens.utils import get_module, strip_wrapper_prefix, unwrap_model

__all__ = ["LayerCapture"]

Where = Literal["output", "input"]


class LayerCapture:
    """Record activations of named submodules during forward passes (context manager).

    Args:
        model: the module to hook (DDP / ``torch.compile`` wrappers are unwrapped).
        layers: dotted module names (``"backbone.layer3"``), a single name, or a mapping from name to
            ``"output"`` (default) or ``"input"`` (the first positional input, captured with a
            forward-pre-hook).
        clone: pass a clone of the captured tensor downstream (default) so in-place ops cannot rewrite the
            stored tensor. ``clone=False`` saves memory for outputs that are never modified in place.
        detach: store detached tensors (no autograd history; for monitoring only).
        record_order: also record the dotted names of all submodules in the order their forward finishes
            (:attr:`execution_order`), e.g. to find the modules between two layers.
        requires_grad: if a captured tensor does not require grad (frozen layers, no-grad inputs), replace it
            by a leaf that does, so attributions w.r.t. it can be taken. Ignored when ``detach=True``.

    Attributes:
        activations: ``{name: [tensor of call 0, tensor of call 1, ...]}``, kept after exit until the
            next ``__enter__`` or :meth:`clear`.
        execution_order: module names in forward-completion order (``record_order=True`` only).

    Raises:
        ValueError: unknown layer name (the message lists the closest valid names) or bad ``layers`` value.
        RuntimeError: entering a capture that is already active.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
        >>> with LayerCapture(net, ["0"]) as cap:
        ...     _ = net(torch.randn(5, 3))
        >>> cap.get("0").shape, len(net[0]._forward_hooks)
        (torch.Size([5, 4]), 0)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | Mapping[str, Where],
        *,
        clone: bool = True,
        detach: bool = False,
        record_order: bool = False,
        requires_grad: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected argument `model` to be a torch.nn.Module, but got {type(model).__name__}.")
        if isinstance(layers, str):
            spec: dict[str, str] = {layers: "output"}
        elif isinstance(layers, Mapping):
            spec = dict(layers)
        elif isinstance(layers, Sequence):
            spec = {name: "output" for name in layers}
        else:
            raise TypeError(
                "Expected argument `layers` to be a dotted module name, a sequence of names or a mapping "
                f"name -> 'output'/'input', but got {type(layers).__name__}."
            )
        if not spec:
            raise ValueError("Expected at least one layer name in `layers`, but got none.")
        for name, where in spec.items():
            if where not in ("output", "input"):
                raise ValueError(
                    f"Expected the capture point of layer {name!r} to be 'output' or 'input', but got {where!r}."
                )
        self.model = model
        self._root = unwrap_model(model)
        self._spec = spec
        self._modules = {name: get_module(self._root, name) for name in spec}
        self.clone = bool(clone)
        self.detach = bool(detach)
        self.record_order = bool(record_order)
        self.requires_grad = bool(requires_grad)
        self.activations: dict[str, list[Any]] = {name: [] for name in spec}
        self.execution_order: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False
        self._paused = False

    # ------------------------------------------------------------------ hooks
    def _prepare(self, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Return (tensor to store, tensor to pass downstream or None for unchanged)."""
        if self.detach:
            stored = t.detach()
            if self.clone:
                stored = stored.clone()
            return stored, None
        if self.requires_grad and not t.requires_grad and t.is_floating_point():
            stored = t.detach().requires_grad_(True)
            return stored, stored.clone() if self.clone else stored
        if self.clone:
            return t, t.clone()
        return t, None

    def _output_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._paused:
                return None
            if isinstance(output, Tensor):
                stored, passed = self._prepare(output)
                self.activations[name].append(stored)
                return passed
            if isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
                pairs = [self._prepare(o) if isinstance(o, Tensor) else (o, None) for o in output]
                self.activations[name].append(type(output)(p[0] for p in pairs))
                if all(p[1] is None for p in pairs):
                    return None
                return type(output)(o if p[1] is None else p[1] for o, p in zip(output, pairs))
            self.activations[name].append(output)  # not a tensor: stored as is
            return None

        return hook

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> Any:
            if self._paused:
                return None
            if not args or not isinstance(args[0], Tensor):
                raise RuntimeError(
                    f"LayerCapture: input capture of {name!r} needs a Tensor as the first positional input, "
                    f"but got {type(args[0]).__name__ if args else 'no positional input'}; capture the output "
                    "of the previous module instead."
                )
            stored, passed = self._prepare(args[0])
            self.activations[name].append(stored)
            if passed is None:
                return None
            return (passed, *args[1:])

        return hook

    def _order_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._paused:
                self.execution_order.append(name)

        return hook

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> LayerCapture:
        if self._active:
            raise RuntimeError("LayerCapture is already active; it cannot be entered twice (nested `with`).")
        self.clear()
        try:
            if self.record_order:
                for mname, module in self._root.named_modules():
                    if mname:
                        self._handles.append(module.register_forward_hook(self._order_hook(mname)))
            for name, where in self._spec.items():
                module = self._modules[name]
                if where == "output":
                    self._handles.append(module.register_forward_hook(self._output_hook(name)))
                else:
                    self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
        except BaseException:
            self._remove()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._remove()
        return False

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False
        self._paused = False

    # ------------------------------------------------------------------ access
    @property
    def active(self) -> bool:
        """Whether the hooks are currently registered."""
        return self._active

    @property
    def layers(self) -> dict[str, str]:
        """The captured layer names and their capture points."""
        return dict(self._spec)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Temporarily stop recording (hooks stay registered and pass tensors through unchanged)."""
        previous = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = previous

    def clear(self) -> None:
        """Drop all recorded activations and the execution order."""
        self.activations = {name: [] for name in self._spec}
        self.execution_order = []

    def num_calls(self, name: str) -> int:
        """Number of forward calls recorded for layer ``name``."""
        return len(self.activations[self._key(name)])

    def _key(self, name: str) -> str:
        if name in self.activations:
            return name
        stripped = strip_wrapper_prefix(name)
        for key in self.activations:
            if strip_wrapper_prefix(key) == stripped:
                return key
        raise ValueError(
            f"Layer {name!r} is not captured by this LayerCapture; captured layers: {sorted(self._spec)}."
        )

    def get(self, name: str, call: int = 0) -> Tensor:
        """The activation of layer ``name`` recorded on forward call ``call`` (negative counts from the end).

        Raises:
            ValueError: ``name`` is not captured, or ``call`` is out of range.
            RuntimeError: the layer did not run while the capture was active.
        """
        calls = self.activations[self._key(name)]
        if not calls:
            raise RuntimeError(
                f"Layer {name!r} recorded no forward call: run the model inside `with LayerCapture(...)` and "
                "check that the layer is used by its forward."
            )
        if isinstance(call, bool) or not isinstance(call, int) or not -len(calls) <= call < len(calls):
            raise ValueError(
                f"Expected argument `call` to be an int in [{-len(calls)}, {len(calls)}) for layer {name!r}, "
                f"but got {call!r}."
            )
        return calls[call]


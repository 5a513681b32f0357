"""Small shared helpers: module lookup by dotted name, argument validation, lazy optional imports."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import math
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

__all__ = [
    "check_finite_nonneg",
    "check_positive_int",
    "closest_names",
    "extra_forward",
    "in_extra_forward",
    "get_module",
    "module_names",
    "require",
    "strip_wrapper_prefix",
    "unwrap_model",
]

_WRAPPER_PREFIXES = ("module.", "_forward_module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module inside DDP / Fabric / ``torch.compile`` wrappers.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(net) is net
        True
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("module", "_forward_module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and type(model).__name__ in {
                "DistributedDataParallel",
                "DataParallel",
                "_FabricModule",
                "_LightningModuleWrapperBase",
                "_LightningPrecisionModuleWrapperBase",
                "OptimizedModule",
            }:
                model = inner
                break
    return model


def strip_wrapper_prefix(name: str) -> str:
    """Remove DDP/compile prefixes (``module.``, ``_orig_mod.``) from a dotted module name.

    Example:
        >>> strip_wrapper_prefix("module.backbone.layer1")
        'backbone.layer1'
    """
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def module_names(model: nn.Module) -> list[str]:
    """All dotted submodule names of ``model`` (the root, named ``""``, excluded)."""
    return [name for name, _ in unwrap_model(model).named_modules() if name]


def closest_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` candidates closest to ``name`` (difflib ratio, then substring matches).

    Example:
        >>> closest_names("backbone.layr1", ["backbone.layer1", "backbone.layer2", "head"], n=2)
        ['backbone.layer1', 'backbone.layer2']
    """
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if len(close) < n:
        tail = name.split(".")[-1]
        for cand in candidates:
            if cand not in close and tail and tail in cand:
                close.append(cand)
            if len(close) >= n:
                break
    return close


def get_module(model: nn.Module, name: str, *, what: str = "layer") -> nn.Module:
    """Return the submodule ``name`` (dotted path) of ``model``.

    Wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``) are accepted.

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: if no such submodule exists; the message lists the closest valid names.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> get_module(net, "0")
        Linear(in_features=2, out_features=3, bias=True)
    """
    if not isinstance(name, str):
        raise TypeError(f"Expected the {what} name to be a dotted module path (str), but got {type(name).__name__}.")
    root = unwrap_model(model)
    modules = dict(root.named_modules())
    key = strip_wrapper_prefix(name)
    if key in modules and key != "":
        return modules[key]
    if key == "" and name != "":
        return root
    names = [n for n in modules if n]
    close = closest_names(key, names)
    hint = f" Closest valid names: {', '.join(repr(c) for c in close)}." if close else ""
    raise ValueError(
        f"Unknown {what} {name!r}: {type(root).__name__} has no submodule with that dotted name.{hint}"
        " List all names with `[n for n, _ in model.named_modules()]`."
    )


def require(module: str, extra: str, purpose: str) -> Any:
    """Import an optional dependency or raise an ImportError naming the pip extra that provides it.

    Example:
        >>> require("math", extra="none", purpose="arithmetic").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{purpose} needs the optional dependency `{module}`. Install it with "
            f"`pip install 'reprlens[{extra}]'` (or `pip install {module.split('.')[0]}`)."
        ) from err


def check_positive_int(value: Any, name: str, *, allow_none: bool = False, minimum: int = 1) -> None:
    """Raise a clear error unless ``value`` is an int >= ``minimum`` (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected argument `{name}` to be an integer >= {minimum}, but got {value!r}.")


def check_finite_nonneg(value: Any, name: str) -> float:
    """Raise a clear error unless ``value`` is a finite float >= 0; return it as float."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Expected argument `{name}` to be a number, but got {type(value).__name__}.") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"Expected argument `{name}` to be finite and >= 0, but got {value!r}.")
    return out


_EXTRA = threading.local()


@contextlib.contextmanager
def extra_forward() -> Iterator[None]:
    """Mark forwards/backwards that reprlens runs for itself (noise references, head re-runs, inner VJPs).

    Recorders that observe training (e.g. :class:`reprlens.callbacks.TrainingTrace`) ignore everything that
    happens inside this context, so one reprlens callback's extra work never shows up in another's record.

    Example:
        >>> with extra_forward():
        ...     in_extra_forward()
        True
        >>> in_extra_forward()
        False
    """
    _EXTRA.depth = getattr(_EXTRA, "depth", 0) + 1
    try:
        yield
    finally:
        _EXTRA.depth -= 1


def in_extra_forward() -> bool:
    """Whether the current thread is inside :func:`extra_forward`."""
    return getattr(_EXTRA, "depth", 0) > 0

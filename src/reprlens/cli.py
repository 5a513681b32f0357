"""Command-line entry points: ``reprlens-train`` (the Hydra main job) and ``reprlens-report``.

``reprlens-train`` composes ``conf/train.yaml`` (shipped in the wheel as the package ``reprlens.conf``)
with the command-line overrides, then :func:`run` trains and writes everything under a dated run
directory (``outputs/YYYY-MM-DD/HH-MM-SS/``): checkpoints, TensorBoard and CSV logs, Hydra's saved
config (``.hydra/``) and ``summary.json`` with the final metrics and the linear-probe result.

Examples (shell)::

    reprlens-train                                   # SimCLR on shapes, a few epochs
    reprlens-train model=autoencoder data=digits trainer.max_epochs=5
    reprlens-train -m model.lr=1e-3,2e-3             # a 2-job sweep under multirun/
    reprlens-train trainer=ddp                       # 2 CPU processes (gloo)
    python -m reprlens.train trainer=debug           # same entry point as a module

The run function is importable, so a composed config can be trained without a subprocess:

    >>> from hydra import compose, initialize_config_module
    >>> with initialize_config_module("reprlens.conf", version_base="1.3"):
    ...     cfg = compose("train", overrides=["trainer=debug"])
    >>> sorted(k for k in ("data", "model", "trainer") if k in cfg)
    ['data', 'model', 'trainer']
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["instantiate_callbacks", "instantiate_loggers", "report", "run", "train"]

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
_REQUIRED_KEYS = ("data", "model", "trainer")


def _instantiate_group(group: Any, key: str) -> list[Any]:
    """Instantiate every entry of a ``{name: config}`` dict (or a list) of ``_target_`` configs.

    ``None`` entries are skipped, so ``callbacks.linear_probe=null`` disables one callback.
    """
    from hydra.utils import instantiate

    if group is None:
        return []
    if isinstance(group, (DictConfig, Mapping)):
        items = list(group.items())
    elif isinstance(group, (ListConfig, list, tuple)):
        items = [(f"{i}", conf) for i, conf in enumerate(group)]
    else:
        raise TypeError(
            f"Expected `{key}` to be a dict of {{name: config with `_target_`}} (or a list of such configs), "
            f"but got {type(group).__name__}: {group!r}. Select configs from the `{key}` group, e.g. "
            f"`{key}=default`, or set `{key}=none`."
        )
    objects = []
    for name, conf in items:
        if conf is None:
            continue
        if not isinstance(conf, (DictConfig, Mapping)) or "_target_" not in conf:
            raise ValueError(
                f"Expected `{key}.{name}` to be a config with a `_target_` (the class to build), but got "
                f"{conf!r}. Give it a `_target_`, or set `{key}.{name}=null` to leave it out."
            )
        log.info("Instantiating %s.%s <%s>", key, name, conf["_target_"])
        objects.append(instantiate(conf, _convert_="all"))
    return objects


def instantiate_callbacks(callbacks_cfg: Any) -> list[Any]:
    """Build the Lightning callbacks of a ``callbacks`` config (``{name: config}``; ``None`` entries skipped).

    Args:
        callbacks_cfg: the ``cfg.callbacks`` node: a dict of callback configs, each with a ``_target_``,
            a list of such configs, or ``None``.

    Returns:
        The callbacks, in config order.

    Raises:
        ValueError: an entry is neither ``None`` nor a config with a ``_target_``.
        TypeError: ``callbacks_cfg`` is neither a dict, a list nor ``None``.

    Example:
        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"lr": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor"},
        ...                         "off": None})
        >>> [type(cb).__name__ for cb in instantiate_callbacks(cfg)]
        ['LearningRateMonitor']
    """
    return _instantiate_group(callbacks_cfg, "callbacks")


def instantiate_loggers(logger_cfg: Any) -> list[Any]:
    """Build the Lightning loggers of a ``logger`` config (``{name: config}``; ``None`` entries skipped).

    Args:
        logger_cfg: the ``cfg.logger`` node: a dict of logger configs, each with a ``_target_``, a list
            of such configs, or ``None``.

    Returns:
        The loggers, in config order (empty: no logging).

    Example:
        >>> import tempfile
        >>> from omegaconf import OmegaConf
        >>> d = tempfile.mkdtemp()
        >>> cfg = OmegaConf.create({"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": d}})
        >>> [type(lg).__name__ for lg in instantiate_loggers(cfg)]
        ['CSVLogger']
    """
    return _instantiate_group(logger_cfg, "logger")


def _check_config(cfg: Any) -> None:
    if not isinstance(cfg, DictConfig):
        raise TypeError(
            f"Expected the composed Hydra config (omegaconf.DictConfig), but got {type(cfg).__name__}. "
            "Compose it with hydra.compose('train', overrides=[...]) under initialize_config_module('reprlens.conf')."
        )
    missing = [k for k in _REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise ValueError(
            f"Expected the config to have {list(_REQUIRED_KEYS)} (each with a `_target_`), but {missing} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Select them from their groups, e.g. "
            "`data=shapes model=simclr trainer=default`."
        )


def _reg_weight(cfg: DictConfig) -> float | None:
    """The optional top-level ``reg_weight`` key (regularizer-weight sweeps), as a float, or None when unset."""
    value = cfg.get("reg_weight")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"Expected `reg_weight` to be a finite number >= 0 (0: no regularizer, the baseline), but got {value!r}. "
            "Set e.g. `reg_weight=0.1`, or `reg_weight=null` to leave callbacks.regularizer as configured."
        )
    return float(value)


def _apply_reg_weight(cfg: DictConfig) -> Any:
    """``cfg.callbacks`` with ``regularizer`` dropped when the top-level ``reg_weight`` is 0 (the baseline).

    ``conf/experiment/sweep_regularizer.yaml`` interpolates ``reg_weight`` into the regularizer's weights;
    ``ExplanationRegularization`` needs a weight > 0, so weight 0 means "no regularizer" and the entry is removed.
    """
    callbacks_cfg = cfg.get("callbacks")
    if _reg_weight(cfg) != 0.0 or not isinstance(callbacks_cfg, DictConfig) or "regularizer" not in callbacks_cfg:
        return callbacks_cfg
    log.info("reg_weight=0: running without the explanation regularizer (the baseline)")
    # a plain dict of the nodes: they keep their parent, so interpolations such as ${paths.output_dir} resolve
    return {k: callbacks_cfg[k] for k in callbacks_cfg if k != "regularizer"}


def _requested_gpus(devices: Any) -> tuple[int, int] | None:
    """``(count, highest index + 1)`` of a Trainer ``devices`` value, or None when Lightning picks ("auto", -1)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return None if devices < 0 else (devices, devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1", ""):
            return None
        if "," not in text:
            try:
                n = int(text)
            except ValueError:
                return None
            return None if n < 0 else (n, n)
        devices = [int(part) for part in text.split(",") if part.strip()]
    if isinstance(devices, (list, tuple, ListConfig)):
        ids = [int(d) for d in devices]
        return (len(ids), max(ids) + 1) if ids else None
    return None


def _check_devices(cfg: DictConfig) -> None:
    """Refuse more GPUs than the machine has, before Lightning answers with "No supported gpu backend found!"."""
    trainer_cfg = cfg.trainer
    accelerator = str(trainer_cfg.get("accelerator", "auto")).lower()
    if accelerator not in ("gpu", "cuda", "auto"):
        return
    requested = _requested_gpus(trainer_cfg.get("devices", "auto"))
    if requested is None:
        return
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator == "auto" and available == 0:
        return  # "auto" without GPUs runs on CPU processes (like trainer=ddp)
    count, needed = requested
    if needed > available:
        devices = OmegaConf.to_container(trainer_cfg.devices) if isinstance(
            trainer_cfg.get("devices"), ListConfig) else trainer_cfg.get("devices")
        fixes = (
            f"use `trainer.devices={available}`, or `trainer=ddp` for 2 processes on CPU (gloo)"
            if available
            else "use `trainer=cpu` (one process) or `trainer=ddp` (2 CPU processes, gloo)"
        )
        raise ValueError(
            f"trainer.devices={devices!r} asks for {count} GPU{'s' if count != 1 else ''}"
            + (f" (up to index {needed - 1})" if needed != count else "")
            + f" with trainer.accelerator={accelerator!r}, but this machine has {available} visible CUDA "
            f"GPU{'s' if available != 1 else ''} (torch.cuda.device_count()={available}). To fix it, {fixes}, "
            "or check CUDA_VISIBLE_DEVICES."
        )


def _output_dir(cfg: DictConfig, trainer: Any) -> Path:
    """The run directory: ``paths.output_dir`` when it resolves, else the trainer's ``default_root_dir``."""
    try:
        out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    except Exception:  # `${hydra:...}` outside a Hydra run
        out = None
    return Path(out if out is not None else trainer.default_root_dir)


def _to_float(value: Any) -> float | None:
    """A Python float from a scalar tensor / number, or None when it is not a scalar."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return None
            return float(value.detach().cpu().item())  # after training: no step is slowed down
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, (int, float)):
            return float(value)
    except (TypeError, ValueError):  # pragma: no cover - exotic metric types
        return None
    return None


def _metrics_to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        f = _to_float(value)
        if f is not None:
            out[str(name)] = f
    return dict(sorted(out.items()))


def _json_safe(obj: Any) -> Any:
    """Nested dicts/lists of plain JSON values; tensors become floats or lists, non-finite floats None."""
    import torch

    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.detach().cpu().tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return _json_safe(obj.item())
    if hasattr(obj, "_asdict"):  # named tuples
        return _json_safe(obj._asdict())
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return _json_safe(dataclasses.asdict(obj))
    return str(obj)


def _probe_results(callbacks: Sequence[Any], metrics: Mapping[str, float]) -> dict[str, Any]:
    """The ``results`` of every LinearProbe callback (``linear_probe``, ``linear_probe_1``, ...).

    When the callback ran in other processes (strategy ``ddp_spawn``) its ``results`` stay there; the
    metrics under its ``prefix`` came back in ``trainer.callback_metrics`` and are used instead.
    """
    out: dict[str, Any] = {}
    for cb in callbacks:
        if not any(klass.__name__ == "LinearProbe" for klass in type(cb).__mro__):  # subclasses too
            continue
        res = getattr(cb, "results", None)
        if not res:
            prefix = str(getattr(cb, "prefix", "probe/"))
            res = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
        key = "linear_probe" if not out else f"linear_probe_{len(out)}"
        out[key] = _json_safe(res)
    return out


def _last_checkpoint(ckpt_cb: Any) -> str | None:
    """``last.ckpt`` of a ModelCheckpoint (also when it was written by a spawned worker process)."""
    if ckpt_cb is None:
        return None
    path = getattr(ckpt_cb, "last_model_path", "") or ""
    if not path and getattr(ckpt_cb, "save_last", False) and getattr(ckpt_cb, "dirpath", None):
        candidate = Path(ckpt_cb.dirpath) / f"{ckpt_cb.CHECKPOINT_NAME_LAST}{ckpt_cb.FILE_EXTENSION}"
        path = str(candidate) if candidate.is_file() else ""
    return path or None


def _optimized_value(cfg: DictConfig, metrics: Mapping[str, float]) -> float | None:
    name = cfg.get("optimized_metric")
    if name is None:
        return None
    if name not in metrics:
        msg = (
            f"optimized_metric={name!r} was not logged; the run logged {sorted(metrics)}. Set "
            "`optimized_metric=<one of them>` (or null), or enable the callback that logs it."
        )
        if _hydra_mode() == "MULTIRUN":
            raise ValueError(msg)  # a sweeper needs the value
        log.warning(msg)
        return None
    return metrics[name]


def _hydra_mode() -> str | None:
    """``"RUN"`` / ``"MULTIRUN"`` inside a Hydra job, None outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return str(HydraConfig.get().mode).rsplit(".", 1)[-1]
    except Exception:  # pragma: no cover - Hydra internals
        return None
    return None


def _check_launcher(trainer: Any) -> None:
    """Lightning's script launcher (strategy="ddp") re-runs ``sys.argv``: it cannot work inside a sweep."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if type(launcher).__name__ == "_SubprocessScriptLauncher" and _hydra_mode() == "MULTIRUN":
        raise RuntimeError(
            "trainer=ddp (strategy 'ddp') cannot run inside a multirun (-m): Lightning's DDP launcher re-runs the "
            "whole command line in each worker, which would start the sweep again. Run the DDP jobs one at a time "
            "(without -m), or add `+trainer.strategy.start_method=spawn` (strategy 'ddp_spawn': workers started "
            "with multiprocessing) to the sweep."
        )


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (and optionally test) from a composed reprlens config; write ``summary.json``.

    Steps: seed everything, instantiate ``cfg.data`` (a LightningDataModule), ``cfg.model`` (a
    LightningModule), the ``cfg.callbacks`` and ``cfg.logger`` dicts (``None`` entries skipped) and
    ``cfg.trainer``; ``trainer.fit`` when ``cfg.train``, ``trainer.test`` when ``cfg.test`` (with the best
    checkpoint when one was saved); then, on global rank 0, write ``summary.json`` into the run directory
    (``paths.output_dir``) with the final ``trainer.callback_metrics``, the LinearProbe result, the
    checkpoint paths and ``optimized_metric``.

    Args:
        cfg: the composed ``train`` config (see ``conf/train.yaml``).

    Returns:
        The final metrics as ``{name: float}`` (``trainer.callback_metrics`` after fit, then test).

    Raises:
        ValueError: ``data``, ``model`` or ``trainer`` is missing, a callback/logger entry has no ``_target_``, or
            ``trainer.devices`` asks for more GPUs than the machine has.
        TypeError: ``cfg`` is not a DictConfig.
        RuntimeError: strategy ``ddp`` (Lightning's script launcher) inside a Hydra multirun.

    Example:
        >>> from hydra import compose, initialize_config_module
        >>> with initialize_config_module("reprlens.conf", version_base="1.3"):  # doctest: +SKIP
        ...     cfg = compose("train", overrides=["trainer=debug", "paths.output_dir=/tmp/run"])
        ...     metrics = run(cfg)
    """
    _check_config(cfg)
    _check_devices(cfg)
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)

    log.info("Instantiating datamodule <%s>", cfg.data.get("_target_"))
    # _convert_="all": plain lists/dicts, so save_hyperparameters() keeps checkpoints loadable with
    # torch.load(weights_only=True) (an omegaconf ListConfig in the hyper-parameters is not)
    datamodule = instantiate(cfg.data, _convert_="all")
    log.info("Instantiating model <%s>", cfg.model.get("_target_"))
    model = instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_callbacks(_apply_reg_weight(cfg))
    loggers = instantiate_loggers(cfg.get("logger"))
    log.info("Instantiating trainer <%s>", cfg.trainer.get("_target_"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers if loggers else False, _convert_="all")

    _check_launcher(trainer)

    if loggers:
        hparams = {
            k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg.get(k), DictConfig) else cfg.get(k)
            for k in ("task_name", "seed", "data", "model")
        }
        for lg in loggers:
            lg.log_hyperparams(hparams)

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update(_metrics_to_floats(trainer.callback_metrics))

    if cfg.get("test", False):
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        if ckpt is None and not cfg.get("train", True):
            ckpt = cfg.get("ckpt_path")  # test=true train=false ckpt_path=...: evaluate a saved model
        if ckpt is None:
            log.warning("No checkpoint was saved: testing the current weights.")
        trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt)
        metrics.update(_metrics_to_floats(trainer.callback_metrics))

    if trainer.is_global_zero:
        spawned = type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher"
        out_dir = _output_dir(cfg, trainer)
        ckpt_cb = trainer.checkpoint_callback
        summary = {
            "task_name": cfg.get("task_name"),
            "seed": cfg.get("seed"),
            # read by reprlens-report's regularized-vs-baseline comparison and the sweep's results table
            "regularized": any(type(cb).__name__ == "ExplanationRegularization" for cb in trainer.callbacks),
            "reg_weight": _reg_weight(cfg),
            "optimized_metric": cfg.get("optimized_metric"),
            "optimized_value": metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None,
            "metrics": metrics,
            **_probe_results(trainer.callbacks, metrics),
            "best_model_path": getattr(ckpt_cb, "best_model_path", None) or None,
            "last_model_path": _last_checkpoint(ckpt_cb),
            # with ddp_spawn the loops ran in the worker processes: their counters are not known here
            "epochs": None if spawned else int(trainer.current_epoch),
            "global_step": None if spawned else int(trainer.global_step),
            "world_size": int(trainer.world_size),
            "output_dir": str(out_dir),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / SUMMARY_FILE
        path.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
        log.info("Wrote %s", path)
        if cfg.get("report", True):
            _write_report(out_dir)
    return metrics


def _write_report(out_dir: Path) -> None:
    """Build ``report.html`` in the run directory; a failure is logged, never fatal (the run itself succeeded)."""
    try:
        from reprlens.report import build_report

        log.info("Wrote %s", build_report(out_dir))
    except Exception as err:  # noqa: BLE001 - the report is a by-product; `reprlens-report RUN_DIR` can retry
        log.warning("Could not build the report (%s: %s); rebuild it with `reprlens-report %s`.",
                    type(err).__name__, err, out_dir)


@hydra.main(version_base="1.3", config_path="pkg://reprlens.conf", config_name="train")
def train(cfg: DictConfig) -> float | None:
    """``reprlens-train``: the Hydra main job (see the module docstring and ``conf/README.md``).

    Returns the value of ``cfg.optimized_metric`` (for sweepers such as Optuna), or None when it is null.
    """
    metrics = run(cfg)
    return _optimized_value(cfg, metrics)


def report(argv: Sequence[str] | None = None) -> int:
    """``reprlens-report RUN_DIR [--out FILE]``: build the HTML report of a finished run.

    Calls ``reprlens.report.build_report(run_dir, out=...)`` and prints the path of the HTML file; without
    that module it prints a "not implemented yet" message and returns exit code 2.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit code (0: report written; 2: bad arguments or not implemented yet).

    Example:
        >>> import tempfile
        >>> report([tempfile.mkdtemp()]) in (0, 2)  # doctest: +SKIP
        True
    """
    parser = argparse.ArgumentParser(
        prog="reprlens-report", description="Build the HTML report of a finished reprlens-train run."
    )
    parser.add_argument("run_dir", type=Path, help="run directory written by reprlens-train (has summary.json)")
    parser.add_argument("--out", type=Path, default=None, help="HTML file to write (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.error(f"RUN_DIR must be an existing directory written by reprlens-train, got {str(args.run_dir)!r}")
    try:
        module = importlib.import_module("reprlens.report")
    except ModuleNotFoundError as err:
        if err.name != "reprlens.report":
            raise
        module = None
    build = getattr(module, "build_report", None)
    if build is None:
        print(
            "reprlens-report: not implemented yet (reprlens.report.build_report does not exist in this "
            f"version); the run's results are in {args.run_dir / SUMMARY_FILE} and its TensorBoard/CSV logs.",
            file=sys.stderr,
        )
        return 2
    result = build(args.run_dir) if args.out is None else build(args.run_dir, out=args.out)
    if result is not None:
        print(result)
    return 0

"""Integration: experiment configs, the regularizer-weight sweep and its results table, and users' own pipelines
(their own LightningModule written against ``pytorch_lightning`` with lightly-style tuple batches, their own
logger, their own Hydra app composing reprlens callback configs). See docs/integration.md.

The user-Hydra-app composition test is tests/test_cli.py::test_user_hydra_app_uses_reprlens_configs; here the
user app also trains its own module with the composed reprlens callbacks.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from reprlens.cli import _apply_reg_weight, instantiate_callbacks
from reprlens.utils import get_module

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def _compose(overrides: list[str]):
    with initialize_config_module("reprlens.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def _layer_names(conf) -> list[str]:
    names = []
    for key in ("source_layer", "target_layer", "layer", "layers", "encoder"):
        v = conf.get(key)
        names += [v] if isinstance(v, str) else list(v or [])
    return names


# ------------------------------------------------------------------------------------------ experiment configs
def test_every_study_has_an_experiment_config():
    studies = {p.name for p in (ROOT / "experiments").iterdir() if (p / "run.py").is_file()}
    expected = {
        "constraints": "autoencoder_digits_regularized", "relax": "relax_shapes", "invert": "invert_shapes",
        "trace": "trace_digits", "explainer": "explainer_shapes", "linear_probe": "linear_probe_shapes",
    }
    assert studies <= set(expected), f"a study without an experiment config: {studies - set(expected)}"
    assert {expected[s] for s in studies} <= set(EXPERIMENTS)
    assert "sweep_regularizer" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_config_composes_and_names_existing_layers(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    assert cfg.task_name == experiment
    model = instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_callbacks(_apply_reg_weight(cfg))
    assert callbacks, experiment
    checked = 0
    for name, conf in cfg.callbacks.items():
        if conf is None:
            continue
        for layer in _layer_names(conf):
            get_module(model, layer)  # raises ValueError with the closest names
            checked += 1
    if experiment not in ("autoencoder_digits", "classifier_shapes", "simclr_shapes", "linear_probe_shapes"):
        assert checked > 0, f"{experiment}: no layer-named callback"
    # the model's example input runs (data and model agree on channels and size)
    x = torch.rand(2, cfg.data_info.channels, cfg.data_info.image_size, cfg.data_info.image_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_experiment_config_with_a_missing_layer_names_the_closest():
    cfg = _compose(["experiment=explainer_shapes", "callbacks.explainer.target_layer=features.relu33"])
    model = instantiate(cfg.model, _convert_="all")
    with pytest.raises(ValueError, match="features.relu3"):
        get_module(model, cfg.callbacks.explainer.target_layer)


# ------------------------------------------------------------------------------------------ sweep + reg_weight
def test_sweep_config_interpolates_reg_weight_and_zero_drops_the_regularizer(tmp_path):
    with initialize_config_module("reprlens.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=sweep_regularizer", "reg_weight=0.3"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.reg_weight == "0,0.1,1"
    assert "seed" in cfg.hydra.sweeper.params
    assert cfg.callbacks.regularizer.informativeness == 0.3 == cfg.callbacks.regularizer.disentanglement
    cfg = _compose(["experiment=sweep_regularizer", "reg_weight=0.3", f"paths.output_dir={tmp_path}"])
    names = [type(c).__name__ for c in instantiate_callbacks(_apply_reg_weight(cfg))]
    assert "ExplanationRegularization" in names
    cfg = _compose(["experiment=sweep_regularizer", "reg_weight=0", f"paths.output_dir={tmp_path}"])
    kept = _apply_reg_weight(cfg)
    assert "regularizer" not in kept and "model_checkpoint" in kept
    # the remaining nodes still resolve their interpolations
    assert kept["model_checkpoint"].dirpath == f"{tmp_path}/checkpoints"
    names = [type(c).__name__ for c in instantiate_callbacks(kept)]
    assert "ExplanationRegularization" not in names and "LinearProbe" in names
    # no reg_weight: the config is left as it is
    cfg = _compose(["experiment=simclr_shapes_regularized"])
    assert _apply_reg_weight(cfg) is cfg.callbacks
    cfg = _compose(["experiment=sweep_regularizer", "reg_weight=-1"])
    with pytest.raises(ValueError, match="reg_weight"):
        _apply_reg_weight(cfg)


def test_optuna_config_composes_or_names_the_missing_plugin():
    try:
        import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    except ImportError:
        with initialize_config_module("reprlens.conf", version_base="1.3"):
            with pytest.raises(Exception, match="optuna"):
                compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    else:
        with initialize_config_module("reprlens.conf", version_base="1.3"):
            cfg = compose("train", overrides=["experiment=sweep_regularizer", "hparams_search=optuna"],
                          return_hydra_config=True)
        assert cfg.optimized_metric == "probe/linear_val_acc"


def test_sweep_multirun_writes_summaries_report_and_results_table(tmp_path):
    """reprlens-train -m experiment=sweep_regularizer (tiny sizes): baseline + regularized, results.md/csv."""
    sweep = tmp_path / "sweep"
    exe = BIN / "reprlens-train"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "reprlens.train"]
    args = [
        "-m", "experiment=sweep_regularizer", "reg_weight=0,0.5", "seed=0", f"hydra.sweep.dir={sweep}",
        "data.num_train=64", "data.num_val=32", "data.num_test=32", "data.batch_size=32",
        "model.width=4", "model.projector_hidden_dim=16", "model.projector_out_dim=8",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.num_sanity_val_steps=0", "callbacks.progress_bar=null", "trainer.enable_model_summary=false",
        "trainer.accelerator=cpu", "logger=[csv]", "callbacks.linear_probe.epochs=5",
        "callbacks.linear_probe.progress_bar=false", "callbacks.linear_probe.knn_k=3", "report=false",
    ]
    proc = subprocess.run(cmd + args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    _ok(proc)
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(2)]
    assert [s["regularized"] for s in summaries] == [False, True]
    assert [s["reg_weight"] for s in summaries] == [0.0, 0.5]
    assert not any(k.startswith("reg/") for k in summaries[0]["metrics"])
    assert any(k.startswith("reg/") for k in summaries[1]["metrics"])

    proc = subprocess.run([str(BIN / "reprlens-report"), str(sweep)], env=_env(), capture_output=True, text=True,
                          timeout=300)
    _ok(proc)
    status = json.loads((sweep / "summary.json").read_text())["report"]["sections"] if (
        sweep / "summary.json").is_file() else None
    html = (sweep / "report.html").read_text()
    assert 'id="comparison"' in html and "Mean per group" in html
    assert status is None or status["comparison"] == "ok"
    md = (sweep / "results.md").read_text()
    assert "| reg_weight=0 | 1 |" in md and "| reg_weight=0.5 | 1 |" in md
    assert "probe/linear_val_acc" in md
    with open(sweep / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == ["reg_weight=0", "reg_weight=0.5"]
    for r, s in zip(rows, summaries):
        assert float(r["probe/linear_val_acc"]) == pytest.approx(s["metrics"]["probe/linear_val_acc"])

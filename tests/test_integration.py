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


# ------------------------------------------------------------------------------------------ users' own pipelines
_USER_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


class TupleViews(Dataset):
    """lightly-style samples: ((view1, view2), label, filename); the class is the bright channel."""

    def __init__(self, n, seed, two_views=True):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        base = 0.3 * torch.rand(n, 3, 12, 12, generator=g)
        base[torch.arange(n), self.y] += 0.6
        self.x = base
        self.noise = 0.05 * torch.randn(2, n, 3, 12, 12, generator=g)
        self.two_views = two_views

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if not self.two_views:
            return self.x[i], self.y[i]
        return (self.x[i] + self.noise[0, i], self.x[i] + self.noise[1, i]), self.y[i], f"img_{i}.png"


def nt_xent(z0, z1, t=0.5):
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    sim = z @ z.T / t
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(z0)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def make_module(pl):
    class UserSimCLR(pl.LightningModule):
        """Written like lightly's examples: backbone + projection_head, tuple batches, tensor loss."""

        def __init__(self, lr=1e-2):
            super().__init__()
            self.save_hyperparameters()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.projection_head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

        def forward(self, x):
            return self.projection_head(self.backbone(x))

        def training_step(self, batch, batch_idx):
            (x0, x1), _, _ = batch
            loss = nt_xent(self(x0), self(x1))
            self.log("train_loss_ssl", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            (x0, x1), _, _ = batch
            self.log("val_loss_ssl", nt_xent(self(x0), self(x1)))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    return UserSimCLR


def make_datamodule(pl):
    class UserData(pl.LightningDataModule):
        """The user's data module; `eval_dataloader(split)` (un-augmented (x, y) batches) feeds LinearProbe."""

        def train_dataloader(self):
            return DataLoader(TupleViews(64, 0), batch_size=16, shuffle=True,
                              generator=torch.Generator().manual_seed(0))

        def val_dataloader(self):
            return DataLoader(TupleViews(32, 1), batch_size=16)

        def eval_dataloader(self, split):
            return DataLoader(TupleViews(64 if split == "train" else 32, {"train": 0, "val": 1, "test": 2}[split],
                                         two_views=False), batch_size=32)

    return UserData
'''


@pytest.fixture()
def user_code(tmp_path, monkeypatch):
    (tmp_path / "user_code.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import user_code as mod

    return importlib.reload(mod)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


def test_pytorch_lightning_module_with_tuple_batches_logs_to_the_users_csv_logger(user_code, tmp_path):
    """A lightly-style module (pytorch_lightning namespace, ((v1, v2), y, fname) batches) with the regularizer,
    ScoreMonitor and LinearProbe; the reprlens metrics land in the user's own CSVLogger."""
    ptl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loggers import CSVLogger

    from reprlens.callbacks import ExplanationRegularization, LinearProbe, ScoreMonitor

    torch.manual_seed(0)
    model = user_code.make_module(ptl)()
    dm = user_code.make_datamodule(ptl)()
    logger = CSVLogger(tmp_path, name="user_logs", version="v0")  # the user's own logger
    reg = ExplanationRegularization("backbone.2", "projection_head", informativeness=0.1, disentanglement=0.1)
    monitor = ScoreMonitor("backbone.2", "backbone.5", max_batches=1)  # default inputs: first view of the tuple
    probe = LinearProbe(layer="backbone", epochs=50, knn_k=3, progress_bar=False)
    trainer = ptl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=logger, inference_mode=False,
                          callbacks=[reg, monitor, probe], enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)

    header, rows = _read_csv(tmp_path / "user_logs" / "v0" / "metrics.csv")
    for name in ("train_loss_ssl", "reg/informativeness", "reg/disentanglement", "val/informativeness",
                 "val/disentanglement", "probe/linear_val_acc", "probe/knn_val_acc"):
        assert name in header, f"{name} not in the user's metrics.csv columns {header}"
        values = [float(r[name]) for r in rows if r[name]]
        assert values and all(torch.isfinite(torch.tensor(values))), name
    # scores are in their documented ranges
    inf = [float(r["val/informativeness"]) for r in rows if r["val/informativeness"]]
    dis = [float(r["val/disentanglement"]) for r in rows if r["val/disentanglement"]]
    assert len(inf) == 2 and all(0 <= v <= 1 for v in inf) and all(0 <= v <= 0.25 + 1e-6 for v in dis)
    # the regularizer ran every optimizer step (4 steps per epoch, 2 epochs)
    assert len([r for r in rows if r["reg/informativeness"]]) == trainer.global_step == 8
    # the probe separates the bright-channel classes (chance 1/3) and matches the callback's own result
    acc = [float(r["probe/linear_val_acc"]) for r in rows if r["probe/linear_val_acc"]][-1]
    assert acc > 0.8
    assert acc == pytest.approx(float(trainer.callback_metrics["probe/linear_val_acc"]))


def test_user_hydra_app_trains_its_module_with_reprlens_callback_configs(tmp_path):
    """The user's own Hydra app composes reprlens callback and logger configs (search-path plugin), overrides
    their layer names for its own module and trains it with pytorch_lightning; metrics go to the CSV logger."""
    pytest.importorskip("pytorch_lightning")
    (tmp_path / "user_code.py").write_text(_USER_MODULE)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.yaml").write_text(textwrap.dedent(
        """\
        defaults:
          - callbacks: [score_monitor, linear_probe]
          - callbacks/regularizer: both
          - logger: csv
          - _self_
        paths:
          output_dir: ${hydra:runtime.output_dir}
        callbacks:
          score_monitor:
            source_layer: backbone.2
            target_layer: backbone.5
            max_batches: 1
            plot_every_n_epochs: null
          linear_probe:
            layer: backbone
            epochs: 50
            knn_k: 3
            progress_bar: false
          regularizer:
            source_layer: backbone.2
            target_layer: projection_head
        max_epochs: 1
        """))
    (tmp_path / "my_app.py").write_text(textwrap.dedent(
        """\
        import json
        import hydra
        import pytorch_lightning as pl
        from reprlens.cli import instantiate_callbacks, instantiate_loggers
        import user_code

        @hydra.main(version_base="1.3", config_path="conf", config_name="config")
        def main(cfg):
            pl.seed_everything(0)
            trainer = pl.Trainer(max_epochs=cfg.max_epochs, accelerator="cpu", devices=1, inference_mode=False,
                                 callbacks=instantiate_callbacks(cfg.callbacks),
                                 logger=instantiate_loggers(cfg.logger), enable_checkpointing=False,
                                 enable_progress_bar=False, log_every_n_steps=1, num_sanity_val_steps=0)
            trainer.fit(user_code.make_module(pl)(), datamodule=user_code.make_datamodule(pl)())
            print(json.dumps({"callbacks": sorted(type(c).__name__ for c in trainer.callbacks
                                                  if type(c).__module__.startswith("reprlens")),
                              "log_dir": trainer.logger.log_dir}))

        main()
        """))
    run = tmp_path / "out"
    proc = subprocess.run([sys.executable, "my_app.py", f"hydra.run.dir={run}"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    _ok(proc)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["callbacks"] == ["ExplanationRegularization", "LinearProbe", "ScoreMonitor"]
    header, rows = _read_csv(Path(out["log_dir"]) / "metrics.csv")
    assert Path(out["log_dir"]).is_relative_to(run)
    for name in ("reg/informativeness", "val/informativeness", "probe/linear_val_acc"):
        assert name in header and any(r[name] for r in rows), name


_TINY = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.num_sanity_val_steps=0",
         "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_model_summary=false",
         "callbacks.progress_bar=null", "logger=[csv]", "callbacks.linear_probe.epochs=5",
         "callbacks.linear_probe.progress_bar=false", "callbacks.linear_probe.knn_k=3"]
_SHAPES_TINY = ["data.num_train=64", "data.num_val=32", "data.num_test=32"]
_STUDY_RUNS = {
    # experiment: (extra overrides, report section that must be "ok", metric that must be in summary.json)
    "relax_shapes": (_SHAPES_TINY + ["callbacks.relax.num_masks=50", "callbacks.relax.num_probe=2"], "relax", None),
    "invert_shapes": (["data.num_train=64", "data.num_val=200", "data.num_test=32",
                       "callbacks.concept_labeler.n_permutations=10"], "concept_labels", None),
    "trace_digits": ([], "influential_examples", None),
    "explainer_shapes": (_SHAPES_TINY + ["callbacks.explainer.max_epochs=1"], "training_curves", "explainer/rel_err"),
    "linear_probe_shapes": (_SHAPES_TINY, "training_curves", "probe/linear_val_acc"),
}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(_STUDY_RUNS))
def test_study_experiment_runs_as_one_command(experiment, tmp_path):
    """Each study preset runs end to end (tiny sizes) and its artefact reaches the report / summary."""
    extra, section, metric = _STUDY_RUNS[experiment]
    run = tmp_path / "run"
    exe = BIN / "reprlens-train"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "reprlens.train"]
    proc = subprocess.run(cmd + [f"experiment={experiment}", f"hydra.run.dir={run}", *_TINY, *extra], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=600)
    _ok(proc)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task_name"] == experiment
    assert summary["report"]["sections"][section] == "ok"
    if metric is not None:  # logged to the user-facing CSV log (callbacks that log after fit skip callback_metrics)
        header, rows = _read_csv(run / "csv" / "metrics.csv")
        assert metric in header and any(r[metric] for r in rows), metric


def test_results_table_groups_by_swept_overrides_with_mean_and_sample_std(tmp_path):
    """results.md / results.csv of a hand-made multirun: the seed is averaged over, fixed overrides are ignored."""
    import statistics

    from reprlens.report import build_report

    accs = {("0", "0"): 0.50, ("0", "1"): 0.60, ("0", "2"): 0.70, ("1", "0"): 0.80, ("1", "1"): 0.84, ("1", "2"): 0.86}
    for i, ((w, seed), acc) in enumerate(sorted(accs.items())):
        d = tmp_path / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            f"- experiment=sweep_regularizer\n- reg_weight={w}\n- seed={seed}\n- hydra.verbose=false\n")
        (d / "summary.json").write_text(json.dumps({
            "seed": int(seed), "regularized": w != "0", "reg_weight": float(w),
            "metrics": {"probe/linear_val_acc": acc}}))
    build_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    for w in ("0", "1"):
        xs = [a for (ww, _), a in accs.items() if ww == w]
        expected = f"| reg_weight={w} | 3 | {statistics.mean(xs):.4g} ± {statistics.stdev(xs):.2g} |"
        assert expected in md, (expected, md)
    assert "experiment=sweep_regularizer" not in md.split("## Runs")[0]
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], r["seed"], r["regularized"]) for r in rows] == [
        (f"reg_weight={w}", s, str(w != "0")) for w, s in sorted(accs)]
    assert [float(r["probe/linear_val_acc"]) for r in rows] == [accs[k] for k in sorted(accs)]
    # without overrides: grouped by the regularized flag
    for d in tmp_path.glob("*/.hydra"):
        (d / "overrides.yaml").unlink()
    build_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| baseline | 3 |" in md and "| regularized | 3 |" in md


@pytest.mark.slow
def test_optuna_sweep_of_the_regularizer_weight(tmp_path):
    """The documented Optuna command (2 tiny trials) runs and reports the best reg_weight."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "opt"
    exe = BIN / "reprlens-train"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "reprlens.train"]
    args = ["-m", "experiment=sweep_regularizer", "hparams_search=optuna",
            'hydra.sweeper.params={reg_weight: "interval(0.0, 1.0)"}', "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep}", *_SHAPES_TINY,
            *[o for o in _TINY if not o.startswith("callbacks.progress_bar")], "callbacks.progress_bar=null",
            "report=false"]
    proc = subprocess.run(cmd + args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    _ok(proc)
    res = OmegaConf.load(sweep / "optimization_results.yaml")
    assert 0.0 <= res.best_params.reg_weight <= 1.0
    values = [json.loads((sweep / str(i) / "summary.json").read_text())["optimized_value"] for i in range(2)]
    assert res.best_value == pytest.approx(max(values))
    assert all(json.loads((sweep / str(i) / "summary.json").read_text())["regularized"] for i in range(2))

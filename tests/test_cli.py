"""reprlens-train / python -m reprlens.train end to end (subprocesses), multirun, DDP, wheel, report, plugin."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# tiny SimCLR-on-shapes run: 2 steps of 32 (two views), a 1-epoch linear probe on 64/32/32 examples
TINY = [
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "model.width=4",
    "model.projector_hidden_dim=16",
    "model.projector_out_dim=8",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.linear_probe.epochs=20",
    "callbacks.linear_probe.knn_k=5",
    "callbacks.progress_bar.refresh_rate=1",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _cli(args: list[str], cwd: Path, *, module: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = BIN / "reprlens-train"
    cmd = [sys.executable, "-m", "reprlens.train"] if module or not exe.exists() else [str(exe)]
    return subprocess.run(cmd + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def _last_logged(metrics_csv: Path, name: str) -> float:
    with metrics_csv.open() as f:
        values = [row[name] for row in csv.DictReader(f) if row.get(name)]
    assert values, f"{name} never logged in {metrics_csv}"
    return float(values[-1])


def _check_run_dir(run: Path, *, world_size: int = 1, steps: int = 2) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    m = summary["metrics"]
    # the linear probe ran and its numbers are the ones the sweeper gets
    acc = m["probe/linear_val_acc"]
    assert 0.0 <= acc <= 1.0
    assert summary["linear_probe"]["linear_val_acc"] == pytest.approx(acc)
    assert summary["optimized_metric"] == "probe/linear_val_acc" and summary["optimized_value"] == acc
    assert summary["world_size"] == world_size and summary["global_step"] == steps and summary["epochs"] == 1
    assert Path(summary["output_dir"]) == run
    # checkpoint: the trained step count and the model's hyper-parameters from the command line
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == steps
    assert ckpt["hyper_parameters"]["width"] == 4
    assert summary["last_model_path"] == str(run / "checkpoints" / "last.ckpt")
    # loggers: CSV agrees with the summary; TensorBoard wrote events
    assert _last_logged(run / "csv" / "metrics.csv", "probe/linear_val_acc") == pytest.approx(acc)
    assert _last_logged(run / "csv" / "metrics.csv", "val/loss") == pytest.approx(m["val/loss"], rel=1e-5)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # Hydra's record of the composed config
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert cfg["model"]["width"] == 4 and cfg["model_info"]["two_views"] is True
    assert (run / "train.log").is_file()
    return summary


def test_cli_end_to_end(tmp_path):
    """reprlens-train with tiny overrides: a dated run dir under the cwd with every artefact."""
    proc = _cli(TINY, cwd=tmp_path)
    _ok(proc)
    (day,) = (tmp_path / "outputs").iterdir()
    (run,) = day.iterdir()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", day.name) and re.fullmatch(r"\d{2}-\d{2}-\d{2}", run.name)
    _check_run_dir(run)
    assert "Epoch 0" in proc.stderr + proc.stdout  # progress bar
    exe = BIN / "reprlens-report"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from reprlens.cli import report; "
                                           "sys.exit(report())"]
    report = subprocess.run([*cmd, str(run)], capture_output=True, text=True, env=_env(), timeout=300)
    if report.returncode != 2:  # 2: reprlens.report not built yet
        _ok(report)
        assert (run / "report.html").is_file()


def test_multirun_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "model.lr=1e-3,2e-3", *TINY, f"hydra.sweep.dir={sweep}", "callbacks.progress_bar=null"]
    proc = _cli(args, cwd=tmp_path, module=True)
    _ok(proc)
    assert (sweep / "multirun.yaml").is_file()
    lrs = []
    for job, lr in (("0", "0.001"), ("1", "0.002")):  # Hydra records the parsed value
        _check_run_dir(sweep / job)
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        lrs.append(ckpt["hyper_parameters"]["lr"])
        assert f"model.lr={lr}" in yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
    assert lrs == [1e-3, 2e-3]  # each job trained with its own value


def test_unknown_option_names_the_choices(tmp_path):
    proc = _cli(["model=nope"], cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stderr
    assert "Could not find 'model/nope'" in err and "Available options in 'model'" in err
    for option in ("simclr", "autoencoder", "classifier"):
        assert option in err
    proc = _cli(["trainer=gpux"], cwd=tmp_path)
    assert proc.returncode != 0 and "Available options in 'trainer'" in proc.stderr and "ddp" in proc.stderr


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = _cli(["--cfg", "job", "model=autoencoder", "data=digits"], cwd=tmp_path)
    _ok(proc)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["_target_"] == "reprlens.models.ConvAutoencoder"
    assert cfg["data"]["_target_"] == "reprlens.data.DigitsDataModule"
    assert not (tmp_path / "outputs").exists()


def test_run_in_process_with_test_stage(tmp_path):
    """run(cfg) without a subprocess: autoencoder on digits, fit + test with the best checkpoint."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from reprlens.cli import run

    GlobalHydra.instance().clear()
    with initialize_config_module("reprlens.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "model=autoencoder",
                "data=digits",
                "data_info.image_size=16",
                "data.batch_size=32",
                "logger=csv",
                "callbacks.progress_bar=null",
                "callbacks.linear_probe.max_batches=2",
                "callbacks.linear_probe.knn_k=0",
                "trainer=debug",
                "trainer.detect_anomaly=false",
                "trainer.enable_model_summary=false",
                "trainer.enable_progress_bar=false",
                "test=true",
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path}/run",
            ],
        )
    metrics = run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"] == pytest.approx(metrics)
    assert {"train/loss", "val/loss", "test/loss", "test/acc", "probe/linear_val_acc"} <= set(metrics)
    assert summary["global_step"] == 4  # trainer=debug: 4 batches
    assert summary["best_model_path"].endswith(".ckpt")
    assert _last_logged(tmp_path / "run" / "csv" / "metrics.csv", "test/acc") == pytest.approx(metrics["test/acc"])
    # test only, from the saved checkpoint (ModelCheckpoint without monitor keeps the final weights):
    # the same weights on the same test batches give the same numbers
    again = OmegaConf.merge(
        cfg, {"train": False, "ckpt_path": summary["best_model_path"], "paths": {"output_dir": f"{tmp_path}/run2"}}
    )
    metrics2 = run(again)
    assert metrics2["test/acc"] == pytest.approx(metrics["test/acc"]) and "train/loss" not in metrics2
    assert metrics2["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)


def test_run_rejects_bad_configs_and_ddp_inside_a_sweep(tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from reprlens.cli import run

    with pytest.raises(TypeError, match="DictConfig"):
        run({"data": {}})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['model', 'trainer'\] are missing"):
        run(OmegaConf.create({"data": {"_target_": "x"}}))
    GlobalHydra.instance().clear()
    with initialize_config_module("reprlens.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["trainer=ddp", "hydra.mode=MULTIRUN", "logger=none", "callbacks=none", "data.num_train=8",
                       f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(RuntimeError, match=r"multirun.*start_method=spawn"):
            run(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert not (tmp_path / "run" / "summary.json").exists()


def test_report_entry_point(tmp_path, capsys, monkeypatch):
    from reprlens.cli import report

    with pytest.raises(SystemExit) as exc:
        report([str(tmp_path / "missing")])
    assert exc.value.code == 2 and "existing directory" in capsys.readouterr().err
    try:
        from reprlens.report import build_report  # noqa: F401
    except ImportError:
        pass
    else:  # an empty run dir: every section "unavailable", the file is still written
        assert report([str(tmp_path)]) == 0
        assert Path(capsys.readouterr().out.strip()) == tmp_path / "report.html"
        assert (tmp_path / "report.html").is_file()
        assert report([str(tmp_path), "--out", str(tmp_path / "r.html")]) == 0
        assert (tmp_path / "r.html").is_file()
    # without reprlens.report: a clear message and exit code 2
    monkeypatch.setitem(sys.modules, "reprlens.report", None)
    assert report([str(tmp_path)]) == 2
    assert "not implemented yet" in capsys.readouterr().err


def test_user_hydra_app_uses_reprlens_configs(tmp_path):
    """A user's Hydra app (its own config dir) composes reprlens groups through the search-path plugin."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.yaml").write_text(
        textwrap.dedent(
            """\
            defaults:
              - callbacks: default
              - logger: csv
              - _self_
            paths:
              output_dir: ${hydra:runtime.output_dir}
            mine: 1
            """
        )
    )
    (tmp_path / "my_app.py").write_text(
        textwrap.dedent(
            """\
            import json
            import hydra

            @hydra.main(version_base="1.3", config_path="conf", config_name="config")
            def main(cfg):
                print(json.dumps({"mine": cfg.mine, "callbacks": [c._target_ for c in cfg.callbacks.values()],
                                  "dirpath": cfg.callbacks.model_checkpoint.dirpath,
                                  "logger": list(cfg.logger)}))

            main()
            """
        )
    )
    run = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "my_app.py", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    _ok(proc)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {
        "mine": 1,
        "callbacks": [
            "lightning.pytorch.callbacks.ModelCheckpoint",
            "lightning.pytorch.callbacks.TQDMProgressBar",
            "reprlens.callbacks.LinearProbe",
        ],
        "dirpath": f"{run}/checkpoints",
        "logger": ["csv"],
    }
    info = subprocess.run(
        [sys.executable, "my_app.py", "--info", "searchpath"], cwd=tmp_path, env=_env(), capture_output=True,
        text=True, timeout=120,
    )
    _ok(info)
    assert "reprlens" in info.stdout and "pkg://reprlens.conf" in info.stdout


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    args = ["trainer=ddp", *TINY, "data.batch_size=16", f"hydra.run.dir={run}"]
    proc = _cli(args, cwd=tmp_path, timeout=600)
    _ok(proc)
    # 64 examples / (2 ranks x 16) = 2 steps per rank; one summary written by rank 0
    summary = _check_run_dir(run, world_size=2, steps=2)
    assert summary["metrics"]["probe/linear_val_acc"] >= 0
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran the same job in the same directory


@pytest.mark.slow
def test_ddp_spawn_inside_a_multirun(tmp_path):
    """strategy ddp cannot run under -m (Lightning re-runs argv); start_method=spawn can, with a full summary."""
    sweep = tmp_path / "sweep"
    args = ["-m", "model.lr=1e-3", "trainer=ddp", "+trainer.strategy.start_method=spawn", *TINY, "data.batch_size=16",
            f"hydra.sweep.dir={sweep}", "callbacks.progress_bar=null"]
    proc = _cli(args, cwd=tmp_path, module=True, timeout=600)
    _ok(proc)
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] is None  # counters stay in the workers
    acc = summary["metrics"]["probe/linear_val_acc"]
    assert summary["linear_probe"]["linear_val_acc"] == acc == summary["optimized_value"]
    assert summary["last_model_path"] == str(sweep / "0" / "checkpoints" / "last.ckpt")
    ckpt = torch.load(summary["last_model_path"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["lr"] == 1e-3


@pytest.mark.slow
def test_optuna_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
            *TINY, f"hydra.sweep.dir={sweep}", "callbacks.progress_bar=null", "logger=csv"]
    proc = _cli(args, cwd=tmp_path, module=True, timeout=600)
    _ok(proc)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    accs = [json.loads((sweep / j / "summary.json").read_text())["optimized_value"] for j in ("0", "1")]
    assert results["best_value"] == pytest.approx(max(accs))


@pytest.mark.slow
def test_wheel_non_editable_install_finds_configs(tmp_path):
    """Build the wheel from a copy of the sources, install it (no deps) into a fresh venv, run from there."""
    src = tmp_path / "src_copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", src / "src", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "conf", src / "conf", ignore=ignore)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "-n", "-o", str(dist), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    _ok(build)
    (wheel,) = dist.glob("reprlens-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    vpy = venv / "bin" / "python"
    site = subprocess.run(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # the dependencies (torch, lightning, hydra, ...) come from this environment's site-packages, without its
    # editable reprlens (a plain path line in a .pth file does not process that directory's own .pth files)
    deps = Path(torch.__file__).resolve().parents[1]
    Path(site, "_reprlens_test_deps.pth").write_text(f"{deps}\n")
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    if inst.returncode != 0 and "no such option: --python" in inst.stderr:  # pip < 22.3
        pytest.skip("needs pip >= 22.3 (--python)")
    _ok(inst)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(vpy), "-c", "import reprlens, reprlens.conf, hydra_plugins.reprlens_searchpath as p; "
         "print(reprlens.__file__); print(reprlens.conf.__file__); print(p.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    _ok(where)
    for line in where.stdout.split():
        assert line.startswith(site), f"{line} is not from the installed wheel ({site})"
    run = work / "run"
    proc = subprocess.run(
        [str(venv / "bin" / "reprlens-train"), *TINY, f"hydra.run.dir={run}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    _ok(proc)
    _check_run_dir(run)

"""Every Hydra config of conf/ composes and instantiates; bad selections give Hydra's error with the options."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import reprlens.conf
from reprlens.cli import instantiate_callbacks, instantiate_loggers

CONF = Path(reprlens.conf.__file__).resolve().parent
GROUPS = ("data", "model", "trainer", "callbacks", "logger", "paths", "experiment", "hparams_search")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str], tmp_path: Path, hydra_cfg: bool = False) -> DictConfig:
    """Compose `train` with the run paths pointed into tmp_path (so `${hydra:...}` needs no Hydra run)."""
    GlobalHydra.instance().clear()
    with initialize_config_module("reprlens.conf", version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *overrides],
            return_hydra_config=hydra_cfg,
        )


def _resolved(cfg: DictConfig) -> dict:
    """Resolve every interpolation (fails on a dangling `${...}`)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    return c


def test_conf_ships_every_group_and_a_readme():
    assert (CONF / "train.yaml").is_file()
    readme = (CONF / "README.md").read_text()
    for group in GROUPS:
        opts = options(group)
        assert opts, f"conf/{group}/ has no config"
        assert f"`{group}/`" in readme, f"conf/README.md does not describe the {group} group"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes_and_resolves(group, tmp_path):
    for opt in options(group):
        if group == "hparams_search" and opt == "optuna":
            pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
        if group == "callbacks" and opt not in ("default", "none"):
            sel = f"callbacks=[default,{opt}]"
        else:
            sel = f"{group}={opt}"
        cfg = _compose([sel], tmp_path)
        c = _resolved(cfg)
        for key in ("data", "model", "trainer"):
            assert "_target_" in c[key], (sel, key)
        assert c["paths"]["output_dir"] == f"{tmp_path}/run"


def test_default_composition(tmp_path):
    cfg = _compose([], tmp_path)
    assert cfg.data._target_ == "reprlens.data.ShapesDataModule"
    assert cfg.model._target_ == "reprlens.models.SimCLR"
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert set(cfg.callbacks) == {"model_checkpoint", "progress_bar", "linear_probe"}
    assert set(cfg.logger) == {"tensorboard", "csv"}
    assert cfg.callbacks.model_checkpoint.dirpath == f"{tmp_path}/run/checkpoints"
    assert cfg.logger.csv.save_dir == cfg.logger.tensorboard.save_dir == f"{tmp_path}/run"
    assert cfg.optimized_metric == "probe/linear_val_acc"
    assert cfg.train is True and cfg.test is False and cfg.ckpt_path is None


def test_run_dirs_are_dated_under_the_working_directory(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_module("reprlens.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    cwd = Path.cwd()
    date_time = r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}"
    assert re.fullmatch(re.escape(f"{cwd}/outputs/") + date_time, cfg.hydra.run.dir)
    assert re.fullmatch(re.escape(f"{cwd}/multirun/") + date_time, cfg.hydra.sweep.dir)
    assert cfg.hydra.job.chdir is False


def test_seed_and_experiment_override_the_primary_config(tmp_path):
    cfg = _compose(["experiment=autoencoder_digits", "seed=7"], tmp_path)
    assert cfg.seed == 7  # command line wins over the experiment
    assert cfg.task_name == "autoencoder_digits"  # experiment wins over train.yaml (_self_ first)
    assert cfg.model._target_ == "reprlens.models.ConvAutoencoder"
    assert cfg.data._target_ == "reprlens.data.DigitsDataModule"


@pytest.mark.parametrize("group", ["data", "model", "trainer", "logger", "experiment"])
def test_unknown_option_names_the_available_ones(group, tmp_path):
    with pytest.raises(MissingConfigException) as err:
        _compose([f"{group}=nope"], tmp_path)
    msg = str(err.value)
    assert f"Available options in '{group}'" in msg
    for opt in options(group):
        assert opt in msg


def test_unknown_key_is_rejected(tmp_path):
    with pytest.raises(Exception, match="nope"):
        _compose(["model.nope=1"], tmp_path)


def test_callbacks_dict_skips_null_and_rejects_missing_target(tmp_path):
    cfg = _compose(["callbacks.linear_probe=null", "callbacks=[default,lr_monitor]"], tmp_path)
    cbs = instantiate_callbacks(cfg.callbacks)
    names = [type(cb).__name__ for cb in cbs]
    assert names == ["ModelCheckpoint", "TQDMProgressBar", "LearningRateMonitor"]
    assert cbs[0].dirpath == f"{tmp_path}/run/checkpoints"
    with pytest.raises(ValueError, match=r"callbacks\.bad.*_target_.*callbacks\.bad=null"):
        instantiate_callbacks(OmegaConf.create({"bad": {"monitor": "x"}}))
    with pytest.raises(TypeError, match="dict"):
        instantiate_callbacks(OmegaConf.create({"a": 1}).a)
    assert instantiate_callbacks(None) == [] and instantiate_callbacks(_compose(["callbacks=none"], tmp_path).callbacks) == []


def test_every_logger_config_instantiates(tmp_path):
    for opt in options("logger"):
        cfg = _compose([f"logger={opt}"], tmp_path)
        loggers = instantiate_loggers(cfg.logger)
        expected = {"default": ["TensorBoardLogger", "CSVLogger"], "none": []}.get(opt)
        if expected is not None:
            assert [type(lg).__name__ for lg in loggers] == expected
        else:
            assert len(loggers) == 1
        for lg in loggers:
            assert Path(lg.save_dir) == tmp_path / "run"


def test_every_callback_config_instantiates(tmp_path):
    """One file per callback, whose top-level key names the entry; each builds its callback."""
    for opt in options("callbacks"):
        if opt in ("default", "none", "main"):  # collections of callback configs, tested below
            continue
        cfg = _compose([f"callbacks=[{opt}]"], tmp_path)
        assert list(cfg.callbacks) == [opt], f"conf/callbacks/{opt}.yaml must have the single top-level key {opt!r}"
        (cb,) = instantiate_callbacks(cfg.callbacks)
        assert isinstance(cb, pl.Callback), (opt, type(cb))


def test_main_callbacks_collection_instantiates(tmp_path):
    """callbacks=main (experiment=main): every reprlens callback plus the regularizer, all instantiated."""
    cfg = _compose(["experiment=main"], tmp_path)
    names = {type(cb).__name__ for cb in instantiate_callbacks(cfg.callbacks)}
    assert {"ExplanationRegularization", "ScoreMonitor", "RelaxMonitor", "ConceptLabeler", "TrainingTrace",
            "LinearProbe", "ModelCheckpoint"} <= names
    assert cfg.trainer.inference_mode is False
    cfg = _compose(["experiment=main", "callbacks/regularizer=none"], tmp_path)
    assert "ExplanationRegularization" not in {type(cb).__name__ for cb in instantiate_callbacks(cfg.callbacks)}


@pytest.mark.parametrize("opt", ["default", "cpu", "ddp", "debug", "gpu"])
def test_every_trainer_config_instantiates(opt, tmp_path):
    if opt == "gpu" and not torch.cuda.is_available():
        cfg = _compose([f"trainer={opt}"], tmp_path)
        assert cfg.trainer.accelerator == "gpu"
        pytest.skip("trainer=gpu instantiates only with a CUDA device")
    cfg = _compose([f"trainer={opt}", "trainer.enable_model_summary=false"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert Path(trainer.default_root_dir) == tmp_path / "run"
    if opt == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        assert isinstance(trainer.strategy, DDPStrategy)
        assert trainer.strategy.process_group_backend == "gloo"
        assert trainer.num_devices == 2
    if opt == "debug":
        assert trainer.limit_train_batches == 4


def test_optuna_search_config(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose(["hparams_search=optuna"], tmp_path, hydra_cfg=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert str(cfg.hydra.mode).endswith("MULTIRUN")
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) >= {"model.lr"}
    # every searched key exists in the composed config
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None, key


def test_searchpath_plugin_is_discovered():
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    from hydra_plugins.reprlens_searchpath.reprlens_searchpath import ReprlensSearchPathPlugin

    assert ReprlensSearchPathPlugin in Plugins.instance().discover(SearchPathPlugin)


def test_user_app_composes_reprlens_configs(tmp_path):
    """A user's own config dir (not reprlens') can pick reprlens groups through the search-path plugin."""
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "mine.yaml").write_text("_target_: torch.nn.Linear\nin_features: 2\nout_features: 3\n")
    (conf / "my_app.yaml").write_text(
        "defaults:\n  - callbacks: default\n  - logger: csv\n  - trainer: ddp\n  - model: mine\n  - _self_\n"
        "paths:\n  output_dir: " + str(tmp_path / "out") + "\nanswer: 42\n"
    )
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("my_app", return_hydra_config=True)
    assert cfg.answer == 42
    assert cfg.model._target_ == "torch.nn.Linear"  # the app's own group
    assert set(cfg.callbacks) >= {"model_checkpoint", "linear_probe"}  # reprlens' group
    assert cfg.callbacks.model_checkpoint.dirpath == f"{tmp_path}/out/checkpoints"
    assert cfg.trainer.strategy.process_group_backend == "gloo"


SMALL_DATA = {
    "shapes": ["data.num_train=32", "data.num_val=16", "data.num_test=16", "data.batch_size=8"],
    "digits": ["data.batch_size=8"],
}


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
@pytest.mark.parametrize("data", sorted(SMALL_DATA))
@pytest.mark.parametrize("model", ["simclr", "autoencoder", "classifier"])
def test_every_data_model_pair_trains_one_step(data, model, tmp_path):
    """data_info/model_info keep channels, classes and two-view batches consistent for every pair."""
    cfg = _compose([f"data={data}", f"model={model}", *SMALL_DATA[data]], tmp_path)
    dm = instantiate(cfg.data, _convert_="all")
    net = instantiate(cfg.model, _convert_="all")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1] == cfg.data_info.channels == cfg.model.in_channels
    assert ("views" in batch) == (model == "simclr")
    assert int(batch["label"].max()) < cfg.data_info.num_classes == dm.num_classes
    loss = net.training_step(batch, 0)
    loss = loss["loss"] if isinstance(loss, dict) else loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_nested_callback_groups_compose_and_instantiate(tmp_path):
    """Sub-groups such as conf/callbacks/regularizer/ (selected with `+callbacks/<sub>=<option>`)."""
    subs = sorted(p for p in (CONF / "callbacks").iterdir() if p.is_dir() and list(p.glob("*.yaml")))
    if not subs:
        pytest.skip("no nested callback groups")
    for sub in subs:
        for opt in sorted(q.stem for q in sub.glob("*.yaml")):
            cfg = _compose([f"+callbacks/{sub.name}={opt}"], tmp_path)
            _resolved(cfg)
            assert {"model_checkpoint", "progress_bar", "linear_probe"} <= set(cfg.callbacks), (sub.name, opt)
            cbs = instantiate_callbacks(cfg.callbacks)
            assert all(isinstance(cb, pl.Callback) for cb in cbs)
            assert len(cbs) == sum(v is not None for v in cfg.callbacks.values())


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_builds_its_model_and_data(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}"], tmp_path)
    _resolved(cfg)
    assert all(isinstance(cb, pl.Callback) for cb in instantiate_callbacks(cfg.callbacks))
    net = instantiate(cfg.model, _convert_="all")
    dm = instantiate(cfg.data, _convert_="all")
    x = torch.rand(2, *dm.image_shape)
    assert x.shape[1] == cfg.model.in_channels
    out = net(x)
    assert out.shape[0] == 2 and torch.isfinite(out).all()

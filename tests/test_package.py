"""Package-level checks: imports, README/CI agreement, licence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_and_version():
    import reprlens

    assert re.fullmatch(r"\d+\.\d+\.\d+.*", reprlens.__version__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        reprlens.nope  # noqa: B018


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmds = [b.strip() for b in blocks if "pytest" in b]
    assert len(test_cmds) == 1, "README must show exactly one test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmds[0] in [line.strip() for line in ci]


def test_license_is_apache():
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]


def test_get_module_lists_closest_names():
    from torch import nn

    from reprlens.utils import get_module

    net = nn.Sequential()
    net.add_module("backbone", nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    net.add_module("head", nn.Linear(2, 2))
    assert get_module(net, "backbone.0") is net.backbone[0]
    with pytest.raises(ValueError, match=r"'backbone\.0'"):
        get_module(net, "backbone.O")
    with pytest.raises(TypeError, match="dotted module path"):
        get_module(net, 3)  # type: ignore[arg-type]


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    """The README's quickstart, with tiny sizes substituted, trains and logs the promised metrics."""
    readme = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)\n```", readme, flags=re.S)[0]
    small = code.replace("max_epochs=3", "max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, "
                                         "enable_checkpointing=False, enable_progress_bar=False")
    small = small.replace("num_train=2048", "num_train=64, num_val=32, num_test=32, batch_size=16")
    assert small != code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(small, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    metrics = namespace["trainer"].callback_metrics
    for key in ("reg/informativeness", "reg/disentanglement", "val/informativeness", "val/disentanglement"):
        assert key in metrics, key
    assert "linear_val_acc" in namespace["callbacks"][2].results

"""Issue 10, item 5: two seeded CPU runs of the main job are bit-identical.

Both runs go through ``reprlens.cli.run`` on ``experiment=main`` (SimCLR on shapes with the explanation
regularizer, ScoreMonitor, RelaxMonitor, ConceptLabeler, TrainingTrace, LinearProbe and report.html), with
tiny sizes, into two directories. Compared bit for bit: the scores (summary.json metrics and the per-step
metrics.csv), the weights and optimizer state of the checkpoints, the trace store (every shard file and the
per-example aggregate read back through ``TraceReader``), the figures and ``report.html``.

What may legitimately differ, and is excluded by name: absolute paths of the run directory, wall-clock
timings (``relax/seconds``), the trace's random ``run_id`` (it identifies a run so that a store is never
appended to by another run) and TensorBoard event files (they embed wall-clock timestamps).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

# metrics that measure wall-clock time: equal seeds do not make them equal
TIMING_COLUMNS = {"relax/seconds"}
PATH_KEYS = {"best_model_path", "last_model_path", "output_dir"}

# two runs of the main job: ~65 s on the shared 2-core CI machine
pytestmark = pytest.mark.slow


def _compose(out: Path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("reprlens.conf", version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "experiment=main",
                "data.num_train=64",
                "data.num_val=32",
                "data.num_test=32",
                "data.batch_size=16",
                "data.eval_batch_size=16",
                "trainer.accelerator=cpu",
                "trainer.max_epochs=1",
                "+trainer.limit_train_batches=2",
                "+trainer.limit_val_batches=1",
                "+trainer.num_sanity_val_steps=0",
                "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "callbacks.progress_bar=null",
                "callbacks.linear_probe.max_batches=2",
                "callbacks.linear_probe.knn_k=0",
                "callbacks.relax.num_probe=2",
                "callbacks.relax.num_masks=50",
                "callbacks.concept_labeler.n_permutations=20",
                f"paths.root_dir={out}",
                f"paths.output_dir={out}/run",
            ],
        )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from reprlens.cli import run

    dirs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"repro_{name}")
        run(_compose(out))
        dirs.append(out / "run")
    return dirs


def _files(root: Path) -> set[str]:
    """Relative paths of the run's files, without TensorBoard event files (named after host, pid and time)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "tfevents" not in p.name}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def test_same_files(two_runs):
    a, b = two_runs
    files = _files(a)
    assert files == _files(b)
    # the run produced what the comparison below relies on
    assert {"summary.json", "report.html", "csv/metrics.csv", "checkpoints/last.ckpt"} <= files
    assert any(f.endswith(".png") for f in files)


def test_scores_bit_identical(two_runs):
    a, b = two_runs
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["output_dir"] != sb["output_dir"]  # two distinct runs
    # json floats round-trip exactly: equality here is bit equality of the float64 values
    assert {k: v for k, v in sa.items() if k not in PATH_KEYS} == {k: v for k, v in sb.items() if k not in PATH_KEYS}
    assert {"train/loss", "val/disentanglement", "reg/total", "probe/linear_val_acc"} <= set(sa["metrics"])
    rows_a, rows_b = _csv_rows(a / "csv" / "metrics.csv"), _csv_rows(b / "csv" / "metrics.csv")
    assert len(rows_a) > 1 and rows_a == rows_b
    # every reprlens callback logged a value that is compared (RelaxMonitor and ConceptLabeler log to the logger only)
    logged = {k for row in rows_a for k, v in row.items() if v}
    for prefix in ("train/", "val/", "reg/", "relax/", "probe/", "concept_labels/"):
        assert any(k.startswith(prefix) for k in logged), (prefix, sorted(logged))


def test_weights_and_optimizer_bit_identical(two_runs):
    a, b = two_runs
    ca, cb = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False) for d in (a, b))
    assert ca["global_step"] == cb["global_step"] == 2
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), k
    # the weights moved: the comparison is not between two copies of the initialisation
    init = torch.load(next(a.rglob("trace/weights/initial.pt")), map_location="cpu", weights_only=True)
    layer = "backbone.layer3.0.conv2"
    assert not torch.equal(init[layer]["weight"], ca["state_dict"][f"{layer}.weight"])
    opt_a, opt_b = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for p in opt_a:
        for name, va in opt_a[p].items():
            vb = opt_b[p][name]
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), (p, name)


def test_trace_bit_identical(two_runs):
    from reprlens.trace import TraceReader

    a, b = two_runs
    ta, tb = next(a.rglob("trace/trace.json")).parent, next(b.rglob("trace/trace.json")).parent
    shards = sorted(p for p in _files(ta) if not p.startswith("cache") and p != "trace.json")
    assert any(p.endswith(".npy") for p in shards), shards
    for rel in shards:
        assert (ta / rel).read_bytes() == (tb / rel).read_bytes(), rel
    ma, mb = (json.loads((t / "trace.json").read_text()) for t in (ta, tb))
    assert ma.pop("run_id") != mb.pop("run_id")  # random by design: identifies the run that owns the store
    assert ma == mb
    ra, rb = TraceReader(ta), TraceReader(tb)
    assert torch.equal(ra.example_ids, rb.example_ids)
    (layer,) = ra.layers
    agg_a, agg_b = ra.aggregate(layer), rb.aggregate(layer)
    assert agg_a.shape[0] == ra.num_examples > 0
    assert (agg_a == agg_b).all() and (agg_a != 0).any()


def test_figures_and_report_bit_identical(two_runs):
    a, b = two_runs
    figures = sorted(p for p in _files(a) if p.endswith((".png", ".csv")) and not p.startswith("csv/"))
    assert figures
    for rel in figures:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    html_a, html_b = (a / "report.html").read_bytes(), (b / "report.html").read_bytes()
    assert len(html_a) > 1000 and html_a == html_b

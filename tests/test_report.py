"""Tests of reprlens.report.build_report (HTML run report) and the reprlens-report command."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reprlens.report import REPORT_FILE, SECTIONS, build_report

# ------------------------------------------------------------------------------------------------ helpers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(seed: int) -> bytes:
    """A small PNG whose pixels depend on ``seed`` (distinct files have distinct bytes)."""
    import io

    from PIL import Image

    img = Image.new("RGB", (6, 5), color=(seed % 256, (7 * seed) % 256, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_metrics(path: Path, *, regularized: bool = True) -> None:
    header = ["epoch", "step", "train/loss", "val/loss", "val/informativeness", "val/disentanglement"]
    if regularized:
        header += ["reg/informativeness", "reg/disentanglement"]
    rows = []
    for epoch in range(3):
        for s in range(2):
            step = epoch * 2 + s
            row = {"epoch": epoch, "step": step, "train/loss": 2.0 / (step + 1)}
            if regularized:
                row["reg/informativeness"] = 0.1 * step
                row["reg/disentanglement"] = 0.2 + 0.01 * step
            rows.append(row)
        rows.append({"epoch": epoch, "step": epoch * 2 + 1, "val/loss": 1.5 - 0.1 * epoch,
                     "val/informativeness": 0.3 + 0.05 * epoch, "val/disentanglement": 0.1 + 0.02 * epoch})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


CONCEPT_CSV = """# mode: positive
# max_length: 3
neuron,rank,formula,length,auc,fraction,p_value,p_corrected
0,0,shape==circle,1,0.61,0.2,0.01,0.05
0,1,RANK_ONE_FORMULA,1,0.99,0.2,0.01,0.05
1,0,colour==red OR shape==square,2,0.93,0.3,0.0001,0.0005
2,0,NOT background==dark,1,0.75,0.5,0.001,0.005
3,0,TIE_LARGER_P,1,0.75,0.5,0.01,0.5
"""


def _synthetic_run(root: Path, *, regularized: bool = True, probe_acc: float = 0.8) -> Path:
    """A run directory as reprlens-train writes it, minus relax maps, trace and children."""
    root.mkdir(parents=True, exist_ok=True)
    summary = {
        "task_name": "synthetic", "seed": 1, "optimized_metric": "probe/linear_val_acc",
        "optimized_value": probe_acc,
        "metrics": {"probe/linear_val_acc": probe_acc, "val/informativeness": 0.4,
                    "val/disentanglement": 0.14,
                    "train/loss": 0.4},
        "linear_probe": {"linear_val_acc": probe_acc, "knn_val_acc": probe_acc - 0.1},
        "regularized": regularized,
        "epochs": 3, "global_step": 6,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_metrics(root / "csv" / "metrics.csv", regularized=regularized)
    figs = root / "tensorboard" / "figures"
    figs.mkdir(parents=True)
    for step in (2, 4, 6, 8):
        (figs / f"val_attribution_maps_step{step}.png").write_bytes(_png(step))
    cl = root / "tensorboard" / "concept_labels" / "backbone.pool"
    cl.mkdir(parents=True)
    (cl / "epoch=0002.csv").write_text(CONCEPT_CSV)
    (cl / "epoch=0002.png").write_bytes(_png(100))
    (cl / "epoch=0000.csv").write_text(CONCEPT_CSV.replace("shape==circle", "OLD_EPOCH_FORMULA"))
    return root


def _statuses(html_text: str) -> dict[str, str]:
    out = {}
    for key in SECTIONS:
        m = re.search(rf'<li><a href="#{key}">[^<]*</a> <span class="[a-z]+">([^<]*)</span></li>', html_text)
        assert m is not None, f"section {key} missing from the table of contents"
        out[key] = m.group(1)
    return out


def _embedded_pngs(html_text: str) -> list[bytes]:
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)
    return [base64.b64decode(m) for m in found]


# ------------------------------------------------------------------------------------------------ tests
def test_synthetic_run_sections_present_and_missing_ones_marked(tmp_path: Path) -> None:
    run = _synthetic_run(tmp_path / "run")
    path = build_report(run)
    assert path == (run / REPORT_FILE).resolve()
    text = path.read_text()
    st = _statuses(text)
    for key in ("config", "training_curves", "scores", "attribution_maps", "concept_labels"):
        assert st[key] == "ok", (key, st[key])
    # missing artefacts: a reason and the missing file, not a failure
    assert st["relax"].startswith("unavailable:") and "relax/" in st["relax"]
    assert st["influential_examples"].startswith("unavailable:")
    assert "trace.json" in st["influential_examples"]
    assert st["comparison"].startswith("unavailable:") and "summary.json" in st["comparison"]

    # self-contained: no external asset
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    pngs = _embedded_pngs(text)
    assert all(p.startswith(PNG_SIGNATURE) for p in pngs)
    # ScoreMonitor PNGs: first and last kept verbatim (at most 3 of the 4 steps shown), step order
    figs = run / "tensorboard" / "figures"
    saved = {(figs / f"val_attribution_maps_step{s}.png").read_bytes() for s in (2, 4, 6, 8)}
    shown = [p for p in pngs if p in saved]
    assert shown[0] == _png(2) and shown[-1] == _png(8) and len(shown) == 3
    # concept figure embedded verbatim, latest epoch's table, rows sorted by AUC (0.93 > 0.75 > 0.61)
    assert _png(100) in pngs
    assert "OLD_EPOCH_FORMULA" not in text
    i93, i75, i61 = (text.index(f"<td>{a}</td>") for a in ("0.93", "0.75", "0.61"))
    assert i93 < i75 < i61
    assert "colour==red OR shape==square" in text
    assert "RANK_ONE_FORMULA" not in text  # only each unit's best (rank-0) formula
    assert text.index("NOT background==dark") < text.index("TIE_LARGER_P")  # AUC tie: smaller p first
    # scores over epochs: per-step reg/* values averaged per epoch
    # (steps (0,1), (2,3), (4,5) -> 0.05, 0.25, 0.45)
    assert "<td>reg/informativeness</td><td>epoch (mean)</td><td>0.05</td><td>0.45</td><td>3</td>" in text
    assert "<td>val/informativeness</td><td>epoch</td><td>0.3</td><td>0.4</td><td>3</td>" in text
    # training curves: last train loss 2 / 6 at step 5
    assert "<td>train/loss</td><td>0.3333</td><td>5</td>" in text
    # probe accuracy shown
    assert "linear_val_acc" in text and "0.8" in text
    # curves and score plots are matplotlib PNGs (4 ScoreMonitor/concept PNGs + curves + scores)
    assert len(pngs) == 3 + 1 + 2

    summary = json.loads((run / "summary.json").read_text())
    assert summary["report"]["path"] == REPORT_FILE
    assert summary["report"]["sections"] == st
    assert summary["metrics"]["probe/linear_val_acc"] == 0.8  # the rest of the summary is kept


def test_report_is_deterministic(tmp_path: Path) -> None:
    run = _synthetic_run(tmp_path / "run")
    first = build_report(run).read_bytes()
    summary_after_first = (run / "summary.json").read_bytes()
    second = build_report(run).read_bytes()
    assert first == second
    assert (run / "summary.json").read_bytes() == summary_after_first
    # a copy of the run dir elsewhere: same bytes too (no absolute paths / timestamps in the HTML)
    other = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, other)
    assert build_report(other, out=tmp_path / "x.html").read_bytes() == first


def test_empty_dir_every_section_unavailable(tmp_path: Path) -> None:
    text = build_report(tmp_path).read_text()
    st = _statuses(text)
    assert all(v.startswith("unavailable:") for v in st.values()), st
    assert "summary.json missing" in st["config"]
    assert "metrics.csv missing" in st["training_curves"]
    assert not (tmp_path / "summary.json").exists()  # no summary is invented


def test_damaged_artefacts_do_not_stop_the_report(tmp_path: Path) -> None:
    run = _synthetic_run(tmp_path / "run")
    (run / "summary.json").write_text("{not json")
    (run / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n")  # header only
    trace = run / "tensorboard" / "trace"
    trace.mkdir()
    (trace / "trace.json").write_text("{}")  # not a trace store
    st = _statuses(build_report(run).read_text())
    assert "unreadable summary.json" in st["config"]
    assert st["training_curves"].startswith("unavailable:") and "empty" in st["training_curves"]
    assert st["influential_examples"].startswith("unavailable:")
    assert st["attribution_maps"] == "ok"
    assert (run / "summary.json").read_text() == "{not json"  # left untouched


def test_trace_fallback_png(tmp_path: Path) -> None:
    run = _synthetic_run(tmp_path / "run")
    trace = run / "tensorboard" / "trace"
    trace.mkdir()
    (trace / "top_examples.png").write_bytes(_png(7))
    text = build_report(run).read_text()
    assert _statuses(text)["influential_examples"] == "ok"
    assert _png(7) in _embedded_pngs(text)


def test_regularized_vs_baseline_comparison(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    _synthetic_run(sweep / "0", regularized=False, probe_acc=0.5)
    _synthetic_run(sweep / "1", regularized=True, probe_acc=0.7)
    _synthetic_run(sweep / "2", regularized=True, probe_acc=0.9)
    text = build_report(sweep).read_text()
    st = _statuses(text)
    assert st["comparison"] == "ok"
    # the top-level directory is not a run: its own sections say so, children are not mixed in
    assert st["training_curves"].startswith("unavailable:")
    section = text[text.index('<section id="comparison">'):]
    # mean per group: baseline 0.5, regularized (0.7 + 0.9) / 2 = 0.8
    means = section[section.index("Mean per group"):]
    assert re.search(r"<td>baseline</td><td>1</td><td>0.5</td>", means)
    assert re.search(r"<td>regularized</td><td>2</td><td>0.8</td>", means)
    assert len(_embedded_pngs(section)) == 1

    # only regularized runs: nothing to compare, said so
    shutil.rmtree(sweep / "0")
    st = _statuses(build_report(sweep).read_text())
    assert st["comparison"].startswith("unavailable:") and "regularized" in st["comparison"]


def test_regularized_flag_from_config(tmp_path: Path) -> None:
    from reprlens.report import _Run

    run = tmp_path / "r"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("callbacks:\n  regularizer:\n    _target_: x.Y\n")
    assert _Run.load(run).regularized() is True
    (run / ".hydra" / "config.yaml").write_text("callbacks:\n  regularizer: null\n")
    assert _Run.load(run).regularized() is False


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="existing run directory"):
        build_report(tmp_path / "nope")
    with pytest.raises(TypeError, match="path"):
        build_report(3)  # type: ignore[arg-type]


def test_cli_report_command(tmp_path: Path) -> None:
    from reprlens.cli import report

    run = _synthetic_run(tmp_path / "run")
    assert report([str(run)]) == 0
    assert (run / REPORT_FILE).is_file()


# ------------------------------------------------------------------------------------------------ end to end
E2E_OVERRIDES = [
    "callbacks=[default,score_monitor,relax,concept_labeler,trace]",
    "+callbacks/regularizer=both",
    "callbacks.regularizer.source_layer=backbone.layer2",
    "callbacks.regularizer.target_layer=backbone.pool",
    "trainer.inference_mode=false",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "model.width=8",
    "callbacks.relax.num_masks=50",
    "callbacks.relax.num_probe=2",
    "callbacks.score_monitor.max_batches=1",
    "callbacks.score_monitor.num_probe=2",
    "callbacks.linear_probe.epochs=10",
    "callbacks.concept_labeler.n_permutations=10",
]


@pytest.mark.slow
def test_end_to_end_train_then_report(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    train = shutil.which("reprlens-train", path=str(bindir)) or "reprlens-train"
    report = shutil.which("reprlens-report", path=str(bindir)) or "reprlens-report"
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([train, *E2E_OVERRIDES, f"hydra.run.dir={run}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([report, str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    html_path = run / REPORT_FILE
    first = html_path.read_bytes()
    text = first.decode()
    st = _statuses(text)
    for key in SECTIONS:
        if key != "comparison":
            assert st[key] == "ok", (key, st[key])
    assert st["comparison"].startswith("unavailable:")
    # every embedded figure is a non-empty PNG
    pngs = _embedded_pngs(text)
    assert len(pngs) >= 8 and all(p.startswith(PNG_SIGNATURE) and len(p) > 200 for p in pngs)
    # relax uncertainty maps and the probe accuracy are there
    assert "uncertainty" in text and "linear_val_acc" in text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["report"]["sections"] == st
    # reprlens-report rebuilds it identically
    proc = subprocess.run([report, str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert html_path.read_bytes() == first


def test_influential_examples_from_trace_match_bruteforce(tmp_path: Path) -> None:
    """A real trace (plain SGD, exact) of a tiny classifier; the report's ids equal a brute-force ranking."""
    import torch
    import torch.nn.functional as F

    from reprlens.data import ShapesDataModule
    from reprlens.models import Classifier
    from reprlens.report import _NUM_TEST_IMAGES, _TOP_K
    from reprlens.trace import TraceRecorder

    torch.manual_seed(0)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "seed: 0\n"
        "model: {_target_: reprlens.models.Classifier, in_channels: 3, num_classes: 5, channels: [4, 8]}\n"
        "data: {_target_: reprlens.data.ShapesDataModule, num_train: 24, num_val: 8, num_test: 8,"
        " batch_size: 12,"
        " seed: 0}\n"
    )
    model = Classifier(in_channels=3, num_classes=5, channels=(4, 8)).double()
    model.train()
    dm = ShapesDataModule(num_train=24, num_val=8, num_test=8, batch_size=12, seed=0)
    dm.setup()
    train = dm.dataset("train").without_views()
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps = []  # (ids, a_i, dL/dz_i) per step: the oracle's own record
    with TraceRecorder(model, ["fc"], run / "trace", dtype="float64") as rec:
        for t in range(3):
            ids = torch.arange(8 * t, 8 * t + 12) % 24
            batch = train.get_batch(ids)
            rec.begin_step(batch["index"], batch["label"])
            a = model.pool(model.features(batch["image"].double()))
            logits = model.fc(a)
            logits.retain_grad()
            F.cross_entropy(logits, batch["label"]).backward()
            steps.append((batch["index"], a.detach().clone(), logits.grad.detach().clone()))
            rec.before_optimizer_step(opt)
            opt.step()
            opt.zero_grad()
            rec.end_step()
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": model.float().state_dict()}, run / "checkpoints" / "last.ckpt")

    text = build_report(run).read_text()
    assert _statuses(text)["influential_examples"] == "ok", _statuses(text)["influential_examples"]
    section = text[text.index('<section id="influential_examples">'):text.index('<section id="comparison">')]
    assert len(_embedded_pngs(section)) == _NUM_TEST_IMAGES

    # brute force: c_i(x) = sum_t -lr * g_ti * (a_ti . a(x) + 1); score_i = <c_i, dz> / |dz|, dz = sum_i c_i
    model = model.double().eval()
    x = dm.dataset("test").without_views().get_batch(torch.arange(_NUM_TEST_IMAGES))["image"].double()
    with torch.no_grad():
        ax = model.pool(model.features(x))  # (M, D)
    c = torch.zeros(_NUM_TEST_IMAGES, 24, 5, dtype=torch.float64)
    for ids, a, g in steps:
        contrib = -lr * g[None] * ((ax @ a.T)[..., None] + 1.0)  # (M, B, 5)
        c.index_add_(1, ids, contrib)
    dz = c.sum(1)
    score = (c * dz[:, None]).sum(-1) / dz.norm(dim=-1, keepdim=True)
    rows = re.findall(r"<tr><td>(\d+)</td><td>([^<]*)</td><td>([^<]*)</td>"
                      r"<td>([\d ]+)</td><td>([\d ]+)</td></tr>",
                      section)
    assert len(rows) == _NUM_TEST_IMAGES
    for m, (idx, dz_norm, err, pro, opp) in enumerate(rows):
        assert int(idx) == m
        assert float(dz_norm) == pytest.approx(float(dz[m].norm()), rel=2e-3)
        assert abs(float(err)) < 1e-3
        pro_ids = [int(v) for v in pro.split()]
        opp_ids = [int(v) for v in opp.split()]
        assert len(pro_ids) == len(opp_ids) == _TOP_K
        order = torch.argsort(score[m], descending=True)
        # compare as sets of the top/bottom k (no ties at the boundary expected with random weights)
        assert set(pro_ids) == set(order[:_TOP_K].tolist())
        assert set(opp_ids) == set(order[-_TOP_K:].tolist())

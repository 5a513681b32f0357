"""Self-contained HTML report of a finished ``reprlens-train`` run, built from its run directory only.

:func:`build_report` reads what the run left on disk — ``summary.json``, Hydra's ``.hydra/config.yaml``, the
CSV logger's ``metrics.csv``, the PNG figures of ``ScoreMonitor`` / ``RelaxMonitor`` / ``ConceptLabeler``,
the concept-label CSV tables, the ``TrainingTrace`` store and the checkpoints — and writes ``report.html``
with every figure embedded as a base64 ``data:`` URI (no external files). Nothing is retrained. A section
whose artefacts are missing says ``unavailable: <why> (<missing file>)`` instead of failing. The output is
deterministic: rebuilding from the same run directory gives a byte-identical file (inputs sorted, no
timestamps, PNG metadata stripped).

Sections (ids in ``summary.json["report"]["sections"]``):

``config``
    run config, final metrics and the linear-probe accuracy (``summary.json``, ``.hydra/config.yaml``).
``training_curves``
    train/val losses over steps (``metrics.csv``).
``scores``
    explanation scores over epochs: ``reg/*`` (regularizer) and ``*/informativeness``,
    ``*/disentanglement`` (ScoreMonitor) from ``metrics.csv``.
``attribution_maps``
    ScoreMonitor attribution-map grids (``*attribution_maps_step*.png``).
``relax``
    RELAX importance and uncertainty overlays (``relax/{init,epoch=E}-{kind}.png``).
``concept_labels``
    ConceptLabeler table (``concept_labels/<layer>/epoch=E.csv``, top rows) and figure.
``influential_examples``
    the most influential training examples of a few test images, computed with
    :class:`reprlens.trace.TraceReader` from the trace store, the last checkpoint and the data config
    (falls back to PNGs saved in the trace directory).
``comparison``
    regularized vs baseline runs when the directory holds several runs (sub-directories with a
    ``summary.json``, e.g. a multirun); a run is *regularized* when its summary says
    ``"regularized": true``, or its config has a non-null ``callbacks.regularizer``, or it logged ``reg/*``.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> run = Path(tempfile.mkdtemp())
    >>> _ = (run / "summary.json").write_text(json.dumps({"metrics": {"probe/linear_val_acc": 0.8}}))
    >>> path = build_report(run)
    >>> path.name, "probe/linear_val_acc" in path.read_text()
    ('report.html', True)
"""

from __future__ import annotations

import base64
import contextlib
import copy
import csv
import html
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["REPORT_FILE", "SECTIONS", "build_report"]

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"

#: section id -> title, in report order
SECTIONS: dict[str, str] = {
    "config": "Run config and probe accuracy",
    "training_curves": "Training curves",
    "scores": "Explanation scores over epochs",
    "attribution_maps": "Attribution maps (ScoreMonitor)",
    "relax": "RELAX maps with uncertainty (RelaxMonitor)",
    "concept_labels": "Concept labels (ConceptLabeler)",
    "influential_examples": "Influential training examples (TrainingTrace)",
    "comparison": "Regularized vs baseline",
}

_MAX_IMAGES = 3  # PNGs shown per figure series (first ... last)
_CONCEPT_ROWS = 15  # rows of the concept-label table
_NUM_TEST_IMAGES = 3  # test images of the influential-examples section
_TOP_K = 6  # proponents / opponents shown per test image
_SCORE_RE = re.compile(r"(^reg/)|(informativeness$)|(disentanglement$)")
_STEP_RE = re.compile(r"_step(\d+)\.png$")
_RELAX_RE = re.compile(r"^(init|epoch=(\d+))-([A-Za-z_]+)\.png$")
_EPOCH_RE = re.compile(r"^epoch=(\d+)\.(csv|png)$")


class _Unavailable(Exception):
    """A section cannot be built: ``why`` and the missing file(s)."""

    def __init__(self, why: str, missing: str) -> None:
        super().__init__(f"{why} ({missing})")
        self.why = why
        self.missing = missing


@dataclass
class _Section:
    key: str
    title: str
    body: str = ""
    status: str = "ok"
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ helpers
def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _is_child_run(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file() or (path / ".hydra").is_dir() or (path / "multirun.yaml").is_file()


def _own_files(run_dir: Path) -> list[Path]:
    """Files of this run (sorted), not descending into nested runs (sub-directories with a summary)."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _is_child_run(here / d))
        out.extend(here / f for f in filenames)
    return sorted(out, key=lambda p: _rel(p, run_dir))


def _child_runs(run_dir: Path) -> list[Path]:
    """Nested run directories (with a ``summary.json``) up to two levels down, sorted."""
    found = []
    for child in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if (child / SUMMARY_FILE).is_file():
            found.append(child)
        else:
            found.extend(sorted(g for g in child.iterdir() if g.is_dir() and (g / SUMMARY_FILE).is_file()))
    return found


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, caption: str) -> str:
    cap = html.escape(caption)
    return f'<figure><img src="{_png_uri(data)}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def _fig_html(fig: Any, caption: str) -> str:
    from reprlens.plotting.common import figure_to_png, require_matplotlib

    try:
        data = figure_to_png(fig)
    finally:
        require_matplotlib().close(fig)
    return _img(data, caption)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    cells = ("".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) for row in rows)
    body = "".join(f"<tr>{c}</tr>" for c in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _spread(items: Sequence[Any], k: int) -> list[Any]:
    """At most ``k`` items evenly spread over ``items``, always keeping the first and the last."""
    n = len(items)
    if n <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    idx = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def _float(s: str | None) -> float | None:
    if s is None or s == "":
        return None
    try:
        return float(s)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ run data
@dataclass
class _Run:
    """What was found in one run directory."""

    root: Path
    files: list[Path]
    summary: dict[str, Any] | None
    summary_error: str | None
    config: Any  # omegaconf DictConfig or None
    metrics_csv: Path | None

    @classmethod
    def load(cls, root: Path) -> _Run:
        summary, err = None, None
        spath = root / SUMMARY_FILE
        if spath.is_file():
            try:
                loaded = json.loads(spath.read_text())
                if not isinstance(loaded, dict):
                    raise ValueError(f"expected a JSON object, got {type(loaded).__name__}")
                summary = {k: v for k, v in loaded.items() if k != "report"}
            except (ValueError, OSError) as e:
                err = f"unreadable {SUMMARY_FILE}: {e}"
        config = None
        cpath = root / ".hydra" / "config.yaml"
        if cpath.is_file():
            from omegaconf import OmegaConf

            with contextlib.suppress(Exception):
                config = OmegaConf.load(cpath)
        files = _own_files(root)
        csvs = [p for p in files if p.name == "metrics.csv"]
        # the CSV logger's default place first (<run>/csv/metrics.csv), then any other
        csvs.sort(key=lambda p: (p.parent.name != "csv", _rel(p, root)))
        return cls(root, files, summary, err, config, csvs[0] if csvs else None)

    def find(self, predicate: Callable[[Path], bool]) -> list[Path]:
        return [p for p in self.files if predicate(p)]

    def metrics(self) -> dict[str, Any]:
        return dict((self.summary or {}).get("metrics") or {})

    def read_metrics_csv(self) -> tuple[list[str], list[dict[str, str]]]:
        if self.metrics_csv is None:
            raise _Unavailable("no CSV logger output",
                               "metrics.csv missing; run with logger=default or logger=[csv]")
        with open(self.metrics_csv, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
        if not rows:
            raise _Unavailable("the CSV log has no rows", f"{_rel(self.metrics_csv, self.root)} is empty")
        return header, rows

    def regularized(self) -> bool | None:
        s = self.summary or {}
        if isinstance(s.get("regularized"), bool):
            return bool(s["regularized"])
        if self.config is not None:
            from omegaconf import OmegaConf

            with contextlib.suppress(Exception):
                reg = OmegaConf.select(self.config, "callbacks.regularizer", default=None)
                return reg is not None
        if s:
            return any(k.startswith("reg/") for k in self.metrics())
        return None


def _series(
    rows: Sequence[Mapping[str, str]], column: str, x: str = "step"
) -> tuple[list[float], list[float]]:
    """``(x, y)`` of the rows where ``column`` was logged (and x is known), in row order."""
    xs, ys = [], []
    for r in rows:
        y, xv = _float(r.get(column)), _float(r.get(x))
        if y is not None and xv is not None:
            xs.append(xv)
            ys.append(y)
    return xs, ys


def _epoch_means(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """Mean of ``ys`` per distinct ``xs`` value, in increasing x (exact float sums: deterministic)."""
    acc: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
        acc.setdefault(x, []).append(y)
    keys = sorted(acc)
    return keys, [math.fsum(acc[k]) / len(acc[k]) for k in keys]


# ------------------------------------------------------------------------------------------------ sections
def _section_config(run: _Run) -> str:
    parts = []
    if run.summary is None:
        raise _Unavailable(run.summary_error or "the run wrote no summary", f"{SUMMARY_FILE} missing")
    s = run.summary
    keys = ("task_name", "seed", "epochs", "global_step", "world_size", "optimized_metric", "optimized_value")
    info = [(k, s.get(k)) for k in keys if k in s]
    reg = run.regularized()
    if reg is not None:
        info.append(("regularized", reg))
    if info:
        parts.append(_table(["key", "value"], info))
    probes = {k: v for k, v in s.items() if k.startswith("linear_probe") and isinstance(v, Mapping)}
    probe_rows = [(name, k, v) for name, res in sorted(probes.items()) for k, v in sorted(res.items())
                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
    metric_probe = [("metrics", k, v) for k, v in sorted(run.metrics().items()) if k.startswith("probe/")]
    if probe_rows or metric_probe:
        table = _table(["source", "metric", "value"], probe_rows or metric_probe)
        parts.append("<h3>Probe accuracy</h3>" + table)
    else:
        parts.append('<p class="na">probe accuracy unavailable: no LinearProbe result in summary.json '
                     "(add the linear_probe callback)</p>")
    metrics = run.metrics()
    if metrics:
        parts.append("<h3>Final metrics</h3>" + _table(["metric", "value"], sorted(metrics.items())))
    ckpts = run.find(lambda p: p.suffix == ".ckpt")
    if ckpts:
        parts.append("<h3>Checkpoints</h3>" + _table(
            ["file", "bytes"], [(_rel(p, run.root), p.stat().st_size) for p in ckpts]))
    if run.config is not None:
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(run.config, resolve=False)
        parts.append("<details><summary>Hydra config (.hydra/config.yaml)</summary>"
                     f"<pre>{html.escape(text)}</pre></details>")
    return "\n".join(parts)


def _section_training_curves(run: _Run) -> str:
    header, rows = run.read_metrics_csv()
    losses = [c for c in header if "loss" in c.rsplit("/", 1)[-1] and not c.startswith("reg/")]
    if not losses:
        where = _rel(run.metrics_csv, run.root)  # type: ignore[arg-type]
        raise _Unavailable("no loss column was logged", f"no '*loss*' column in {where}")
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for col in sorted(losses):
        stage = col.split("/", 1)[0] if "/" in col else "loss"
        xs, ys = _series(rows, col)
        if xs:
            panels.setdefault(f"{stage} loss", {})[col] = (xs, ys)
    if not panels:
        raise _Unavailable("the loss columns hold no values", _rel(run.metrics_csv, run.root))
    from reprlens.plotting.report import plot_metric_curves

    ordered = sorted(panels.items(), key=lambda kv: (not kv[0].startswith("train"), kv[0]))  # train first
    fig = plot_metric_curves(dict(ordered))
    last = [(col, ys[-1], int(xs[-1])) for p in panels.values() for col, (xs, ys) in p.items()]
    return _fig_html(fig, f"losses over optimizer steps ({_rel(run.metrics_csv, run.root)})") + _table(
        ["metric", "last value", "at step"], last)


def _section_scores(run: _Run) -> str:
    header, rows = run.read_metrics_csv()
    cols = sorted(c for c in header if _SCORE_RE.search(c))
    if not cols:
        raise _Unavailable(
            "no explanation score was logged (add ScoreMonitor and/or the regularizer)",
            f"no reg/* or */informativeness, */disentanglement column in {_rel(run.metrics_csv, run.root)}",
        )
    panels, table = {}, []
    for col in cols:
        xs, ys = _series(rows, col, x="epoch")
        if xs and len(xs) == len(_series(rows, col, x="step")[0]):
            xs, ys = _epoch_means(xs, ys)  # several values per epoch (logged every step): their mean
            xlab = "epoch (mean)" if len(xs) < len(_series(rows, col, x="epoch")[0]) else "epoch"
        else:  # no epoch column for this metric: steps
            xs, ys = _series(rows, col)
            xlab = "step"
        if xs:
            panels[f"{col} (per {xlab})"] = {col: (xs, ys)}
            table.append((col, xlab, ys[0], ys[-1], len(ys)))
    if not panels:
        raise _Unavailable("the score columns hold no values", _rel(run.metrics_csv, run.root))
    from reprlens.plotting.report import plot_metric_curves

    fig = plot_metric_curves(panels, xlabel="epoch / step", ncols=3)
    return _fig_html(fig, "explanation scores (reg/*: training steps; val/*: validation epochs)") + _table(
        ["metric", "x", "first", "last", "points"], table)


def _section_attribution_maps(run: _Run) -> str:
    pngs = run.find(lambda p: p.suffix == ".png" and "attribution_maps" in p.name)
    if not pngs:
        raise _Unavailable("ScoreMonitor saved no figure",
                           "no *attribution_maps_step*.png under the run directory; "
                           "add callbacks=[...,score_monitor]")
    groups: dict[str, list[Path]] = {}
    for p in pngs:
        groups.setdefault(_STEP_RE.sub("", p.name), []).append(p)
    parts = []
    for tag, files in sorted(groups.items()):
        files.sort(key=lambda p: int(m.group(1)) if (m := _STEP_RE.search(p.name)) else -1)
        for p in _spread(files, _MAX_IMAGES):
            parts.append(_img(p.read_bytes(), _rel(p, run.root)))
    return "\n".join(parts)


def _section_relax(run: _Run) -> str:
    pngs = run.find(lambda p: p.suffix == ".png" and p.parent.name == "relax" and _RELAX_RE.match(p.name))
    if not pngs:
        raise _Unavailable("RelaxMonitor saved no figure",
                           "no relax/{init,epoch=E}-{importance,uncertainty}.png; add callbacks=[...,relax]")
    by_stem: dict[tuple[int, str], dict[str, Path]] = {}
    for p in pngs:
        m = _RELAX_RE.match(p.name)
        assert m is not None
        epoch = -1 if m.group(1) == "init" else int(m.group(2))
        by_stem.setdefault((epoch, _rel(p.parent, run.root)), {})[m.group(3)] = p
    order = ["importance", "uncertainty", "u_relax"]
    parts = []
    for (epoch, where), kinds in _spread(sorted(by_stem.items()), 2):
        label = "untrained encoder" if epoch < 0 else f"epoch {epoch}"
        parts.append(f"<h3>{html.escape(label)} <small>({html.escape(where)})</small></h3>")
        for kind in sorted(kinds, key=lambda k: (order.index(k) if k in order else len(order), k)):
            parts.append(_img(kinds[kind].read_bytes(), f"{kind}: {_rel(kinds[kind], run.root)}"))
    if not any("uncertainty" in kinds for _, kinds in by_stem.items()):
        parts.append('<p class="na">uncertainty maps unavailable: no relax/*-uncertainty.png</p>')
    return "\n".join(parts)


def _read_concept_csv(path: Path) -> tuple[dict[str, str], list[str], list[list[str]]]:
    params, lines = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            k, _, v = line[1:].partition(":")
            params[k.strip()] = v.strip()
        elif line.strip():
            lines.append(line)
    rows = list(csv.reader(lines))
    if not rows:
        raise _Unavailable("the concept-label table is empty", str(path.name))
    return params, rows[0], rows[1:]


def _section_concept_labels(run: _Run) -> str:
    files = run.find(lambda p: p.suffix in (".csv", ".png") and _EPOCH_RE.match(p.name) is not None
                     and "concept_labels" in p.parts[len(run.root.parts):])
    csvs = [p for p in files if p.suffix == ".csv"]
    if not csvs:
        raise _Unavailable("ConceptLabeler wrote no table",
                           "no concept_labels/<layer>/epoch=E.csv; add callbacks=[...,concept_labeler]")
    by_layer: dict[Path, list[Path]] = {}
    for p in csvs:
        by_layer.setdefault(p.parent, []).append(p)
    parts = []
    for layer_dir, paths in sorted(by_layer.items()):
        path = max(paths, key=lambda p: int(_EPOCH_RE.match(p.name).group(1)))  # type: ignore[union-attr]
        params, header, rows = _read_concept_csv(path)
        mode = params.get("mode", "positive")
        if "rank" in header:  # the best formula of each unit (InvertResult.best): rank 0 of the final beam
            ir = header.index("rank")
            rows = [r for r in rows if _float(r[ir]) == 0]
            if "step" in header and _float(params.get("max_length")) is not None:
                ist = header.index("step")
                rows = [r for r in rows if _float(r[ist]) == _float(params.get("max_length"))]
        if "auc" in header:
            ia = header.index("auc")
            ip = header.index("p_corrected") if "p_corrected" in header else None

            def key(r: list[str], ia: int = ia, ip: int | None = ip) -> tuple[float, float]:
                a = _float(r[ia])
                obj = -math.inf if a is None or math.isnan(a) else (a if mode != "negative" else 1.0 - a)
                p = _float(r[ip]) if ip is not None else None
                return (-obj, math.inf if p is None or math.isnan(p) else p)

            rows = sorted(rows, key=key)  # best objective first, then smallest corrected p; stable for ties
        keep = [c for c in ("neuron", "formula", "length", "auc", "fraction", "p_corrected", "p_value")
                if c in header] or header
        idx = [header.index(c) for c in keep]
        numeric = ("auc", "fraction", "p_corrected", "p_value")
        shown = [[_fmt(_float(r[i])) if c in numeric and _float(r[i]) is not None else r[i]
                  for c, i in zip(keep, idx)] for r in rows[:_CONCEPT_ROWS]]
        parts.append(f"<h3>layer {html.escape(layer_dir.name)} — {html.escape(_rel(path, run.root))} "
                     f"({len(rows)} labelled units, top {len(shown)} by AUC)</h3>")
        parts.append(_table(keep, shown))
        png = path.with_suffix(".png")
        if png.is_file():
            parts.append(_img(png.read_bytes(), _rel(png, run.root)))
        else:
            parts.append(f'<p class="na">figure unavailable: {html.escape(_rel(png, run.root))} missing</p>')
    return "\n".join(parts)


def _trace_dirs(run: _Run) -> list[Path]:
    return sorted({p.parent for p in run.find(lambda p: p.name == "trace.json")})


def _load_model_and_data(run: _Run) -> tuple[Any, Any]:
    """The trained model (last checkpoint) and the datamodule, rebuilt from ``.hydra/config.yaml``."""
    if run.config is None:
        raise _Unavailable("the model and data config are needed to embed test images",
                           ".hydra/config.yaml missing")
    ckpts = run.find(lambda p: p.suffix == ".ckpt")
    last = [p for p in ckpts if p.name == "last.ckpt"] or ckpts
    if not last:
        raise _Unavailable("the trained weights are needed to embed test images",
                           "no checkpoints/*.ckpt; keep the model_checkpoint callback")
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = copy.deepcopy(run.config)
    if OmegaConf.select(cfg, "paths") is not None:  # `${hydra:...}` does not resolve outside the Hydra job
        cwd = None
        hpath = run.root / ".hydra" / "hydra.yaml"
        if hpath.is_file():
            with contextlib.suppress(Exception):
                cwd = OmegaConf.select(OmegaConf.load(hpath), "hydra.runtime.cwd", default=None)
        with contextlib.suppress(Exception):
            cfg.paths.root_dir = str(cwd or run.root)
            cfg.paths.output_dir = str(run.root)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    model = instantiate(model_cfg, _convert_="all")
    state = torch.load(last[-1], map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    model.eval()
    datamodule = instantiate(data_cfg, _convert_="all")
    return model, datamodule


def _layer_forward(model: Any, layer: str, x: Any) -> Callable[[Any, Any], Any]:
    """A ``forward_fn`` reaching ``layer``: ``model(x)``, else ``model.<head>(model(x))``."""
    import torch

    from reprlens.utils import get_module

    candidates: list[Callable[[Any, Any], Any]] = [lambda m, x: m(x)]
    for head in ("projector", "head", "classifier", "decoder"):
        if hasattr(model, head):
            candidates.append(lambda m, x, h=head: getattr(m, h)(m(x)))
    mod = get_module(model, layer)
    for fn in candidates:
        hit: list[bool] = []
        h = mod.register_forward_hook(lambda *_: hit.append(True))
        try:
            with torch.no_grad():
                fn(model, x[:1])
        except Exception:  # a head that does not take the forward output
            hit.clear()
        finally:
            h.remove()
        if hit:
            return fn
    raise _Unavailable(f"no forward pass of the model reaches the traced layer {layer!r}",
                       "model(x) and model.<projector|head|classifier|decoder>(model(x)) tried")


def _section_influential(run: _Run) -> str:
    tdirs = _trace_dirs(run)
    fallback = run.find(lambda p: p.suffix == ".png" and ("trace" in p.parts[len(run.root.parts):-1]
                                                          or "influen" in p.name or "top_examples" in p.name))
    if not tdirs:
        if fallback:
            return "\n".join(_img(p.read_bytes(), _rel(p, run.root)) for p in fallback)
        raise _Unavailable("no training trace was recorded", "no trace/trace.json; add callbacks=[...,trace]")
    try:
        return _influential_from_trace(run, tdirs[0])
    except _Unavailable as e:
        if fallback:
            note = f'<p class="na">trace query unavailable: {html.escape(str(e))}; showing saved figures</p>'
            return note + "\n".join(_img(p.read_bytes(), _rel(p, run.root)) for p in fallback)
        raise


def _influential_from_trace(run: _Run, tdir: Path) -> str:
    import torch

    from reprlens.trace import TraceReader
    from reprlens.trace.plots import plot_top_examples

    try:
        reader = TraceReader(tdir)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise _Unavailable(f"the trace store cannot be read: {e}", _rel(tdir / "trace.json", run.root)) from e
    if reader.mode == "tracin":
        raise _Unavailable("TracIn traces need the per-example loss; query them with TraceReader.influence",
                           _rel(tdir, run.root))
    if getattr(reader, "num_examples", 0) == 0:
        raise _Unavailable("the trace holds no recorded step", _rel(tdir, run.root))
    model, dm = _load_model_and_data(run)
    layer = reader.layers[-1]
    dm.setup()
    test = dm.dataset("test").without_views()
    n_test = min(_NUM_TEST_IMAGES, len(test))
    batch = test.get_batch(torch.arange(n_test))
    x = batch["image"]
    forward_fn = _layer_forward(model, layer, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = reader.contributions(x, layer, model=model, forward_fn=forward_fn, progress=True)
    prop = reader.top_k(res, _TOP_K, proponents=True)
    opp = reader.top_k(res, _TOP_K, proponents=False)
    train = dm.dataset("train").without_views()
    ids = torch.unique(torch.cat([prop.ids.flatten(), opp.ids.flatten()]))
    imgs = train.get_batch(ids)["image"]
    lookup = {int(i): imgs[k] for k, i in enumerate(ids.tolist())}
    names = None
    with contextlib.suppress(Exception):
        names = list(getattr(train, "class_names", None) or getattr(dm, "class_names", None) or []) or None
    exact = "exact" if not reader.approximations else f"approximate ({', '.join(reader.approximations)})"
    parts = [
        f"<p>layer <code>{html.escape(layer)}</code>, mode {html.escape(reader.mode)}, {html.escape(exact)}; "
        f"store {html.escape(_rel(tdir, run.root))}. Score: projection of each training example's "
        "contribution onto the net change of the layer's pre-activation (positive: moved it toward its final "
        "value).</p>"
    ]
    for i in range(n_test):
        fig = plot_top_examples((prop, opp), lambda j: lookup[int(j)], index=i, ncols=_TOP_K, test_image=x[i],
                                class_names=names, title=f"test image {i} (label {int(batch['label'][i])})")
        parts.append(_fig_html(fig, f"test image {i}: top {_TOP_K} proponents and opponents"))
    err = res.completeness_error.double()
    parts.append(_table(
        ["test image", "‖Δz‖", "completeness error", f"top {_TOP_K} proponents (ids)",
         f"top {_TOP_K} opponents (ids)"],
        [(i, float(res.delta_z_norm[i]), float(err[i]), " ".join(str(int(j)) for j in prop.ids[i]),
          " ".join(str(int(j)) for j in opp.ids[i])) for i in range(n_test)],
    ))
    return "\n".join(parts)


_COMPARE_KEYS = ("probe/linear_val_acc", "probe/knn_val_acc", "val/informativeness", "val/disentanglement",
                 "val/loss", "train/loss")


def _section_comparison(run: _Run, children: Sequence[_Run]) -> str:
    if not children:
        raise _Unavailable("the run directory holds a single run",
                           "no sub-directory with a summary.json (run a multirun over callbacks/regularizer)")
    flags = [c.regularized() for c in children]
    if True not in flags or False not in flags:
        kinds = "regularized" if True in flags else "baseline"
        raise _Unavailable(f"all {len(children)} nested runs are {kinds} (or unknown); nothing to compare",
                           "no run with the other regularizer setting")
    names = [_rel(c.root, run.root) for c in children]
    groups = ["regularized" if f else ("baseline" if f is False else "unknown") for f in flags]
    keys = [k for k in _COMPARE_KEYS if any(k in c.metrics() for c in children)]
    extra = sorted({k for c in children for k in c.metrics() if k.startswith("probe/") and k not in keys})
    keys += extra
    rows = [[n, g, *[c.metrics().get(k) for k in keys]] for n, g, c in zip(names, groups, children)]
    parts = [_table(["run", "group", *keys], rows)]
    # mean per group
    means = []
    for g in ("baseline", "regularized"):
        vals = []
        for k in keys:
            xs = [c.metrics().get(k) for c, gg in zip(children, groups) if gg == g]
            xs = [float(v) for v in xs if isinstance(v, (int, float)) and math.isfinite(float(v))]
            vals.append(sum(xs) / len(xs) if xs else None)
        means.append([g, groups.count(g), *vals])
    parts.append("<h3>Mean per group</h3>" + _table(["group", "runs", *keys], means))
    plot_keys = [k for k in keys if any(isinstance(c.metrics().get(k), (int, float)) for c in children)]
    if plot_keys:
        from reprlens.plotting.report import plot_run_comparison

        fig = plot_run_comparison(names, {k: [c.metrics().get(k) for c in children] for k in plot_keys},
                                  groups=groups)
        parts.append(_fig_html(fig, "final metrics per run"))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ html
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}th{background:#f4f4f4}
figure{display:inline-block;margin:.5em;vertical-align:top}figure img{max-width:100%}
figcaption{font-size:.8em;color:#555}.na{color:#a33;font-style:italic}pre{font-size:.8em;background:#f8f8f8;
padding:.6em;overflow:auto}.ok{color:#275}
""".strip()


def _render(title: str, sections: Sequence[_Section]) -> str:
    toc = "".join(
        f'<li><a href="#{s.key}">{html.escape(s.title)}</a> '
        f'<span class="{"ok" if s.status == "ok" else "na"}">{html.escape(s.status)}</span></li>'
        for s in sections
    )
    body = []
    for s in sections:
        if s.status == "ok":
            content = s.body
        else:
            content = f'<p class="na">{html.escape(s.status)}</p>'
        notes = "".join(f'<p class="na">{html.escape(n)}</p>' for n in s.notes)
        body.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>\n{content}{notes}</section>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<ul>{toc}</ul>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _build(key: str, fn: Callable[[], str]) -> _Section:
    sec = _Section(key, SECTIONS[key])
    try:
        sec.body = fn()
        if not sec.body.strip():
            raise _Unavailable("the section has no content", "no artefact")
    except _Unavailable as e:
        sec.status = f"unavailable: {e.why} ({e.missing})"
    except ImportError as e:
        sec.status = f"unavailable: a package is missing: {e}"
    except Exception as e:  # a damaged artefact must not stop the other sections
        sec.status = f"unavailable: error while reading the artefacts: {type(e).__name__}: {e}"
        warnings.warn(f"reprlens report section {key!r} failed: {type(e).__name__}: {e}", stacklevel=3)
    return sec


def build_report(run_dir: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None) -> Path:
    """Write the self-contained HTML report of a ``reprlens-train`` run directory (nothing is retrained).

    Reads only the run directory: ``summary.json``, ``.hydra/config.yaml``, the CSV logger's ``metrics.csv``,
    the callbacks' PNG figures and concept-label CSVs, the ``TrainingTrace`` store and the checkpoints (see
    the module docstring for the sections). Every section whose artefacts are missing is rendered as
    ``unavailable: <why> (<missing file>)``. When ``summary.json`` exists, its ``"report"`` entry is set to
    the report path and the status of every section (the rest of the file is kept as it was).

    Deterministic: the same run directory gives a byte-identical ``report.html``.

    Args:
        run_dir: the run directory (``outputs/<date>/<time>`` of a run, or a multirun directory whose
            numbered sub-directories are runs: then the ``comparison`` section compares them, and, when
            ``out`` is None, ``results.md`` (mean ± sample std per swept setting: the Hydra overrides that
            differ between the runs, the seed excepted; then one row per run) and ``results.csv`` (one row
            per run) are written next to the report).
        out: the HTML file to write (default ``<run_dir>/report.html``).

    Returns:
        The path of the written HTML file.

    Raises:
        ValueError: ``run_dir`` is not an existing directory.
        TypeError: ``run_dir`` or ``out`` is not a path.

    Example:
        >>> import tempfile
        >>> path = build_report(tempfile.mkdtemp())  # an empty directory: every section is unavailable
        >>> "unavailable" in path.read_text()
        True
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(
            f"Expected `run_dir` to be a path (str or os.PathLike), but got {type(run_dir).__name__}."
        )
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"Expected `out` to be a path or None, but got {type(out).__name__}.")
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(
            "Expected `run_dir` to be an existing run directory (written by reprlens-train, with "
            "summary.json), "
            f"but {str(root)!r} is not a directory. Pass e.g. outputs/<date>/<time>."
        )
    root = root.resolve()
    out_path = Path(out) if out is not None else root / REPORT_FILE
    run = _Run.load(root)
    children = [_Run.load(c) for c in _child_runs(root)]

    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "reprlens", "figure.max_open_warning": 0}):
        sections = [
            _build("config", lambda: _section_config(run)),
            _build("training_curves", lambda: _section_training_curves(run)),
            _build("scores", lambda: _section_scores(run)),
            _build("attribution_maps", lambda: _section_attribution_maps(run)),
            _build("relax", lambda: _section_relax(run)),
            _build("concept_labels", lambda: _section_concept_labels(run)),
            _build("influential_examples", lambda: _section_influential(run)),
            _build("comparison", lambda: _section_comparison(run, children)),
        ]
    name = (run.summary or {}).get("task_name") or root.name
    text = _render(f"reprlens report — {name}", sections)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out_path)
    _update_summary(root, out_path, sections)
    if children and out is None:
        _write_results_table(root, children)
    return out_path


RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"


def _job_overrides(run: _Run) -> list[str]:
    """The run's Hydra command-line overrides (``.hydra/overrides.yaml``), minus the sweep's own ``hydra.*`` ones."""
    path = run.root / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    try:
        items = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # noqa: BLE001 - a damaged file: the run is grouped by its regularizer flag instead
        return []
    return [str(o) for o in items or [] if not str(o).lstrip("+~").startswith("hydra.")]


def _results_rows(root: Path, children: Sequence[_Run]) -> tuple[list[str], list[list[Any]], list[list[Any]]]:
    """(metric keys, one row per run, one row per setting) of a multirun's results table.

    A setting is the run's overrides other than ``seed=...`` (e.g. ``reg_weight=0.1``; runs without overrides
    are grouped as ``regularized`` / ``baseline``); its row holds ``mean ± std`` (sample std) over its runs.
    """
    keys = [k for k in _COMPARE_KEYS if any(k in c.metrics() for c in children)]
    keys += sorted({k for c in children for k in c.metrics() if k.startswith(("probe/", "reg/")) and k not in keys})
    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    overrides = [_job_overrides(c) for c in children]
    values: dict[str, set[str]] = {}
    for ov in overrides:
        for o in ov:
            values.setdefault(key(o), set()).add(o)
    # the swept keys: overrides whose value differs between the runs (the seed is averaged over)
    swept = {k for k, v in values.items() if k != "seed" and (len(v) > 1 or any(
        not any(key(o) == k for o in ov) for ov in overrides))}
    settings = []
    for c, ov in zip(children, overrides):
        chosen = [o for o in ov if key(o) in swept]
        flag = c.regularized()
        settings.append(" ".join(chosen) if chosen else ("regularized" if flag else "baseline" if flag is False else "?"))
    runs = [[_rel(c.root, root), st, (c.summary or {}).get("seed"), c.regularized(), *[c.metrics().get(k) for k in keys]]
            for c, st in zip(children, settings)]
    groups = []
    for st in dict.fromkeys(settings):
        members = [c for c, s2 in zip(children, settings) if s2 == st]
        row: list[Any] = [st, len(members)]
        for k in keys:
            xs = [float(v) for v in (c.metrics().get(k) for c in members)
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
            if not xs:
                row.append(None)
                continue
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
            row.append(f"{mean:.4g} ± {std:.2g}")
        groups.append(row)
    return keys, runs, groups


def _write_results_table(root: Path, children: Sequence[_Run]) -> None:
    """Write ``results.md`` (per setting and per run) and ``results.csv`` (per run) into a multirun directory."""
    keys, runs, groups = _results_rows(root, children)

    def md(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
        cell = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell(v).replace("|", "\\|") for v in r) + " |" for r in rows]
        return "\n".join(lines)

    text = (
        f"# Results of {root.name}\n\nMean ± sample std over the runs of each setting (the swept values other "
        "than the seed):\n\n" + md(["setting", "runs", *keys], groups)
        + "\n\n## Runs\n\n" + md(["run", "setting", "seed", "regularized", *keys], runs) + "\n"
    )
    (root / RESULTS_MD).write_text(text, encoding="utf-8")
    with open(root / RESULTS_CSV, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "setting", "seed", "regularized", *keys])
        writer.writerows([["" if v is None else v for v in r] for r in runs])


def _update_summary(root: Path, out_path: Path, sections: Sequence[_Section]) -> None:
    spath = root / SUMMARY_FILE
    if not spath.is_file():
        return
    try:
        data = json.loads(spath.read_text())
    except ValueError:
        return  # unreadable: the config section already says so; do not overwrite the user's file
    if not isinstance(data, dict):
        return
    data["report"] = {
        "path": _rel(out_path.resolve(), root),
        "sections": {s.key: s.status for s in sections},
    }
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError:  # NaN/inf in a hand-written summary: leave the file as it is
        return
    tmp = spath.with_name(spath.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, spath)


def _main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - thin wrapper of cli.report
    from reprlens.cli import report

    return report(argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())


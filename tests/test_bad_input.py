"""Bad input everywhere (issue 10, item 1).

Every public entry point (functions, classes, callbacks, CLI) is driven with wrong shapes, dtypes, devices,
names, ranges, empty inputs and NaN/Inf, and must raise a specific error whose message names what was
expected or given. Hypothesis drives the functional APIs with valid-but-odd inputs (constant maps, single
positions, huge/tiny magnitudes, ties): the outputs must be finite (or the documented error / NaN).
"""

from __future__ import annotations

import math
import re
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from reprlens.attribution import (
    LayerToLayerAttribution,
    PooledHead,
    aggregate_channels,
    chain_attributions,
    layer_attributions,
    normalize_maps,
)
from reprlens.capture import LayerCapture
from reprlens.invert import ConceptSet, auroc
from reprlens.relax import Relax, relax
from reprlens.scores import Disentanglement, Informativeness, disentanglement, informativeness
from reprlens.utils import get_module

NAN = float("nan")
INF = float("inf")
HYP = settings(max_examples=int(__import__("os").environ.get("BADINPUT_EXAMPLES", 30)), deadline=None,
               suppress_health_check=[HealthCheck.too_slow], derandomize="BADINPUT_EXAMPLES" not in __import__("os").environ)


def _head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def _src(*shape: int, **kw) -> torch.Tensor:
    return torch.randn(*(shape or (2, 4, 5, 5)), **kw)


def _enc() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _maps(*shape: int) -> torch.Tensor:
    return torch.rand(*(shape or (2, 3, 4, 4)))


def _imp(name: str):
    import importlib

    return importlib.import_module(name)


_RELAX = dict(num_masks=10, batch_size=10, num_cells=3, seed=0)

# (id, thunk, exception type, message regex naming what was expected/given)
CASES = [
    # ---- attribution.layer_attributions ----
    ("la-source-not-tensor", lambda: layer_attributions([1.0, 2.0], _head()), TypeError, r"`source`.*torch\.Tensor.*list"),
    ("la-source-int-dtype", lambda: layer_attributions(torch.ones(2, 4, 5, 5, dtype=torch.long), _head()), TypeError,
     r"floating-point `source`.*int64"),
    ("la-source-meta-device", lambda: layer_attributions(_src(device="meta"), _head()), ValueError, r"'meta' tensor"),
    ("la-source-1d", lambda: layer_attributions(torch.randn(5), _head()), ValueError, r"\(N, \*S\).*\(5,\)"),
    ("la-unknown-method", lambda: layer_attributions(_src(), _head(), method="saliency"), ValueError,
     r"`method`.*grad_x_act.*'saliency'"),
    ("la-dims-out-of-range", lambda: layer_attributions(_src(), _head(), dims=[5]), ValueError, r"`dims` in \[0, 3\).*\[5\]"),
    ("la-dims-negative", lambda: layer_attributions(_src(), _head(), dims=[-1]), ValueError, r"`dims` in \[0, 3\).*\[-1\]"),
    ("la-chunk-size-zero", lambda: layer_attributions(_src(), _head(), chunk_size=0), ValueError, r"`chunk_size`.*>= 1.*0"),
    ("la-ig-n-steps-zero", lambda: layer_attributions(_src(), _head(), method="integrated_gradients", n_steps=0),
     ValueError, r"`n_steps`.*>= 1.*0"),
    ("la-unknown-transform", lambda: layer_attributions(_src(), _head(), transform="square"), ValueError,
     r"`transform`.*'abs'.*'square'"),
    ("la-nan-source-check-finite", lambda: layer_attributions(torch.full((2, 4, 5, 5), NAN), _head(), check_finite=True),
     ValueError, r"NaN or Inf"),
    ("la-graph-source-no-grad", lambda: layer_attributions(_src(), torch.randn(2, 3)), ValueError, r"does not require grad"),
    ("la-graph-target-unrelated", lambda: layer_attributions(_src(requires_grad=True), torch.randn(2, 3, requires_grad=True)),
     ValueError, r"not computed from the source"),
    ("la-graph-target-batch-mismatch",
     lambda: (lambda h: layer_attributions(h, (h.flatten(1) @ torch.randn(100, 3))[:1]))(_src(requires_grad=True)),
     ValueError, r"batch size 2.*\(1, 3\)"),
    ("la-ig-baseline-shape", lambda: layer_attributions(_src(), _head(), method="integrated_gradients",
                                                        source_baseline=torch.zeros(3, 3)),
     ValueError, r"broadcastable to the source shape \(2, 4, 5, 5\).*\(3, 3\)"),
    ("la-head-shape-mismatch", lambda: layer_attributions(_src(2, 3, 5, 5), _head()), ValueError,
     r"head could not be applied to the source of shape \(2, 3, 5, 5\).*mat1 and mat2"),
    ("la-head-dtype-mismatch", lambda: layer_attributions(_src().double(), _head()), ValueError,
     r"head could not be applied.*torch\.float64"),
    ("pooledhead-not-callable", lambda: PooledHead(3), TypeError, r"`mlp` to be callable.*int"),
    ("chain-upper-wrong-ndim", lambda: chain_attributions(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)), ValueError,
     r"`upper` of shape \(N, O, K\).*\(2, 3, 4, 4\)"),
    # ---- attribution.normalize_maps / aggregate_channels ----
    ("normalize-eps-nan", lambda: normalize_maps(_maps(), eps=NAN), ValueError, r"`eps`.*finite.*nan"),
    ("normalize-eps-negative", lambda: normalize_maps(_maps(), eps=-1.0), ValueError, r"`eps`.*>= 0.*-1"),
    ("normalize-int-maps", lambda: normalize_maps(torch.ones(2, 2, 3, dtype=torch.long)), TypeError, r"floating-point.*int64"),
    ("normalize-unknown-mode", lambda: normalize_maps(_maps(), mode="zscore"), ValueError, r"`mode`.*minmax.*'zscore'"),
    ("normalize-not-tensor", lambda: normalize_maps(np.ones((2, 2, 3))), TypeError, r"`maps`.*torch\.Tensor.*ndarray"),
    ("aggregate-4d-needs-channel-dim", lambda: aggregate_channels(torch.rand(2, 2, 3, 3)), ValueError,
     r"Cannot infer the channel axis.*ndim=4.*channel_dim="),
    ("aggregate-2d", lambda: aggregate_channels(torch.rand(2, 2)), ValueError, r"at least 3 dims.*\(2, 2\)"),
    ("aggregate-channel-dim-out-of-range", lambda: aggregate_channels(torch.rand(2, 2, 3, 3, 3), channel_dim=7),
     ValueError, r"`channel_dim`.*5-dim.*7"),
    ("aggregate-unknown-transform", lambda: aggregate_channels(torch.rand(2, 2, 3), transform="log"), ValueError,
     r"`transform`.*'log'"),
    # ---- scores ----
    ("inf-reference-k-mismatch", lambda: informativeness(_maps(), _maps(5, 2, 4, 4)), ValueError,
     r"agree in every axis but the first.*\(2, 3, 4, 4\) and \(5, 2, 4, 4\)"),
    ("inf-reference-positions-mismatch", lambda: informativeness(_maps(), _maps(5, 3, 5, 5)), ValueError,
     r"\(2, 3, 4, 4\) and \(5, 3, 5, 5\)"),
    ("inf-2d-maps", lambda: informativeness(_maps(2, 3), _maps(2, 3)), ValueError, r"ndim >= 3.*\(2, 3\).*unsqueeze"),
    ("inf-nan-maps", lambda: informativeness(torch.full((2, 3, 4, 4), NAN), _maps()), ValueError, r"`maps` to be finite"),
    ("inf-inf-reference", lambda: informativeness(_maps(), torch.full((2, 3, 4, 4), INF)), ValueError,
     r"`reference_maps` to be finite"),
    ("inf-int-maps", lambda: informativeness(torch.ones(2, 3, 4, 4, dtype=torch.long), _maps()), TypeError,
     r"floating point.*int64.*\.float\(\)"),
    ("inf-empty-maps", lambda: informativeness(_maps(0, 3, 4, 4), _maps()), ValueError, r"at least one sample.*\(0, 3, 4, 4\)"),
    ("inf-empty-reference", lambda: informativeness(_maps(), _maps(0, 3, 4, 4)), ValueError, r"`reference_maps`.*\(0, 3, 4, 4\)"),
    ("inf-meta-maps", lambda: informativeness(_maps().to("meta"), _maps()), ValueError, r"`maps`.*'meta' tensor"),
    ("inf-meta-reference", lambda: informativeness(_maps(), _maps().to("meta")), ValueError, r"`reference_maps`.*'meta'"),
    ("inf-unknown-reduce-dims", lambda: informativeness(_maps(), _maps(), reduce_dims="max"), ValueError,
     r"`reduce_dims`.*'sum'.*'max'"),
    ("inf-negative-ddof", lambda: informativeness(_maps(), _maps(), ddof=-1), ValueError, r"`ddof`.*>= 0.*-1"),
    ("dis-single-dim", lambda: disentanglement(_maps(2, 1, 4, 4)), ValueError, r"at least 2 target dims.*K=1"),
    ("dis-ddof-too-large", lambda: disentanglement(_maps(), ddof=3), ValueError, r"ddof=3.*more than 3.*K=3"),
    ("dis-inf-maps", lambda: disentanglement(torch.full((2, 3, 4, 4), INF)), ValueError, r"finite.*NaN or Inf"),
    ("dis-subset-larger-than-total", lambda: disentanglement(_maps(), num_dims_total=2), ValueError,
     r"K'=3.*at most `num_dims_total`=2"),
    ("metric-inf-shape-mismatch", lambda: Informativeness()(_maps(), _maps(5, 2, 4, 4)), ValueError,
     r"\(2, 3, 4, 4\) and \(5, 2, 4, 4\)"),
    ("metric-dis-unknown-kwarg", lambda: Disentanglement(reduction="median"), ValueError, r"Unexpected keyword.*reduction"),
    # ---- invert ----
    ("auroc-nan-activations", lambda: auroc(torch.tensor([[NAN], [1.0]]), torch.tensor([[0], [1]])), ValueError,
     r"without NaN.*units \[0\]"),
    ("auroc-non-binary-labels", lambda: auroc(torch.rand(4, 1), torch.tensor([[0], [1], [2], [1]])), ValueError,
     r"binary concept labels.*\[2\]"),
    ("auroc-row-mismatch", lambda: auroc(torch.rand(4, 1), torch.tensor([[0], [1], [1]])), ValueError,
     r"same number of samples.*4.*3"),
    ("auroc-empty", lambda: auroc(torch.rand(0, 1), torch.zeros(0, 1, dtype=torch.bool)), ValueError,
     r"at least one sample.*\(0, 1\)"),
    ("auroc-3d-activations", lambda: auroc(torch.rand(4, 1, 2), torch.zeros(4, 1, dtype=torch.bool)), ValueError,
     r"\(N,\) or \(N, D\).*\(4, 1, 2\)"),
    ("conceptset-names-mismatch", lambda: ConceptSet(torch.zeros(4, 2), ["a"]), ValueError, r"2 concept names.*got 1"),
    # ---- relax ----
    ("relax-2d-image", lambda: relax(_enc(), torch.rand(8, 8), **_RELAX), ValueError, r"\(C, H, W\) or \(N, C, H, W\).*\(8, 8\)"),
    ("relax-5d-image", lambda: relax(_enc(), torch.rand(1, 1, 3, 8, 8), **_RELAX), ValueError, r"\(1, 1, 3, 8, 8\)"),
    ("relax-empty-batch", lambda: relax(_enc(), torch.rand(0, 3, 8, 8), **_RELAX), ValueError, r"at least one image"),
    ("relax-uint8-images", lambda: relax(_enc(), torch.ones(1, 3, 8, 8, dtype=torch.uint8), **_RELAX), TypeError,
     r"floating-point images.*uint8"),
    ("relax-nan-images", lambda: relax(_enc(), torch.rand(3, 3, 8, 8).index_fill(0, torch.tensor([1]), NAN), **_RELAX),
     ValueError, r"finite images.*images \[1\] contain NaN or Inf"),
    ("relax-meta-images", lambda: relax(_enc(), torch.rand(1, 3, 8, 8, device="meta"), **_RELAX), ValueError, r"'meta' tensor"),
    ("relax-wrong-channels", lambda: relax(_enc(), torch.rand(1, 1, 8, 8), **_RELAX), ValueError,
     r"encoder could not be applied to the images of shape \(1, 1, 8, 8\).*3 channels"),
    ("relax-encoder-nan-output", lambda: relax(lambda x: x.flatten(1) * NAN, torch.rand(1, 3, 8, 8), **_RELAX), RuntimeError,
     r"non-finite similarities.*image 0"),
    ("relax-p-keep-zero", lambda: Relax(_enc(), num_masks=10, batch_size=10, p_keep=0.0), ValueError, r"`p_keep`.*\(0, 1\).*0\.0"),
    ("relax-p-keep-nan", lambda: Relax(_enc(), num_masks=10, batch_size=10, p_keep=NAN), ValueError, r"`p_keep`.*nan"),
    ("relax-num-cells-zero", lambda: Relax(_enc(), num_masks=10, batch_size=10, num_cells=0), ValueError, r"`num_cells`.*>= 1"),
    ("relax-images-too-small", lambda: relax(_enc(), torch.rand(1, 3, 4, 4), num_masks=10, batch_size=10, num_cells=9, seed=0),
     ValueError, r"too small for num_cells=9"),
    ("relax-quantile-nan", lambda: Relax(_enc(), num_masks=10, batch_size=10, u_relax_quantile=NAN), ValueError,
     r"`u_relax_quantile` in \[0, 1\].*nan"),
    ("relax-quantile-string", lambda: Relax(_enc(), num_masks=10, batch_size=10, u_relax_quantile="half"), TypeError,
     r"`u_relax_quantile` to be a number.*'half'"),
    ("relax-batch-size-gt-masks", lambda: Relax(_enc(), num_masks=10, batch_size=20), ValueError, r"num_masks >= batch_size"),
    ("relax-seed-and-generator", lambda: Relax(_enc(), num_masks=10, batch_size=10, seed=0, generator=torch.Generator()),
     ValueError, r"either `seed`.*or `generator`"),
    ("relax-baseline-shape", lambda: relax(_enc(), torch.rand(1, 3, 8, 8), baseline=torch.zeros(2), **_RELAX), ValueError,
     r"baseline tensor of shape.*\(3,\).*got \(2,\)"),
    ("relax-encoder-output-1d", lambda: relax(lambda x: x.sum((1, 2, 3)), torch.rand(1, 3, 8, 8), **_RELAX), ValueError,
     r"encoder output.*at least 2 dims.*\(1,\)"),
    ("relax-unknown-kwarg", lambda: relax(_enc(), torch.rand(1, 3, 8, 8), num_mask=10), TypeError, r"Unknown Relax arguments.*num_masks"),
    ("relax-encoder-not-callable", lambda: Relax(3), TypeError, r"`encoder`.*callable.*int"),
    # ---- linear probe / kNN ----
    ("knn-nan-embeddings", lambda: _imp("reprlens.callbacks").knn_accuracy(
        torch.rand(10, 3).index_fill(0, torch.tensor([2]), NAN), torch.zeros(10, dtype=torch.long), torch.rand(4, 3),
        torch.zeros(4, dtype=torch.long)), ValueError, r"finite embeddings in `train_x`.*1 of 10 rows.*\[2\]"),
    ("probe-inf-query", lambda: _imp("reprlens.callbacks").fit_linear_probe(
        torch.rand(10, 3), torch.zeros(10, dtype=torch.long), torch.full((4, 3), INF), torch.zeros(4, dtype=torch.long)),
     ValueError, r"finite embeddings in `val_x`"),
    ("probe-row-mismatch", lambda: _imp("reprlens.callbacks").fit_linear_probe(
        torch.rand(10, 3), torch.zeros(9, dtype=torch.long)), ValueError, r"`train_x` of shape \(N, D\).*\(10, 3\) and \(9,\)"),
    ("probe-float-labels", lambda: _imp("reprlens.callbacks").fit_linear_probe(
        torch.rand(10, 3), torch.zeros(10)), TypeError, r"integer class labels in `train_y`.*float32"),
    # ---- regularizer, invert, explainer net, trace, collector ----
    ("regularizer-negative-weight", lambda: _imp("reprlens.regularizer").ExplanationRegularizer(informativeness=-1),
     ValueError, r"`informativeness`.*finite weight >= 0.*-1"),
    ("regularizer-unaggregated-transform", lambda: _imp("reprlens.regularizer").ExplanationRegularizer(
        informativeness=1, transform="none"), ValueError, r"`transform`.*'abs'.*'none'.*channel-aggregated"),
    ("regularizer-one-sampled-dim", lambda: _imp("reprlens.regularizer").ExplanationRegularizer(
        disentanglement=1, num_dims_sampled=1), ValueError, r"`num_dims_sampled`.*>= 2.*1"),
    ("l2l-unknown-source-layer", lambda: LayerToLayerAttribution(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), "5", "1"),
     ValueError, r"Unknown source layer '5'"),
    ("summed-map-unrelated-target", lambda: _imp("reprlens.attribution").summed_map(torch.rand(2, 3), torch.rand(2, 3)),
     ValueError, r"no gradient path from the source"),
    ("invert-tensor-concepts", lambda: _imp("reprlens.invert").Invert(torch.zeros(3, 2)), TypeError,
     r"`concepts` to be a ConceptSet.*Tensor"),
    ("invert-rows-mismatch", lambda: _imp("reprlens.invert").Invert(
        ConceptSet(torch.tensor([[0, 1], [1, 0], [1, 1], [0, 0]]).bool(), ["a", "b"])).explain(torch.rand(5, 3)),
     ValueError, r"activations with 4 rows.*got 5"),
    ("conceptset-non-binary", lambda: ConceptSet(torch.full((4, 2), 2), ["a", "b"]), ValueError,
     r"binary labels.*\[2, 2"),
    ("part-explainer-zero-channels", lambda: _imp("reprlens.explainer_net").PartExplainer(0), ValueError,
     r"`in_channels`.*>= 1.*0"),
    ("class-pure-sampler-batch-zero", lambda: _imp("reprlens.trace").ClassPureBatchSampler(
        torch.zeros(10, dtype=torch.long), batch_size=0), ValueError, r"`batch_size`.*>= 1.*0"),
    ("collector-empty-layer", lambda: _imp("reprlens.invert").ActivationCollector(""), TypeError,
     r"`layer`.*non-empty dotted module name"),
    # ---- capture / utils: names ----
    ("capture-unknown-layer", lambda: LayerCapture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), ["1x"]), ValueError,
     r"Unknown layer '1x'.*Closest valid names: '1'"),
    ("get-module-not-str", lambda: get_module(nn.Sequential(nn.ReLU()), 3), TypeError, r"dotted module path \(str\).*int"),
]


@pytest.mark.parametrize(("thunk", "exc", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_functional_and_class_bad_input(thunk, exc, pattern):
    with pytest.raises(exc, match=pattern):
        thunk()


# ---------------------------------------------------------------------------------------------------------------
# callbacks: __init__ validation, and names resolved in setup / on_fit_start
# ---------------------------------------------------------------------------------------------------------------
def _cb_cases():
    from reprlens.callbacks import (
        ConceptLabeler,
        ExplainerDistillation,
        ExplanationRegularization,
        LinearProbe,
        RelaxMonitor,
        ScoreMonitor,
        TrainingTrace,
    )

    return [
        ("scoremonitor-empty-layer", lambda: ScoreMonitor("", "head"), TypeError, r"`source_layer`.*dotted module name.*''"),
        ("scoremonitor-unknown-score", lambda: ScoreMonitor("a", "b", scores=("purity",)), ValueError,
         r"`scores`.*informativeness.*'purity'"),
        ("scoremonitor-every-n-zero", lambda: ScoreMonitor("a", "b", every_n_epochs=0), ValueError, r"`every_n_epochs`.*>= 1.*0"),
        ("regularization-negative-weight", lambda: ExplanationRegularization("a", "b", informativeness=-1.0), ValueError,
         r"`informativeness`.*finite weight >= 0.*-1\.0"),
        ("regularization-nan-weight", lambda: ExplanationRegularization("a", "b", disentanglement=NAN), ValueError,
         r"`disentanglement`.*finite weight.*nan"),
        ("regularization-all-zero", lambda: ExplanationRegularization("a", "b"), ValueError, r"at least one weight > 0"),
        ("linearprobe-every-n-zero", lambda: LinearProbe(every_n_epochs=0), ValueError, r"`every_n_epochs`.*>= 1.*0"),
        ("linearprobe-embedding-fn", lambda: LinearProbe(embedding_fn=3), TypeError, r"`embedding_fn`.*callable.*int"),
        ("relaxmonitor-probe-2d", lambda: RelaxMonitor(torch.rand(8, 8)), ValueError, r"`probe`.*\(N, C, H, W\).*\(8, 8\)"),
        ("relaxmonitor-num-probe-zero", lambda: RelaxMonitor(num_probe=0), ValueError, r"`num_probe`.*>= 1"),
        ("trace-unknown-mode", lambda: TrainingTrace("a", mode="influence"), ValueError, r"`mode` in.*'influence'"),
        ("trace-no-layers", lambda: TrainingTrace([]), ValueError, r"non-empty list.*\[\]"),
        ("trace-int-dtype", lambda: TrainingTrace("a", dtype="int8"), ValueError, r"`dtype` in.*'int8'"),
        ("explainer-unknown-mode", lambda: ExplainerDistillation("a", mode="during"), ValueError, r"`mode` in.*'during'"),
        ("explainer-empty-layer", lambda: ExplainerDistillation(""), TypeError, r"`target_layer`.*dotted module name"),
        ("conceptlabeler-tensor-concepts", lambda: ConceptLabeler("a", torch.zeros(4, 2, dtype=torch.bool)), TypeError,
         r"`concepts`.*ConceptSet.*Tensor"),
    ]


@pytest.mark.parametrize("case", _cb_cases(), ids=[c[0] for c in _cb_cases()])
def test_callback_init_bad_input(case):
    _, thunk, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        thunk()


@pytest.fixture(scope="module")
def trainer_and_model():
    import lightning.pytorch as pl

    from reprlens.models import Classifier

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=1,
                         default_root_dir=tempfile.mkdtemp(), enable_model_summary=False)
    return trainer, Classifier()


@pytest.mark.parametrize(
    ("name", "make", "hook", "pattern"),
    [
        ("scoremonitor", lambda C: C.ScoreMonitor("featurs.conv1", "head"), "setup",
         r"Unknown source layer 'featurs\.conv1'.*Closest valid names: 'features"),
        ("regularization", lambda C: C.ExplanationRegularization("features.cnv2", "head", informativeness=1.0),
         "on_fit_start", r"Unknown source layer 'features\.cnv2'.*Closest valid names: 'features\.conv2'"),
        ("trace", lambda C: C.TrainingTrace("nope"), "setup", r"Unknown layer 'nope'.*named_modules"),
        ("explainer", lambda C: C.ExplainerDistillation("nope"), "setup", r"Unknown layer 'nope'"),
        ("linearprobe", lambda C: C.LinearProbe(layer="nope"), "setup", r"Unknown layer 'nope'"),
        ("relaxmonitor", lambda C: C.RelaxMonitor(encoder="nope"), "setup", r"Unknown encoder 'nope'"),
    ],
    ids=lambda v: v if isinstance(v, str) and not v.startswith(("Unknown", "setup", "on_")) else None,
)
def test_callback_unknown_layer_names(trainer_and_model, name, make, hook, pattern):
    import reprlens.callbacks as C

    trainer, model = trainer_and_model
    cb = make(C)
    try:
        with pytest.raises(ValueError, match=pattern):
            cb.setup(trainer, model, "fit")
            if hook == "on_fit_start":
                cb.on_fit_start(trainer, model)
    finally:
        cb.teardown(trainer, model, "fit")
    assert "training_step" not in vars(model), "a failed setup must leave the module unchanged after teardown"


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def test_cli_report_rejects_missing_dir_file_and_no_args(tmp_path, capsys):
    from reprlens.cli import report

    afile = tmp_path / "x.txt"
    afile.write_text("x")
    for argv, pattern in (([str(tmp_path / "missing")], r"existing directory.*missing"),
                          ([str(afile)], r"existing directory.*x\.txt"),
                          ([], r"required: run_dir")):
        with pytest.raises(SystemExit) as exc:
            report(argv)
        assert exc.value.code == 2
        assert re.search(pattern, capsys.readouterr().err)


def test_cli_run_and_build_report_bad_arguments(tmp_path):
    from omegaconf import OmegaConf

    from reprlens.cli import run
    from reprlens.report import build_report

    with pytest.raises(TypeError, match="DictConfig"):
        run({"data": {}})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['model', 'trainer'\] are missing"):
        run(OmegaConf.create({"data": {"_target_": "x"}}))
    with pytest.raises(ValueError, match=r"existing run directory.*is not a directory"):
        build_report(tmp_path / "nope")


def test_trace_reader_missing_store(tmp_path):
    from reprlens.trace import TraceReader

    with pytest.raises(FileNotFoundError, match=r"No trace store.*trace\.json is missing"):
        TraceReader(tmp_path / "nope")


def test_data_bad_arguments():
    from reprlens.data import ShapesDataModule, ShapesDataset

    with pytest.raises(ValueError, match=r"`num_samples`.*>= 1.*-1"):
        ShapesDataset(-1)
    with pytest.raises(ValueError, match=r"`image_size`=2 is too small.*>= 16"):
        ShapesDataset(4, image_size=2)
    with pytest.raises(ValueError, match=r"`num_train`.*>= 1.*0"):
        ShapesDataModule(num_train=0)


# ---------------------------------------------------------------------------------------------------------------
# hypothesis: valid-but-odd inputs give finite outputs (or the documented error)
# ---------------------------------------------------------------------------------------------------------------
_MAG = st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30, 3e38])


@st.composite
def _odd_maps(draw, min_k: int = 1, max_n: int = 3):
    """(N, K, P) float32 maps: random, constant, single-position, ties, scaled to huge/tiny magnitudes."""
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(min_k, 4))
    p = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["random", "constant", "ties", "signed"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        base = torch.rand(n, k, p, generator=g, dtype=torch.float64)
    elif kind == "constant":
        base = torch.ones(n, k, p, dtype=torch.float64)
    elif kind == "ties":
        base = torch.randint(0, 2, (n, k, p), generator=g).double()
    else:
        base = torch.rand(n, k, p, generator=g, dtype=torch.float64) * 2 - 1
    return (base * draw(_MAG)).float()


@HYP
@given(maps=_odd_maps(), mode=st.sampled_from(["minmax", "max"]))
def test_hyp_normalize_maps_finite_and_bounded(maps, mode):
    out = normalize_maps(maps, mode=mode)
    assert out.shape == maps.shape and torch.isfinite(out).all()
    if mode == "minmax":
        assert out.min() >= 0 and out.max() <= 1
        # float64 oracle (no overflow there): same result up to float32 rounding
        ref = normalize_maps(maps.double(), mode=mode)
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)


@HYP
@given(maps=_odd_maps(), transform=st.sampled_from(["abs", "lin", "sqrt"]))
def test_hyp_aggregate_channels_matches_float64(maps, transform):
    phi = maps[..., None, None]  # (N, K, C=P, 1, 1): the P axis plays the channels
    out = aggregate_channels(phi, transform)
    ref = aggregate_channels(phi.double(), transform)
    # finite wherever no float32 partial sum can overflow (bounded by the sum of |terms|; a signed "lin" sum
    # of -2.8e38 and -1.3e38 overflows in float32 even when later terms bring the float64 total back in range)
    bound = aggregate_channels(phi.double(), "sqrt" if transform == "sqrt" else "abs")
    fits = bound <= torch.finfo(torch.float32).max
    assert torch.isfinite(out[fits]).all()
    torch.testing.assert_close(out[fits].double(), ref[fits], rtol=1e-5, atol=0)


@HYP
@given(maps=_odd_maps(), ref=_odd_maps(), reduce_dims=st.sampled_from(["sum", "abs"]))
def test_hyp_informativeness_finite_in_unit_interval(maps, ref, reduce_dims):
    ref = ref[:, :1, :1].expand(-1, maps.shape[1], maps.shape[2]).contiguous()  # same K and P as maps
    s = informativeness(maps, ref, reduce_dims=reduce_dims, reduction="none")
    assert s.shape == (maps.shape[0],) and torch.isfinite(s).all()
    assert (s >= 0).all() and (s <= 1 + 1e-6).all()
    # float64 oracle: no overflow of the dim sum there (a float32 sum of 3e38 maps overflowed before the fix)
    ref64 = informativeness(maps.double(), ref.double(), reduce_dims=reduce_dims, reduction="none")
    torch.testing.assert_close(s.double(), ref64, atol=1e-5, rtol=0)


@HYP
@given(maps=_odd_maps(min_k=2))
def test_hyp_disentanglement_finite_and_bounded(maps):
    s = disentanglement(maps, reduction="none")
    assert torch.isfinite(s).all() and (s >= 0).all() and (s <= 0.25 + 1e-6).all()  # var of values in [0, 1]


@HYP
@given(seed=st.integers(0, 2**16), n=st.integers(1, 12), d=st.integers(1, 3), levels=st.integers(1, 4),
       mag=_MAG)
def test_hyp_auroc_matches_sklearn_with_ties(seed, n, d, levels, mag):
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, levels, (n, d), generator=g).double() - 1  # many ties
    acts = codes.float() * mag  # huge/tiny; 2 * 3e38 overflows to +inf, which is ranked (same order as codes)
    labels = torch.randint(0, 2, (n, 2), generator=g).bool()
    a = auroc(acts, labels)
    assert a.shape == (d, 2)
    for k in range(2):
        y = labels[:, k].numpy()
        if y.all() or not y.any():
            assert torch.isnan(a[:, k]).all()  # documented: NaN for a constant concept
        else:
            ref = [roc_auc_score(y, codes[:, j].numpy()) for j in range(d)]
            np.testing.assert_allclose(a[:, k].numpy(), ref, atol=1e-12)


@HYP
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["random", "constant", "single"]), mag=_MAG,
       method=st.sampled_from(["grad", "grad_x_act", "integrated_gradients"]))
def test_hyp_layer_attributions_finite(seed, kind, mag, method):
    g = torch.Generator().manual_seed(seed)
    size = 1 if kind == "single" else 3
    h = torch.rand(2, 2, size, size, generator=g, dtype=torch.float64)
    if kind == "constant":
        h = torch.ones_like(h)
    h = h * min(mag, 1e100)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Flatten(), nn.Linear(2 * size * size, 3)).double()
    phi = layer_attributions(h, head, method=method, n_steps=4, transform="abs")
    assert phi.shape == (2, 3, size, size) and torch.isfinite(phi).all()
    # linear head: grad is the weight, grad_x_act = h * w, IG = (h - 0) * w: independent recomputation
    w = head[1].weight.reshape(3, 2, size, size)
    expect = w.abs().sum(1).expand(2, -1, -1, -1) if method == "grad" else (h[:, None] * w[None]).abs().sum(2)
    torch.testing.assert_close(phi, expect, rtol=1e-9, atol=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["random", "constant", "huge", "tiny"]))
def test_hyp_relax_finite_with_tiny_encoder(seed, kind):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(2, 3, 8, 8, generator=g)
    img = {"random": img, "constant": torch.full_like(img, 0.5), "huge": img * 1e6, "tiny": img * 1e-6}[kind]
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    r = Relax(enc, num_masks=20, batch_size=10, num_cells=3, seed=seed)(img)
    assert r.importance.shape == (2, 8, 8)
    assert torch.isfinite(r.importance).all() and torch.isfinite(r.uncertainty).all()
    assert (r.importance.abs() <= 1 + 1e-6).all()  # a weighted mean of cosine similarities


def test_normalize_maps_overflowing_range_regression():
    """+-3e38 spans more than float32's max: hi - lo overflows; the result must still be the exact minmax."""
    maps = torch.tensor([[[3e38, -3e38, 0.0]]])
    torch.testing.assert_close(normalize_maps(maps), torch.tensor([[[1.0, 0.0, 0.5]]]))
    x = torch.tensor([[[3e38, -3e38, 0.0, 1e38]]], requires_grad=True)
    normalize_maps(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert math.isfinite(float(informativeness(maps, torch.rand(2, 1, 3))))

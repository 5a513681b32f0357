"""INVERT core: exact AUC / p-values against independent oracles, known answers, reference compatibility."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from torchmetrics.functional.classification import binary_auroc

from reprlens.invert import ConceptSet, Invert, auroc, auroc_exact, mann_whitney, midranks
from reprlens.invert._fixtures import fx1, splitmix_uniform
from reprlens.invert._reference import reference_explain
from reprlens.invert.functional import excluded_atoms

LN10 = math.log(10.0)


@pytest.fixture(scope="module")
def fx():
    a, c, names = fx1()
    return a, ConceptSet(c, names, warn=False)


@pytest.fixture(scope="module")
def fx_clean():
    a, c, names = fx1(clean=True)
    return a, ConceptSet(c, names, warn=False)


def brute_auc(a: np.ndarray, t: np.ndarray) -> float:
    pos, neg = a[t], a[~t]
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return (gt + 0.5 * eq) / (len(pos) * len(neg))


# ------------------------------------------------------------------------------------------ fixture sanity
def test_fx1_checksums(fx):
    a, cs = fx
    assert cs.counts.tolist() == [66, 104, 146, 198, 215, 252, 283, 323, 383, 423, 215, 0]
    expect = [171.422680809, 91.169006476, 506.556585841, -301.877004534, 6.012288484, 385.745184580]
    np.testing.assert_allclose(a.double().sum(0).numpy(), expect, atol=1e-6)
    _, tie = midranks(a)
    assert tie.tolist() == [0, 0, 0, 0, 0, 1302169596]
    assert splitmix_uniform(0, 3).shape == (3,)


# ------------------------------------------------------------------------------------------ AUC oracles
@pytest.mark.parametrize("kind", ["random", "quantised", "relu"])
def test_auroc_matches_pairwise_scipy_torchmetrics(kind):
    g = torch.Generator().manual_seed(1)
    n, d, k = 400, 5, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "quantised":
        x = torch.round(x * 3) / 3
    elif kind == "relu":
        x = torch.relu(x)
    t = torch.rand(n, k, generator=g) < torch.tensor([0.05, 0.2, 0.5, 0.9])
    auc = auroc_exact(x, t)
    assert auc.shape == (k, d) and auc.dtype == torch.float64
    xn, tn = x.numpy(), t.numpy()
    for kk, dd in itertools.product(range(k), range(d)):
        ref = brute_auc(xn[:, dd], tn[:, kk])
        assert abs(auc[kk, dd].item() - ref) <= 1e-12
        sp = scipy.stats.mannwhitneyu(xn[tn[:, kk], dd], xn[~tn[:, kk], dd]).statistic / (
            tn[:, kk].sum() * (~tn[:, kk]).sum()
        )
        assert abs(auc[kk, dd].item() - sp) <= 1e-12
        tm = binary_auroc(x[:, dd].float(), t[:, kk].long()).item()
        assert abs(auc[kk, dd].item() - tm) <= (1e-6 if kind == "random" else 2e-5)
    # functional auroc gives the transposed (D, K) matrix and accepts a ConceptSet
    cs = ConceptSet(t, warn=False)
    assert torch.equal(auroc(x, cs), auc.t())


def test_gemm_form_equals_per_pair_bitwise():
    a, c, _ = fx1()
    full = auroc_exact(a, c[:, :10])
    for kk in (0, 3, 9):
        for dd in (0, 5):
            assert full[kk, dd].item() == auroc_exact(a[:, dd], c[:, kk]).item()


def test_midranks_match_scipy():
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [3.0, 2.0], [2.0, 0.0], [float("inf"), -float("inf")]])
    r, tie = midranks(x)
    for dd in range(2):
        np.testing.assert_array_equal(r[:, dd].numpy(), scipy.stats.rankdata(x[:, dd].numpy()))
    assert tie.tolist() == [6.0, 24.0]


def test_auc_invariances():
    a, c, _ = fx1()
    base = auroc_exact(a, c[:, :10])
    # strictly increasing transforms: bitwise identical
    for f in (torch.exp, lambda v: 3 * v.double() + 7, lambda v: midranks(v)[0]):
        assert torch.equal(auroc_exact(f(a), c[:, :10]), base)
    # AUC(-a) = 1 - AUC(a), AUC(~c) = 1 - AUC(c)
    assert torch.allclose(auroc_exact(-a, c[:, :10]), 1 - base, atol=1e-15, rtol=0)
    assert torch.allclose(auroc_exact(a, ~c[:, :10]), 1 - base, atol=1e-15, rtol=0)
    # permuting samples
    perm = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(auroc_exact(a[perm], c[perm, :10]), base)
    # constant concepts -> NaN
    assert torch.isnan(auroc_exact(a, c[:, 11])).all()


# ------------------------------------------------------------------------------------------ p-value oracles
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
@pytest.mark.parametrize("n1", [1, 3, 8, 20, 500])
@pytest.mark.parametrize("ties", [False, True])
def test_p_values_match_scipy(alternative, n1, ties):
    g = torch.Generator().manual_seed(n1)
    n = 1200
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x[:, 1] += 0.3
    if ties:
        x = torch.round(x * 2)
    t = torch.zeros(n, dtype=torch.bool)
    t[torch.randperm(n, generator=g)[:n1]] = True
    u, p, logp = mann_whitney(x, t, alternative)
    for dd in range(2):
        res = scipy.stats.mannwhitneyu(x[t, dd].numpy(), x[~t, dd].numpy(), alternative=alternative)
        assert u[dd].item() == res.statistic
        if n1 <= 8 and not ties:
            assert p[dd].item() == res.pvalue  # exact path: identical
        elif res.pvalue > 1e-290:
            assert abs(p[dd].item() - res.pvalue) <= 1e-9 * res.pvalue
        assert logp[dd].item() <= 0


def test_log_p_beyond_underflow(fx):
    a, cs = fx
    # FX-1 two-sided log10 p of known formulas
    known = {0: [("c3", -112.7445)], 1: [("c1", -55.2563), ("c1 & ~c2", -57.7693)], 2: [("c5 | c6", -233.8708)],
             3: [("~c7", -168.7899)], 5: [("c8", -182.5955), ("c8 & c9", -69.3172)], 4: [("c8", -1.5776)]}
    inv = Invert(cs, correction=None)
    for d, items in known.items():
        res = inv.score(a[:, d], [f for f, _ in items])
        for (f, lg), lp in zip(items, res.log_p):
            assert round(lp / LN10, 4) == lg, (d, f, lp / LN10)
    # independent numpy log_ndtr for the underflowing case
    t = cs.evaluate("c5 | c6").numpy()
    x = a[:, 2].double().numpy()
    n1, n0 = t.sum(), (~t).sum()
    u = scipy.stats.mannwhitneyu(x[t], x[~t]).statistic
    z = (max(u, n1 * n0 - u) - n1 * n0 / 2 - 0.5) / math.sqrt(n1 * n0 / 12 * (len(x) + 1))
    ref = math.log(2) + scipy.special.log_ndtr(-z)
    res = inv.score(a[:, 2], "c5 | c6")
    assert abs(res.log_p[0] - ref) <= 1e-9 * abs(ref)
    assert res.p_value[0] == 0.0


# ------------------------------------------------------------------------------------------ reference mode
REF_TABLE = [
    # (unit, settings, [(formula, length, auc, n1)], p1)
    (0, dict(max_length=1), [("c3", 1, 0.989414, 198), ("c9", 1, 0.510589, 423), ("c5", 1, 0.505943, 252)], 0),
    (0, dict(max_length=3, beam_size=5), [("c3", 1, .989414, 198), ("c3 & ~c11", 2, .989414, 198),
                                          ("c11 | c3", 2, .989414, 198), ("c3", 2, .989414, 198),
                                          ("c3", 2, .989414, 198)], 0),
    (0, dict(mode="negative"), [("c0 & c4 & ~c8", 3, .213165, 8), ("c0 & c10 & ~c8", 3, .213165, 8),
                                ("c0 & c4 & ~c6", 3, .233216, 9)], 0.00361),
    (1, dict(max_length=2), [("c1 & c3", 2, .987979, 11), ("c1 & ~c2", 2, .982301, 98),
                             ("c1 & c8", 2, .981443, 11)], 2.28e-08),
    (1, dict(), [("c1 & c3 & ~c7", 3, .989207, 8), ("c1 & c3", 2, .987979, 11),
                 ("c1 & c3 & ~c11", 3, .987979, 11)], 3.36e-13),
    (1, dict(limit_search=6), [("c1 & ~c2", 2, .982301, 98), ("c1 & ~c11 & ~c2", 3, .982301, 98),
                               ("c11 | (c1 & ~c2)", 3, .982301, 98)], 0),
    (1, dict(min_fraction=0.0), [("c1 & c3 & c5", 3, .992996, 1), ("c1 & c3 & ~c7", 3, .989207, 8),
                                 ("c1 & c3", 2, .987979, 11)], 0.015),
    (1, dict(max_length=2, max_fraction=1.0), [("c1 & c3", 2, .987979, 11), ("c1 & ~c2", 2, .982301, 98),
                                               ("c1 & ~c2", 2, .982301, 98)], 2.28e-08),
    (1, dict(mode="negative"), [("c2 & c4", 2, .298362, 13), ("c10 & c2", 2, .298362, 13),
                                ("c2 & c4", 2, .298362, 13)], 0.0121),
    (2, dict(max_length=2), [("c5 | c6", 2, .987005, 502), ("c5 | c6", 2, .987005, 502),
                             ("c6", 1, .923519, 283)], 0),
    (2, dict(beam_size=5), [("c5 | c6", 2, .987005, 502), ("c5 | c6", 2, .987005, 502),
                            ("~c11 & (c5 | c6)", 3, .987005, 502), ("c11 | c5 | c6", 3, .987005, 502),
                            ("c5 | c6", 3, .987005, 502)], 0),
    (2, dict(max_length=2, max_fraction=1.0), [("c5 | c6", 2, .987005, 502), ("c5 | c6", 2, .987005, 502),
                                               ("~c0 | ~c2", 2, .933467, 1999)], 0),
    (3, dict(), [("c0 & c6 & ~c7", 3, .682543, 8), ("c0 & c6 & ~c5", 3, .682543, 8),
                 ("c4 & c9 & ~c7", 3, .655161, 37)], 0.0741),
    (3, dict(limit_search=6), [("c1 & c4 & ~c7", 3, .638162, 7), ("c1 & c10 & ~c7", 3, .638162, 7),
                               ("c4 & ~c7", 2, .613243, 179)], 0.211),
    (3, dict(min_fraction=0.0), [("c0 & c6 & c8", 3, .960961, 2), ("c0 & c6 & c9", 3, .956978, 1),
                                 ("c0 & c1 & c6", 3, .826413, 1)], 0.00624),
    (3, dict(max_length=2, max_fraction=1.0), [("~c7", 1, .986933, 1677), ("~c11 & ~c7", 2, .986933, 1677),
                                               ("c11 | ~c7", 2, .986933, 1677)], 0),
    (3, dict(mode="negative"), [("c7", 1, .013067, 323), ("c11 | c7", 2, .013067, 323),
                                ("c7 & ~c11", 2, .013067, 323)], 0),
    (4, dict(max_length=1), [("c8", 1, .536422, 383), ("c4", 1, .513629, 215), ("c10", 1, .513629, 215)], 0.0264),
    (4, dict(beam_size=5), [("c1 & c2 & ~c6", 3, .865230, 4), ("c1 & c2 & ~c9", 3, .780686, 4),
                            ("c3 & c6 & c8", 3, .722584, 6), ("c1 & c2", 2, .646021, 6),
                            ("c1 & c2 & ~c11", 3, .646021, 6)], 0.00715),
    (4, dict(limit_search=6), [("c5 & c8", 2, .560387, 45), ("c5 & c8 & ~c11", 3, .560387, 45),
                               ("c11 | (c5 & c8)", 3, .560387, 45)], 0.165),
    (4, dict(min_fraction=0.0), [("c2 & c3 & c8", 3, .821911, 1), ("c1 & c3 & c8", 3, .797548, 2),
                                 ("c1 & c3 & c8", 3, .797548, 2)], 0.357),
    (4, dict(max_length=2, max_fraction=1.0), [("~c0 | ~c5", 2, .687396, 1994), ("~c2 | ~c5", 2, .620558, 1986),
                                               ("c1 & c8", 2, .604004, 11)], 0.114),
    (4, dict(mode="negative"), [("c0 & c7 & ~c9", 3, .309488, 8), ("c0 & c5", 2, .312604, 6),
                                ("c11 | (c0 & c5)", 3, .312604, 6)], 0.0618),
    (5, dict(max_length=2), [("c8 & c9", 2, .981870, 99), ("c8 & c9", 2, .981870, 99), ("c8", 1, .933518, 383)], 0),
    (5, dict(beam_size=5), [("c0 & c8 & c9", 3, .987368, 5), ("c0 & c8 & c9", 3, .987368, 5),
                            ("c8 & c9", 2, .981870, 99), ("c8 & c9", 2, .981870, 99),
                            ("c8 & c9 & ~c11", 3, .981870, 99)], 3.8e-05),
    (5, dict(mode="negative"), [("c1 & c4 & ~c9", 3, .272317, 6), ("c1 & c10 & ~c9", 3, .272317, 6),
                                ("c1 & ~c8 & ~c9", 3, .308250, 72)], 0.0351),
    (1, dict(beam_size=1), [("c1 & c3 & ~c7", 3, .989207, 8)], 3.36e-13),
    (3, dict(beam_size=1), [("c4 & c9 & ~c7", 3, .655161, 37)], 0.0012),
]


def _ref_invert(cs, settings):
    kw = dict(max_length=3, beam_size=3, min_fraction=0.002, max_fraction=0.5)
    kw.update(settings)
    return Invert(cs, compat="reference", correction=None, **kw)


def test_reference_table_fx1(fx):
    a, cs = fx
    # all units of one setting in one call, then compare row by row
    for d, settings, rows, p1 in REF_TABLE:
        res = _ref_invert(cs, settings).explain(a, neurons=[d])
        got = list(zip(res.formula, res.length.tolist(), res.auc.tolist(), res.n_pos.tolist()))
        assert [(f, ln, n) for f, ln, _, n in got] == [(f, ln, n) for f, ln, _, n in rows], (d, settings)
        for (_, _, auc, _), (_, _, ref_auc, _) in zip(got, rows):
            assert abs(auc - ref_auc) <= 2e-6
        assert float(f"{res.p_value[0]:.3g}") == p1, (d, settings, res.p_value[0])
        if p1 == 0:
            assert np.isfinite(res.log_p[0])


def test_reference_states_and_to_reference(fx):
    a, cs = fx
    res = _ref_invert(cs, {}).explain(a, neurons=[1, 2], return_states=True)
    ref = res.to_reference()
    assert [e["formula"] for e in ref[1]["1"]] == ["c1", "c0", "c7"]
    assert [e["formula"] for e in ref[1]["2"]] == ["c1 & c3", "c1 & ~c2", "c1 & c8"]
    assert [e["formula"] for e in ref[2]["1"]] == ["c6", "c5", "c3"]
    assert set(ref[2]) == {"1", "2", "3"}
    assert abs(ref[1]["1"][0]["differentiability"] - 2 * abs(0.5 - ref[1]["1"][0]["metric"])) < 1e-15


def test_reference_mode_matches_literal_reimplementation():
    """The vectorised reference mode equals the per-candidate sympy + torchmetrics loop (small random data)."""
    g = torch.Generator().manual_seed(3)
    n, k = 300, 6
    c = torch.rand(n, k, generator=g) < torch.linspace(0.05, 0.4, k)
    c[:, 5] = False
    a = torch.stack([c[:, 0].float() + torch.randn(n, generator=g), torch.relu(torch.randn(n, generator=g))], 1)
    names = [f"x{i}" for i in range(k)]
    cs = ConceptSet(c, names, warn=False)
    for settings in (dict(max_length=2, beam_size=2), dict(max_length=3, beam_size=3, limit_search=4)):
        res = Invert(cs, compat="reference", min_fraction=0.01, correction=None, **settings).explain(a)
        for d in range(2):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = reference_explain(a[:, d], c, names, min_fraction=0.01, max_fraction=0.5, **settings)
            mine = res.for_neuron(d)
            assert [r["formula"] for r in ref] == mine.formula
            assert [r["length"] for r in ref] == mine.length.tolist()
            np.testing.assert_allclose([r["metric"] for r in ref], mine.auc, atol=2e-6)


# ------------------------------------------------------------------------------------------ default mode
def test_default_known_answers_fx1(fx):
    a, cs = fx
    res = Invert(cs, max_length=3, beam_size=3).explain(a)
    expect = {
        0: (["c3", "c3 & ~c0", "c3 & ~c4"], [.989414, .988888, .986632], 241),
        1: (["c1 & c3 & ~c7", "c1 & c3", "c1 & c3 & ~c6"], [.989207, .987979, .987826], 227),
        2: (["c5 | c6", "~c0 & (c5 | c6)", "~c1 & (c5 | c6)"], [.987005, .981087, .977153], 245),
        3: (["~c7", "c0 | ~c7", "c3 | ~c7"], [.986933, .984260, .980388], 244),
        4: (["~c0 | ~c5", "c6 | ~c0 | ~c5", "c9 | ~c2 | ~c5"], [.687396, .682406, .681658], 224),
        5: (["c0 & c8 & c9", "c8 & c9", "c8 & c9 & ~c2"], [.987368, .981870, .979732], 246),
    }
    for d, (forms, aucs, nt) in expect.items():
        r = res.for_neuron(d)
        assert r.formula == forms
        np.testing.assert_allclose(r.auc, aucs, atol=5e-7)
        assert (r.n_tests == nt).all()
        # length equals the number of atoms in the string; no c10/c11; distinct truth vectors
        assert r.length.tolist() == [f.count("c") for f in forms]
        vecs = [r.truth_vector(i) for i in range(len(r))]
        assert all(not torch.equal(vecs[i], vecs[j]) for i in range(3) for j in range(i))
    assert not any(("c10" in f or "c11" in f) for f in res.formula)
    # Bonferroni
    np.testing.assert_allclose(res.p_corrected, np.minimum(1, res.p_value * res.n_tests))
    inter = Invert(cs, max_length=3, beam_size=3, min_fraction=0.002, max_fraction=0.5).explain(a)
    assert inter.for_neuron(3).formula == ["c0 & c6 & ~c7", "c4 & c9 & ~c7", "c4 & c6 & ~c7"]
    assert inter.for_neuron(4).formula == ["c1 & c2 & ~c6", "c1 & c2 & ~c9", "c3 & c6 & c8"]
    assert inter.for_neuron(0).n_tests[0] == 179


def test_planted_concepts_recovered(fx_clean):
    a, cs = fx_clean
    res = Invert(cs, max_length=3, beam_size=3).explain(a[:, :4])
    best = res.best()
    assert best.formula == ["c3", "c1 & ~c2", "c5 | c6", "~c7"]  # single, AND(NOT), OR, NOT
    assert (best.auc == 1.0).all()
    assert res.for_neuron(2).formula == ["c5 | c6", "~c0 & (c5 | c6)", "~c1 & (c5 | c6)"]
    l1 = Invert(cs, max_length=1, beam_size=1).explain(a[:, :4])
    assert l1.formula == ["c3", "c1", "c6", "~c7"]
    np.testing.assert_allclose(l1.auc[1:3], [0.975064, 0.934451], atol=5e-7)
    neg = Invert(cs, max_length=2, beam_size=1, mode="negative").explain(a[:, 3])
    assert neg.formula == ["c7"] and neg.auc[0] == 0.0


def test_negative_mode_equals_negated_activations(fx):
    a, cs = fx
    pos = Invert(cs, max_length=2, beam_size=3).explain(-a)
    neg = Invert(cs, max_length=2, beam_size=3, mode="negative").explain(a)
    assert pos.formula == neg.formula
    np.testing.assert_allclose(pos.auc, 1 - neg.auc, atol=1e-15, rtol=0)
    # reference mode without constant concepts
    cs10 = cs.select([f"c{i}" for i in range(10)])
    p2 = Invert(cs10, compat="reference", max_length=2).explain(-a)
    n2 = Invert(cs10, compat="reference", max_length=2, mode="negative").explain(a)
    assert p2.formula == n2.formula


def test_symmetric_alpha_duality(fx):
    a, cs = fx
    pos = Invert(cs, max_length=2, beam_size=2, alpha=0.01).explain(a)
    neg = Invert(cs, max_length=2, beam_size=2, alpha=0.01, mode="negative").explain(a)
    assert len(pos) == len(neg)
    for i in range(len(pos)):
        assert torch.equal(pos.truth_vector(i), ~neg.truth_vector(i))
        assert abs(pos.auc[i] - (1 - neg.auc[i])) <= 1e-15


def test_tables_invariant_to_transforms_chunks_and_duplicates(fx):
    a, cs = fx
    inv = Invert(cs, max_length=3, beam_size=3)
    base = inv.explain(a)
    for other in (inv.explain(torch.exp(a.double())), inv.explain(3 * a + 7),
                  Invert(cs, neuron_chunk=1).explain(a), Invert(cs, neuron_chunk=4).explain(a)):
        assert other.formula == base.formula
        assert np.array_equal(other.auc, base.auc)
        assert np.array_equal(other.n_tests, base.n_tests)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert np.array_equal(inv.explain(a).auc, base.auc)
    # permuting samples (rows of A and C together)
    perm = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(1))
    permuted = Invert(ConceptSet(cs.labels[perm], cs.names, warn=False)).explain(a[perm])
    assert permuted.formula == base.formula and np.array_equal(permuted.auc, base.auc)
    # an extra duplicate column changes nothing in default mode
    dup = ConceptSet(torch.cat([cs.labels, cs.labels[:, 3:4]], 1), cs.names + ["c3copy"], warn=False)
    res = Invert(dup).explain(a)
    assert res.formula == base.formula and np.array_equal(res.auc, base.auc)


def test_exhaustive_agreement_small_k():
    g = torch.Generator().manual_seed(7)
    n, k = 200, 4
    misses = 0
    for trial in range(3):
        c = torch.rand(n, k, generator=g) < torch.tensor([0.1, 0.25, 0.4, 0.3])
        c[:, 3] |= c[:, 0]  # overlapping concepts
        a = torch.randn(n, 3, generator=g, dtype=torch.float64) + c[:, :3].double() * torch.tensor([1.0, -0.5, 0.7])
        cs = ConceptSet(c, warn=False)
        res = Invert(cs, max_length=2, beam_size=2 * k, alpha=0.0).explain(a)
        b1 = Invert(cs, max_length=2, beam_size=1, alpha=0.0).explain(a)
        atoms = torch.cat([c, ~c], 1)
        for d in range(3):
            best = -1.0
            for i in range(2 * k):
                if not (0 < atoms[:, i].sum() < n):
                    continue
                best = max(best, auroc_exact(a[:, d], atoms[:, i]).item())
                for j in range(2 * k):
                    for v in (atoms[:, i] & atoms[:, j], atoms[:, i] | atoms[:, j]):
                        if 0 < v.sum() < n:
                            best = max(best, auroc_exact(a[:, d], v).item())
            assert res.for_neuron(d).auc[0] == best
            misses += int(b1.for_neuron(d).auc[0] < best)
    print(f"beam B=1 missed the L<=2 optimum in {misses}/9 units")


# ------------------------------------------------------------------------------------------ degenerate inputs
def test_degenerate_inputs(fx):
    a, cs = fx
    const = torch.zeros(2000)
    with pytest.warns(UserWarning, match="Constant units"):
        r = Invert(cs, max_length=2).explain(const)
    assert (r.auc == 0.5).all() and (r.p_value == 1).all() and (r.log_p == 0).all()
    assert r.formula == ["c0", "c1", "c2"]  # first feasible atoms in canonical order
    # N = 2, n1 = 1
    cs2 = ConceptSet(torch.tensor([[True], [False]]), warn=False)
    r2 = Invert(cs2, max_length=1, beam_size=1, alpha=0.0).explain(torch.tensor([1.0, 0.0]))
    assert r2.formula == ["c0"] and r2.auc[0] == 1.0
    # integer labels are converted; ±inf are ranked; a single unit as (N,)
    ci = ConceptSet(cs.labels.long(), cs.names, warn=False)
    x = a[:, 0].clone()
    x[0] = float("inf")
    r3 = Invert(ci, max_length=1).explain(x)
    assert r3.formula[0] == "c3"
    # limit_search > 2K is clamped
    r4 = Invert(cs, compat="reference", limit_search=10_000, max_length=2).explain(a[:, 0])
    assert r4.formula[0] == "c3"
    # no feasible atom: no rows and a warning
    cs_small = ConceptSet(torch.tensor([[1], [0], [0], [0]], dtype=torch.bool), warn=False)
    with pytest.warns(UserWarning, match="No concept passes"):
        r5 = Invert(cs_small, min_fraction=0.8).explain(torch.arange(4.0))
    assert len(r5) == 0


def test_bad_inputs(fx):
    a, cs = fx
    with pytest.raises(ValueError, match="rows"):
        Invert(cs).explain(a[:100])
    nan = a.clone()
    nan[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*\[2\]"):
        Invert(cs).explain(nan)
    with pytest.raises(ValueError, match="max_length"):
        Invert(cs, max_length=0)
    with pytest.raises(ValueError, match="beam_size"):
        Invert(cs, beam_size=0)
    with pytest.raises(ValueError, match="limit_search"):
        Invert(cs, limit_search=0)
    with pytest.raises(ValueError, match="mode"):
        Invert(cs, mode="both")
    with pytest.raises(ValueError, match="correction"):
        Invert(cs, correction="holm")
    with pytest.raises(ValueError, match="alpha"):
        Invert(cs, alpha=0.1, compat="reference")
    with pytest.raises(ValueError, match="either"):
        Invert(cs, alpha=0.1, min_fraction=0.2)
    with pytest.raises(ValueError, match="min_fraction <= max_fraction"):
        Invert(cs, min_fraction=0.6, max_fraction=0.2)
    with pytest.raises(ValueError, match="binary"):
        ConceptSet(torch.tensor([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="alternative"):
        Invert(cs, alternative="one-sided")
    with pytest.raises(TypeError):
        Invert(cs).explain([1, 2, 3])


def test_excluded_atoms_rules():
    c = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 1, 0, 1], [1, 1, 0, 0, 1]], dtype=torch.bool)
    ex = excluded_atoms(c).tolist()
    # c1 duplicates c0, c3 and c4 are constant; c2 (the complement of c0) comes first in canonical order
    assert ex[:5] == [False, True, False, True, True]
    assert ex[5:] == [True, True, True, True, True]  # ~c0 = ~c1 = c2 and ~c2 = c0 (earlier), constants


# ------------------------------------------------------------------------------------------ corrections
def test_permutation_correction_small(fx):
    a, cs = fx
    cs10 = cs.select([f"c{i}" for i in range(10)])
    inv = Invert(cs10, max_length=2, beam_size=2, min_fraction=0.01, max_fraction=0.99,
                 correction="permutation", n_permutations=49, seed=3)
    res = inv.explain(a[:, [0, 4]])
    p0 = res.for_neuron(0).p_corrected
    assert p0[0] == pytest.approx(1 / 50)  # planted unit beats every permutation
    pn = res.for_neuron(1).p_corrected
    assert pn[0] > 0.05  # a noise unit is not significant after the search correction
    assert pn[0] < res.for_neuron(1).p_corrected[-1] + 1e-12  # monotone in the row statistic
    again = inv.explain(a[:, [0, 4]])
    assert np.array_equal(again.p_corrected, res.p_corrected)  # seeded


def test_null_calibration_bonferroni_fast(fx):
    _, cs = fx
    cs10 = cs.select([f"c{i}" for i in range(10)])
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(2000, 60, generator=g)
    res = Invert(cs10, max_length=3, beam_size=3, min_fraction=0.01, max_fraction=0.99,
                 compat="reference", correction="bonferroni").explain(noise).best()
    assert np.mean(res.p_value <= 0.05) >= 0.4  # search inflation of uncorrected p
    assert np.mean(res.p_corrected <= 0.05) <= 0.10


@pytest.mark.slow
def test_null_calibration_permutation_slow(fx):
    _, cs = fx
    cs10 = cs.select([f"c{i}" for i in range(10)])
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2000, 300, generator=g)
    inv = Invert(cs10, max_length=3, beam_size=3, min_fraction=0.01, max_fraction=0.99, compat="reference",
                 correction="permutation", n_permutations=1500)
    res = inv.explain(noise).best()
    assert np.mean(res.p_value <= 0.05) >= 0.40
    assert np.mean(res.p_corrected <= 0.05) <= 0.10
    assert np.mean(res.p_corrected <= 0.10) <= 0.17


# ------------------------------------------------------------------------------------------ score / result
def test_score_and_result_api(fx, tmp_path):
    a, cs = fx
    res = Invert(cs).score(a[:, :3], ["c3", "c1 & ~c2"])
    assert len(res) == 6 and (res.n_tests == 2).all()
    direct = auroc_exact(a[:, 0], cs.evaluate("c3")).item()
    assert res.for_neuron(0).auc[0] == direct
    full = Invert(cs, max_length=2).explain(a[:, :2])
    text = full.to_csv(tmp_path / "t.csv")
    assert text.startswith("# max_length: 2") and "c1 & ~c2" in text or "c1 & c3" in text
    assert str(full.expr(0)) == full.formula[0]
    assert full.describe(0) == full.formula[0]
    assert "| unit |" in full.summary()
    assert len(full.best()) == 2


def test_formula_strings_match_sympy():
    """The sympy-free printer gives sympy's str() for random left-to-right chains."""
    import random

    import sympy

    from reprlens.invert.search import _Expr

    rng = random.Random(0)
    names = ["c0", "c1", "c2", "c10", "c11", "shape=circle", "colour=red", "b", "a_1"]
    for _ in range(3000):
        length = rng.randint(1, 5)
        expr_s = expr_m = None
        for _ in range(length):
            name, neg, op = rng.choice(names), rng.random() < 0.4, rng.random() < 0.5
            sym = sympy.Symbol(name)
            lit_s = ~sym if neg else sym
            lit_m = _Expr.literal(name, neg)
            if expr_s is None:
                expr_s, expr_m = lit_s, lit_m
            elif op:
                expr_s, expr_m = expr_s & lit_s, _Expr.combine("and", expr_m, lit_m)
            else:
                expr_s, expr_m = expr_s | lit_s, _Expr.combine("or", expr_m, lit_m)
        assert expr_m.text == str(expr_s)


@pytest.mark.gpu
def test_cpu_and_gpu_tables_identical(fx, cuda_device):
    a, cs = fx
    for kw in (dict(), dict(compat="reference", min_fraction=0.002), dict(mode="negative", beam_size=5)):
        cpu = Invert(cs, **kw).explain(a)
        gpu = Invert(cs, **kw).explain(a.to(cuda_device))
        assert gpu.formula == cpu.formula
        assert np.array_equal(gpu.auc, cpu.auc) and np.array_equal(gpu.n_tests, cpu.n_tests)
        np.testing.assert_allclose(gpu.log_p, cpu.log_p, rtol=1e-12)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            amp = Invert(cs).explain(a.to(cuda_device))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    base = Invert(cs).explain(a)
    assert amp.formula == base.formula and np.array_equal(amp.auc, base.auc)

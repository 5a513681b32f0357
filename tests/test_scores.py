"""Tests of reprlens.scores.functional: known answers, brute-force oracles, invariants, gradcheck, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from reprlens.scores import (
    disentanglement,
    disentanglement_per_dim,
    informativeness,
    informativeness_per_dim,
    map_similarity,
)

D64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# independent oracles
# ----------------------------------------------------------------------------------------------------------


def _np_minmax(a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-map normalisation of one flat map, written without torch (spec 2.4)."""
    lo, hi, s = a.min(), a.max(), np.abs(a).max()
    if hi - lo > eps * s:
        return (a - lo) / (hi - lo)
    return np.zeros_like(a)


def _np_max(a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    hi, s = a.max(), np.abs(a).max()
    return a / hi if hi > eps * s else np.zeros_like(a)


_NP_NORM = {"minmax": _np_minmax, "max": _np_max, "none": lambda a, eps=0: a}


def _np_ns(maps, ref, reduce_dims="sum", normalize_dims=False, normalization="minmax", ddof=0):
    """Per-sample loop oracle of NS (spec 2.5)."""
    maps = maps.reshape(maps.shape[0], maps.shape[1], -1)
    ref = ref.reshape(ref.shape[0], ref.shape[1], -1)
    norm = _NP_NORM[normalization]

    def reduce(a):  # a: (K, L)
        if normalize_dims:  # per-dim min-max, independent of the final normalisation
            a = np.stack([_np_minmax(row) for row in a])
        if reduce_dims == "sum":
            return a.sum(0)
        if reduce_dims == "abs":
            return np.abs(a).sum(0)
        return a.var(0, ddof=ddof)

    r_ref = np.mean([reduce(r) for r in ref], axis=0)
    return np.array([np.mean(np.abs(norm(reduce(m)) - norm(r_ref))) for m in maps])


def _np_vs(maps, ddof=0, normalize=True, spatial="mean"):
    """Per-sample, per-position loop oracle of VS (spec 2.6)."""
    maps = maps.reshape(maps.shape[0], maps.shape[1], -1)
    out = []
    for sample in maps:
        a = np.stack([_np_minmax(row) if normalize else row for row in sample])
        v = np.array([a[:, p].var(ddof=ddof) for p in range(a.shape[1])])
        out.append(v.mean() if spatial == "mean" else v.var(ddof=ddof))
    return np.array(out)


def _grad_x_act_maps(head: nn.Module, h: torch.Tensor, transform: str = "abs") -> torch.Tensor:
    """(N, K, P) maps of every output dim of ``head`` w.r.t. h (N, C, P), per sample via the full Jacobian."""
    jac = torch.func.vmap(torch.func.jacrev(lambda x: head(x.unsqueeze(0)).squeeze(0)))(h)  # (N, K, C, P)
    phi = h.unsqueeze(1) * jac
    if transform == "abs":
        return phi.abs().sum(2)
    if transform == "lin":
        return phi.sum(2)
    return phi.abs().sqrt().sum(2)


class _Head(nn.Module):
    """z = W tanh(conv1x1(h)).mean(positions) + b: a small smooth head, final layer `fc`."""

    def __init__(self, c: int = 3, hidden: int = 4, k: int = 5) -> None:
        super().__init__()
        self.mix = nn.Conv1d(c, hidden, 1)
        self.fc = nn.Linear(hidden, k)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.mix(h)).mean(-1))


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=D64)


# ----------------------------------------------------------------------------------------------------------
# known answers (spec 5.1)
# ----------------------------------------------------------------------------------------------------------


def test_ka1_identity_head_known_values():
    w = torch.eye(2, dtype=D64)
    h = torch.tensor([[2.0, 1.0]], dtype=D64)  # C=1 folded: positions p1, p2
    jac = torch.autograd.functional.jacobian(lambda x: x @ w.T, h)[0, :, 0, :]  # (K, P)
    maps = (h * jac).unsqueeze(0)  # grad_x_act, (1, K=2, P=2)
    torch.testing.assert_close(maps[0], torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=D64))
    assert disentanglement(maps).item() == pytest.approx(0.25, abs=1e-15)
    assert disentanglement(maps, ddof=1).item() == pytest.approx(0.5, abs=1e-15)
    torch.testing.assert_close(disentanglement_per_dim(maps), torch.tensor([0.25, 0.25], dtype=D64))
    h_u = torch.tensor([[1.0, 1.0]], dtype=D64)
    ref = (h_u * jac).unsqueeze(0)  # R(u) = [1, 1]: flat -> zero map
    assert informativeness(maps, ref).item() == pytest.approx(0.5, abs=1e-15)
    assert informativeness(maps, maps).item() == 0.0


def test_ka2_identical_maps_and_ka3_single_dim():
    h = torch.tensor([[2.0, 1.0]], dtype=D64)
    w = torch.ones(2, 2, dtype=D64)
    maps = (h.unsqueeze(1) * w.unsqueeze(0))  # each row of W -> map h ⊙ W_k, identical
    assert disentanglement(maps).item() == 0.0
    with pytest.raises(ValueError, match=r"^disentanglement needs at least 2 target dims, got K=1$"):
        disentanglement(maps[:, :1])
    with pytest.raises(ValueError, match="at least 2 target dims"):
        disentanglement_per_dim(maps[:, :1])


@pytest.mark.parametrize("k", [2, 3, 5])
def test_disjoint_partition_masks(k):
    g = torch.Generator().manual_seed(k)
    positions = 4 * k
    owner = torch.randperm(positions, generator=g) % k  # every dim owns >= 1 position, partition
    masks = (owner.unsqueeze(0) == torch.arange(k).unsqueeze(1)).to(D64)  # (K, P)
    maps = (masks * (1 + torch.rand(k, 1, generator=g, dtype=D64))).reshape(1, k, 2, 2 * k)  # scaled masks
    assert disentanglement(maps).item() == pytest.approx((k - 1) / k**2, abs=1e-14)
    assert disentanglement(maps, ddof=1).item() == pytest.approx(1 / k, abs=1e-14)
    if k == 2:  # complementary masks attain the global maximum 0.25
        rand = _rand(200, 2, 8)
        assert disentanglement(rand, reduction="none").max() < disentanglement(maps)


# ----------------------------------------------------------------------------------------------------------
# brute-force oracles
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reduce_dims", "normalize_dims", "normalization", "ddof"),
    [("sum", False, "minmax", 0), ("abs", False, "minmax", 0), ("var", False, "minmax", 1),
     ("sum", True, "minmax", 0), ("sum", False, "max", 0), ("sum", False, "none", 0), ("var", True, "max", 0)],
)
def test_informativeness_matches_loop_oracle(reduce_dims, normalize_dims, normalization, ddof):
    maps = _rand(6, 4, 3, 5, seed=1) - 0.3  # signed maps
    ref = _rand(3, 4, 3, 5, seed=2) - 0.3
    kw = dict(reduce_dims=reduce_dims, normalize_dims=normalize_dims, normalization=normalization, ddof=ddof)
    expected = _np_ns(maps.numpy(), ref.numpy(), **kw)
    got = informativeness(maps, ref, reduction="none", **kw)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert informativeness(maps, ref, **kw).item() == pytest.approx(expected.mean(), rel=1e-12)
    assert informativeness(maps, ref, reduction="sum", **kw).item() == pytest.approx(expected.sum(), rel=1e-12)


@pytest.mark.parametrize(("ddof", "normalize", "spatial"), [(0, True, "mean"), (1, True, "mean"),
                                                            (0, False, "mean"), (0, True, "var"), (1, True, "var")])
def test_disentanglement_matches_loop_oracle(ddof, normalize, spatial):
    maps = _rand(5, 6, 4, 3, seed=3)
    expected = _np_vs(maps.numpy(), ddof=ddof, normalize=normalize, spatial=spatial)
    got = disentanglement(maps, ddof=ddof, normalize=normalize, spatial_reduction=spatial, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_disentanglement_variance_map_shape_and_values():
    maps = _rand(2, 3, 4, 5, seed=4)
    vmap_ = disentanglement(maps, spatial_reduction="none", reduction="none")
    assert vmap_.shape == (2, 4, 5)
    torch.testing.assert_close(vmap_.flatten(1).mean(1), disentanglement(maps, reduction="none"))
    assert disentanglement(maps, spatial_reduction="none").shape == (4, 5)


def test_per_dim_identities():
    maps = _rand(4, 5, 3, 3, seed=5)
    per_dim = disentanglement_per_dim(maps, reduction="none")
    assert per_dim.shape == (4, 5)
    torch.testing.assert_close(per_dim.mean(1), disentanglement(maps, reduction="none"), rtol=1e-13, atol=0)
    ref = _rand(3, 5, 3, 3, seed=6)
    ns_k = informativeness_per_dim(maps, ref, reduction="none")
    assert ns_k.shape == (4, 5)
    for k in (0, 3):  # with one dim, per-dim NS is NS with reduce_dims="sum"
        torch.testing.assert_close(ns_k[:, k], informativeness(maps[:, k : k + 1], ref[:, k : k + 1], reduction="none"))
    torch.testing.assert_close(informativeness_per_dim(maps, ref), ns_k.mean(0))
    # oracle: per dim, per sample
    expected = np.array([[np.mean(np.abs(_np_minmax(maps[n, k].numpy().ravel())
                                         - _np_minmax(ref[:, k].mean(0).numpy().ravel())))
                          for k in range(5)] for n in range(4)])
    np.testing.assert_allclose(ns_k.numpy(), expected, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# invariants (spec 5.3)
# ----------------------------------------------------------------------------------------------------------


def test_ranges_and_self_informativeness():
    maps = _rand(50, 4, 6, seed=7) ** 3
    ref = _rand(8, 4, 6, seed=8)
    ns = informativeness(maps, ref, reduction="none")
    vs = disentanglement(maps, reduction="none")
    assert ((ns >= 0) & (ns <= 1)).all() and ((vs >= 0) & (vs <= 0.25)).all()
    assert torch.equal(informativeness(maps, maps[:1], reduction="none")[:1], torch.zeros(1, dtype=D64))
    # NS(x, x) = 0 for a single reference equal to the input, per sample and per dim
    assert informativeness_per_dim(maps[:1], maps[:1]).abs().max() == 0


def test_vs_zero_for_duplicated_final_rows():
    torch.manual_seed(1)
    head = _Head().double()
    with torch.no_grad():
        head.fc.weight.copy_(head.fc.weight[:1].expand_as(head.fc.weight))
    h = torch.randn(4, 3, 6, dtype=D64)
    for transform in ("abs", "lin", "sqrt"):
        maps = _grad_x_act_maps(head, h, transform)
        assert disentanglement(maps).abs().item() < 1e-12
        assert disentanglement_per_dim(maps).abs().max().item() < 1e-12


@pytest.mark.parametrize("transform", ["abs", "lin", "sqrt"])
@pytest.mark.parametrize("c", [3.7, 0.01, -2.5])
def test_scale_invariance_of_final_layer(transform, c):
    torch.manual_seed(2)
    head = _Head().double()
    h = torch.randn(5, 3, 7, dtype=D64)
    u = torch.rand(4, 3, 7, dtype=D64)
    maps, ref = _grad_x_act_maps(head, h, transform), _grad_x_act_maps(head, u, transform)
    with torch.no_grad():
        head.fc.weight.mul_(c)
    maps_c, ref_c = _grad_x_act_maps(head, h, transform), _grad_x_act_maps(head, u, transform)
    if transform == "lin":
        torch.testing.assert_close(maps_c, c * maps, rtol=1e-13, atol=0)
    for f in (
        lambda m, r: informativeness(m, r, reduction="none"),
        lambda m, r: informativeness_per_dim(m, r, reduction="none"),
        lambda m, r: disentanglement(m, reduction="none"),
        lambda m, r: disentanglement(m, ddof=1, reduction="none"),
        lambda m, r: disentanglement_per_dim(m, reduction="none"),
    ):
        torch.testing.assert_close(f(maps_c, ref_c), f(maps, ref), rtol=1e-12, atol=1e-14)


def test_vs_permutation_invariance():
    maps = _rand(3, 6, 10, seed=9)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(disentanglement(maps[:, perm], reduction="none"), disentanglement(maps, reduction="none"),
                               rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(disentanglement_per_dim(maps[:, perm]), disentanglement_per_dim(maps)[perm])
    sim = map_similarity(maps)
    torch.testing.assert_close(map_similarity(maps[:, perm]), sim[:, perm][:, :, perm])


def test_degenerate_maps_finite_scores_and_zero_grads():
    constant = torch.full((2, 3, 4), 0.7, dtype=D64)
    zeros = torch.zeros(2, 3, 4, dtype=D64)
    single = _rand(2, 3, 1, seed=10)  # one position per map
    for maps in (constant, zeros, single):
        maps = maps.clone().requires_grad_(True)
        ref = maps.detach().clone().requires_grad_(True)
        outs = [
            informativeness(maps, ref),
            informativeness(maps, ref, reduce_dims="var", normalize_dims=True),
            informativeness_per_dim(maps, ref).sum(),
            disentanglement(maps),
            disentanglement(maps, ddof=1, spatial_reduction="var"),
            disentanglement_per_dim(maps).sum(),
            map_similarity(maps).sum(),
        ]
        for out in outs:
            assert torch.isfinite(out).all() and out.item() == 0.0
            g_maps, g_ref = torch.autograd.grad(out, (maps, ref), allow_unused=True, materialize_grads=True)
            assert torch.equal(g_maps, torch.zeros_like(g_maps)) and torch.equal(g_ref, torch.zeros_like(g_ref))


def test_informativeness_flat_noise_and_mixed_validity():
    # one valid map and one flat map in the same batch: the flat one is the zero map, the valid one untouched
    maps = torch.tensor([[[[3.0, 1.0, 2.0]]], [[[5.0, 5.0, 5.0]]]], dtype=D64)  # N=2, K=1
    ref = torch.tensor([[[[0.0, 0.0, 1.0]]]], dtype=D64)
    torch.testing.assert_close(informativeness(maps, ref, reduction="none"),
                               torch.tensor([(1 + 0 + 0.5) / 3, 1 / 3], dtype=D64))


# ----------------------------------------------------------------------------------------------------------
# fast path c: unbiased dim subsampling
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ddof", [0, 1])
def test_subset_estimator_unbiased(ddof):
    k, draws = 12, 4000
    maps = _rand(1, k, 3, 4, seed=11) ** 2
    exact = disentanglement(maps, ddof=ddof)
    g = torch.Generator().manual_seed(ddof)
    for m in (2, k // 4):
        idx = torch.rand(draws, k, generator=g).argsort(dim=1)[:, :m]  # uniform subsets without replacement
        subset = maps[0][idx]  # (draws, m, 3, 4)
        est = disentanglement(subset, ddof=ddof, num_dims_total=k, reduction="none")
        se = est.std() / draws**0.5
        assert (est.mean() - exact).abs() < 3 * se, (m, est.mean().item(), exact.item(), se.item())
        # the gradient w.r.t. the maps is unbiased too
        leaf = subset.clone().requires_grad_(True)
        disentanglement(leaf, ddof=ddof, num_dims_total=k, reduction="sum").backward()
        per_draw = torch.zeros(draws, k, 12, dtype=D64).scatter_(1, idx.unsqueeze(-1).expand(-1, -1, 12),
                                                                  leaf.grad.flatten(2))
        full = maps.clone().requires_grad_(True)
        disentanglement(full, ddof=ddof).backward()
        z = (per_draw.mean(0) - full.grad[0].flatten(1)) / (per_draw.std(0) / draws**0.5)
        assert z.abs().max() < 4.5, z.abs().max()
    # m = K: the exact score
    torch.testing.assert_close(disentanglement(maps, ddof=ddof, num_dims_total=k), exact, rtol=0, atol=0)
    shuffled = maps[:, torch.randperm(k, generator=g)]
    torch.testing.assert_close(disentanglement(shuffled, ddof=ddof, num_dims_total=k), exact, rtol=1e-13, atol=0)


def test_subset_estimator_formula():
    maps = _rand(2, 3, 5, seed=12)
    for ddof in (0, 1):
        expected = maps.var(dim=1, correction=1).mean(1) * (9 / (10 - ddof))
        torch.testing.assert_close(
            disentanglement(maps, normalize=False, ddof=ddof, num_dims_total=10, reduction="none"), expected)


# ----------------------------------------------------------------------------------------------------------
# map similarity
# ----------------------------------------------------------------------------------------------------------


def test_map_similarity_against_cosine():
    maps = _rand(3, 4, 2, 5, seed=13)
    sim = map_similarity(maps)
    assert sim.shape == (3, 4, 4)
    norm = torch.stack([torch.stack([torch.from_numpy(_np_minmax(maps[n, k].numpy().ravel()))
                                     for k in range(4)]) for n in range(3)])
    expected = torch.nn.functional.cosine_similarity(norm.unsqueeze(2), norm.unsqueeze(1), dim=-1)
    torch.testing.assert_close(sim, expected, rtol=1e-12, atol=1e-14)
    raw = map_similarity(maps, normalize=False)
    expected_raw = torch.nn.functional.cosine_similarity(maps.flatten(2).unsqueeze(2), maps.flatten(2).unsqueeze(1), -1)
    torch.testing.assert_close(raw, expected_raw, rtol=1e-12, atol=1e-14)
    dup = torch.cat([maps[:, :1], 3 * maps[:, :1], torch.zeros_like(maps[:, :1])], dim=1)
    sim_dup = map_similarity(dup)
    torch.testing.assert_close(sim_dup[:, 0, 1], torch.ones(3, dtype=D64))
    assert torch.equal(sim_dup[:, 2], torch.zeros(3, 3, dtype=D64))  # zero map: 0, no NaN


# ----------------------------------------------------------------------------------------------------------
# gradcheck (float64, random maps without ties)
# ----------------------------------------------------------------------------------------------------------


def test_gradcheck_scores():
    maps = (_rand(2, 3, 2, 3, seed=14) + 0.1).requires_grad_(True)
    ref = (_rand(2, 3, 2, 3, seed=15) - 0.5).requires_grad_(True)
    checks = [
        (lambda m, r: informativeness(m, r, reduction="none"), (maps, ref)),
        (lambda m, r: informativeness(m, r, reduce_dims="var", ddof=1, normalize_dims=True), (maps, ref)),
        (lambda m, r: informativeness(m, r, reduce_dims="abs", normalization="max"), (maps, ref)),
        (lambda m, r: informativeness_per_dim(m, r, reduction="none"), (maps, ref)),
        (lambda m: disentanglement(m, reduction="none"), (maps,)),
        (lambda m: disentanglement(m, ddof=1, spatial_reduction="var"), (maps,)),
        (lambda m: disentanglement(m, spatial_reduction="none", reduction="none"), (maps,)),
        (lambda m: disentanglement(m, num_dims_total=7), (maps,)),
        (lambda m: disentanglement_per_dim(m, reduction="none"), (maps,)),
        (lambda m: map_similarity(m), (maps,)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-7, atol=1e-6)
    assert torch.autograd.gradgradcheck(lambda m: disentanglement(m), (maps,), eps=1e-7, atol=1e-6)


def test_double_backward_through_maps_to_parameters():
    """θ ↦ score(maps(θ)) with maps from a create_graph Jacobian: gradcheck of the double backward."""
    torch.manual_seed(3)
    h = torch.randn(2, 3, 4, dtype=D64)
    u = torch.rand(2, 3, 4, dtype=D64)
    w0 = torch.randn(4, 3, dtype=D64)
    w1 = torch.randn(3, 4, dtype=D64)

    def head(w_a, w_b, x):
        return torch.tanh(torch.einsum("hc,ncp->nhp", w_a, x)).mean(-1) @ w_b.T

    def maps_of(w_a, w_b, x):
        x = x.clone().requires_grad_(True)
        z = head(w_a, w_b, x)
        rows = [torch.autograd.grad(z[:, k].sum(), x, create_graph=True)[0] for k in range(z.shape[1])]
        return (x.unsqueeze(1) * torch.stack(rows, 1)).sum(2)  # lin maps (N, K, P)

    def score(w_a, w_b):
        m, r = maps_of(w_a, w_b, h), maps_of(w_a, w_b, u)
        return informativeness(m, r) + disentanglement(m)

    assert torch.autograd.gradcheck(score, (w0.requires_grad_(True), w1.requires_grad_(True)), eps=1e-7, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# dtype handling
# ----------------------------------------------------------------------------------------------------------


def test_float32_and_half_inputs():
    maps, ref = _rand(4, 3, 8, seed=16), _rand(2, 3, 8, seed=17)
    exact_ns, exact_vs = informativeness(maps, ref), disentanglement(maps)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        ns = informativeness(maps.to(dtype), ref.to(dtype))
        vs = disentanglement(maps.to(dtype))
        assert ns.dtype == vs.dtype == torch.float32  # half is upcast to fp32
        assert ns.item() == pytest.approx(exact_ns.item(), rel=tol)
        assert vs.item() == pytest.approx(exact_vs.item(), rel=tol)
    assert informativeness(maps.float(), ref).dtype == D64  # mixed dtypes are promoted


def test_no_validation_path_is_identical_and_guards_non_finite():
    maps, ref = _rand(4, 3, 8, seed=18), _rand(2, 3, 8, seed=19)
    assert torch.equal(informativeness(maps, ref, validate_args=False), informativeness(maps, ref))
    assert torch.equal(disentanglement(maps, validate_args=False), disentanglement(maps))
    # documented guard without checks: with normalisation a non-finite map counts as a flat (zero) map ...
    for value in (float("nan"), float("inf")):
        bad, zeroed = maps.clone(), maps.clone()
        bad[0, 0, 0] = value
        zeroed[0, 0] = 0.0
        torch.testing.assert_close(disentanglement(bad, validate_args=False), disentanglement(zeroed), rtol=0, atol=0)
        # ... and without normalisation NaN propagates (NaN in, NaN out), never a finite wrong value
        assert torch.isnan(disentanglement(bad, normalize=False, validate_args=False))


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    maps, ref = _rand(2, 3, 4), _rand(2, 3, 4)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = maps.clone()
        bad[1, 2, 3] = value
        with pytest.raises(ValueError, match="NaN or Inf"):
            informativeness(bad, ref)
        with pytest.raises(ValueError, match="NaN or Inf"):
            informativeness(maps, bad)
        with pytest.raises(ValueError, match="NaN or Inf"):
            disentanglement(bad)
        with pytest.raises(ValueError, match="NaN or Inf"):
            map_similarity(bad)
    with pytest.raises(ValueError, match=r"at least one position axis.*unsqueeze"):
        disentanglement(maps[:, :, 0])
    with pytest.raises(ValueError, match=r"at least one position axis"):
        informativeness(maps, ref[:, :, 0])
    with pytest.raises(ValueError, match=r"agree in every axis but the first"):
        informativeness(maps, ref[:, :2])
    with pytest.raises(ValueError, match=r"agree in every axis but the first"):
        informativeness_per_dim(maps, ref[:, :, :3])
    with pytest.raises(ValueError, match="at least one sample"):
        disentanglement(maps[:0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        disentanglement(maps.numpy())
    with pytest.raises(TypeError, match="floating point"):
        disentanglement(maps.long())
    with pytest.raises(ValueError, match="`reduce_dims`"):
        informativeness(maps, ref, reduce_dims="mean")
    with pytest.raises(ValueError, match="`normalization`"):
        informativeness(maps, ref, normalization="zscore")
    with pytest.raises(ValueError, match="`reduction`"):
        disentanglement(maps, reduction="max")
    with pytest.raises(ValueError, match="`spatial_reduction`"):
        disentanglement(maps, spatial_reduction="sum")
    with pytest.raises(ValueError, match="`eps`"):
        disentanglement(maps, eps=-1.0)
    with pytest.raises(ValueError, match="`ddof`"):
        disentanglement(maps, ddof=-1)
    with pytest.raises(TypeError, match="`normalize`"):
        disentanglement(maps, normalize="yes")
    with pytest.raises(ValueError, match="`num_dims_total`"):
        disentanglement(maps, num_dims_total=2)
    with pytest.raises(ValueError, match="`num_dims_total`"):
        disentanglement(maps, num_dims_total=1)
    with pytest.raises(ValueError, match="K=1"):
        informativeness(maps[:, :1], ref[:, :1], reduce_dims="var", ddof=1)
    with pytest.raises(ValueError, match="ddof=2"):
        disentanglement(maps[:, :2], ddof=2)


def test_all_reductions_shapes():
    maps, ref = _rand(3, 4, 2, 2), _rand(2, 4, 2, 2)
    for red, shape in (("mean", ()), ("sum", ()), ("none", (3,))):
        assert informativeness(maps, ref, reduction=red).shape == shape
        assert disentanglement(maps, reduction=red).shape == shape
    for red, shape in (("mean", (4,)), ("sum", (4,)), ("none", (3, 4))):
        assert informativeness_per_dim(maps, ref, reduction=red).shape == shape
        assert disentanglement_per_dim(maps, reduction=red).shape == shape


def test_position_axes_are_flattened():
    maps, ref = _rand(3, 4, 2, 3, 2), _rand(2, 4, 2, 3, 2)
    flat, flat_ref = maps.flatten(2), ref.flatten(2)
    torch.testing.assert_close(informativeness(maps, ref), informativeness(flat, flat_ref), rtol=0, atol=0)
    torch.testing.assert_close(disentanglement(maps, ddof=1), disentanglement(flat, ddof=1), rtol=0, atol=0)
    torch.testing.assert_close(map_similarity(maps), map_similarity(flat), rtol=0, atol=0)


@pytest.mark.gpu
def test_scores_on_cuda_match_cpu(cuda_device):
    from reprlens.scores import Disentanglement, Informativeness

    maps, ref = _rand(6, 5, 4, 4, seed=20), _rand(3, 5, 4, 4, seed=21)
    cm, cr = maps.to(cuda_device), ref.to(cuda_device)
    pairs = [
        (informativeness(cm, cr, reduction="none"), informativeness(maps, ref, reduction="none")),
        (informativeness_per_dim(cm, cr), informativeness_per_dim(maps, ref)),
        (disentanglement(cm, ddof=1, reduction="none"), disentanglement(maps, ddof=1, reduction="none")),
        (disentanglement(cm, num_dims_total=9), disentanglement(maps, num_dims_total=9)),
        (disentanglement_per_dim(cm), disentanglement_per_dim(maps)),
        (map_similarity(cm), map_similarity(maps)),
        (informativeness(cm.half(), cr.half()), informativeness(maps.float(), ref.float())),
    ]
    for got, expected in pairs:
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), expected, rtol=2e-3 if got.dtype == torch.float32 else 1e-12, atol=1e-6)
    ns, vs = Informativeness().to(cuda_device), Disentanglement().to(cuda_device)
    ns.update(cm.float(), cr.float())
    vs.update(cm.float())
    assert ns.compute().item() == pytest.approx(informativeness(maps, ref).item(), rel=1e-5)
    assert vs.compute().item() == pytest.approx(disentanglement(maps).item(), rel=1e-5)
    leaf = cm.clone().requires_grad_(True)
    disentanglement(leaf).backward()
    assert torch.isfinite(leaf.grad).all()


# ----------------------------------------------------------------------------------------------------------
# property-based robustness: ties, constant rows, zeros, negative values, tiny and huge scales
# ----------------------------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _maps_strategy(draw):
    n, k, p = draw(st.integers(1, 3)), draw(st.integers(2, 4)), draw(st.integers(1, 5))
    values = st.sampled_from([0.0, 1.0, -1.0, 2.5, 1e-8, -3e4, 7.0])
    flat = draw(st.lists(values, min_size=n * k * p, max_size=n * k * p))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e20]))
    return torch.tensor(flat, dtype=D64).reshape(n, k, p) * scale


@settings(max_examples=60, deadline=None)
@given(maps=_maps_strategy(), ref=_maps_strategy(), ddof=st.sampled_from([0, 1]))
def test_property_finite_bounded_and_zero_nan_free_gradients(maps, ref, ddof):
    ref = ref[:, : maps.shape[1]] if ref.shape[1] >= maps.shape[1] else maps.flip(0)
    if ref.shape[2] != maps.shape[2]:
        ref = maps.flip(0)
    maps = maps.clone().requires_grad_(True)
    ns = informativeness(maps, ref, reduction="none")
    vs = disentanglement(maps, ddof=ddof, reduction="none")
    k = maps.shape[1]
    vs_max = 0.25 if ddof == 0 else (k / (4 * (k - 1)) if k % 2 == 0 else (k + 1) / (4 * k))
    assert ((ns >= 0) & (ns <= 1)).all() and ((vs >= 0) & (vs <= vs_max + 1e-12)).all()
    sim = map_similarity(maps)
    assert ((sim >= -1e-12) & (sim <= 1 + 1e-12)).all()
    (grad,) = torch.autograd.grad(ns.sum() + vs.sum() + sim.sum() + disentanglement_per_dim(maps).sum(), maps)
    assert torch.isfinite(grad).all()


def test_benchmark_smoke_correctness_gate():
    """Tiny run of benchmarks/bench_scores.py: its correctness gate (ours == reference loop) must pass."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scores.py"
    spec = importlib.util.spec_from_file_location("bench_scores", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.bench_scores(argparse.Namespace(small=True, pairs=1), torch.device("cpu"))
    assert out["gate"]["ns"] == pytest.approx(out["gate"]["ns_loop"], rel=1e-10)
    assert out["gate"]["vs"] == pytest.approx(out["gate"]["vs_loop"], rel=1e-10)

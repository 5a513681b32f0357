"""Tests of reprlens.relax against independent oracles (relax-xai, a float64 West loop, enumeration)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reprlens.relax import MaskBank, Relax, RelaxResult, relax, sample_masks


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def conv_encoder(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).to(dtype).eval()


class BlockEncoder(nn.Module):
    """Sees only the top-left ``size x size`` block; a constant part makes masking change the direction."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.size = size
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        z = F.relu(self.conv(x[:, :, : self.size, : self.size])).mean((2, 3))
        return torch.cat([z, torch.ones_like(z)], dim=1)


def west_oracle(encoder, image, masks, eps):
    """The reference's per-mask recursion (West's weighted algorithm), float64, one mask at a time."""
    with torch.no_grad():
        h = encoder(image[None]).flatten(1)
        R = torch.zeros(image.shape[1:], dtype=torch.float64)
        U = torch.zeros_like(R)
        S = torch.full_like(R, eps)
        for m in masks:
            s = F.cosine_similarity(h, encoder((image * m)[None]).flatten(1), dim=1, eps=1e-8)[0].double()
            S = S + m
            r_old = R.clone()
            R = R + m * (s - R) / S
            U = U + (s - R) * (s - r_old) * m
    return R, U, S


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# ------------------------------------------------------------------------------------------------
# 1. relax-xai on identical masks
# ------------------------------------------------------------------------------------------------
def test_matches_relax_xai_on_identical_masks():
    relax_xai = pytest.importorskip("relax_xai.relax")
    from relax_xai.masking_functions import mask_generator

    enc = conv_encoder()
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    ref_masks = torch.cat([next(mask_generator(100, (48, 48), "cpu")) for _ in range(30)])[:, 0]
    assert torch.equal(MaskBank.sample(3000, (48, 48), seed=1).render(0, 3000), ref_masks)

    torch.manual_seed(1)
    with torch.no_grad():
        ref = relax_xai.RELAX(x, enc, batch_size=100, num_batches=30)
        ref.forward()
    for mode in ("reference", "default"):
        res = Relax(enc, mode=mode, seed=1).explain(x)
        assert (res.importance[0] - ref.importance).abs().max() <= 1e-5
        assert ((res.m2[0] - ref.uncertainty).abs() / ref.uncertainty.abs()).max() <= 1e-4
        sow = res.sum_of_weights[0] + (0 if mode == "reference" else 1e-10)
        assert ((sow - ref.sum_of_weights).abs() / ref.sum_of_weights).max() <= 1e-5
    res = Relax(enc, mode="reference", seed=1).explain(x)
    assert res.uncertainty_kind == "m2" and torch.equal(res.uncertainty, res.m2)
    ref_keep = ref.uncertainty <= ref.uncertainty.median()
    diff = res.u_relax_mask[0] != ref_keep
    med = ref.uncertainty.median()
    assert (((ref.uncertainty[diff] - med).abs() / med) <= 1e-4).all()
    assert (res.u_relax[0] - ref.u_relax).abs().max() <= 1e-5


def test_batch_of_images_equals_separate_reference_runs():
    relax_xai = pytest.importorskip("relax_xai.relax")
    enc = conv_encoder(1)
    xs = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    res = Relax(enc, mode="reference", seed=1, num_masks=500).explain(xs)
    for k in range(3):
        torch.manual_seed(1)
        with torch.no_grad():
            ref = relax_xai.RELAX(xs[k : k + 1], enc, batch_size=100, num_batches=5)
            ref.forward()
        assert (res.importance[k] - ref.importance).abs().max() <= 1e-5
        assert ((res.m2[k] - ref.uncertainty).abs() / ref.uncertainty).max() <= 1e-4


# ------------------------------------------------------------------------------------------------
# 2. brute-force float64 oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["default", "reference"])
@pytest.mark.parametrize("accumulate_at", ["pixel", "cell"])
def test_float64_west_oracle(mode, accumulate_at):
    enc = conv_encoder(2, torch.float64)
    x = torch.randn(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    masks = MaskBank.sample(200, (16, 16), num_cells=4, seed=3).render(0, 200, dtype=torch.float64)
    eps = 1e-10 if mode == "reference" else 1e-300
    R, U, S = west_oracle(enc, x, masks, eps)
    res = Relax(enc, mode=mode, num_cells=4, seed=3, num_masks=200, accumulate_at=accumulate_at).explain(x)
    assert (res.importance[0] - R).abs().max() <= 1e-12
    assert (res.m2[0] - U).abs().max() <= 1e-12 * max(1.0, float(U.abs().max()))
    if mode == "reference":
        assert (res.sum_of_weights[0] - S).abs().max() <= 1e-10
    else:
        assert torch.allclose(res.variance[0], U / S, rtol=1e-9, atol=1e-15)
        assert torch.allclose(res.uncertainty, res.m2 / res.sum_of_weights)


# ------------------------------------------------------------------------------------------------
# 3. closed form by enumerating every mask
# ------------------------------------------------------------------------------------------------
def _enumerated_bank(s: int, size: int) -> MaskBank:
    grids = torch.tensor(list(itertools.product([0, 1], repeat=s * s)), dtype=torch.bool).reshape(-1, s, s)
    shifts = torch.tensor(list(itertools.product(range(s), range(s))))
    g = grids.repeat_interleave(len(shifts), 0)
    sh = shifts.repeat(len(grids), 1)
    return MaskBank(g, sh, (size, size), num_cells=s)


def _linear_encoder(size: int):
    w = torch.randn(6, 3 * size * size, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    return lambda x: x.flatten(1) @ w.T


@pytest.mark.parametrize("s,size", [(2, 8), (3, 9)])
def test_closed_form_by_enumeration(s, size):
    bank = _enumerated_bank(s, size)
    assert len(bank) == 2 ** (s * s) * s * s
    enc = _linear_encoder(size)
    x = torch.randn(3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = bank.render(0, len(bank), dtype=torch.float64)
    sims = F.cosine_similarity(enc(x[None]), enc(x[None] * m[:, None]), dim=1).double()
    em = m.mean(0)
    exact_r = (sims[:, None, None] * m).mean(0) / em
    exact_v = (m * (sims[:, None, None] - exact_r) ** 2).mean(0) / em
    for masks in (m, bank, list(m.split(37))):
        res = relax(enc, x, masks=masks, batch_size=64, num_masks=64)
        assert res.num_masks_used.tolist() == [len(bank)]
        assert (res.importance[0] - exact_r).abs().max() <= 1e-12
        assert (res.variance[0] - exact_v).abs().max() <= 1e-12


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_monte_carlo_converges_to_closed_form(p):
    s, size = 2, 8
    bank = _enumerated_bank(s, size)
    enc = _linear_encoder(size)
    x = torch.randn(3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    m = bank.render(0, len(bank), dtype=torch.float64)
    k = bank.grids.flatten(1).sum(1).double()
    wgt = p**k * (1 - p) ** (s * s - k)  # probability of each enumerated mask (shifts uniform)
    sims = F.cosine_similarity(enc(x[None]), enc(x[None] * m[:, None]), dim=1).double()
    exact = torch.einsum("n,n,nhw->hw", wgt, sims, m) / torch.einsum("n,nhw->hw", wgt, m)
    covered, err_n, err_4n = [], [], []
    for seed in range(6):
        r1 = relax(enc, x, num_masks=1000, num_cells=s, p_keep=p, seed=seed)
        r4 = relax(enc, x, num_masks=4000, num_cells=s, p_keep=p, seed=seed + 100)
        covered.append(((r4.importance[0] - exact).abs() <= 3 * r4.standard_error[0]).double().mean())
        err_n.append((r1.importance[0] - exact).abs().mean())
        err_4n.append((r4.importance[0] - exact).abs().mean())
    assert torch.stack(covered).mean() >= 0.95
    ratio = float(torch.stack(err_4n).mean() / torch.stack(err_n).mean())
    assert 0.3 <= ratio <= 0.75  # 1/sqrt(4) = 0.5


# ------------------------------------------------------------------------------------------------
# 4. known-answer locality, 5. invariants
# ------------------------------------------------------------------------------------------------
def test_locality_block_encoder():
    x = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(0))
    res = Relax(BlockEncoder(16), num_masks=3000, seed=0).explain(x)
    imp = res.importance[0]
    am = int(imp.argmax())
    assert am // 48 < 16 and am % 48 < 16
    top = imp.flatten().topk(256).indices
    rows, cols = top // 48, top % 48
    assert ((rows < 16) & (cols < 16)).double().mean() >= 0.9
    assert ((rows < 20) & (cols < 20)).double().mean() >= 0.99


@pytest.mark.parametrize("mode", ["default", "reference"])
def test_constant_encoder(mode):
    enc = lambda x: torch.ones(x.shape[0], 5)  # noqa: E731
    res = relax(enc, torch.rand(2, 3, 20, 20), num_masks=300, seed=0, mode=mode)
    assert (res.importance - 1).abs().max() <= 1e-6
    if mode == "default":
        assert res.uncertainty.abs().max() <= 1e-12
    else:
        assert res.m2.abs().max() <= 1e-9


def test_invariants_masks_weights_and_urelax():
    n, p = 3000, 0.5
    bank = MaskBank.sample(n, (24, 24), seed=0)
    m = bank.render(0, n)
    assert m.min() >= 0 and m.max() <= 1 + 1e-6  # float32 interpolation rounding, as in relax-xai
    assert abs(float(m.mean()) - p) <= 0.01
    S, S2 = bank.weight_sums()
    assert abs(float(S.mean()) - n * p) <= 0.01 * n * p
    assert torch.allclose(S, m.double().sum(0)) and torch.allclose(S2, (m.double() ** 2).sum(0))
    enc = conv_encoder(4)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    res = Relax(enc, num_masks=n, seed=0).explain(x)
    assert (res.u_relax_mask.flatten(1).sum(1) >= math.ceil(24 * 24 / 2)).all()
    assert torch.equal(res.u_relax, torch.where(res.u_relax_mask, res.importance, 0.0))
    assert torch.allclose(res.variance, res.m2 / res.sum_of_weights, rtol=1e-12)
    assert torch.allclose(res.sum_of_weights[0], S)
    small = Relax(enc, num_masks=300, seed=0).explain(x)
    assert small.standard_error.mean() > 2 * res.standard_error.mean()


def test_region_not_read_has_mean_similarity_importance():
    def enc(x):  # reads only the right half
        return torch.cat([x[:, :, :, 16:].mean((2, 3)), torch.ones(x.shape[0], 3)], 1)

    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = relax(enc, x, num_masks=2000, num_cells=4, seed=0)
    masks = MaskBank.sample(2000, (32, 32), num_cells=4, seed=0).render(0, 2000)
    mean_sim = F.cosine_similarity(enc(x[None]), enc(x[None] * masks[:, None]), dim=1).double().mean()
    # columns 0-3 are independent of the read half (cells of 8 px): E[s | kept] = E[s]
    left = res.importance[0, :, :4]
    assert (left.mean() - mean_sim).abs() <= 4 * res.standard_error[0, :, :4].mean()
    right = res.importance[0, :, 20:]
    assert right.mean() - mean_sim > 4 * res.standard_error[0, :, 20:].mean()


# ------------------------------------------------------------------------------------------------
# 6. batch-size invariance, 7. determinism
# ------------------------------------------------------------------------------------------------
def test_batch_size_invariance_float64():
    enc = conv_encoder(5, torch.float64)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    base = Relax(enc, num_masks=200, batch_size=100, num_cells=4, seed=2).explain(x)
    for bs in (1, 7, 200):
        for ipf in (1, 3):
            r = Relax(enc, num_masks=200, batch_size=bs, images_per_forward=ipf, num_cells=4, seed=2).explain(x)
            assert (r.importance - base.importance).abs().max() <= 1e-12
            assert ((r.m2 - base.m2).abs() / base.m2).max() <= 1e-10


def test_batch_size_one_equals_hundred_float32():
    enc = conv_encoder(6)
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    a = Relax(enc, num_masks=300, batch_size=1, seed=0, mode="reference").explain(x)
    b = Relax(enc, num_masks=300, batch_size=100, seed=0, mode="reference").explain(x)
    assert (a.importance - b.importance).abs().max() <= 1e-6
    assert ((a.m2 - b.m2).abs() / b.m2).max() <= 1e-4


def test_determinism_and_rng_hygiene():
    enc = conv_encoder(7)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    a = Relax(enc, num_masks=200, num_cells=4, seed=11).explain(x)
    assert torch.equal(torch.get_rng_state(), state)
    b = Relax(enc, num_masks=200, num_cells=4, seed=11).explain(x)
    for f in ("importance", "m2", "sum_of_weights"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    c = Relax(enc, num_masks=200, num_cells=4, seed=12).explain(x)
    assert not torch.equal(a.importance, c.importance)
    # a seeded call restarts the stream; a generator advances
    ex = Relax(enc, num_masks=200, num_cells=4, seed=11)
    assert torch.equal(ex.explain(x).importance, ex.explain(x).importance)
    exg = Relax(enc, num_masks=200, num_cells=4, generator=torch.Generator().manual_seed(11))
    g1, g2 = exg.explain(x), exg.explain(x)
    assert torch.equal(g1.importance, a.importance) and not torch.equal(g1.importance, g2.importance)
    # prefix property (at multiples of the block size)
    long = MaskBank.sample(3000, (16, 16), num_cells=4, seed=1)
    short = MaskBank.sample(500, (16, 16), num_cells=4, seed=1)
    assert torch.equal(long.grids[:500], short.grids) and torch.equal(long.shifts[:500], short.shifts)
    batches = list(sample_masks(250, (16, 16), batch_size=100, num_cells=4, seed=1))
    assert [len(m) for m in batches] == [100, 100, 50]
    assert torch.equal(torch.cat(batches)[:200], long.render(0, 200))


# ------------------------------------------------------------------------------------------------
# 8. paths and options
# ------------------------------------------------------------------------------------------------
def test_pixel_and_cell_paths_agree_float32_masks():
    enc = conv_encoder(8)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    a = Relax(enc, num_masks=400, seed=0, accumulate_at="pixel").explain(x)
    b = Relax(enc, num_masks=400, seed=0, accumulate_at="cell").explain(x)
    assert (a.importance - b.importance).abs().max() <= 1e-9
    assert ((a.m2 - b.m2).abs() / a.m2).max() <= 1e-6
    assert torch.allclose(a.sum_of_weights, b.sum_of_weights, rtol=1e-6)


def test_early_stopping_equals_fixed_run():
    enc = conv_encoder(9, torch.float64)  # float64: batch composition does not change rounding
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(num_cells=4, seed=0, early_stop_min_masks=200, early_stop_every_n_masks=200)
    es = Relax(enc, num_masks=2000, early_stop_tol=0.2, **kw).explain(x)
    assert (es.num_masks_used < 2000).all()
    for k in range(2):
        n = int(es.num_masks_used[k])
        fixed = Relax(enc, num_masks=n, num_cells=4, seed=0).explain(x[k])
        assert (fixed.importance[0] - es.importance[k]).abs().max() <= 1e-12
        assert (fixed.m2[0] - es.m2[k]).abs().max() <= 1e-12 * float(fixed.m2.abs().max())
        assert torch.allclose(fixed.sum_of_squared_weights[0], es.sum_of_squared_weights[k])
    const = relax(lambda z: torch.ones(z.shape[0], 3), x, num_masks=2000, early_stop_tol=1e-3, **kw)
    assert const.num_masks_used.tolist() == [200, 200]


def test_rise_masks_match_direct_construction():
    bank = MaskBank.sample(20, (20, 18), num_cells=5, shift="rise", seed=0)
    ch, cw = math.ceil(20 / 5), math.ceil(18 / 5)
    up = F.interpolate(bank.grids.float()[:, None], size=(6 * ch, 6 * cw), mode="bilinear", align_corners=False)
    direct = torch.stack([up[i, 0, sx : sx + 20, sy : sy + 18] for i, (sx, sy) in enumerate(bank.shifts.tolist())])
    assert torch.equal(bank.render(0, 20), direct)
    assert (bank.shifts[:, 0] < ch).all() and (bank.shifts[:, 1] < cw).all()


def test_reference_masks_match_separable_form():
    from reprlens.relax import _interp_matrix

    s, h = 7, 30
    U = _interp_matrix(h, s, torch.float64, torch.device("cpu"))
    eye = F.interpolate(torch.eye(s, dtype=torch.float64)[None], size=h, mode="linear", align_corners=False)[0].T
    assert (U - eye).abs().max() <= 1e-15


def test_baseline_equals_explicit_construction():
    enc = conv_encoder(10, torch.float64)
    x = torch.randn(3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    masks = MaskBank.sample(150, (12, 12), num_cells=3, seed=0).render(0, 150, dtype=torch.float64)
    res = relax(enc, x, masks=masks, baseline=b, batch_size=50, num_masks=150)
    with torch.no_grad():
        h = enc(x[None])
        xm = masks[:, None] * x + (1 - masks[:, None]) * b[:, None, None]
        s = F.cosine_similarity(h, enc(xm), dim=1)
    exp = (s[:, None, None] * masks).sum(0) / masks.sum(0)
    assert (res.importance[0] - exp).abs().max() <= 1e-12
    res_fn = relax(enc, x, masks=masks, baseline=lambda im: torch.zeros_like(im) + b[:, None, None], batch_size=50, num_masks=150)
    assert torch.allclose(res_fn.importance, res.importance, atol=1e-12)


def test_custom_similarity_dot_product():
    enc = conv_encoder(11, torch.float64)
    x = torch.randn(3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    masks = MaskBank.sample(100, (12, 12), num_cells=3, seed=0).render(0, 100, dtype=torch.float64)
    res = relax(enc, x, masks=masks, similarity=lambda a, b: (a * b).sum(1), batch_size=30, num_masks=100)
    with torch.no_grad():
        s = (enc(x[None]) * enc(masks[:, None] * x)).sum(1)
    exp_r = (s[:, None, None] * masks).sum(0) / masks.sum(0)
    exp_m2 = (masks * (s[:, None, None] - exp_r) ** 2).sum(0)
    assert (res.importance[0] - exp_r).abs().max() <= 1e-10 * float(exp_r.abs().max())
    assert ((res.m2[0] - exp_m2).abs() / exp_m2).max() <= 1e-9


def test_autocast_bf16_ranks_agree():
    enc = BlockEncoder(16)
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = Relax(enc, num_masks=1000, seed=0).explain(x)
    b = Relax(enc, num_masks=1000, seed=0, autocast_dtype=torch.bfloat16).explain(x)
    assert spearman(a.importance, b.importance) >= 0.99


# ------------------------------------------------------------------------------------------------
# 9. encoder hygiene, results
# ------------------------------------------------------------------------------------------------
def test_encoder_hygiene():
    enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    enc.train()
    enc[1].eval()
    flags = [m.training for m in enc.modules()]
    bn_state = {k: v.clone() for k, v in enc[1].state_dict().items()}
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    r1 = Relax(enc, num_masks=100, num_cells=4, seed=0).explain(x)
    assert [m.training for m in enc.modules()] == flags
    assert all(torch.equal(v, enc[1].state_dict()[k]) for k, v in bn_state.items())
    assert all(p.grad is None for p in enc.parameters())
    assert not r1.importance.requires_grad and not r1.importance.is_inference()
    with torch.no_grad():
        r2 = Relax(enc, num_masks=100, num_cells=4, seed=0).explain(x)
    with torch.enable_grad():
        r3 = Relax(enc, num_masks=100, num_cells=4, seed=0).explain(x)
    with torch.inference_mode():
        r4 = Relax(enc, num_masks=100, num_cells=4, seed=0).explain(x)
    for r in (r2, r3, r4):
        assert torch.equal(r.importance, r1.importance)
    (r1.importance * torch.ones(1, requires_grad=True)).sum().backward()  # usable in autograd afterwards
    with pytest.raises(TypeError, match="output_transform"):
        relax(lambda z: (z.mean((2, 3)), z), x, num_masks=100, num_cells=4, seed=0)
    ok = relax(lambda z: [z.mean((2, 3)), z.amax((2, 3))], x, num_masks=100, num_cells=4, seed=0,
               output_transform=lambda out: out[-1])
    assert ok.importance.shape == (2, 16, 16)


def test_result_helpers():
    res = relax(lambda z: z.mean((2, 3)) + 1, torch.rand(2, 3, 8, 8), num_masks=60, num_cells=3, seed=0)
    assert isinstance(res, RelaxResult)
    d = res.as_dict()
    assert set(d) >= {"importance", "variance", "standard_error", "num_masks_used"}
    r32 = res.to(dtype=torch.float32)
    assert r32.importance.dtype == torch.float32 and r32.num_masks_used.dtype == torch.int64
    assert res.cpu().importance.device.type == "cpu"


def test_never_kept_pixels_give_nan_and_warning():
    masks = torch.ones(4, 8, 8)
    masks[:, 0, 0] = 0
    with pytest.warns(UserWarning, match="never kept"):
        res = relax(lambda z: z.mean((2, 3)) + 1, torch.rand(3, 8, 8), masks=masks, batch_size=4, num_masks=4)
    assert torch.isnan(res.importance[0, 0, 0]) and not res.u_relax_mask[0, 0, 0]
    assert torch.isfinite(res.importance[0, 1:]).all()
    ref = relax(lambda z: z.mean((2, 3)) + 1, torch.rand(3, 8, 8), masks=masks, batch_size=4, num_masks=4, mode="reference")
    assert ref.importance[0, 0, 0] == 0


# ------------------------------------------------------------------------------------------------
# 10. input errors
# ------------------------------------------------------------------------------------------------
def test_input_errors():
    enc = conv_encoder(12)
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Relax(enc, num_masks=100).explain(torch.rand(3, 3, 3, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        Relax(enc, num_masks=100).explain(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too small.*num_cells"):
        Relax(enc, num_masks=100).explain(torch.rand(3, 3, 20))
    with pytest.raises(ValueError, match="p_keep"):
        Relax(enc, p_keep=1.0)
    with pytest.raises(ValueError, match="num_masks >= batch_size"):
        Relax(enc, num_masks=50, batch_size=100)
    with pytest.raises(ValueError, match="mask"):
        relax(enc, x, masks=torch.rand(5, 8, 8), num_masks=5, batch_size=5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        relax(enc, x, masks=torch.rand(5, 16, 16) * 2, num_masks=5, batch_size=5)
    with pytest.raises(ValueError, match="similarity"):
        relax(enc, x, similarity=lambda a, b: a * b, num_masks=100, num_cells=4)
    with pytest.raises(ValueError, match="seed.*generator"):
        Relax(enc, seed=0, generator=torch.Generator())
    for kw in (dict(early_stop_tol=0.1), dict(baseline=0.5), dict(shift="rise")):
        with pytest.raises(ValueError, match="reference"):
            Relax(enc, mode="reference", **kw)
    with pytest.raises(ValueError, match="shape"):
        relax(lambda z: z.mean((1, 2, 3)), x, num_masks=100, num_cells=4)
    nan_enc = lambda z: torch.full((z.shape[0], 3), float("nan"))  # noqa: E731
    with pytest.raises(RuntimeError, match="non-finite.*image 0"):
        relax(nan_enc, x, num_masks=100, num_cells=4)
    with pytest.raises(TypeError):
        relax(enc, x, num_mask=10)


@pytest.mark.parametrize("shift,shape", [("reference", (30, 26)), ("rise", (20, 18))])
def test_separable_render_matches_interpolate(shift, shape):
    bank = MaskBank.sample(300, shape, num_cells=5, shift=shift, seed=0)
    a = bank.render(0, 300)
    b = bank.render(0, 300, method="separable")
    assert (a - b).abs().max() <= 4e-7  # a few float32 ulps near 1
    a64 = bank.render(0, 300, dtype=torch.float64)
    b64 = bank.render(0, 300, dtype=torch.float64, method="separable")
    assert (a64 - b64).abs().max() <= 1e-14


# ------------------------------------------------------------------------------------------------
# 12. GPU (skipped without CUDA)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cpu_and_cuda_agree(cuda_device):
    enc = conv_encoder(13)
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    cpu = Relax(enc, num_masks=1000, seed=0).explain(x)
    bank = MaskBank.sample(1000, (48, 48), seed=0)
    # float32 bmm on the GPU: a few ulps from the CPU interpolation
    assert (bank.render(0, 1000, device=cuda_device, method="separable").cpu() - bank.render(0, 1000)).abs().max() <= 1e-6
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the encoder's conv, not RELAX, would differ by ~1e-3 in TF32
    try:
        gpu = Relax(enc.to(cuda_device), num_masks=1000, seed=0).explain(x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert gpu.importance.device.type == "cuda"
    gpu = gpu.cpu()
    assert (gpu.importance - cpu.importance).abs().max() <= 1e-5
    assert ((gpu.m2 - cpu.m2).abs() / cpu.m2).max() <= 1e-4
    bf = Relax(BlockEncoder(16).to(cuda_device), num_masks=1000, seed=0, autocast_dtype=torch.bfloat16).explain(x[0])
    fp = Relax(BlockEncoder(16).to(cuda_device), num_masks=1000, seed=0).explain(x[0])
    assert spearman(bf.importance.cpu(), fp.importance.cpu()) >= 0.99

"""Explainer network, functional core: templates, masks, filter loss, location instability, receptive field."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from reprlens.explainer_net import (
    ReceptiveField,
    filter_loss,
    filter_mutual_information,
    location_instability,
    part_mask,
    part_templates,
    peak_positions,
    receptive_field,
    reference_filter_gradient,
)
from reprlens.explainer_net import functional as Fn

D = torch.float64

@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads contend badly (20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



# ------------------------------------------------------------------------------------------ templates
def test_template_bank():
    h, w = 5, 7
    t, lp = part_templates(h, w, dtype=D)
    s = h * w
    tau = 0.5 / s
    assert t.shape == (s + 1, h, w) and lp.shape == (s + 1,)
    assert torch.allclose(lp.exp().sum(), torch.tensor(1.0, dtype=D), atol=1e-12)
    assert torch.allclose(lp.exp(), torch.full((s + 1,), 1 / (s + 1), dtype=D), atol=1e-15)
    assert torch.all(t[-1] == -tau)
    for m in range(s):  # brute force: t[mu] at mu equals tau; formula per pixel
        mi, mj = divmod(m, w)
        assert t[m, mi, mj] == pytest.approx(tau, abs=1e-15)
    m = 17
    mi, mj = divmod(m, w)
    expect = np.array([[tau * max(1 - 4 * (abs(i - mi) / h + abs(j - mj) / w), -1) for j in range(w)] for i in range(h)])
    np.testing.assert_allclose(t[m].numpy(), expect, atol=1e-12, rtol=0)
    # square: the paper's formula tau * max(1 - beta * L1 / n, -1)
    n = 6
    ts, _ = part_templates(n, n, dtype=D)
    mi, mj = 2, 4
    expect = np.array([[0.5 / n**2 * max(1 - 4 * (abs(i - mi) + abs(j - mj)) / n, -1) for j in range(n)] for i in range(n)])
    np.testing.assert_allclose(ts[mi * n + mj].numpy(), expect, atol=1e-12, rtol=0)
    assert part_templates(h, w, dtype=D)[0] is t  # cached


# ------------------------------------------------------------------------------------------ masks
def test_mask_one_hot_n7():
    x = torch.zeros(1, 1, 7, 7, dtype=D)
    x[0, 0, 3, 2] = 2.0
    m = part_mask(x)[0, 0]
    assert m.max() == 1 and m[3, 2] == 1 and m.min() == -1
    for i in range(7):
        for j in range(7):
            d = abs(i - 3) + abs(j - 2)
            assert float(m[i, j]) == pytest.approx(max(1 - 4 * d / 7, -1), abs=1e-12)
    assert float(m[3, 3]) == pytest.approx(0.428571428571, abs=1e-9)
    assert float(m[3, 4]) == pytest.approx(-0.142857142857, abs=1e-9)
    out = torch.relu(x * part_mask(x))
    assert torch.equal(out != 0, x != 0)
    # border peak: asymmetric but correct
    xb = torch.zeros(1, 1, 7, 7, dtype=D)
    xb[0, 0, 0, 6] = 1.0
    mb = part_mask(xb)[0, 0]
    assert mb[0, 6] == 1 and float(mb[1, 6]) == pytest.approx(1 - 4 / 7) and mb[6, 0] == -1


def test_mask_ties_gradient_unit_grid():
    x = torch.zeros(2, 3, 5, 5, dtype=D)
    x[:, :, 1, 3] = 1.0
    x[:, :, 3, 1] = 1.0  # tie: first in row-major order is (1, 3)
    m = part_mask(x)
    assert torch.all(m[:, :, 1, 3] == 1) and torch.all(m[:, :, 3, 1] < 1)
    xr = (torch.rand(2, 3, 5, 5, dtype=D) * 3).requires_grad_()
    m = part_mask(xr)
    assert not m.requires_grad and m.grad_fn is None
    y = torch.relu(xr * torch.relu(m))
    (g,) = torch.autograd.grad(y.sum(), xr)
    assert torch.allclose(g, torch.relu(m), atol=1e-12)
    # unit grid, n=7, beta=2: slope 2*beta/(n-1) = 2/3 per pixel
    x1 = torch.zeros(1, 1, 7, 7, dtype=D)
    x1[0, 0, 3, 3] = 1
    mu = part_mask(x1, beta=torch.tensor([2.0], dtype=D), coords="unit_grid")[0, 0]
    assert float(mu[3, 4]) == pytest.approx(1 / 3, abs=1e-12) and float(mu[3, 5]) == pytest.approx(-1 / 3, abs=1e-12)


def test_mask_centroid_rounding():
    # pixels at (2,3) and (2,4), equal weight: centroid col 3.5 (0-based) = 4.5 1-based -> 5 -> 0-based 4
    x = torch.zeros(1, 1, 7, 7, dtype=D)
    x[0, 0, 2, 3] = 1.0
    x[0, 0, 2, 4] = 1.0
    m = part_mask(x, mode="centroid")[0, 0]
    assert m[2, 4] == 1
    # weighted: rows 1 (w=3) and 4 (w=1): centroid 1.75 -> 2.75 1-based -> 3 -> row 2
    x = torch.zeros(1, 1, 7, 7, dtype=D)
    x[0, 0, 1, 0] = 3.0
    x[0, 0, 4, 0] = 1.0
    assert part_mask(x, mode="centroid")[0, 0, 2, 0] == 1
    z = part_mask(torch.zeros(1, 1, 4, 4, dtype=D), mode="centroid")  # all-zero map: centre (0, 0)
    assert z[0, 0, 0, 0] == 1


# ------------------------------------------------------------------------------------------ filter loss
def _naive_mi(x: torch.Tensor) -> torch.Tensor:
    """Triple loop over channels x templates x images, float64."""
    b, c, h, w = x.shape
    t, lp = part_templates(h, w, dtype=D)
    prior = lp.exp()
    out = []
    for ch in range(c):
        m_count = t.shape[0]
        sc = torch.zeros(b, m_count, dtype=D)
        for m in range(m_count):
            for i in range(b):
                sc[i, m] = (x[i, ch] * t[m]).sum()
        lpx_t = sc - torch.logsumexp(sc, 0, keepdim=True)
        px = (prior[None] * lpx_t.exp()).sum(1)
        mi = 0.0
        for m in range(m_count):
            for i in range(b):
                p = math.exp(lpx_t[i, m])
                mi += prior[m] * p * (lpx_t[i, m] - math.log(px[i]))
        out.append(mi)
    return torch.tensor(out, dtype=D)


def _entropy_mi(x: torch.Tensor) -> torch.Tensor:
    """Independent H(T) - H(T|X) with p(T|x) ∝ pi_T p(x|T) and p(x) = sum_T pi_T p(x|T)."""
    b, c, h, w = x.shape
    t, lp = part_templates(h, w, dtype=D)
    prior = lp.exp()
    res = []
    for ch in range(c):
        sc = torch.einsum("bij,mij->bm", x[:, ch], t)
        px_t = torch.softmax(sc, 0)  # over images
        joint = prior[None] * px_t  # p(x, T)
        px = joint.sum(1)
        pt_x = joint / px[:, None]
        h_t = -(prior * prior.log()).sum()
        h_t_x = -(px[:, None] * pt_x * torch.log(pt_x)).sum()
        res.append(h_t - h_t_x)
    return torch.stack(res)


def test_filter_loss_oracles():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 3, 4, 4, dtype=D, generator=g) * 40
    mi = filter_mutual_information(x)
    torch.testing.assert_close(mi, _naive_mi(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(mi, _entropy_mi(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(filter_loss(x, reduction="none"), -mi)
    torch.testing.assert_close(filter_loss(x), -mi.mean())
    torch.testing.assert_close(filter_loss(x, reduction="sum"), -mi.sum())
    torch.testing.assert_close(filter_mutual_information(x, chunk_channels=2), mi, atol=1e-14, rtol=0)


@pytest.mark.parametrize("normalize", ["none", "batch_peak"])
def test_filter_loss_gradcheck(normalize):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(4, 2, 5, 5, dtype=D, generator=g) * 20).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: filter_loss(a, normalize=normalize, reduction="none"), (x,),
                                    fast_mode=True)


def test_filter_loss_invariants():
    g = torch.Generator().manual_seed(2)
    b, s = 6, 25
    x = torch.rand(b, 4, 5, 5, dtype=D, generator=g) * 30
    mi = filter_mutual_information(x)
    assert torch.all(mi >= -1e-12) and torch.all(mi <= min(math.log(b), math.log(s + 1)) + 1e-12)
    perm = torch.randperm(b, generator=g)
    torch.testing.assert_close(filter_mutual_information(x[perm]), mi, atol=1e-12, rtol=0)
    torch.testing.assert_close(filter_mutual_information(x + torch.tensor([0.0, 3.0, 7.0, 1.0], dtype=D).view(1, 4, 1, 1)), mi, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat([filter_mutual_information(x[:, :1]), filter_mutual_information(x[:, 1:])]), mi, atol=1e-12, rtol=0)
    same = x[:1].expand(b, -1, -1, -1)
    assert torch.allclose(filter_mutual_information(same), torch.zeros(4, dtype=D), atol=1e-12)
    Fn._WARNED.discard("b1")
    with pytest.warns(UserWarning, match=">= 2 images"):
        assert torch.all(filter_mutual_information(x[:1]) == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        filter_mutual_information(x[:1])  # warns once only
    bp = filter_mutual_information(x, normalize="batch_peak")
    # scale invariant up to the 1e-6 stabiliser of the denominator (peaks ~30 here: relative 3e-8)
    torch.testing.assert_close(filter_mutual_information(7.3 * x, normalize="batch_peak"), bp, atol=1e-7, rtol=0)
    raw = filter_mutual_information(7.3 * x)
    assert torch.all((raw - mi).abs() > 1e-3)  # whereas the raw loss is not scale invariant
    # float32 vs float64: atol 1e-5, no rtol
    torch.testing.assert_close(filter_mutual_information(x.float()).double(), mi, atol=1e-5, rtol=0)


def test_filter_loss_ordering_equal_mass():
    n, b, mass = 7, 16, 1000.0
    peaks_v, rand_v = [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        pos = torch.randperm(n * n, generator=g)[:b]
        peaks = torch.zeros(b, 1, n * n, dtype=D)
        peaks[torch.arange(b), 0, pos] = mass
        u = torch.rand(b, 1, n * n, dtype=D, generator=g)
        rand = mass * u / u.sum(-1, keepdim=True)
        ident = rand[:1].expand(b, -1, -1)
        lp = float(filter_loss(peaks.view(b, 1, n, n)))
        lr = float(filter_loss(rand.view(b, 1, n, n)))
        li = float(filter_loss(ident.reshape(b, 1, n, n)))
        assert lp < lr < li + 1e-12 and abs(li) < 1e-12
        peaks_v.append(lp)
        rand_v.append(lr)
    assert -2.42 <= np.mean(peaks_v) <= -2.21 and -0.091 <= np.mean(rand_v) <= -0.060


def _reference_G(x, m, pos, epoch, mag):
    """Independent numpy float64 transcription of spec 2.5 (per channel loop)."""
    x, m = x.numpy(), m.numpy()
    b, c = x.shape[:2]
    G = np.zeros_like(x)
    ar = 0.5

    def fix(a):
        fin = a[np.isfinite(a)]
        top = np.abs(fin).max() if fin.size else 0.0
        a = np.where(np.isposinf(a), top, a)
        a = np.where(np.isneginf(a), -top, a)
        return np.where(np.isnan(a), 0.0, a)

    for d in range(c):
        s = np.array([(x[i, d] * m[i, d]).mean() for i in range(b)])
        s_rev = np.array([(x[i, d] * m[b - 1 - i, c - 1 - d]).mean() for i in range(b)])
        t = np.array([x[i, d].mean() for i in range(b)])
        lzp = ar * np.log(np.mean(np.exp(s_rev / ar)))
        lzn = ar * np.log(np.mean(np.exp(-t / ar)))
        gp = fix(np.exp(s / ar)) * (s - lzp + ar)
        gn = fix(np.exp(-t / ar)) * (-t - lzn + ar)
        gp = fix(gp * mag / (epoch * gp[pos].mean())) if pos.any() else gp
        gn = fix(gn * mag / (epoch * gn[~pos].mean())) if (~pos).any() else gn
        for i in range(b):
            if pos[i]:
                G[i, d] -= 1e-5 * gp[i] * m[i, d]
            else:
                G[i, d] += 1e-5 * gn[i]
    return G


def test_reference_mode_gradient():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 3, 5, 5, dtype=D, generator=g) * 2
    m = part_mask(x)
    pos = np.array([True, False, True, True, False, True])
    G = reference_filter_gradient(x, m, positive_mask=torch.from_numpy(pos), epoch=2, mag=0.1)
    np.testing.assert_allclose(G.numpy(), _reference_G(x, m, pos, 2, 0.1), atol=1e-12, rtol=0)
    # positives: -G proportional to m (same sign pattern); negatives: constant positive G
    Gi = G[0, 0]
    ratio = (-Gi / m[0, 0])[m[0, 0].abs() > 1e-6]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    assert torch.allclose(G[1], G[1, :, :1, :1].expand_as(G[1])) and torch.all(G[1] > 0)
    # autograd: value is the exact loss; gradient is G
    xr = x.clone().requires_grad_()
    loss = filter_loss(xr, mode="reference", mask=m, positive_mask=torch.from_numpy(pos), epoch=2)
    torch.testing.assert_close(loss.detach(), filter_loss(x))
    loss.backward()
    torch.testing.assert_close(xr.grad, G)
    big = reference_filter_gradient(x * 1e4, part_mask(x))
    assert torch.isfinite(big).all()


# ------------------------------------------------------------------------------------------ location instability
def _numpy_instability(maps, lm, rf, size, top_k=100, ddof=1, include_zero=False, select_ratio=1.0):
    """Brute force: per-filter, per-landmark loops with sorting."""
    maps = maps.numpy()
    lm = lm.numpy()
    n, f, h, w = maps.shape
    k_count = lm.shape[1]
    diag = math.hypot(*size)
    per = []
    for fi in range(f):
        sig = []
        for k in range(k_count):
            cands = []
            for b in range(n):
                flat = maps[b, fi].reshape(-1)
                idx = int(np.argmax(flat))
                v = flat[idx]
                if not np.all(np.isfinite(lm[b, k])) or (v <= 0 and not include_zero):
                    continue
                q = (rf.start[0] + (idx // w) * rf.jump[0], rf.start[1] + (idx % w) * rf.jump[1])
                cands.append((-v, b, math.hypot(q[0] - lm[b, k, 0], q[1] - lm[b, k, 1]) / diag))
            cands.sort()
            kept = [c[2] for c in cands[:top_k]]
            if len(kept) >= 2:
                sig.append(np.std(kept, ddof=ddof))
        per.append(np.mean(sig) if sig else np.nan)
    per = np.array(per)
    act = np.sort(per[np.isfinite(per)])
    nsel = max(1, int(round(select_ratio * act.size)))
    return act[:nsel].mean(), per


def test_instability_vs_bruteforce():
    g = torch.Generator().manual_seed(0)
    n, f, h, w = 40, 5, 4, 4
    maps = torch.relu(torch.randn(n, f, h, w, dtype=D, generator=g))
    maps[:5, 2] = 0.0  # zero peaks excluded
    lm = torch.rand(n, 3, 2, dtype=D, generator=g) * 16 - 0.5
    lm[::3, 1] = float("nan")
    rf = ReceptiveField((1.5, 1.5), (4.0, 4.0), (18.0, 18.0))
    for kw in ({}, {"top_k": 10}, {"ddof": 0}, {"select_ratio": 0.5}, {"include_zero_peaks": True, "top_k": 7}):
        res = location_instability(maps, lm, rf, (16, 16), **kw)
        nk = {k.replace("include_zero_peaks", "include_zero"): v for k, v in kw.items()}
        val, per = _numpy_instability(maps, lm, rf, (16, 16), **nk)
        np.testing.assert_allclose(res.per_filter.numpy(), per, atol=1e-12)
        assert float(res.value) == pytest.approx(val, abs=1e-12)
        assert res.num_active == f


def test_instability_known_answers():
    g = torch.Generator().manual_seed(0)
    size = (224, 224)
    n = 100
    # perfect detector: a 14x14 grid, jump 16, landmark exactly at the firing unit's centre
    rf = ReceptiveField((7.5, 7.5), (16.0, 16.0), (40.0, 40.0))
    idx = torch.randint(0, 196, (n,), generator=g)
    maps = torch.zeros(n, 1, 196, dtype=D)
    maps[torch.arange(n), 0, idx] = 1.0 + torch.rand(n, dtype=D, generator=g)
    maps = maps.view(n, 1, 14, 14)
    q = torch.stack([7.5 + (idx // 14) * 16.0, 7.5 + (idx % 14) * 16.0], -1).to(D)
    assert float(location_instability(maps, q[:, None], rf, size).value) == 0.0
    off = (q + torch.tensor([20.0, 0.0], dtype=D)).clamp(max=223)[:, None]
    off = q[:, None] + torch.tensor([12.0, 16.0], dtype=D)  # 20 px offset
    off = off.clamp(max=223.0)
    keep = (q[:, 0] + 12 <= 223) & (q[:, 1] + 16 <= 223)
    assert float(location_instability(maps[keep], off[keep], rf, size).value) == pytest.approx(0.0, abs=1e-12)
    # centre-fixed filter, K = 2000 uniform landmarks
    centre = ReceptiveField((112.0, 112.0), (1.0, 1.0), (1.0, 1.0))
    lm = torch.rand(n, 2000, 2, dtype=D, generator=g) * 224 - 0.5
    v = location_instability(torch.rand(n, 1, 1, 1, dtype=D, generator=g) + 0.1, lm, centre, size).value
    assert float(v) == pytest.approx(0.100711, abs=0.001)
    # uniform firing position, independent uniform landmarks: F = 200 filters on a 28x28 grid, K = 200
    grid = ReceptiveField((4.0, 4.0), (8.0, 8.0), (8.0, 8.0))
    f = 200
    idx = torch.randint(0, 784, (n, f), generator=g)
    maps = torch.zeros(n * f, 784, dtype=torch.float32)
    maps[torch.arange(n * f), idx.flatten()] = 1.0 + torch.rand(n * f, generator=g)
    lm = torch.rand(n, 200, 2, dtype=torch.float32, generator=g) * 224 - 0.5
    v = location_instability(maps.view(n, f, 28, 28), lm, grid, size).value
    assert float(v) == pytest.approx(0.175314, abs=0.0015)


def test_instability_topk_and_edges():
    g = torch.Generator().manual_seed(1)
    rf = ReceptiveField((0.0, 0.0), (1.0, 1.0), (1.0, 1.0))
    n_hi, n_lo = 100, 400
    pos = torch.randint(0, 100, (n_hi + n_lo, 2), generator=g)
    maps = torch.zeros(n_hi + n_lo, 1, 100, 100, dtype=D)
    score = torch.cat([10 + torch.rand(n_hi, dtype=D, generator=g), torch.rand(n_lo, dtype=D, generator=g) + 0.01])
    maps[torch.arange(n_hi + n_lo), 0, pos[:, 0], pos[:, 1]] = score
    lm = pos.to(D) + torch.tensor([3.0, -2.0], dtype=D)
    lm[n_hi:] = torch.rand(n_lo, 2, dtype=D, generator=g) * 99
    lm = lm.clamp(0, 99)[:, None]
    hi_ok = (pos[:n_hi, 0] + 3 <= 99) & (pos[:n_hi, 1] - 2 >= 0)
    sel = torch.cat([hi_ok, torch.ones(n_lo, dtype=torch.bool)])
    maps, lm = maps[sel], lm[sel]
    k_hi = int(hi_ok.sum())
    assert float(location_instability(maps, lm, rf, (100, 100), top_k=k_hi).value) == pytest.approx(0, abs=1e-12)
    assert float(location_instability(maps, lm, rf, (100, 100), top_k=500).value) > 0.01
    # < 2 candidates -> inactive; NaN landmarks excluded
    m2 = torch.rand(3, 2, 4, 4, dtype=D, generator=g)
    m2[1:, 1] = 0.0
    lm2 = torch.rand(3, 1, 2, dtype=D, generator=g) * 3
    r = location_instability(m2, lm2, rf, (4, 4))
    assert r.num_active == 1 and math.isnan(float(r.per_filter[1]))
    lm2[0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="no active filter"):
        assert math.isnan(float(location_instability(m2[:, 1:], lm2, rf, (4, 4)).value))
    # ddof=0 scales ddof=1 by sqrt((n-1)/n)
    m3 = torch.rand(7, 1, 4, 4, dtype=D, generator=g)
    lm3 = torch.rand(7, 1, 2, dtype=D, generator=g) * 3
    a = location_instability(m3, lm3, rf, (4, 4)).value
    b = location_instability(m3, lm3, rf, (4, 4), ddof=0).value
    assert float(b) == pytest.approx(float(a) * math.sqrt(6 / 7), abs=1e-12)


def test_instability_bad_input():
    rf = ReceptiveField((0.0, 0.0), (1.0, 1.0), (1.0, 1.0))
    maps = torch.rand(4, 2, 3, 3)
    with pytest.raises(ValueError, match="outside"):
        location_instability(maps, torch.full((4, 1, 2), 50.0), rf, (3, 3))
    with pytest.raises(ValueError, match="conv feature map"):
        location_instability(torch.rand(4, 2, 9), torch.zeros(4, 1, 2), rf, (3, 3))
    with pytest.raises(ValueError, match="shape"):
        location_instability(maps, torch.zeros(3, 1, 2), rf, (3, 3))
    bad = maps.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        location_instability(bad, torch.zeros(4, 1, 2), rf, (3, 3))
    # 1-based landmarks
    lm = torch.ones(4, 1, 2)
    a = location_instability(maps, lm, rf, (3, 3), landmark_index_base=1).value
    b = location_instability(maps, lm - 1, rf, (3, 3)).value
    assert float(a) == float(b)
    q, v = peak_positions(maps, rf)
    assert q.shape == (4, 2, 2) and v.shape == (4, 2)


# ------------------------------------------------------------------------------------------ receptive field
def _d6(c1: int = 16, c2: int = 32):
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU())


def _stack4():
    return nn.Sequential(nn.Conv2d(1, 2, 5, padding=2), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, padding=1),
                         nn.MaxPool2d(3, 2, 1), nn.Conv2d(2, 2, 3, stride=2, padding=0))


def _vgg16_features():
    """VGG-16 conv geometry (1 channel everywhere: only the geometry matters)."""
    layers: list[nn.Module] = []
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _alexnet():
    """torchvision AlexNet layout (features + avgpool + classifier), 1 channel."""
    net = nn.Module()
    net.features = nn.Sequential(
        nn.Conv2d(1, 1, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(1, 1, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, 2), nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    net.avgpool = nn.AdaptiveAvgPool2d(6)
    net.classifier = nn.Linear(36, 2)
    return net


def test_receptive_field_known_answers():
    assert receptive_field(_vgg16_features(), "28") == ReceptiveField((7.5, 7.5), (16.0, 16.0), (196.0, 196.0))
    assert receptive_field(_vgg16_features(), "29") == receptive_field(_vgg16_features(), "28")  # ReLU passes
    assert receptive_field(_alexnet(), "features.11") == ReceptiveField((15.0, 15.0), (16.0, 16.0), (163.0, 163.0))
    assert receptive_field(_d6(), "7") == ReceptiveField((1.5, 1.5), (4.0, 4.0), (18.0, 18.0))
    assert receptive_field(_stack4(), "4") == ReceptiveField((4.5, 4.5), (8.0, 8.0), (22.0, 22.0))
    with pytest.raises(ValueError, match="probe"):
        receptive_field(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), "2")
    with pytest.raises(ValueError, match="Closest"):
        receptive_field(_d6(), "77")


def _probe_unit_support(net, layer, size, unit):
    """Perturbation oracle on the probe copy (unit weights, avg-pools): which pixels change the unit."""
    import copy

    pnet = copy.deepcopy(net).double()
    for mod in pnet.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    for i, mod in enumerate(pnet):
        if isinstance(mod, nn.MaxPool2d):
            pnet[i] = nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding)
    stop = int(layer) + 1
    body = pnet[:stop]
    x0 = torch.ones(1, 1, *size, dtype=D)
    with torch.no_grad():
        base = body(x0)[0, :, unit[0], unit[1]]
        xs = torch.ones(size[0] * size[1], 1, *size, dtype=D)
        xs.view(-1, size[0] * size[1])[torch.arange(size[0] * size[1]), torch.arange(size[0] * size[1])] += 1
        out = body(xs)[:, :, unit[0], unit[1]]
    return ((out - base).abs().sum(1) > 1e-12).view(size)


def test_receptive_field_probe_and_perturbation():
    net = _d6()
    a = receptive_field(net, "7")
    p = receptive_field(net, "7", method="probe", input_size=(32, 32))
    assert a == p
    for unit in [(3, 4), (5, 5), (2, 6)]:
        sup = _probe_unit_support(_d6(1, 1), "7", (40, 40), unit)  # same geometry, 1 channel (fast)
        rows = torch.nonzero(sup.any(1)).flatten()
        cols = torch.nonzero(sup.any(0)).flatten()
        ci, cj = a.start[0] + unit[0] * a.jump[0], a.start[1] + unit[1] * a.jump[1]
        half = (a.size[0] - 1) / 2
        assert float(rows.min()) == ci - half and float(rows.max()) == ci + half
        assert float(cols.min()) == cj - half and float(cols.max()) == cj + half
        assert float(rows.max() - rows.min() + 1) == a.size[0]
    s4 = _stack4()
    assert receptive_field(s4, "4", method="probe", input_size=(64, 64)) == receptive_field(s4, "4")
    with pytest.raises(ValueError, match="input_size"):
        receptive_field(net, "7", method="probe")
    with pytest.raises(ValueError, match="3x3"):
        receptive_field(net, "7", method="probe", input_size=(8, 8))

"""normalize_maps and aggregate_channels: known values, invariances, NaN-free gradients, gradcheck."""

from __future__ import annotations

import doctest

import pytest
import torch

import reprlens.attribution as attribution
from reprlens.attribution import aggregate_channels, normalize_maps


def _no_ties(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_minmax_known_values():
    maps = torch.tensor([[[2.0, 1.0, 0.0], [-1.0, 1.0, 0.0], [3.0, 3.0, 3.0], [0.0, 0.0, 0.0]]])
    out = normalize_maps(maps)
    expected = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(out, expected)


def test_max_mode_known_values_and_invalid():
    maps = torch.tensor([[[2.0, 1.0, -1.0], [-1.0, -2.0, -3.0], [0.0, 0.0, 0.0]]])
    out = normalize_maps(maps, mode="max")
    expected = torch.tensor([[[1.0, 0.5, -0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(out, expected)
    assert normalize_maps(maps, mode="none") is maps


def test_range_and_float64_recompute():
    maps = _no_ties(4, 3, 5, 6)
    out = normalize_maps(maps)
    assert out.min() >= 0 and out.max() <= 1
    flat = maps.flatten(2)
    ref = (flat - flat.min(-1, keepdim=True).values) / (
        flat.max(-1, keepdim=True).values - flat.min(-1, keepdim=True).values
    )
    torch.testing.assert_close(out.flatten(2), ref, rtol=0, atol=1e-15)


@pytest.mark.parametrize("c", [1e-8, 0.3, 7.0, 1e6])
def test_scale_invariance(c):
    maps = _no_ties(3, 4, 5, 5)
    maps[0, 1] = 2.5  # constant map stays invalid at every scale
    torch.testing.assert_close(normalize_maps(c * maps), normalize_maps(maps), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        normalize_maps(c * maps, mode="max"), normalize_maps(maps, mode="max"), rtol=0, atol=1e-12
    )


def test_negative_scale_flips_minmax():
    maps = _no_ties(2, 3, 4, 4)
    torch.testing.assert_close(normalize_maps(-2.0 * maps), 1 - normalize_maps(maps), rtol=0, atol=1e-12)


def test_start_dim_whole_map():
    maps = _no_ties(3, 4, 5)
    out = normalize_maps(maps, start_dim=1)
    assert torch.allclose(out.flatten(1).amin(1), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(out.flatten(1).amax(1), torch.ones(3, dtype=torch.float64))
    # every element its own single-position map -> zero map, finite
    single = normalize_maps(maps, start_dim=3)
    assert torch.equal(single, torch.zeros_like(maps))


@pytest.mark.parametrize("mode", ["minmax", "max"])
def test_constant_and_zero_maps_zero_grad_no_nan(mode):
    maps = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    maps[0, 0] = 1.7  # constant
    maps[1, 2] = 1e-12 * _no_ties(4, 4)  # tiny but valid relative to its own scale
    maps[0, 1, 0, 0] = 1.0  # single non-zero position: valid
    maps.requires_grad_(True)
    out = normalize_maps(maps, mode=mode)
    w = _no_ties(*out.shape, seed=3)
    (out * w).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(maps.grad).all()
    if mode == "minmax":
        assert torch.equal(out[0, 0], torch.zeros(4, 4, dtype=torch.float64))
        assert torch.equal(maps.grad[0, 0], torch.zeros(4, 4, dtype=torch.float64))  # constant map
    else:  # "max" keeps a positive constant map (A / hi = 1), as the reference training path
        assert torch.equal(out[0, 0], torch.ones(4, 4, dtype=torch.float64))
    assert torch.equal(maps.grad[1, 0], torch.zeros(4, 4, dtype=torch.float64))  # all-zero map
    assert maps.grad[0, 1].abs().sum() > 0


def test_numerically_flat_map_is_invalid():
    base = torch.full((1, 1, 8), 1.0, dtype=torch.float64)
    base[0, 0, 0] += 1e-9  # r / s = 1e-9 < eps
    assert torch.equal(normalize_maps(base), torch.zeros_like(base))
    assert normalize_maps(base, eps=0.0).max() == 1


@pytest.mark.parametrize("mode", ["minmax", "max"])
def test_gradcheck(mode):
    maps = (_no_ties(2, 3, 3, 4) + (3.0 if mode == "max" else 0.0)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: normalize_maps(m, mode=mode), (maps,))
    assert torch.autograd.gradgradcheck(lambda m: normalize_maps(m, mode=mode), (maps,))


def test_normalize_bad_input():
    with pytest.raises(ValueError, match="mode"):
        normalize_maps(torch.zeros(1, 1, 2), mode="zscore")
    with pytest.raises(ValueError, match="eps"):
        normalize_maps(torch.zeros(1, 1, 2), eps=float("nan"))
    with pytest.raises(TypeError, match="Tensor"):
        normalize_maps([1.0, 2.0])
    with pytest.raises(TypeError, match="floating"):
        normalize_maps(torch.zeros(1, 1, 2, dtype=torch.long))


def test_aggregate_channels_values():
    phi = _no_ties(2, 3, 4, 5, 6)
    torch.testing.assert_close(aggregate_channels(phi, "abs"), phi.abs().sum(2), rtol=0, atol=0)
    torch.testing.assert_close(aggregate_channels(phi, "lin"), phi.sum(2), rtol=0, atol=0)
    torch.testing.assert_close(aggregate_channels(phi, "sqrt"), phi.abs().sqrt().sum(2), rtol=0, atol=1e-15)
    assert aggregate_channels(phi, "none") is phi
    flat = _no_ties(2, 3, 7)  # (N, K, D): every feature is a position
    torch.testing.assert_close(aggregate_channels(flat, "abs"), flat.abs())
    seq = _no_ties(2, 3, 4, 7)  # (N, K, C, L)
    torch.testing.assert_close(aggregate_channels(seq, "lin", channel_dim=2), seq.sum(2))
    with pytest.raises(ValueError, match="channel_dim"):
        aggregate_channels(seq, "lin")
    with pytest.raises(ValueError, match="transform"):
        aggregate_channels(phi, "square")


def test_aggregate_sqrt_zero_gradient_and_gradcheck():
    phi = torch.zeros(1, 1, 2, 1, 2, dtype=torch.float64)
    phi[0, 0, 0, 0, 0] = 4.0
    phi.requires_grad_(True)
    aggregate_channels(phi, "sqrt").sum().backward()
    assert torch.isfinite(phi.grad).all()
    assert phi.grad[0, 0, 1].abs().sum() == 0 and phi.grad[0, 0, 0, 0, 0] == pytest.approx(0.25)
    x = (_no_ties(2, 2, 3, 2, 2) + 0.0).requires_grad_(True)
    for transform in ("abs", "lin"):
        assert torch.autograd.gradcheck(lambda p: aggregate_channels(p, transform), (x,))
    away = (x.detach().abs() + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: aggregate_channels(p, "sqrt"), (away,))


def test_doctests():
    res = doctest.testmod(attribution, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert res.failed == 0

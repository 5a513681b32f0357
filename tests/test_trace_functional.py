"""Functional core of the training trace against independent oracles (torch.func, autograd loops, scipy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reprlens.trace import functional as TF

CONVS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2, groups=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=2, groups=2),
    dict(in_channels=4, out_channels=8, kernel_size=3, stride=1, padding=1, dilation=1, groups=4),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=2, dilation=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=(2, 3), padding="same", bias=False),
]


def _layers():
    torch.manual_seed(0)
    out = [(nn.Linear(5, 3).double(), (5,)), (nn.Linear(5, 3, bias=False).double(), (4, 5))]
    out += [(nn.Conv2d(**kw).double(), (4, 7, 6)) for kw in CONVS]
    return out


def _vmap_grads(layer, a, gout):
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def f(p, ai, gi):
        z = torch.func.functional_call(layer, p, (ai[None],))
        return (z * gi[None]).sum()

    return torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, a, gout)


@pytest.mark.parametrize("idx", range(2 + len(CONVS)))
def test_per_example_grads_equal_vmap_and_loop(idx):
    layer, shape = _layers()[idx]
    n = 3
    a = torch.randn(n, *shape, dtype=torch.float64)
    gout = torch.randn_like(layer(a))
    w, b = TF.per_example_grads(layer, a, gout)
    vm = _vmap_grads(layer, a, gout)
    torch.testing.assert_close(w, vm["weight"], atol=1e-10, rtol=0)
    if layer.bias is not None:
        torch.testing.assert_close(b, vm["bias"], atol=1e-10, rtol=0)
    else:
        assert b is None
    # autograd loop, one example at a time
    for i in range(n):
        z = layer(a[i : i + 1])
        gw = torch.autograd.grad((z * gout[i : i + 1]).sum(), layer.weight)[0]
        torch.testing.assert_close(w[i], gw, atol=1e-10, rtol=0)


@pytest.mark.parametrize("idx", range(2 + len(CONVS)))
@pytest.mark.parametrize("method", ["gram", "materialize", "auto"])
def test_factor_dot_equals_materialised(idx, method):
    layer, shape = _layers()[idx]
    a1, a2 = torch.randn(3, *shape, dtype=torch.float64), torch.randn(4, *shape, dtype=torch.float64)
    g1, g2 = torch.randn_like(layer(a1)), torch.randn_like(layer(a2))
    w1, b1 = TF.per_example_grads(layer, a1, g1)
    w2, b2 = TF.per_example_grads(layer, a2, g2)
    ref = w1.flatten(1) @ w2.flatten(1).T
    if b1 is not None:
        ref = ref + b1 @ b2.T
    torch.testing.assert_close(TF.factor_dot(layer, a1, g1, a2, g2, method=method), ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(TF.factor_sq_norm(layer, a1, g1), (w1.flatten(1) ** 2).sum(1) + (
        (b1**2).sum(1) if b1 is not None else 0), atol=1e-10, rtol=0)


@pytest.mark.parametrize("idx", range(2 + len(CONVS)))
def test_row_contributions_equal_applied_update(idx):
    layer, shape = _layers()[idx]
    a, x = torch.randn(3, *shape, dtype=torch.float64), torch.randn(2, *shape, dtype=torch.float64)
    u = torch.randn_like(layer(a))
    w, b = TF.per_example_grads(layer, a, u)
    c = TF.row_contributions(layer, a, u, x)
    ref = TF.apply_delta(layer, x, w, b)
    assert c.shape == (2, 3, *layer(x).shape[1:])
    torch.testing.assert_close(c, ref, atol=1e-10, rtol=0)
    # independent: apply the delta with the layer's own forward (zero base weights)
    for r in range(3):
        clone = type(layer)(**_ctor(layer)).double()
        with torch.no_grad():
            clone.weight.copy_(w[r])
            if b is not None:
                clone.bias.copy_(b[r])
            elif clone.bias is not None:
                clone.bias.zero_()
        torch.testing.assert_close(c[:, r], clone(x), atol=1e-10, rtol=0)
    dz = torch.randn_like(layer(x))
    scores = TF.row_scores(layer, a, u, x, dz)
    torch.testing.assert_close(scores, (c * dz[:, None]).flatten(2).sum(-1), atol=1e-10, rtol=0)


def _ctor(layer):
    if isinstance(layer, nn.Linear):
        return dict(in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None)
    return dict(
        in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=layer.kernel_size,
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
        bias=layer.bias is not None, padding_mode=layer.padding_mode,
    )


def test_unsupported_layer_names_supported_types():
    with pytest.raises(NotImplementedError, match="Linear.*Conv2d"):
        TF.layer_spec(nn.Conv1d(2, 2, 3), "enc.conv")


def test_weighted_kde_equals_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    pts, w = rng.normal(size=30), rng.uniform(0.1, 2.0, size=30)
    grid = np.linspace(-3, 3, 101)
    ref = stats.gaussian_kde(pts, weights=w, bw_method=0.05)(grid)
    got = TF.weighted_gaussian_kde(torch.tensor(pts), torch.tensor(w), torch.tensor(grid), bw=0.05)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10, rtol=0)
    assert torch.all(TF.weighted_gaussian_kde(torch.tensor([0.3]), torch.tensor([1.0]), torch.tensor(grid)) >= 0)
    assert torch.all(TF.weighted_gaussian_kde(torch.tensor(pts), torch.zeros(30), torch.tensor(grid)) == 0)


def test_spec_roundtrip():
    spec = TF.layer_spec(nn.Conv2d(4, 6, 3, padding="same", groups=2, padding_mode="circular"))
    assert TF.LayerSpec.from_dict(spec.to_dict()) == spec
    a = torch.randn(2, 4, 5, 5)
    conv = nn.Conv2d(4, 6, 3, padding="same", groups=2, padding_mode="circular")
    assert TF.patch_matrix(conv, a).shape == (2, 2, 25, 18)
    assert F.unfold(a, 3).shape[-1] == 9

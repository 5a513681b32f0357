"""layer_attributions / LayerToLayerAttribution against Captum, naive loops and known answers (float64)."""

from __future__ import annotations

import doctest
import logging

import pytest
import torch
from torch import nn

import reprlens.attribution as attribution
from reprlens.attribution import (
    REFERENCE_PRESETS,
    LayerToLayerAttribution,
    PooledHead,
    aggregate_channels,
    chain_attributions,
    expected_gradients_interpolants,
    ig_quadrature,
    layer_attributions,
    normalize_maps,
    summed_map,
)

captum_attr = pytest.importorskip("captum.attr")
DT = torch.float64
K = 5


class SmallCNN(nn.Module):
    """conv -> BN -> in-place ReLU -> maxpool -> conv -> BN (source) -> in-place ReLU -> conv head -> GAP -> fc."""

    def __init__(self, k: int = K):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.BatchNorm2d(6),
        )
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(5, k)

    def head_fn(self, h):
        return self.fc(self.head(self.act(h)))

    def forward(self, x):
        return self.head_fn(self.features(x))


def _model(seed=0, k=K):
    torch.manual_seed(seed)
    m = SmallCNN(k).to(DT)
    with torch.no_grad():  # non-trivial running statistics
        for bn in (m.features[1], m.features[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return m.eval()


def _x(n=3, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=DT)


def _captum_all(model, layer, x, k, multiply=True, to_input=False):
    lga = captum_attr.LayerGradientXActivation(model, layer, multiply_by_inputs=multiply)
    return torch.stack([lga.attribute(x, target=j, attribute_to_layer_input=to_input) for j in range(k)], 1)


def _naive(head, h, method="grad_x_act"):
    """Per dim, per sample, batch-of-one forward + autograd.grad (the reference loop structure)."""
    n = h.shape[0]
    rows = []
    for i in range(n):
        cols = []
        for j in range(head(h[:1].detach().clone()).shape[1]):
            x = h[i : i + 1].detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(head(x.clone())[0, j], x)
            cols.append((g * x if method == "grad_x_act" else g)[0])
        rows.append(torch.stack(cols))
    return torch.stack(rows)


def _naive_ig(head, h, h0, alphas, weights):
    n = h.shape[0]
    out = torch.zeros(n, head(h[:1].clone()).shape[1], *h.shape[1:], dtype=h.dtype)
    for i in range(n):
        for j in range(out.shape[1]):
            acc = torch.zeros_like(h[i])
            for a, w in zip(alphas.tolist(), weights.tolist()):
                x = (h0[i] + a * (h[i] - h0[i])).unsqueeze(0).detach().requires_grad_(True)
                (g,) = torch.autograd.grad(head(x.clone())[0, j], x)
                acc = acc + w * g[0]
            out[i, j] = (h[i] - h0[i]) * acc
    return out


# ------------------------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("multiply", [True, False])
def test_captum_equality_all_paths(multiply):
    model = _model()
    x = _x()
    layer = model.features[5]  # BN output, followed by an in-place ReLU
    ref = _captum_all(model, layer, x, K, multiply)
    method = "grad_x_act" if multiply else "grad"
    attr = LayerToLayerAttribution(model, "features.5", "fc")
    torch.testing.assert_close(attr.attribute(x, method=method), ref, rtol=0, atol=1e-10)
    attr_h = LayerToLayerAttribution(model, "features.5", "fc", head=model.head_fn)
    for chunk in (1, 3, K):
        torch.testing.assert_close(attr_h.attribute(x, method=method, chunk_size=chunk), ref, rtol=0, atol=1e-10)
    h = model.features(x)
    for path in ("vmap", "loop", "batched"):
        got = layer_attributions(h, model.head_fn, method, path=path, chunk_size=2)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    for create_graph in (False, True):
        hh = model.features(x)  # the clone keeps hh out of reach of the head's in-place ReLU (as LayerCapture)
        got = layer_attributions(hh, model.head_fn(hh.clone()), method, create_graph=create_graph, chunk_size=2)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
        assert (got.grad_fn is not None) == create_graph


def test_captum_equality_source_input():
    model = _model()
    x = _x()
    ref = _captum_all(model, model.head[0], x, K, to_input=True)
    got = LayerToLayerAttribution(model, "head.0", "fc", attribute_to_source_input=True).attribute(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_naive_loop_every_method_and_transform():
    model = _model()
    x = _x(n=2, size=6)
    h = model.features(x).detach()
    naive = {m: _naive(model.head_fn, h, m) for m in ("grad", "grad_x_act")}
    a, w = ig_quadrature(6)
    h0 = 0.1 * torch.ones_like(h)
    naive["integrated_gradients"] = _naive_ig(model.head_fn, h, h0, a, w)
    for method, ref in naive.items():
        for transform in ("none", "abs", "lin", "sqrt"):
            got = layer_attributions(
                h, model.head_fn, method, transform=transform, n_steps=6, source_baseline=h0, chunk_size=2
            )
            torch.testing.assert_close(got, aggregate_channels(ref, transform), rtol=0, atol=1e-10)


def test_expected_gradients_against_loop_with_shared_draws():
    model = _model()
    x = _x(n=2, size=6)
    bg = _x(n=3, seed=7, size=6)
    s, sigma = 3, 0.3
    attr = LayerToLayerAttribution(model, "features.5", "fc")
    for mult in (True, False):
        got = attr.attribute(
            x, method="expected_gradients", baselines=bg, n_samples=s, stdevs=sigma, multiply_by_activation=mult,
            generator=torch.Generator().manual_seed(5),
        )
        _, d = expected_gradients_interpolants(x, bg, s, sigma, torch.Generator().manual_seed(5))
        ref = torch.zeros_like(got)
        for i in range(2):
            for j in range(K):
                for t in range(s):
                    tt = d["t"][i, t]
                    xt = (tt * (x[i] + sigma * d["eps"][i, t]) + (1 - tt) * bg[d["r"][i, t]]).unsqueeze(0)
                    hx = model.features(xt).detach().requires_grad_(True)
                    (g,) = torch.autograd.grad(model.head_fn(hx.clone())[0, j], hx)
                    ref[i, j] += ((g * hx) if mult else g)[0] / s
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
        # the head path gives the same
        got_h = LayerToLayerAttribution(model, "features.5", "fc", head=model.head_fn).attribute(
            x, method="expected_gradients", baselines=bg, n_samples=s, stdevs=sigma, multiply_by_activation=mult,
            generator=torch.Generator().manual_seed(5), transform="abs",
        )
        torch.testing.assert_close(got_h, aggregate_channels(ref, "abs"), rtol=0, atol=1e-10)


def test_integrated_gradients_captum_oracle_and_completeness():
    model = _model()
    oop = _model()
    oop.act.inplace = False
    oop.features[2].inplace = False
    x = _x(n=2)
    for rule, n_steps in (("gausslegendre", 16), ("riemann_trapezoid", 5), ("riemann_left", 4), ("riemann_middle", 4)):
        # Captum's layer IG fails on in-place ops after the layer: its oracle runs an out-of-place copy
        lig = captum_attr.LayerIntegratedGradients(oop, oop.features[5], multiply_by_inputs=True)
        ref = torch.stack(
            [lig.attribute(x, baselines=torch.zeros_like(x), target=j, n_steps=n_steps, method=rule) for j in range(K)], 1
        )
        for head in (None, model.head_fn):
            attr = LayerToLayerAttribution(model, "features.5", "fc", head=head)
            got, delta = attr.attribute(
                x, method="integrated_gradients", n_steps=n_steps, ig_rule=rule, return_convergence_delta=True
            )
            # Captum's riemann_trapezoid uses weights 1/n (ends halved), summing to (n-1)/n; ours are the
            # proper trapezoid weights 1/(n-1) (spec 2.2), so the results differ by exactly that factor.
            factor = (n_steps - 1) / n_steps if rule == "riemann_trapezoid" else 1.0
            torch.testing.assert_close(got * factor, ref, rtol=0, atol=1e-10)
            z = model(x)
            z0 = model.head_fn(model.features(torch.zeros_like(x)).expand_as(model.features(x)))
            torch.testing.assert_close(delta, z - z0 - got.flatten(2).sum(-1), rtol=0, atol=1e-10)


def test_ig_completeness_linear_and_tanh():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 4, 3, 3, generator=g, dtype=DT)
    h0 = torch.randn(3, 4, 3, 3, generator=g, dtype=DT)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(36, 6)).to(DT)
    phi, delta = layer_attributions(
        h, lin, "integrated_gradients", n_steps=1, source_baseline=h0, return_convergence_delta=True
    )
    scale = (lin(h) - lin(h0)).detach().abs().max()
    assert delta.abs().max() <= 1e-10 * scale
    torch.testing.assert_close(phi.flatten(2).sum(-1), (lin(h) - lin(h0)).detach(), rtol=0, atol=1e-10 * float(scale))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, 6), nn.Tanh()).to(DT)
    with torch.no_grad():
        for p in mlp.parameters():
            p.mul_(2.0)
    deltas = []
    for n_steps in (8, 16, 64):
        _, d = layer_attributions(h, mlp, "integrated_gradients", n_steps=n_steps, source_baseline=h0, return_convergence_delta=True)
        deltas.append(d.abs().max())
    assert deltas[0] > deltas[1] > deltas[2] or deltas[0] < 1e-12
    assert deltas[2] <= 1e-6 * (mlp(h) - mlp(h0)).abs().max()


# ------------------------------------------------------------------------------------------- fast paths
def _pooled(seed=0, c=6, k=K):
    torch.manual_seed(seed)
    return PooledHead(nn.Sequential(nn.Linear(c, 16), nn.Tanh(), nn.Linear(16, k)).to(DT))


@pytest.mark.parametrize("method", ["grad", "grad_x_act", "integrated_gradients"])
@pytest.mark.parametrize("transform", ["none", "lin", "abs", "sqrt"])
def test_factorized_equals_generic(method, transform, caplog):
    head = _pooled()
    h = _x(n=3, size=4).repeat(1, 2, 1, 1)  # (3, 6, 4, 4)
    kw = dict(transform=transform, n_steps=5, source_baseline=0.2)
    with caplog.at_level(logging.DEBUG, logger="reprlens.attribution"):
        fast = layer_attributions(h, head, method, **kw)
    assert "path=factorized" in caplog.text
    generic = layer_attributions(h, head, method, path="vmap", **kw)
    torch.testing.assert_close(fast, generic, rtol=0, atol=1e-10)
    # dims subset, and a wide MLP (C < K: forward-mode Jacobian)
    torch.testing.assert_close(
        layer_attributions(h, head, method, dims=[3, 0], **kw), generic[:, [3, 0]], rtol=0, atol=1e-10
    )
    wide = _pooled(c=6, k=9)
    torch.testing.assert_close(
        layer_attributions(h, wide, method, **kw), layer_attributions(h, wide, method, path="vmap", **kw), rtol=0, atol=1e-10
    )


def test_factorized_create_graph_parameter_gradients():
    head = _pooled()
    h = _x(n=3, size=4).repeat(1, 2, 1, 1).requires_grad_(True)
    grads = []
    for path in ("factorized", "vmap", "loop"):
        maps = layer_attributions(h, head, "grad_x_act", transform="lin", create_graph=True, path=path)
        score = normalize_maps(maps).var(1).mean()
        grads.append(torch.autograd.grad(score, [h, *head.parameters()], allow_unused=True, materialize_grads=True))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_summed_map_fast_path_a():
    model = _model()
    x = _x()
    h = model.features(x)
    lin = layer_attributions(h, model.head_fn, transform="lin")
    w = torch.linspace(-1, 2, K, dtype=DT)
    wn = torch.randn(3, K, dtype=DT)
    for method in ("grad", "grad_x_act"):
        lin_m = layer_attributions(h, model.head_fn, method, transform="lin")
        torch.testing.assert_close(summed_map(h, model.head_fn, method=method), lin_m.sum(1), rtol=0, atol=1e-10)
    torch.testing.assert_close(summed_map(h, model.head_fn, w), (w[None, :, None, None] * lin).sum(1), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        summed_map(h, model.head_fn(h.clone()), wn, create_graph=True), (wn[:, :, None, None] * lin).sum(1), rtol=0, atol=1e-10
    )
    with pytest.raises(ValueError, match="weights"):
        summed_map(h, model.head_fn, torch.ones(K + 1, dtype=DT))


def test_chain_rule_identity():
    torch.manual_seed(0)
    head1 = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, K)).to(DT)
    head2 = nn.Sequential(nn.Tanh(), nn.Linear(K, 3)).to(DT)
    h = _x(n=2, size=4).repeat(1, 2, 1, 1)[:, :4]
    z = head1(h)
    upper = layer_attributions(z, head2, "grad")  # (N, O, K)
    lower = layer_attributions(h, head1, "grad_x_act", transform="lin")  # (N, K, H, W)
    direct = layer_attributions(h, lambda s: head2(head1(s)), "grad_x_act", transform="lin")
    torch.testing.assert_close(chain_attributions(upper, lower), direct, rtol=0, atol=1e-10)
    ab = chain_attributions(upper, lower, "abs")
    torch.testing.assert_close(ab, torch.einsum("nok,nkhw->nohw", upper.abs(), lower))
    var = chain_attributions(upper, lower, "var", ddof=1)
    torch.testing.assert_close(var, (upper[..., None, None] * lower[:, None]).var(2))
    with pytest.raises(ValueError, match="K="):
        chain_attributions(upper, lower[:, :2])


# ------------------------------------------------------------------------------------------- guards
def test_never_is_grads_batched_with_create_graph(monkeypatch):
    real = torch.autograd.grad
    calls = {"batched": 0}

    def guarded(*args, **kwargs):
        if kwargs.get("is_grads_batched") and kwargs.get("create_graph"):
            raise AssertionError("is_grads_batched=True together with create_graph=True")
        calls["batched"] += bool(kwargs.get("is_grads_batched"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", guarded)
    model = _model()
    x = _x(n=2)
    for create_graph in (False, True):
        h = model.features(x)
        layer_attributions(h, model.head_fn(h.clone()), create_graph=create_graph)
        for path in ("auto", "vmap", "loop"):
            layer_attributions(h, model.head_fn, create_graph=create_graph, path=path)
        layer_attributions(h, _pooled(), create_graph=create_graph)
        summed_map(h, model.head_fn(h.clone()), create_graph=create_graph)
        for head in (None, model.head_fn):
            attr = LayerToLayerAttribution(model, "features.5", "fc", head=head)
            for method in ("grad_x_act", "integrated_gradients", "expected_gradients"):
                attr.attribute(x, method=method, create_graph=create_graph, n_steps=3, n_samples=2)
    assert calls["batched"] > 0  # the batched cotangent path did run (without create_graph)
    with pytest.raises(ValueError, match="O\\(K\\^2\\)"):
        layer_attributions(h, model.head_fn, create_graph=True, path="batched")


# ------------------------------------------------------------------------------------------- BatchNorm policies
class BNHead(nn.Module):
    def __init__(self, track: bool, bn1d: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)
        self.bn = nn.BatchNorm1d(3 * 16, track_running_stats=track) if bn1d else nn.BatchNorm2d(3, track_running_stats=track)
        self.fc = nn.Linear(3 * 16, K)
        self.bn1d = bn1d

    def forward(self, h):
        y = self.conv(h)
        if self.bn1d:
            return self.fc(torch.tanh(self.bn(y.flatten(1))))
        return self.fc(torch.tanh(self.bn(y)).flatten(1))


def test_bn_eval_policy_per_sample_exact_and_flags_restored():
    torch.manual_seed(0)
    head = BNHead(track=True).to(DT).train()
    with torch.no_grad():
        head.bn.running_mean.uniform_(-1, 1)
        head.bn.running_var.uniform_(0.5, 2)
    h = _x(n=4, size=4).repeat(1, 2, 1, 1)[:, :4]
    buffers = {k: v.clone() for k, v in head.state_dict().items()}
    maps = layer_attributions(h, head, head_batchnorm="auto", transform="abs")
    assert head.bn.training
    for k, v in head.state_dict().items():
        assert torch.equal(v, buffers[k])
    alone = torch.cat([layer_attributions(h[i : i + 1], head, head_batchnorm="eval", transform="abs") for i in range(4)])
    torch.testing.assert_close(maps, alone, rtol=0, atol=1e-10)
    head.eval()
    torch.testing.assert_close(layer_attributions(h, head, transform="abs"), maps, rtol=0, atol=1e-10)


def test_bn_per_sample_equals_instance_norm():
    torch.manual_seed(0)
    head = BNHead(track=False).to(DT).train()
    h = _x(n=3, size=4).repeat(1, 2, 1, 1)[:, :4]
    got = layer_attributions(h, head, head_batchnorm="auto")
    inorm = BNHead(track=False).to(DT)
    inorm.load_state_dict(head.state_dict())
    inorm.bn = nn.InstanceNorm2d(3, eps=head.bn.eps, affine=True).to(DT)
    inorm.bn.load_state_dict({"weight": head.bn.weight, "bias": head.bn.bias})
    torch.testing.assert_close(got, layer_attributions(h, inorm), rtol=0, atol=1e-10)
    torch.testing.assert_close(layer_attributions(h, head, head_batchnorm="per_sample"), got, rtol=0, atol=1e-10)


def test_bn_batch_policy_differs_and_warns():
    torch.manual_seed(0)
    head = BNHead(track=False, bn1d=True).to(DT).train()
    h = _x(n=4, size=4).repeat(1, 2, 1, 1)[:, :4]
    attribution._WARNED.clear()
    with pytest.warns(UserWarning, match="couples samples"):
        coupled = layer_attributions(h, head)
    explicit = layer_attributions(h, head, head_batchnorm="batch")
    torch.testing.assert_close(coupled, explicit, rtol=0, atol=0)
    assert coupled.abs().max() > 1e-6
    # the coupled quantity of a row depends on the rest of the batch (not a per-sample Jacobian row)
    assert not torch.allclose(layer_attributions(h[:2], head, head_batchnorm="batch"), coupled[:2])
    with pytest.raises(ValueError, match="per_sample"):
        layer_attributions(h, head, head_batchnorm="per_sample")
    with pytest.raises(ValueError, match="head callable"):
        layer_attributions(h.requires_grad_(True), head(h), head_batchnorm="eval")


def test_class_graph_only_bn_in_head_warns():
    model = _model().train()
    model.features[1].eval()
    model.head.insert(1, nn.BatchNorm2d(5).to(DT))
    attribution._WARNED.clear()
    with pytest.warns(UserWarning, match="BatchNorm2d"):
        LayerToLayerAttribution(model, "features.5", "fc").attribute(_x())
    with pytest.raises(ValueError, match="head callable"):
        LayerToLayerAttribution(model, "features.5", "fc", head_batchnorm="eval").attribute(_x())


def test_extra_forwards_preserve_bn_buffers():
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attr = LayerToLayerAttribution(model, "features.5", "fc")
    attr.attribute(_x(), method="expected_gradients", n_samples=2)
    attr.attribute(_x(), method="integrated_gradients", n_steps=3)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    # IG's one ordinary forward of x (train mode) updates running statistics once, like any forward; its
    # baseline and interpolated forwards are restored
    assert model.features[1].num_batches_tracked == before["features.1.num_batches_tracked"] + 1
    assert all("running" in k or "num_batches" in k for k in changed)
    model2 = _model().train()
    before2 = {k: v.clone() for k, v in model2.state_dict().items()}
    LayerToLayerAttribution(model2, "features.5", "fc").attribute(_x(), method="expected_gradients", n_samples=2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, before2[k]), k


# ------------------------------------------------------------------------------------------- known answers
class SumSquares(nn.Module):
    def forward(self, h):
        return (h**2).flatten(1).sum(1, keepdim=True)


def test_ka1_ka2_maps_and_scores():
    h = torch.tensor([[[[2.0, 1.0]]]], dtype=DT)  # N=1, C=1, positions (p1, p2)
    eye = nn.Linear(2, 2, bias=False).to(DT)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(2))
    head = lambda s: eye(s.flatten(1))  # noqa: E731
    maps = layer_attributions(h, head, transform="lin").flatten(2)
    torch.testing.assert_close(maps, torch.tensor([[[2.0, 0.0], [0.0, 1.0]]], dtype=DT))
    nm = normalize_maps(maps)
    torch.testing.assert_close(nm, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=DT))
    assert nm.var(1, correction=0).mean() == pytest.approx(0.25)
    assert nm.var(1, correction=1).mean() == pytest.approx(0.5)
    noise = layer_attributions(torch.ones_like(h), head, transform="lin").flatten(2).sum(1)
    r_x = maps.sum(1)
    ns = (normalize_maps(r_x, start_dim=1) - normalize_maps(noise, start_dim=1)).abs().mean()
    assert ns == pytest.approx(0.5)
    with torch.no_grad():
        eye.weight.fill_(1.0)  # KA2: identical maps
    nm2 = normalize_maps(layer_attributions(h, head, transform="abs").flatten(2))
    assert nm2.var(1).abs().max() == 0


def test_ka4_ig_gxa_and_expected_gradients():
    h = torch.tensor([[[[1.0, 2.0]]]], dtype=DT)
    for n_steps in (1, 2, 7):
        ig = layer_attributions(h, SumSquares(), "integrated_gradients", n_steps=n_steps)
        torch.testing.assert_close(ig.flatten(), torch.tensor([1.0, 4.0], dtype=DT), rtol=0, atol=1e-14)
    gxa = layer_attributions(h, SumSquares())
    torch.testing.assert_close(gxa.flatten(), torch.tensor([2.0, 8.0], dtype=DT))
    model = nn.Sequential(nn.Identity(), SumSquares())
    attr = LayerToLayerAttribution(model, "0", "1")
    x = h.clone()
    eg = attr.attribute(x, method="expected_gradients", n_samples=16, generator=torch.Generator().manual_seed(2))
    _, d = expected_gradients_interpolants(x, None, 16, 0.0, torch.Generator().manual_seed(2))
    torch.testing.assert_close(eg.flatten(), 2 * (d["t"] ** 2).mean() * h.flatten() ** 2, rtol=0, atol=1e-12)
    # linear head: EG = mean(t) * W_k * h
    lin = nn.Linear(2, 3, bias=True).to(DT)
    model_l = nn.Sequential(nn.Flatten(), nn.Identity(), lin)
    eg_l = LayerToLayerAttribution(model_l, "1", "2").attribute(
        h.flatten(1), method="expected_gradients", n_samples=8, generator=torch.Generator().manual_seed(4)
    )
    _, d = expected_gradients_interpolants(h.flatten(1), None, 8, 0.0, torch.Generator().manual_seed(4))
    torch.testing.assert_close(eg_l[0], d["t"].mean() * lin.weight * h.flatten(), rtol=0, atol=1e-12)


def test_hand_built_cnn_exact_values():
    """Tiny CNN with integer weights: z = [sum relu(conv(h)), sum conv(h)] with a 1x1 conv (weights 1, -2)."""
    conv = nn.Conv2d(2, 1, 1, bias=False).to(DT)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -2.0], dtype=DT).view(1, 2, 1, 1))

    def head(s):
        y = conv(s)
        return torch.stack([torch.relu(y).flatten(1).sum(1), y.flatten(1).sum(1)], 1)

    h = torch.tensor([[[[3.0, 1.0]], [[1.0, 1.0]]]], dtype=DT)  # conv out: [1, -1]
    g = layer_attributions(h, head, "grad")
    expected_g = torch.tensor([[[[[1.0, 0.0]], [[-2.0, 0.0]]], [[[1.0, 1.0]], [[-2.0, -2.0]]]]], dtype=DT)
    torch.testing.assert_close(g, expected_g)
    torch.testing.assert_close(layer_attributions(h, head), expected_g * h.unsqueeze(1))
    # IG from 0: dim 1 is linear -> equals grad_x_act; dim 0: relu path, the gate at p1 is on along the whole
    # path (y = alpha * 1 > 0), off at p2 (y = -alpha) -> same as grad_x_act
    ig = layer_attributions(h, head, "integrated_gradients", n_steps=3)
    torch.testing.assert_close(ig, expected_g * h.unsqueeze(1))
    torch.testing.assert_close(
        layer_attributions(h, head, transform="lin").flatten(2), torch.tensor([[[1.0, 0.0], [1.0, -1.0]]], dtype=DT)
    )
    # EG with identity backbone, zero background, sigma 0: x~ = t x, the relu gates do not change for t > 0,
    # so EG = mean(t) * grad_x_act (half the IG value in expectation)

    class Head(nn.Module):
        def forward(self, s):
            return head(s)

    model = nn.Sequential(nn.Identity(), Head())
    eg = LayerToLayerAttribution(model, "0", "1").attribute(
        h, method="expected_gradients", n_samples=5, generator=torch.Generator().manual_seed(9)
    )
    _, d = expected_gradients_interpolants(h, None, 5, 0.0, torch.Generator().manual_seed(9))
    torch.testing.assert_close(eg, d["t"].mean() * expected_g * h.unsqueeze(1), rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------- differentiability
def test_gradcheck_double_backward_through_maps():
    torch.manual_seed(0)
    l1, l2 = nn.Linear(8, 6).to(DT), nn.Linear(6, 3).to(DT)
    h = torch.randn(2, 2, 2, 2, dtype=DT)

    def score(w1, w2):
        head = lambda s: torch.tanh(torch.tanh(s.flatten(1) @ w1.T + l1.bias) @ w2.T + l2.bias)  # noqa: E731
        maps = layer_attributions(h, head, transform="lin", create_graph=True)
        return (maps**2).mean() + maps.flatten(2).var(1).mean()

    w1 = l1.weight.detach().clone().requires_grad_(True)
    w2 = l2.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(score, (w1, w2))


def test_float32_matches_float64():
    model = _model()
    x = _x()
    ref = LayerToLayerAttribution(model, "features.5", "fc").attribute(x, transform="abs")
    m32 = _model().float()
    got = LayerToLayerAttribution(m32, "features.5", "fc", head=m32.head_fn).attribute(x.float(), transform="abs")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_half_source_upcast():
    h = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    head = lambda s: s.float().flatten(1)[:, :4] * 2  # noqa: E731
    assert layer_attributions(h, head).dtype == torch.float32


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    model = _model()
    x = _x(n=2)
    with pytest.raises(ValueError, match="features.5"):
        LayerToLayerAttribution(model, "features.55", "fc")
    with pytest.raises(ValueError, match="not on the path"):
        LayerToLayerAttribution(model, "fc", "features.5").attribute(x)  # source after target
    h = model.features(x)
    other = torch.randn(2, K, dtype=DT, requires_grad=True) * 2
    with pytest.raises(ValueError, match="not on the path|does not depend"):
        layer_attributions(h, other)
    with pytest.raises(ValueError, match="require grad"):
        layer_attributions(h.detach(), model.head_fn(h.clone()))
    seq = torch.randn(2, 4, 7, dtype=DT)
    with pytest.raises(ValueError, match="channel_dim"):
        layer_attributions(seq, lambda s: s.sum(2), transform="abs")
    assert layer_attributions(seq, lambda s: s.sum(2), transform="abs", channel_dim=2).shape == (2, 4, 7)
    for dims in ([K], [-1], [], torch.tensor([0, K])):
        with pytest.raises(ValueError, match="dims"):
            layer_attributions(h, model.head_fn, dims=dims)
    with pytest.raises(TypeError, match="dims"):
        layer_attributions(h, model.head_fn, dims=[0.5])
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        LayerToLayerAttribution(model, "features.5", "fc").attribute(bad)
    with pytest.raises(ValueError, match="NaN"):
        layer_attributions(h * float("inf"), model.head_fn, check_finite=True)
    with pytest.raises(ValueError, match="LayerToLayerAttribution"):
        layer_attributions(h, model.head_fn, "expected_gradients")
    with pytest.raises(ValueError, match="head callable"):
        layer_attributions(h, model.head_fn(h.clone()), "integrated_gradients")
    with pytest.raises(ValueError, match="method"):
        layer_attributions(h, model.head_fn, "saliency")
    with pytest.raises(ValueError, match="PooledHead"):
        layer_attributions(h, model.head_fn, path="factorized")
    with pytest.raises(ValueError, match="positions"):
        layer_attributions(torch.randn(2, 6, dtype=DT), _pooled())
    with pytest.raises(ValueError, match="convergence"):
        layer_attributions(h, model.head_fn, return_convergence_delta=True)
    with pytest.raises(ValueError, match="chunk_size"):
        layer_attributions(h, model.head_fn, chunk_size=0)
    with pytest.raises(ValueError, match="n_steps"):
        ig_quadrature(0)
    with pytest.raises(ValueError, match="batch size"):
        layer_attributions(h, lambda s: s[:1].flatten(1))


def test_target_reduction_and_vector_source():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1).to(DT)
    h = _x(n=2, size=4).repeat(1, 2, 1, 1)[:, :4]
    mean = layer_attributions(h, conv)
    summ = layer_attributions(h, conv, target_reduction="sum")
    torch.testing.assert_close(summ, mean * 16)
    assert layer_attributions(h, conv, target_reduction="flatten", dims=[0, 47]).shape == (2, 2, 4, 4, 4)
    v = torch.randn(3, 4, dtype=DT)
    lin = nn.Linear(4, 2).to(DT)
    maps = layer_attributions(v, lin, transform="abs")  # every feature is a position
    torch.testing.assert_close(maps, (lin.weight[None] * v[:, None]).abs())


def test_presets_and_doctests():
    assert set(REFERENCE_PRESETS) == {"xai4embeddings_train", "xai4embeddings_eval", "xai4embeddings_drift", "xai4embeddings_chain"}
    assert REFERENCE_PRESETS["xai4embeddings_train"]["method"] == "expected_gradients"
    res = doctest.testmod(attribution, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted > 5


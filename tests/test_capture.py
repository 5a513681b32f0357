"""LayerCapture: hooks by dotted name, clone-on-capture, removal, errors."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import reprlens.capture as capture_mod
from reprlens.capture import LayerCapture


class Block(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(Block(3), Block(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_output_capture_survives_inplace_relu():
    net = Net().train()
    x = torch.randn(4, 3, 6, 6)
    before = _hook_count(net)
    with LayerCapture(net, ["backbone.0.bn"]) as cap:
        out = net(x)
    assert _hook_count(net) == before
    h = cap.get("backbone.0.bn")
    assert h.grad_fn is not None and "BatchNorm" in type(h.grad_fn).__name__
    assert (h < 0).any(), "the in-place ReLU must not rewrite the stored tensor"
    # equal to the same model with out-of-place ReLU
    ref = Net()
    ref.load_state_dict(net.state_dict())
    for m in ref.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    with LayerCapture(ref, {"backbone.0.bn": "output"}) as cap_ref:
        out_ref = ref(x)
    torch.testing.assert_close(h, cap_ref.get("backbone.0.bn"))
    torch.testing.assert_close(out, out_ref)
    # the gradient of the output w.r.t. the stored tensor is the true one
    g = torch.autograd.grad(out.sum(), h)[0]
    g_ref = torch.autograd.grad(out_ref.sum(), cap_ref.get("backbone.0.bn"))[0]
    torch.testing.assert_close(g, g_ref)


def test_without_clone_inplace_rewrites_stored_tensor():
    net = Net()
    with LayerCapture(net, ["backbone.0.bn"], clone=False, detach=True) as cap:
        net(torch.randn(4, 3, 6, 6))
    assert (cap.get("backbone.0.bn") >= 0).all()  # documents why clone=True is the default


def test_input_capture_and_multiple_calls():
    net = Net()
    x1, x2 = torch.randn(2, 3, 5, 5), torch.randn(3, 3, 5, 5)
    with LayerCapture(net, {"backbone.1.conv": "input", "head": "output"}) as cap:
        net(x1)
        net(x2)
    assert cap.num_calls("head") == 2
    assert cap.get("head", 1).shape == (3, 2)
    assert cap.get("head", -1) is cap.activations["head"][1]
    with LayerCapture(net, ["backbone.0"], detach=True) as cap0:
        net(x1)
    torch.testing.assert_close(cap.get("backbone.1.conv", 0), cap0.get("backbone.0"))
    with pytest.raises(ValueError, match="call"):
        cap.get("head", 2)


def test_input_capture_protects_against_inplace_module():
    relu = nn.ReLU(inplace=True)
    x = torch.randn(10)
    net = nn.Sequential(relu)
    with LayerCapture(net, {"0": "input"}) as cap:
        net(x)
    assert torch.equal(cap.get("0"), x) and (cap.get("0") < 0).any()


def test_hooks_removed_on_exception_and_reentry_error():
    net = Net()
    before = _hook_count(net)
    cap = LayerCapture(net, ["head", "backbone.0"], record_order=True)
    with pytest.raises(ZeroDivisionError):
        with cap:
            assert _hook_count(net) > before
            1 / 0
    assert _hook_count(net) == before and not cap.active
    with cap:
        with pytest.raises(RuntimeError, match="already active"):
            cap.__enter__()
    assert _hook_count(net) == before


def test_record_order_and_paused():
    net = Net()
    with LayerCapture(net, ["head"], record_order=True) as cap:
        net(torch.randn(2, 3, 4, 4))
        with cap.paused():
            net(torch.randn(2, 3, 4, 4))
    assert cap.num_calls("head") == 1
    order = cap.execution_order
    assert order.index("backbone.0.conv") < order.index("backbone.0.bn") < order.index("backbone.1") < order.index(
        "head"
    )
    assert len(order) == len(set(order))


def test_unknown_name_lists_closest():
    net = Net()
    with pytest.raises(ValueError, match="backbone.0.bn"):
        LayerCapture(net, ["backbone.0.bm"])
    with pytest.raises(ValueError, match="output"):
        LayerCapture(net, {"head": "gradient"})
    with pytest.raises(TypeError):
        LayerCapture(net, 3)
    with pytest.raises(ValueError, match="not captured"):
        LayerCapture(net, ["head"]).get("backbone")
    with pytest.raises(RuntimeError, match="no forward call"):
        LayerCapture(net, ["head"]).get("head")


def test_wrapper_prefix_and_requires_grad():
    net = Net()
    for p in net.parameters():
        p.requires_grad_(False)

    class Wrapper(nn.Module):  # DDP-like naming
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    wrapped = Wrapper(net)
    with LayerCapture(wrapped.module, ["backbone.1"], requires_grad=True) as cap:
        out = wrapped(torch.randn(2, 3, 4, 4))
    h = cap.get("backbone.1")
    assert h.requires_grad and h.is_leaf
    g = torch.autograd.grad(out[:, 0].sum(), h)[0]
    assert g.shape == h.shape and g.abs().sum() > 0
    cap2 = LayerCapture(net, ["module.backbone.1"])
    with cap2:
        net(torch.randn(2, 3, 4, 4))
    assert cap2.get("backbone.1").shape == (2, 4, 4, 4)


def test_tuple_outputs():
    class Two(nn.Module):
        def forward(self, x):
            return x * 2, x - 1

    net = nn.Sequential(Two())
    x = torch.randn(3)
    with LayerCapture(net, ["0"]) as cap:
        out = net(x)
    a, b = cap.get("0")
    torch.testing.assert_close(a, out[0])
    torch.testing.assert_close(b, out[1])


def test_doctests():
    assert doctest.testmod(capture_mod).failed == 0


def test_torchvision_resnet_inplace_relu_maps_equal_out_of_place():
    torchvision = pytest.importorskip("torchvision")
    from reprlens.attribution import LayerToLayerAttribution

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=6).eval()
    ref = torchvision.models.resnet18(num_classes=6).eval()
    ref.load_state_dict(net.state_dict())
    for m in ref.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(2, 3, 32, 32)
    with LayerCapture(net, ["layer1.0.bn1"]) as cap:
        net(x)
    h = cap.get("layer1.0.bn1")
    assert "BatchNorm" in type(h.grad_fn).__name__ and (h < 0).any()
    got = LayerToLayerAttribution(net, "layer1.0.bn1", "fc").attribute(x, dims=[0, 5], transform="abs")
    want = LayerToLayerAttribution(ref, "layer1.0.bn1", "fc").attribute(x, dims=[0, 5], transform="abs")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got.abs().sum() > 0

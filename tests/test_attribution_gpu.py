"""CUDA: attributions equal the CPU float64 result, and the training-step calls never sync with the host."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reprlens.attribution import LayerToLayerAttribution, PooledHead, layer_attributions, summed_map

DT = torch.float64


def _model():
    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6),
    )
    head = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(6, 5, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 7))
    return nn.Sequential(features, head).to(DT).eval()


@pytest.mark.gpu
def test_cuda_matches_cpu_and_no_host_sync(cuda_device):
    model = _model()
    x = torch.randn(3, 3, 8, 8, dtype=DT)
    ref = LayerToLayerAttribution(model, "0.5", "1.5").attribute(x, transform="abs")
    mc = _model().to(cuda_device)
    xc = x.to(cuda_device)
    for head in (None, mc[1]):
        got = LayerToLayerAttribution(mc, "0.5", "1.5", head=head).attribute(xc, transform="abs")
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-10)
    torch.manual_seed(1)
    pooled = PooledHead(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 7))).to(DT).to(cuda_device)
    h = torch.randn(4, 6, 5, 5, dtype=DT, device=cuda_device, requires_grad=True)
    dims = torch.tensor([0, 3], device=cuda_device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # the calls a regularised training step makes never synchronise with the host
        maps = layer_attributions(h, pooled, transform="lin", create_graph=True, dims=dims)
        generic = layer_attributions(h, mc[1], transform="lin", create_graph=True, path="vmap")
        s = summed_map(h, pooled, create_graph=True)
        (maps.square().mean() + generic.square().mean() + s.mean()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(h.grad).all()

"""Random projection of trace factors: unbiased dots, variance formula, end-to-end approximate scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reprlens.trace import TraceReader, TraceRecorder
from reprlens.trace import functional as TF
from reprlens.trace.projection import project_factors, projected_spec, projection_matrices


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projected_pair_is_unbiased_with_the_documented_variance(kind):
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    k = 6
    vals = torch.stack([
        (projection_matrices(12, 12, k_in=1, k_out=k, seed=s, kind=kind)[1] @ u)
        @ (projection_matrices(12, 12, k_in=1, k_out=k, seed=s, kind=kind)[1] @ v) for s in range(2000)
    ])
    exact = u @ v
    se = vals.std() / 2000**0.5
    assert abs(vals.mean() - exact) < 3 * se
    var = (u @ u * (v @ v) + exact**2) / k
    if kind == "rademacher":
        var = var - 2 * (u**2 * v**2).sum() / k
    assert abs(vals.var() / var - 1) < 0.1


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_projected_factor_dot_is_unbiased(layer):
    torch.manual_seed(0)
    mod = nn.Linear(6, 4).double() if layer == "linear" else nn.Conv2d(2, 3, 3, padding=1).double()
    shape = (6,) if layer == "linear" else (2, 4, 4)
    a1, a2 = torch.randn(1, *shape, dtype=torch.float64), torch.randn(1, *shape, dtype=torch.float64)
    g1, g2 = torch.randn_like(mod(a1)), torch.randn_like(mod(a2))
    exact = TF.factor_dot(mod, a1, g1, a2, g2)[0, 0]
    spec = TF.layer_spec(mod)
    vals = []
    for s in range(250):
        Q, P = projection_matrices(spec.d_in, spec.out_features, k_in=5, k_out=3, seed=s)
        pa1, pg1 = project_factors(mod, a1, g1, Q, P)
        pa2, pg2 = project_factors(mod, a2, g2, Q, P)
        vals.append(TF.factor_dot(projected_spec(spec, 5, 3), pa1, pg1, pa2, pg2)[0, 0])
    vals = torch.stack(vals)
    assert abs(vals.mean() - exact) < 3 * vals.std() / 250**0.5


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _train(path, **kw):
    torch.manual_seed(0)
    model = MLP().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    y = torch.arange(40) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TraceRecorder(model, ["fc1", "fc2"], path, dtype="float64", **kw) as rec:
        for step in range(8):
            idx = torch.arange(step % 4 * 10, step % 4 * 10 + 10)
            rec.begin_step(idx, step=step)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            rec.before_optimizer_step(opt)
            opt.step()
            opt.zero_grad()
            rec.end_step()
            if kw.get("mode") == "tracin" and step % 4 == 3:
                rec.checkpoint(model, [{"x": x, "y": y, "index": torch.arange(40)}],
                               lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="none"),
                               lr=0.1, step=step + 1)
    return model, x


def test_projected_trace_approximates_exact_scores(tmp_path):
    model, x = _train(tmp_path / "exact")
    _train(tmp_path / "proj", projection=(2048, 2048), projection_seed=3)
    exact = TraceReader(tmp_path / "exact", dtype=torch.float64)
    proj = TraceReader(tmp_path / "proj", dtype=torch.float64)
    assert exact.exact and not proj.exact and any("projection" in a for a in proj.approximations)
    for name in ["fc1", "fc2"]:
        e = exact.contributions(x[:3], name, model=model)
        p = proj.contributions(x[:3], name, model=model)
        torch.testing.assert_close(p.delta_z_norm, e.delta_z_norm)  # ‖Δz‖ stays exact
        rel = (p.score - e.score).norm() / e.score.norm()
        assert rel < 0.15, rel
    rep = proj.completeness()
    assert rep.weight_error_rel["fc1"] != rep.weight_error_rel["fc1"]  # NaN: ΔW is not recoverable
    # matrices are stored and identical to a regeneration from the seed
    stored = torch.load(tmp_path / "proj" / "projection.pt", weights_only=True)
    Q, P = projection_matrices(8, 16, k_in=2048, k_out=2048, seed=3)
    assert torch.equal(stored["fc1"]["Q"], Q) and torch.equal(stored["fc1"]["P"], P)


def test_projected_tracin_self_influence_close_to_exact(tmp_path):
    _train(tmp_path / "exact", mode="tracin")
    _train(tmp_path / "proj", mode="tracin", projection=2048)
    e = TraceReader(tmp_path / "exact", dtype=torch.float64).self_influence().scores
    p = TraceReader(tmp_path / "proj", dtype=torch.float64).self_influence().scores
    assert ((p - e).norm() / e.norm()) < 0.15

"""Functional core of the training trace: layers as factor pairs (plain torch, no Lightning).

A tracked layer computes ``z = Ã Wᵀ + 1 bᵀ`` per row (one example in one call), where ``Ã`` is the row's patch
matrix (Linear: token rows; Conv2d: ``unfold`` of the padded input) and ``G`` the gradient of the loss with
respect to the row's pre-activation. Per-row weight gradients are ``GᵀÃ`` and bias gradients ``Gᵀ1``; their dot
products are computed from the factors without materialising the gradients (the outer-product / ghost-norm
identity)::

    <g_r, g_q> = sum((G_r G_qᵀ) ⊙ (Ã_r Ã_qᵀ + β 11ᵀ))

Every function accepts either the ``nn.Linear`` / ``nn.Conv2d`` module itself or a :class:`LayerSpec`
(what a trace store keeps of the module), so queries run without the model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(3, 2)
    >>> a, g = torch.randn(4, 3), torch.randn(4, 2)
    >>> w, b = per_example_grads(lin, a, g)
    >>> torch.allclose(factor_dot(lin, a, g, a, g), w.flatten(1) @ w.flatten(1).T + b @ b.T, atol=1e-5)
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SUPPORTED_LAYERS",
    "LayerSpec",
    "apply_delta",
    "factor_dot",
    "factor_sq_norm",
    "grad_matrix",
    "layer_spec",
    "patch_matrix",
    "per_example_grads",
    "row_contributions",
    "row_scores",
    "weighted_gaussian_kde",
]

SUPPORTED_LAYERS = ("torch.nn.Linear", "torch.nn.Conv2d")


@dataclass
class LayerSpec:
    """What the trace needs to know about a tracked layer (serialisable to JSON).

    Attributes:
        kind: ``"Linear"`` or ``"Conv2d"``.
        weight_shape: shape of the weight, ``(out, in)`` or ``(C_out, C_in/groups, kh, kw)``.
        bias: whether a trainable bias exists (β = 1).
        stride, dilation, groups: conv arguments (ignored for Linear).
        pads: explicit ``F.pad`` amounts ``(left, right, top, bottom)`` (conv).
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
    """

    kind: str
    weight_shape: tuple[int, ...]
    bias: bool
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    padding_mode: str = "zeros"
    extra: dict = field(default_factory=dict)

    @property
    def out_features(self) -> int:
        return int(self.weight_shape[0])

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (int(self.weight_shape[2]), int(self.weight_shape[3])) if self.kind == "Conv2d" else (1, 1)

    @property
    def d_in(self) -> int:
        """Columns of the patch matrix of one group."""
        return int(math.prod(self.weight_shape[1:]))

    @property
    def weight_numel(self) -> int:
        return int(math.prod(self.weight_shape)) + (self.out_features if self.bias else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LayerSpec:
        d = dict(d)
        for key in ("weight_shape", "stride", "dilation", "pads"):
            d[key] = tuple(int(v) for v in d[key])
        return cls(**d)


def layer_spec(module: nn.Module | LayerSpec, name: str = "layer") -> LayerSpec:
    """Describe ``module`` as a :class:`LayerSpec`; unsupported types raise ``NotImplementedError``.

    Example:
        >>> layer_spec(torch.nn.Linear(3, 2)).weight_shape
        (2, 3)
    """
    if isinstance(module, LayerSpec):
        return module
    if isinstance(module, nn.Linear):
        has_bias = module.bias is not None and module.bias.requires_grad
        return LayerSpec("Linear", tuple(module.weight.shape), bool(has_bias))
    if type(module) is nn.Conv2d or isinstance(module, nn.Conv2d):
        pads = tuple(int(p) for p in module._reversed_padding_repeated_twice)
        has_bias = module.bias is not None and module.bias.requires_grad
        return LayerSpec(
            "Conv2d",
            tuple(module.weight.shape),
            bool(has_bias),
            stride=tuple(module.stride),
            dilation=tuple(module.dilation),
            groups=int(module.groups),
            pads=pads,  # type: ignore[arg-type]
            padding_mode=module.padding_mode,
        )
    raise NotImplementedError(
        f"Layer {name!r} is a {type(module).__name__}; the training trace supports only "
        f"{', '.join(SUPPORTED_LAYERS)} (the layers whose per-example gradients factor into input x output "
        "gradient). Track the Linear/Conv2d layer inside it instead."
    )


def _pad(spec: LayerSpec, a: Tensor) -> Tensor:
    if not any(spec.pads):
        return a
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return F.pad(a, spec.pads, mode=mode)


def patch_matrix(module: nn.Module | LayerSpec, a: Tensor) -> Tensor:
    """Patch matrices ``Ã`` of a batch of layer inputs, ``(N, groups, P, D_in)``.

    Linear on ``(N, *S, in)``: ``P = prod(S)`` token rows, ``D_in = in``. Conv2d on ``(N, C_in, H, W)``: the padded
    input unfolded with the layer's kernel, stride and dilation, split into channel groups
    (``D_in = C_in/groups·kh·kw``, ``P = H'W'``).

    Example:
        >>> patch_matrix(torch.nn.Conv2d(2, 4, 3), torch.randn(5, 2, 6, 6)).shape
        torch.Size([5, 1, 16, 18])
    """
    spec = layer_spec(module)
    if spec.kind == "Linear":
        n = a.shape[0]
        return a.reshape(n, 1, -1, a.shape[-1])
    n = a.shape[0]
    cols = F.unfold(_pad(spec, a), spec.kernel_size, dilation=spec.dilation, stride=spec.stride)  # (N, C*k, L)
    g = spec.groups
    return cols.reshape(n, g, cols.shape[1] // g, cols.shape[2]).transpose(2, 3)


def grad_matrix(module: nn.Module | LayerSpec, grad_output: Tensor) -> Tensor:
    """Output gradients ``G`` split into groups, ``(N, groups, P, D_out/groups)``.

    Example:
        >>> grad_matrix(torch.nn.Linear(3, 2), torch.randn(4, 5, 2)).shape
        torch.Size([4, 1, 5, 2])
    """
    spec = layer_spec(module)
    n = grad_output.shape[0]
    if spec.kind == "Linear":
        return grad_output.reshape(n, 1, -1, grad_output.shape[-1])
    g = spec.groups
    c_out = grad_output.shape[1]
    return grad_output.reshape(n, g, c_out // g, -1).transpose(2, 3)


def _bias_vec(spec: LayerSpec, grad_output: Tensor) -> Tensor:
    """Per-row bias gradients ``Gᵀ1``, ``(N, D_out)``."""
    n = grad_output.shape[0]
    if spec.kind == "Linear":
        return grad_output.reshape(n, -1, grad_output.shape[-1]).sum(1)
    return grad_output.reshape(n, grad_output.shape[1], -1).sum(-1)


def per_example_grads(module: nn.Module | LayerSpec, a: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-row weight and bias gradients ``(GᵀÃ, Gᵀ1)``: ``((N, *W.shape), (N, D_out) | None)``.

    Meant for oracles and full-rank storage; queries use :func:`factor_dot` instead.

    Example:
        >>> w, b = per_example_grads(torch.nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4, 2))
        >>> w.shape, b.shape
        (torch.Size([4, 2, 3]), torch.Size([4, 2]))
    """
    spec = layer_spec(module)
    A = patch_matrix(spec, a)
    G = grad_matrix(spec, grad_output)
    w = torch.einsum("ngpo,ngpd->ngod", G, A).reshape(a.shape[0], *spec.weight_shape)
    b = _bias_vec(spec, grad_output) if spec.bias else None
    return w, b


def factor_dot(
    module: nn.Module | LayerSpec,
    a1: Tensor,
    g1: Tensor,
    a2: Tensor,
    g2: Tensor,
    *,
    method: str = "auto",
) -> Tensor:
    """Dot products of per-row (weight, bias) gradients from their factors, ``(N1, N2)``.

    ``method="gram"`` uses ``sum((G1 G2ᵀ) ⊙ (Ã1 Ã2ᵀ))`` (cheap when the position counts are small);
    ``"materialize"`` forms the per-row gradients (cheap for large spatial maps); ``"auto"`` picks the cheaper.

    Example:
        >>> lin = torch.nn.Linear(3, 2, bias=False)
        >>> a, g = torch.randn(2, 3), torch.randn(2, 2)
        >>> d = factor_dot(lin, a, g, a, g)
        >>> torch.allclose(d, (a @ a.T) * (g @ g.T))
        True
    """
    spec = layer_spec(module)
    A1, G1 = patch_matrix(spec, a1), grad_matrix(spec, g1)
    A2, G2 = patch_matrix(spec, a2), grad_matrix(spec, g2)
    p1, p2 = A1.shape[2], A2.shape[2]
    d_in, d_out_g = A1.shape[3], G1.shape[3]
    if method == "auto":
        gram_cost = p1 * p2 * (d_in + d_out_g)
        mat_cost = (p1 + p2) * d_in * d_out_g + d_in * d_out_g * a2.shape[0]
        method = "gram" if gram_cost <= mat_cost else "materialize"
    if method == "gram":
        if p1 == 1 and p2 == 1:
            out = torch.einsum("igd,jgd->ijg", A1[:, :, 0], A2[:, :, 0]) * torch.einsum(
                "igo,jgo->ijg", G1[:, :, 0], G2[:, :, 0]
            )
            out = out.sum(-1)
        else:
            ka = torch.einsum("igpd,jgqd->ijgpq", A1, A2)
            kg = torch.einsum("igpo,jgqo->ijgpq", G1, G2)
            out = (ka * kg).sum((2, 3, 4))
    elif method == "materialize":
        w1 = torch.einsum("ngpo,ngpd->ngod", G1, A1).flatten(1)
        w2 = torch.einsum("ngpo,ngpd->ngod", G2, A2).flatten(1)
        out = w1 @ w2.T
    else:
        raise ValueError(f"Expected method in {{'auto', 'gram', 'materialize'}}, but got {method!r}.")
    if spec.bias:
        out = out + _bias_vec(spec, g1) @ _bias_vec(spec, g2).T
    return out


def factor_sq_norm(module: nn.Module | LayerSpec, a: Tensor, g: Tensor) -> Tensor:
    """Squared norms of per-row (weight, bias) gradients, ``(N,)``, without materialising them.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> a, g = torch.randn(4, 3), torch.randn(4, 2)
        >>> torch.allclose(factor_sq_norm(lin, a, g), factor_dot(lin, a, g, a, g).diagonal())
        True
    """
    spec = layer_spec(module)
    A, G = patch_matrix(spec, a), grad_matrix(spec, g)
    p, d_in, d_out_g = A.shape[2], A.shape[3], G.shape[3]
    if p * p * (d_in + d_out_g) <= 2 * p * d_in * d_out_g:
        if p == 1:
            out = ((A[:, :, 0] ** 2).sum(-1) * (G[:, :, 0] ** 2).sum(-1)).sum(-1)
        else:
            ka = A @ A.transpose(-1, -2)
            kg = G @ G.transpose(-1, -2)
            out = (ka * kg).sum((1, 2, 3))
    else:
        out = torch.einsum("ngpo,ngpd->ngod", G, A).pow(2).sum((1, 2, 3))
    if spec.bias:
        out = out + _bias_vec(spec, g).pow(2).sum(-1)
    return out


def row_contributions(module: nn.Module | LayerSpec, a_train: Tensor, u_train: Tensor, a_test: Tensor) -> Tensor:
    """Contribution of each training row's update to each test input's pre-activation, ``(M, R, *z)``.

    ``c_r(x) = (Ã_x Ã_rᵀ + β11ᵀ) U_r`` = the row update ``ΔW_r = U_rᵀ Ã_r`` (and ``Δb_r = U_rᵀ1``) applied to
    ``a(x)``; ``z`` is the layer output shape of one test input (``(*S', out)`` or ``(C_out, H', W')``).

    Example:
        >>> conv = torch.nn.Conv2d(2, 3, 3, bias=False)
        >>> a, u, x = torch.randn(1, 2, 5, 5), torch.randn(1, 3, 3, 3), torch.randn(1, 2, 5, 5)
        >>> w, _ = per_example_grads(conv, a, u)
        >>> torch.allclose(row_contributions(conv, a, u, x)[:, 0], torch.nn.functional.conv2d(x, w[0]), atol=1e-5)
        True
    """
    spec = layer_spec(module)
    Ax = patch_matrix(spec, a_test)  # (M, g, Q, D)
    Ar, Gr = patch_matrix(spec, a_train), grad_matrix(spec, u_train)  # (R, g, P, D), (R, g, P, O)
    ka = torch.einsum("mgqd,rgpd->mrgqp", Ax, Ar)
    if spec.bias:
        ka = ka + 1.0
    c = torch.einsum("mrgqp,rgpo->mrgqo", ka, Gr)  # (M, R, g, Q, O)
    m, r = c.shape[:2]
    if spec.kind == "Linear":
        return c[:, :, 0].reshape(m, r, *a_test.shape[1:-1], spec.out_features)
    h_out, w_out = _conv_out_hw(spec, a_test)
    return c.permute(0, 1, 2, 4, 3).reshape(m, r, spec.out_features, h_out, w_out)


def _conv_out_hw(spec: LayerSpec, a: Tensor) -> tuple[int, int]:
    h = a.shape[-2] + spec.pads[2] + spec.pads[3]
    w = a.shape[-1] + spec.pads[0] + spec.pads[1]
    kh, kw = spec.kernel_size
    h_out = (h - spec.dilation[0] * (kh - 1) - 1) // spec.stride[0] + 1
    w_out = (w - spec.dilation[1] * (kw - 1) - 1) // spec.stride[1] + 1
    return h_out, w_out


def apply_delta(module: nn.Module | LayerSpec, a_test: Tensor, dw: Tensor, db: Tensor | None) -> Tensor:
    """Apply R weight deltas ``(R, *W.shape)`` (+ biases ``(R, D_out)``) to test inputs: ``(M, R, *z)``.

    Conv deltas are stacked as output channels and applied in one convolution (the reference's trick).

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> apply_delta(lin, torch.ones(1, 3), torch.ones(4, 2, 3), None).shape
        torch.Size([1, 4, 2])
    """
    spec = layer_spec(module)
    r = dw.shape[0]
    if spec.kind == "Linear":
        if a_test.dim() == 2:  # one GEMM over the contiguous (R·O, D) deltas, no copy of the deltas
            out = (dw.reshape(r * dw.shape[1], dw.shape[2]) @ a_test.T).reshape(r, dw.shape[1], -1).permute(2, 0, 1)
        else:
            out = torch.einsum("m...d,rod->mr...o", a_test, dw)
        if db is not None:
            shape = [1, r] + [1] * (a_test.dim() - 2) + [spec.out_features]
            out = out + db.reshape(shape)
        return out
    stacked = dw.reshape(r * dw.shape[1], *dw.shape[2:])
    if spec.groups > 1:
        # output channels of each group must stay contiguous per group: (g, R*O_g, ...)
        g = spec.groups
        og = spec.out_features // g
        stacked = dw.reshape(r, g, og, *dw.shape[2:]).transpose(0, 1).reshape(g * r * og, *dw.shape[2:])
    y = F.conv2d(_pad(spec, a_test), stacked, stride=spec.stride, dilation=spec.dilation, groups=spec.groups)
    m = a_test.shape[0]
    if spec.groups > 1:
        g = spec.groups
        og = spec.out_features // g
        y = y.reshape(m, g, r, og, *y.shape[2:]).transpose(1, 2).reshape(m, r, spec.out_features, *y.shape[2:])
    else:
        y = y.reshape(m, r, spec.out_features, *y.shape[2:])
    if db is not None:
        y = y + db.reshape(1, r, spec.out_features, 1, 1)
    return y


def row_scores(
    module: nn.Module | LayerSpec, a_train: Tensor, u_train: Tensor, a_test: Tensor, delta_z: Tensor
) -> Tensor:
    """``⟨c_r(x), Δz(x)⟩`` for every test input and training row, ``(M, R)``, without materialising ``c``.

    By linearity this is the dot of the row update with the "gradient" ``Δzᵀ Ã_x`` (:func:`factor_dot`).

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> a, u, x, dz = torch.randn(5, 3), torch.randn(5, 2), torch.randn(2, 3), torch.randn(2, 2)
        >>> c = row_contributions(lin, a, u, x)
        >>> torch.allclose(row_scores(lin, a, u, x, dz), (c * dz[:, None]).sum(-1), atol=1e-5)
        True
    """
    return factor_dot(module, a_test, delta_z, a_train, u_train)


def weighted_gaussian_kde(points: Tensor, weights: Tensor, grid: Tensor, bw: float = 0.05) -> Tensor:
    """Weighted Gaussian KDE equal to ``scipy.stats.gaussian_kde(points, weights=w, bw_method=bw)``.

    σ = ``bw`` × the weighted standard deviation with the ``1/(1 − Σw̄²)`` correction. Fewer than two points or
    zero spread give a unit spike at the point (a narrow Gaussian of width ``bw·(range)``); zero total weight
    gives zeros.

    Example:
        >>> d = weighted_gaussian_kde(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), torch.linspace(-1, 2, 7))
        >>> d.shape
        torch.Size([7])
    """
    points = points.reshape(-1).to(torch.float64)
    weights = weights.reshape(-1).to(torch.float64)
    grid = grid.reshape(-1).to(torch.float64)
    total = weights.sum()
    if points.numel() == 0 or total <= 0:
        return torch.zeros_like(grid)
    w = weights / total
    mean = (w * points).sum()
    neff_corr = 1.0 - (w**2).sum()
    var = (w * (points - mean) ** 2).sum() / neff_corr if neff_corr > 0 else torch.zeros((), dtype=torch.float64)
    if points.numel() < 2 or var <= 0:
        span = float(grid.max() - grid.min()) if grid.numel() > 1 else 1.0
        sigma = torch.tensor(max(bw * span * 0.1, 1e-12), dtype=torch.float64)
    else:
        sigma = bw * var.sqrt()
    z = (grid[:, None] - points[None, :]) / sigma
    return (w[None, :] * torch.exp(-0.5 * z**2)).sum(1) / (sigma * math.sqrt(2 * math.pi))

"""``PartExplainer``: the explainer side network (plain torch), spec section 2.6."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlens.explainer_net.functional import filter_loss, part_mask

__all__ = ["ExplainerOutput", "PartExplainer"]


@dataclass
class ExplainerOutput:
    """Output of :class:`PartExplainer`.

    Attributes:
        reconstruction: ``(N, C, H, W)`` reconstruction of the target features.
        upper: reconstructions of the upper layers, keyed by layer name.
        p: ``(N,)`` gate, the share of the signal carried by the interpretable track.
        interpretable: ``(N, C_part, H, W)`` final masked maps (the "explainer filters").
        ordinary: ``(N, C, H, W)`` ordinary-track maps.
        filter_loss: 0-dim filter loss (mean over interpretable blocks).
    """

    reconstruction: Tensor
    upper: dict[str, Tensor] = field(default_factory=dict)
    p: Tensor | None = None
    interpretable: Tensor | None = None
    ordinary: Tensor | None = None
    filter_loss: Tensor | None = None


class _TrackNorm(nn.Module):
    """Divide by a running mean of per-image Frobenius norms (one scalar, no gradient through it)."""

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("r", torch.ones((), dtype=torch.float32))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                bm = x.detach().float().flatten(1).norm(dim=1).mean().to(self.r.dtype)
                new = torch.where(self.count == 0, bm, (1 - self.momentum) * self.r + self.momentum * bm)
                self.r.copy_(new)
                self.count.add_(1)
        return x / self.r.clamp_min(1e-6).to(x.dtype)


class _MaskedBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, beta: float, mask_mode: str, coords: str,
                 learnable_beta: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=1, padding=k // 2)
        self.mask_mode = mask_mode
        self.coords = coords
        if learnable_beta:
            self.beta = nn.Parameter(torch.full((cout,), float(beta)))
        else:
            self.register_buffer("beta", torch.full((cout,), float(beta)), persistent=False)
            self._beta_float = float(beta)
        self.learnable_beta = learnable_beta

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pre = F.relu(self.conv(x))
        beta: Any = self.beta if self.learnable_beta else self._beta_float
        m = part_mask(pre, beta=beta, mode=self.mask_mode, coords=self.coords)  # type: ignore[arg-type]
        return pre * F.relu(m), pre, m


class PartExplainer(nn.Module):
    """Explainer network: interpretable masked-conv track + ordinary track, gate ``p`` and decoder.

    Args:
        in_channels: channels ``C`` of the target features.
        part_channels: interpretable channels (default ``C``; must equal ``C`` for the fusion).
        num_interpretable_layers: masked conv blocks (default 2).
        kernel_size: odd conv kernel size (stride 1, "same" padding).
        beta, mask_mode, coords, learnable_beta: mask options (see :func:`part_mask`).
        norm_momentum: momentum of the running norm of each track.
        upper_shapes: ``{layer: (C_u, H_u, W_u) or (D_u,)}`` upper layers to reconstruct as well.
        output_activation: ``"auto"`` (ReLU if the first training batch is all >= 0), ``"relu"`` or
            ``"identity"``.
        filter_loss_mode: ``"exact"`` or ``"reference"``.
        filter_loss_normalize: ``"batch_peak"`` (default) or ``"none"``.
        reference_peak: ``κ`` of ``"batch_peak"``.

    Example:
        >>> net = PartExplainer(8)
        >>> out = net(torch.rand(4, 8, 6, 6))
        >>> out.reconstruction.shape, out.p.shape, float(out.p[0].detach())
        (torch.Size([4, 8, 6, 6]), torch.Size([4]), 0.5)
    """

    def __init__(
        self,
        in_channels: int,
        *,
        part_channels: int | None = None,
        num_interpretable_layers: int = 2,
        kernel_size: int = 3,
        beta: float = 4.0,
        mask_mode: str = "argmax",
        coords: str = "pixel",
        learnable_beta: bool = False,
        norm_momentum: float = 0.1,
        upper_shapes: Mapping[str, tuple[int, ...]] | None = None,
        output_activation: str = "auto",
        filter_loss_mode: str = "exact",
        filter_loss_normalize: str = "batch_peak",
        reference_peak: float = 4.0,
    ) -> None:
        super().__init__()
        for v, n in ((in_channels, "in_channels"), (num_interpretable_layers, "num_interpretable_layers")):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Expected `{n}` to be an integer >= 1, but got {v!r}.")
        part_channels = in_channels if part_channels is None else part_channels
        if part_channels != in_channels:
            raise ValueError(
                f"Expected `part_channels` to equal the ordinary width {in_channels} (the fusion adds both "
                f"tracks), but got {part_channels}; leave it None."
            )
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"Expected an odd `kernel_size` >= 1 (stride 1, same padding), but got {kernel_size!r}.")
        if mask_mode not in ("argmax", "centroid"):
            raise ValueError(f"Expected `mask_mode` in ('argmax', 'centroid'), but got {mask_mode!r}.")
        if coords not in ("pixel", "unit_grid"):
            raise ValueError(f"Expected `coords` in ('pixel', 'unit_grid'), but got {coords!r}.")
        if output_activation not in ("auto", "relu", "identity"):
            raise ValueError(f"Expected `output_activation` in ('auto', 'relu', 'identity'), but got {output_activation!r}.")
        if filter_loss_mode not in ("exact", "reference"):
            raise ValueError(f"Expected `filter_loss_mode` in ('exact', 'reference'), but got {filter_loss_mode!r}.")
        if filter_loss_normalize not in ("none", "batch_peak"):
            raise ValueError(
                f"Expected `filter_loss_normalize` in ('none', 'batch_peak'), but got {filter_loss_normalize!r}."
            )
        if learnable_beta:
            raise NotImplementedError(
                "PartExplainer(learnable_beta=True): the reference's beta pseudo-gradient (spec 2.5) is not "
                "implemented yet; use a fixed `beta` (coords='unit_grid' works with a fixed beta)."
            )
        if not 0 < float(norm_momentum) <= 1:
            raise ValueError(f"Expected `norm_momentum` in (0, 1], but got {norm_momentum!r}.")
        upper = {str(k): tuple(int(d) for d in v) for k, v in (upper_shapes or {}).items()}
        for name, shp in upper.items():
            if len(shp) not in (1, 3) or min(shp) < 1:
                raise ValueError(f"Expected upper shape (C, H, W) or (D,) for {name!r}, but got {shp}.")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, part_channels=part_channels, num_interpretable_layers=num_interpretable_layers,
            kernel_size=kernel_size, beta=float(beta), mask_mode=mask_mode, coords=coords,
            learnable_beta=bool(learnable_beta), norm_momentum=float(norm_momentum), upper_shapes=upper,
            output_activation=output_activation, filter_loss_mode=filter_loss_mode,
            filter_loss_normalize=filter_loss_normalize, reference_peak=float(reference_peak),
        )
        c, k = in_channels, kernel_size
        self.blocks = nn.ModuleList(
            _MaskedBlock(c if i == 0 else part_channels, part_channels, k, beta, mask_mode, coords, learnable_beta)
            for i in range(num_interpretable_layers)
        )
        self.ordinary = nn.Conv2d(c, c, k, padding=k // 2)
        self.norm_interp = _TrackNorm(norm_momentum)
        self.norm_ordin = _TrackNorm(norm_momentum)
        self.gate = nn.Linear(c, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.dec1 = nn.Conv2d(c, c, k, padding=k // 2)
        self.dec2 = nn.Conv2d(c, c, k, padding=k // 2)
        # -1 unresolved ("auto"), 0 identity, 1 relu; a buffer so that state_dict round trips keep it
        init = {"auto": -1, "identity": 0, "relu": 1}[output_activation]
        self.register_buffer("_out_relu", torch.tensor(init, dtype=torch.long))
        self.upper_names = list(upper)
        self.upper_heads = nn.ModuleDict()
        for name, shp in upper.items():
            key = name.replace(".", "__")
            self.upper_heads[key] = nn.Conv2d(c, shp[0], 1) if len(shp) == 3 else nn.Linear(c, shp[0])

    # ------------------------------------------------------------------ forward
    def resolve_output_activation(self, x: Tensor) -> None:
        """Freeze ``output_activation="auto"``: ReLU if ``x`` is all >= 0 (one host sync, once)."""
        if int(self._out_relu) < 0:
            self._out_relu.fill_(1 if bool((x >= 0).all()) else 0)
            self.config["output_activation"] = "relu" if int(self._out_relu) == 1 else "identity"

    def forward(self, x: Tensor) -> ExplainerOutput:
        """Explain target features ``x (N, C, H, W)`` (detached performer features)."""
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Expected target features (N, C, H, W), but got {shape}; pick a conv layer.")
        if x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"Expected {self.config['in_channels']} channels, but got {x.shape[1]}.")
        x = x.detach()
        if int(self._out_relu) < 0:
            self.resolve_output_activation(x)
        h = x
        losses = []
        for blk in self.blocks:
            h, pre, m = blk(h)
            losses.append(
                filter_loss(pre, beta=self.config["beta"], normalize=self.config["filter_loss_normalize"],
                            reference_peak=self.config["reference_peak"], mode=self.config["filter_loss_mode"],
                            mask=m)
            )
        interp = h
        ordin = F.relu(self.ordinary(x))
        xi = self.norm_interp(interp)
        xo = self.norm_ordin(ordin)
        p = torch.sigmoid(self.gate(x.mean((2, 3)).to(self.gate.weight.dtype)).squeeze(1)).to(xi.dtype)
        pv = p.view(-1, 1, 1, 1)
        fused = pv * xi + (1 - pv) * xo
        hid = F.relu(self.dec1(fused))
        rec = self.dec2(hid)
        if int(self._out_relu) == 1:
            rec = F.relu(rec)
        upper: dict[str, Tensor] = {}
        for name in self.upper_names:
            shp = self.config["upper_shapes"][name]
            head = self.upper_heads[name.replace(".", "__")]
            if len(shp) == 3:
                hu, wu = shp[1], shp[2]
                if hu <= hid.shape[2] and wu <= hid.shape[3]:
                    z = F.adaptive_avg_pool2d(hid, (hu, wu))
                else:
                    z = F.interpolate(hid, size=(hu, wu), mode="bilinear", align_corners=False)
                upper[name] = head(z)
            else:
                upper[name] = head(hid.mean((2, 3)))
        fl = torch.stack(losses).mean() if losses else x.new_zeros(())
        return ExplainerOutput(rec, upper, p, interp, ordin, fl)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, **extra: Any) -> None:
        """Save ``{config, state_dict, **extra}`` to ``path`` (reload with :meth:`load`)."""
        torch.save({"config": dict(self.config), "state_dict": self.state_dict(), **extra}, path)

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> PartExplainer:
        """Rebuild a saved explainer (from :meth:`save` or the callback's ``save_path``)."""
        blob = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
            raise ValueError(f"Expected a file written by PartExplainer.save (config + state_dict), got {path!r}.")
        net = cls(**blob["config"])
        sd = blob["state_dict"]
        dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), None)
        if dtype is not None:
            net.to(dtype)  # keep the saved precision (buffers included)
        net.load_state_dict(sd)
        return net

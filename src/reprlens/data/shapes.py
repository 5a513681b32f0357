"""Procedural dSprites-like shapes with known generative factors, masks, landmarks and concepts.

Images are rasterised analytically (inside tests on the pixel-centre grid), vectorised over whole
chunks of images with torch ops: no per-image Python loop, 50k 32x32 images in about a second or
two on one CPU core (``benchmarks/bench_shapes.py``). Every value is a counter-based hash of
``(seed, split, index)``, so an example is identical whatever the chunking, batching or device.

**Factors** (``factor_names``, columns of ``factor_values`` (N, 7) float32):

=============  =====================================================================================
``shape``      categorical index into ``shape_names`` (default square, circle, triangle, ring, cross)
``colour``     categorical index into ``colour_names`` (red, orange, yellow, green, blue, purple)
``scale``      continuous in [0.5, 1]; circumradius = ``scale * 0.3 * image_size`` pixels
``pos_x``      continuous in [0, 1]: 0 = leftmost, 1 = rightmost centre that keeps the shape inside
``pos_y``      continuous in [0, 1]: 0 = top, 1 = bottom
``rotation``   radians in [0, 2*pi), counter-clockwise as seen on screen. Symmetric shapes look the
               same modulo their symmetry: square and cross pi/2, triangle 2*pi/3; circle and ring
               do not change at all (the factor is still sampled and recorded).
``background`` categorical index into ("plain", "noise"): black, or grey uniform noise in [0, 0.6]
=============  =====================================================================================

Continuous factors also have bins (``factor_bins``): scale small/medium/large, pos_x
left/centre/right, pos_y top/middle/bottom (three equal-width bins) and rotation in four 90-degree
bins. Any categorical factor or binned continuous factor can be the class label (``label_factor``).

**Landmarks** (``landmark_names``): ``(L=5, 2)`` float (row, col) pixel coordinates (0-based pixel
centres): the shape centre first, then four "corners" in a fixed order following the rotation:
square corners, triangle vertices (the 4th slot NaN), cross arm tips. Circles and rings have no
corners: NaN (``round_landmarks="nan"``, the default, as the explainer-network metric expects), or
four boundary points at the rotation angle and every 90 degrees with ``round_landmarks="boundary"``
(the triangle's 4th slot then repeats its first vertex). Note that the centre of a ring lies in its
hole, not on the drawn pixels.

**Masks**: ``(1, H, W)`` bool, exactly the pixels whose colour is the object colour.

**Memory**: with ``cache=True`` (default) rendered chunks are kept as uint8 images plus bool masks,
``4 * N * H * W`` bytes (50k at 32x32: 205 MB; at 64x64: 820 MB), filled lazily chunk by chunk (or
all at once with :meth:`ShapesDataset.materialize`). ``cache=False`` renders every batch again
(a few milliseconds per batch of 256 at 32x32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from reprlens.data._common import BatchedDictDataset
from reprlens.data._random import seed_key, stream_hash, uniforms
from reprlens.data.augment import AugmentConfig
from reprlens.utils import check_positive_int

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "FACTOR_NAMES",
    "LANDMARK_NAMES",
    "MIN_IMAGE_SIZE",
    "SHAPES",
    "ShapesDataset",
    "render_shapes",
    "shape_landmarks",
]

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "ring", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (150, 60, 200),
}
WARM_COLOURS = frozenset({"red", "orange", "yellow"})
BACKGROUNDS: tuple[str, ...] = ("plain", "noise")
FACTOR_NAMES: tuple[str, ...] = ("shape", "colour", "scale", "pos_x", "pos_y", "rotation", "background")
CATEGORICAL = ("shape", "colour", "background")
LANDMARK_NAMES: tuple[str, ...] = ("centre", "corner0", "corner1", "corner2", "corner3")
MIN_IMAGE_SIZE = 16
SCALE_RANGE = (0.5, 1.0)
SIZE_FACTOR = 0.3  # circumradius = scale * SIZE_FACTOR * image_size
NOISE_MAX = 0.6
_NOISE_TOP = round(NOISE_MAX * 255)  # brightest noise level (uint8)
BINS: dict[str, tuple[tuple[float, ...], tuple[str, ...]]] = {
    # name: (inner edges, bin names)
    "scale": ((2 / 3, 5 / 6), ("small", "medium", "large")),
    "pos_x": ((1 / 3, 2 / 3), ("left", "centre", "right")),
    "pos_y": ((1 / 3, 2 / 3), ("top", "middle", "bottom")),
    "rotation": ((math.pi / 2, math.pi, 3 * math.pi / 2), ("0..90", "90..180", "180..270", "270..360")),
}
DERIVED_CONCEPTS: tuple[str, ...] = (
    "left_half", "right_half", "top_half", "bottom_half", "large", "small", "warm_colour", "cool_colour",
    "noisy_background",
)

# shape geometry in units of the circumradius R (local coordinates u right, v up, after un-rotating)
_CIRCLE_R = 0.85
_RING_IN, _RING_OUT = 0.55, 0.9
_SQUARE_HALF = 1 / math.sqrt(2)
_CROSS_HALF_WIDTH, _CROSS_ARM = 0.3, 0.95
_TRI_INRADIUS = 0.5


def _check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"Expected `image_size` to be an int, but got {type(image_size).__name__}.")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"`image_size`={image_size} is too small for the shapes: it must be >= {MIN_IMAGE_SIZE} so the smallest "
            f"shape (scale {SCALE_RANGE[0]}) spans at least {2 * SCALE_RANGE[0] * SIZE_FACTOR * MIN_IMAGE_SIZE:.1f} "
            f"pixels. Use 32 (default) or 64."
        )
    return image_size


def _geometry(factors: Tensor, image_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Centre row, centre col, circumradius R (pixels) and rotation of each image, all (N,)."""
    f = factors.to(torch.float32) if factors.dtype not in (torch.float32, torch.float64) else factors
    radius = f[:, 2] * (SIZE_FACTOR * image_size)
    margin = radius + 0.5
    span = (image_size - 1) - 2 * margin
    col = margin + f[:, 3] * span
    row = margin + f[:, 4] * span
    return row, col, radius, f[:, 5]


def _inside_kind(kind: int, u: Tensor, v: Tensor) -> Tensor:
    """Inside test of one global shape kind on local coordinates (units of the circumradius)."""
    if kind == 0:  # square
        return torch.maximum(u.abs(), v.abs()) <= _SQUARE_HALF
    if kind == 1:  # circle
        return u * u + v * v <= _CIRCLE_R**2
    if kind == 2:
        # equilateral triangle with vertices at angles 90, 210, 330 degrees (radius 1): edge k is at
        # distance 0.5 from the centre, opposite vertex k
        s3 = math.sqrt(3) / 2
        a = s3 * u
        b = 0.5 * v
        return (v >= -_TRI_INRADIUS) & (a + b <= _TRI_INRADIUS) & (b - a <= _TRI_INRADIUS)
    if kind == 3:  # ring
        r2 = u * u + v * v
        return (r2 >= _RING_IN**2) & (r2 <= _RING_OUT**2)
    au, av = u.abs(), v.abs()  # cross: union of two bars
    return (torch.minimum(au, av) <= _CROSS_HALF_WIDTH) & (torch.maximum(au, av) <= _CROSS_ARM)


def _rasterise(kind: Tensor, row: Tensor, col: Tensor, radius: Tensor, theta: Tensor, size: int) -> Tensor:
    """``(N, S, S)`` bool inside-masks; each shape kind is tested only on its own images (5 groups)."""
    n, dev = kind.shape[0], kind.device
    grid = torch.arange(size, device=dev, dtype=row.dtype)
    mask = torch.empty((n, size, size), dtype=torch.bool, device=dev)
    for k in range(len(SHAPES)):  # loop over the 5 shape kinds, each vectorised over its images
        rows = (kind == k).nonzero().flatten()
        if rows.numel() == 0:
            continue
        x = grid[None, None, :] - col[rows, None, None]  # (M, 1, S): right
        y = row[rows, None, None] - grid[None, :, None]  # (M, S, 1): up
        c = (torch.cos(theta[rows]) / radius[rows])[:, None, None]
        sn = (torch.sin(theta[rows]) / radius[rows])[:, None, None]
        u = x * c + y * sn
        v = y * c - x * sn
        mask[rows] = _inside_kind(k, u, v)
    return mask


def _shape_kinds(shape_names: Sequence[str], device: torch.device) -> Tensor:
    return torch.tensor([SHAPES.index(s) for s in shape_names], dtype=torch.long, device=device)


def _palette(colour_names: Sequence[str], device: torch.device) -> Tensor:
    return torch.tensor([COLOURS[c] for c in colour_names], dtype=torch.uint8, device=device)


def _render_uint8(
    factors: Tensor, index: Tensor, image_size: int, shape_names: Sequence[str], colour_names: Sequence[str],
    noise_key: int,
) -> tuple[Tensor, Tensor]:
    """``(N, 3, S, S)`` uint8 images and ``(N, 1, S, S)`` bool masks for one chunk."""
    dev = factors.device
    n, s = factors.shape[0], image_size
    row, col, radius, theta = _geometry(factors, s)
    kind = _shape_kinds(shape_names, dev)[factors[:, 0].long()]
    mask = _rasterise(kind, row, col, radius, theta, s)  # (N, S, S)
    colour = _palette(colour_names, dev)[factors[:, 1].long()]  # (N, 3)
    noisy = factors[:, 6] > 0.5
    background = torch.zeros((n, 1, s, s), dtype=torch.uint8, device=dev)
    rows = noisy.nonzero().flatten()
    if rows.numel():
        # grey noise: one 32-bit hash gives 4 pixels (one byte each), only for the noisy images
        words = torch.arange((s * s + 3) // 4, device=dev)
        h = stream_hash(noise_key, index[rows][:, None], words[None, :])  # (M, ceil(S*S/4))
        shifts = torch.arange(0, 32, 8, device=dev)
        bytes_ = ((h[:, :, None] >> shifts) & 0xFF).flatten(1)[:, : s * s]
        noise = ((bytes_ * _NOISE_TOP) // 255).to(torch.uint8)  # integer maths: identical on every device
        background[rows] = noise.view(-1, 1, s, s)
    images = torch.where(mask[:, None], colour[:, :, None, None], background)
    return images, mask[:, None]


def render_shapes(
    factors: Tensor,
    image_size: int = 32,
    *,
    index: Tensor | None = None,
    seed: int = 0,
    shape_names: Sequence[str] = SHAPES,
    colour_names: Sequence[str] = tuple(COLOURS),
) -> tuple[Tensor, Tensor]:
    """Rasterise shapes from a factor table (the functional core of :class:`ShapesDataset`).

    Args:
        factors: ``(N, 7)`` factor values in the encoding of ``FACTOR_NAMES`` (see the module doc).
        image_size: output height and width (>= 16).
        index: ``(N,)`` example ids selecting the background noise (default ``arange(N)``).
        seed: seed of the background noise.
        shape_names: names the ``shape`` column indexes into.
        colour_names: names the ``colour`` column indexes into (keys of ``COLOURS``).

    Returns:
        ``(images, masks)``: ``(N, 3, S, S)`` float32 in [0, 1] and ``(N, 1, S, S)`` bool object masks.

    Example:
        >>> import math, torch
        >>> f = torch.tensor([[0, 0, 1.0, 0.5, 0.5, 0.0, 0]])  # big red square, centred, plain
        >>> img, mask = render_shapes(f, 32)
        >>> img.shape, int(mask.sum()) > 50, bool(img[0, 1][mask[0, 0]].eq(40 / 255).all())
        (torch.Size([1, 3, 32, 32]), True, True)
    """
    image_size = _check_image_size(image_size)
    if factors.ndim != 2 or factors.shape[1] != len(FACTOR_NAMES):
        raise ValueError(f"Expected factors of shape (N, {len(FACTOR_NAMES)}), but got {tuple(factors.shape)}.")
    idx = torch.arange(factors.shape[0], device=factors.device) if index is None else index.to(factors.device)
    images, masks = _render_uint8(factors, idx, image_size, shape_names, colour_names, seed_key(seed, 0x401))
    return images.to(torch.float32) / 255.0, masks


def shape_landmarks(
    factors: Tensor,
    image_size: int = 32,
    *,
    shape_names: Sequence[str] = SHAPES,
    round_landmarks: Literal["nan", "boundary"] = "nan",
) -> Tensor:
    """``(N, 5, 2)`` landmarks (row, col) in pixels: centre, then 4 corners (see the module doc).

    Example:
        >>> import torch
        >>> f = torch.tensor([[0, 0, 1.0, 0.5, 0.5, 0.0, 0]])  # unrotated square, centre (15.5, 15.5)
        >>> shape_landmarks(f, 32)[0, :2]
        tensor([[15.5000, 15.5000],
                [ 8.7118, 22.2882]])
    """
    if round_landmarks not in ("nan", "boundary"):
        raise ValueError(f"Expected `round_landmarks` in ('nan', 'boundary'), but got {round_landmarks!r}.")
    dev = factors.device
    row, col, radius, theta = _geometry(factors, image_size)
    kind = _shape_kinds(shape_names, dev)[factors[:, 0].long()]
    k = torch.arange(4, device=dev, dtype=row.dtype)
    nan = float("nan")
    # per global shape id: angle offset, angle step, radius (units of R); None = no corners
    offset = torch.tensor([math.pi / 4, 0.0, math.pi / 2, 0.0, 0.0], device=dev, dtype=row.dtype)
    step = torch.tensor([math.pi / 2, math.pi / 2, 2 * math.pi / 3, math.pi / 2, math.pi / 2], device=dev,
                        dtype=row.dtype)
    rho = torch.tensor([1.0, _CIRCLE_R, 1.0, _RING_OUT, _CROSS_ARM], device=dev, dtype=row.dtype)
    kk = torch.where((kind == 2)[:, None] & (k == 3)[None, :], torch.zeros_like(k)[None, :], k[None, :])  # tri: repeat
    ang = theta[:, None] + offset[kind][:, None] + step[kind][:, None] * kk
    r = (radius * rho[kind])[:, None]
    corners = torch.stack([row[:, None] - r * torch.sin(ang), col[:, None] + r * torch.cos(ang)], -1)  # (N, 4, 2)
    invalid = torch.zeros_like(ang, dtype=torch.bool)
    if round_landmarks == "nan":
        invalid = ((kind == 1) | (kind == 3))[:, None].expand_as(invalid) | ((kind == 2)[:, None] & (k == 3)[None, :])
    corners = torch.where(invalid[..., None], torch.full_like(corners, nan), corners)
    centre = torch.stack([row, col], -1)[:, None]
    return torch.cat([centre, corners], 1).to(torch.float32)


def _bin(values: Tensor, factor: str) -> Tensor:
    edges = torch.tensor(BINS[factor][0], dtype=values.dtype, device=values.device)
    return torch.bucketize(values.contiguous(), edges, right=True).clamp(max=len(BINS[factor][1]) - 1)


class ShapesDataset(BatchedDictDataset):
    """Procedural coloured shapes on plain or noisy backgrounds with known generative factors.

    Items are dicts: ``"image"`` (3, S, S) float in [0, 1], ``"label"`` int64 (the ``label_factor``),
    ``"index"`` int64, ``"factors"`` (7,) float32, ``"mask"`` (1, S, S) bool, ``"landmarks"`` (5, 2)
    float32 (row, col), plus ``"views"`` / ``"view_landmarks"`` in two-view mode. See the module
    docstring for the factor encoding, landmarks and memory use.

    Args:
        num_samples: number of examples (>= 1).
        image_size: height and width in pixels (>= 16; 32 default, 64 for finer shapes).
        seed: all factors, noise and augmentations derive from it (and ``split``).
        split: salt that makes different splits independent streams ("train", "val", "test" or an int).
        shapes: subset of ``SHAPES`` to draw (default all five), in this order for the labels.
        colours: subset of ``COLOURS`` (default all six).
        background: "plain", "noise" or "mixed" (each example draws one; default).
        label_factor: factor used as ``"label"``: categorical (shape, colour, background) or binned
            continuous (scale, pos_x, pos_y, rotation).
        round_landmarks: "nan" (circles/rings have NaN corners) or "boundary".
        cache: keep rendered chunks in memory (uint8); otherwise render each batch.
        chunk_size: images rendered per vectorised call (bounds the peak memory, ~60 bytes/pixel).
        two_views: add two augmented views per item (contrastive learning).
        augment: augmentation parameters for the views.

    Example:
        >>> ds = ShapesDataset(100, image_size=32, seed=0)
        >>> item = ds[7]
        >>> item["image"].shape, item["landmarks"].shape, ds.num_classes
        (torch.Size([3, 32, 32]), torch.Size([5, 2]), 5)
        >>> ds.concept_matrix().shape[1] == len(ds.concept_names)
        True
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 32,
        seed: int = 0,
        *,
        split: str | int = "train",
        shapes: Sequence[str] | None = None,
        colours: Sequence[str] | None = None,
        background: Literal["plain", "noise", "mixed"] = "mixed",
        label_factor: str = "shape",
        round_landmarks: Literal["nan", "boundary"] = "nan",
        cache: bool = True,
        chunk_size: int = 4096,
        two_views: bool = False,
        augment: AugmentConfig | None = None,
    ) -> None:
        check_positive_int(num_samples, "num_samples")
        self.image_size = _check_image_size(image_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected `seed` to be an int, but got {type(seed).__name__}.")
        check_positive_int(chunk_size, "chunk_size")
        self.shape_names = self._check_subset(shapes, SHAPES, "shapes")
        self.colour_names = self._check_subset(colours, tuple(COLOURS), "colours")
        if background not in ("plain", "noise", "mixed"):
            raise ValueError(f"Expected `background` in ('plain', 'noise', 'mixed'), but got {background!r}.")
        valid_labels = CATEGORICAL + tuple(BINS)
        if label_factor not in valid_labels:
            raise ValueError(
                f"Unknown `label_factor` {label_factor!r}: expected a categorical factor or a binned continuous "
                f"factor, one of {valid_labels}."
            )
        if round_landmarks not in ("nan", "boundary"):
            raise ValueError(f"Expected `round_landmarks` in ('nan', 'boundary'), but got {round_landmarks!r}.")
        if isinstance(split, str):
            split_id = {"train": 0, "val": 1, "test": 2}.get(split)
            if split_id is None:
                raise ValueError(f"Expected `split` in ('train', 'val', 'test') or an int, but got {split!r}.")
        elif isinstance(split, int) and not isinstance(split, bool):
            split_id = split
        else:
            raise TypeError(f"Expected `split` to be a str or int, but got {type(split).__name__}.")
        self.num_samples = num_samples
        self.seed = seed
        self.split = split
        self.background = background
        self.label_factor = label_factor
        self.round_landmarks = round_landmarks
        self.cache = bool(cache)
        self.chunk_size = chunk_size
        self._key = seed_key(seed, split_id, 0x5A)
        self._noise_key = seed_key(seed, split_id, 0x401)
        self.factor_values = self._sample_factors(torch.arange(num_samples))
        # shared by shallow copies (``without_views``): allocated on first use, filled chunk by chunk
        self._store: dict[str, Tensor] = {}
        self._done = torch.zeros(math.ceil(num_samples / chunk_size), dtype=torch.bool)
        self.configure_views(two_views, seed_key(seed, split_id, 0xA06), augment)

    # -- validation ---------------------------------------------------------------------------------
    @staticmethod
    def _check_subset(given: Sequence[str] | None, allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
        if given is None:
            return allowed
        if isinstance(given, str):
            given = [given]
        given = tuple(given)
        unknown = [g for g in given if g not in allowed]
        if unknown or not given or len(set(given)) != len(given):
            raise ValueError(
                f"Invalid `{name}` {list(given)!r}: expected a non-empty list of distinct names from {list(allowed)}"
                + (f" (unknown: {unknown})." if unknown else ".")
            )
        return given

    # -- factors ------------------------------------------------------------------------------------
    def _sample_factors(self, index: Tensor) -> Tensor:
        u = uniforms(self._key, index, 7, dtype=torch.float64)
        shape = torch.floor(u[:, 0] * len(self.shape_names))
        colour = torch.floor(u[:, 1] * len(self.colour_names))
        scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * u[:, 2]
        rotation = 2 * math.pi * u[:, 5]
        if self.background == "mixed":
            bg = torch.floor(u[:, 6] * 2)
        else:
            bg = torch.full_like(u[:, 6], float(BACKGROUNDS.index(self.background)))
        return torch.stack([shape, colour, scale, u[:, 3], u[:, 4], rotation, bg], 1).to(torch.float32)

    @property
    def factor_names(self) -> tuple[str, ...]:
        """Names of the columns of ``factor_values``."""
        return FACTOR_NAMES

    @property
    def factor_categories(self) -> dict[str, tuple[str, ...]]:
        """Value names of the categorical factors (index = encoded value)."""
        return {"shape": self.shape_names, "colour": self.colour_names, "background": BACKGROUNDS}

    @property
    def factor_bins(self) -> dict[str, tuple[tuple[float, ...], tuple[str, ...]]]:
        """Inner bin edges and bin names of the continuous factors."""
        return dict(BINS)

    def factors(self) -> dict[str, Tensor]:
        """Factor columns by name: categorical as int64 (indices into ``factor_categories``), others float32.

        The format ``reprlens.invert.ConceptSet.from_factors`` accepts.
        """
        fv = self.factor_values
        return {
            name: (fv[:, i].long() if name in CATEGORICAL else fv[:, i].clone()) for i, name in enumerate(FACTOR_NAMES)
        }

    def binned_factor(self, name: str) -> Tensor:
        """Bin index (int64) of a continuous factor, or the index of a categorical one."""
        if name in CATEGORICAL:
            return self.factor_values[:, FACTOR_NAMES.index(name)].long()
        if name not in BINS:
            raise ValueError(f"Unknown factor {name!r}: expected one of {FACTOR_NAMES}.")
        return _bin(self.factor_values[:, FACTOR_NAMES.index(name)], name)

    @property
    def labels(self) -> Tensor:
        """``(N,)`` int64 class labels (the binned ``label_factor``)."""
        return self.binned_factor(self.label_factor)

    @property
    def label_names(self) -> tuple[str, ...]:
        """Class names, index = label."""
        if self.label_factor in CATEGORICAL:
            return self.factor_categories[self.label_factor]
        return BINS[self.label_factor][1]

    @property
    def num_classes(self) -> int:
        """Number of classes of ``"label"``."""
        return len(self.label_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def landmark_names(self) -> tuple[str, ...]:
        return LANDMARK_NAMES

    # -- concepts -----------------------------------------------------------------------------------
    @property
    def concept_names(self) -> list[str]:
        """Names of the columns of :meth:`concept_matrix`."""
        names = [f"{f}={v}" for f in CATEGORICAL[:2] for v in self.factor_categories[f]]
        names += [f"{f}={b}" for f in BINS for b in BINS[f][1]]
        names += [f"background={b}" for b in BACKGROUNDS]
        return names + list(DERIVED_CONCEPTS)

    def concept_matrix(self) -> Tensor:
        """``(N, K)`` bool: one column per categorical value, per bin of a continuous factor, and derived.

        Derived concepts: ``left_half``/``right_half`` (centre left/right of the image middle, i.e.
        pos_x < 0.5), ``top_half``/``bottom_half`` (pos_y < 0.5 / >= 0.5), ``large``/``small``
        (scale >= / < 0.75), ``warm_colour`` (red, orange, yellow), ``cool_colour`` (the others),
        ``noisy_background``.
        """
        fv = self.factor_values
        cols = []
        for f in ("shape", "colour"):
            v = fv[:, FACTOR_NAMES.index(f)].long()
            cols.append(v[:, None] == torch.arange(len(self.factor_categories[f]))[None, :])
        for f in BINS:
            cols.append(self.binned_factor(f)[:, None] == torch.arange(len(BINS[f][1]))[None, :])
        bg = fv[:, 6].long()
        cols.append(bg[:, None] == torch.arange(len(BACKGROUNDS))[None, :])
        px, py, sc = fv[:, 3], fv[:, 4], fv[:, 2]
        mid_scale = (SCALE_RANGE[0] + SCALE_RANGE[1]) / 2
        warm = torch.tensor([c in WARM_COLOURS for c in self.colour_names])[fv[:, 1].long()]
        derived = [px < 0.5, px >= 0.5, py < 0.5, py >= 0.5, sc >= mid_scale, sc < mid_scale, warm, ~warm, bg == 1]
        cols.append(torch.stack(derived, 1))
        return torch.cat(cols, 1)

    # -- rendering ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def _render(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return _render_uint8(self.factor_values[index], index, self.image_size, self.shape_names, self.colour_names,
                             self._noise_key)

    def _render_chunk(self, c: int) -> None:
        if not self._store:
            s = self.image_size
            self._store["images"] = torch.empty((self.num_samples, 3, s, s), dtype=torch.uint8)
            self._store["masks"] = torch.empty((self.num_samples, 1, s, s), dtype=torch.bool)
        lo, hi = c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_samples)
        img, mask = self._render(torch.arange(lo, hi))
        self._store["images"][lo:hi] = img
        self._store["masks"][lo:hi] = mask
        self._done[c] = True

    def materialize(self, progress: bool = False) -> ShapesDataset:
        """Render and cache every chunk now (e.g. before forking DataLoader workers). Returns ``self``."""
        if not self.cache:
            return self
        todo = (~self._done).nonzero().flatten().tolist()
        if progress:
            from tqdm.auto import tqdm

            todo = tqdm(todo, desc="rendering shapes", unit="chunk")
        for c in todo:
            self._render_chunk(c)
        return self

    def _fetch(self, index: Tensor) -> dict[str, Any]:
        if self.cache:
            chunks = torch.unique(index // self.chunk_size)
            for c in chunks[~self._done[chunks]].tolist():  # loop over missing chunks, not samples
                self._render_chunk(c)
            img_u8, mask = self._store["images"][index], self._store["masks"][index]
        else:
            img_u8, mask = self._render(index)
        factors = self.factor_values[index]
        label = (
            factors[:, FACTOR_NAMES.index(self.label_factor)].long()
            if self.label_factor in CATEGORICAL
            else _bin(factors[:, FACTOR_NAMES.index(self.label_factor)], self.label_factor)
        )
        return {
            "image": img_u8.to(torch.float32) / 255.0,
            "label": label,
            "index": index.clone(),
            "factors": factors,
            "mask": mask,
            "landmarks": shape_landmarks(factors, self.image_size, shape_names=self.shape_names,
                                         round_landmarks=self.round_landmarks),
        }

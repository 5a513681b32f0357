"""Procedural shapes: determinism, factor/mask/landmark consistency (analytic oracles), concepts, datamodule."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from reprlens.data import (
    COLOURS,
    FACTOR_NAMES,
    SHAPES,
    AugmentConfig,
    ShapesDataModule,
    ShapesDataset,
    augment_batch,
    collate_dict_batch,
    render_shapes,
    shape_landmarks,
)
from reprlens.data.shapes import SIZE_FACTOR

# analytic areas in units of R^2 (R = circumradius), from the documented geometry
AREAS = {
    "square": 2.0,
    "circle": math.pi * 0.85**2,
    "triangle": 3 * math.sqrt(3) / 4,
    "ring": math.pi * (0.9**2 - 0.55**2),
    "cross": 2 * (2 * 0.95 * 0.6) - 0.6**2,
}


def _factors(shape, colour=0, scale=1.0, px=0.5, py=0.5, rot=0.0, bg=0):
    return torch.tensor([[shape, colour, scale, px, py, rot, bg]], dtype=torch.float32)


# ---------------------------------------------------------------- determinism


def test_deterministic_and_independent_of_chunking_cache_and_batching():
    a = ShapesDataset(50, 32, seed=3, chunk_size=7)
    b = ShapesDataset(50, 32, seed=3, chunk_size=4096)
    c = ShapesDataset(50, 32, seed=3, cache=False)
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(1))[:20]
    ba, bb, bc = a.get_batch(idx), b.get_batch(idx), c.get_batch(idx)
    for key in ("image", "label", "index", "factors", "mask"):
        assert torch.equal(ba[key], bb[key]) and torch.equal(ba[key], bc[key]), key
    torch.testing.assert_close(ba["landmarks"], bc["landmarks"], equal_nan=True)
    # an example does not depend on the dataset size either (counter-based randomness)
    d = ShapesDataset(20, 32, seed=3)
    assert torch.equal(d.get_batch(range(20))["image"], a.get_batch(range(20))["image"])
    # single-item access equals the batched access
    item = a[int(idx[4])]
    assert torch.equal(item["image"], ba["image"][4]) and int(item["index"]) == int(idx[4])


def test_seed_and_split_change_the_data():
    a = ShapesDataset(64, 32, seed=0)
    assert not torch.equal(a.factor_values, ShapesDataset(64, 32, seed=1).factor_values)
    assert not torch.equal(a.factor_values, ShapesDataset(64, 32, seed=0, split="val").factor_values)


def test_factor_ranges_and_balance():
    ds = ShapesDataset(4000, 32, seed=0)
    f = ds.factor_values
    assert f.shape == (4000, len(FACTOR_NAMES)) and ds.factor_names == FACTOR_NAMES
    for col, k in ((0, len(SHAPES)), (1, len(COLOURS)), (6, 2)):
        v = f[:, col]
        assert torch.equal(v, v.round()) and v.min() == 0 and v.max() == k - 1
        counts = torch.bincount(v.long(), minlength=k).double() / len(v)
        assert (counts - 1 / k).abs().max() < 0.04  # roughly uniform
    assert f[:, 2].min() >= 0.5 and f[:, 2].max() <= 1.0
    assert f[:, 3:5].min() >= 0 and f[:, 3:5].max() < 1
    assert f[:, 5].min() >= 0 and f[:, 5].max() <= 2 * math.pi
    # independence between factors: correlation of scale and pos_x near 0
    assert abs(float(torch.corrcoef(f[:, [2, 3]].T)[0, 1])) < 0.06


# ---------------------------------------------------------------- geometry oracles


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_area_matches_analytic_area(shape):
    # pixel counting at uniformly random sub-pixel offsets is an unbiased estimate of the area
    s, n = 64, 256
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, 3, generator=g)
    f = torch.cat([_factors(SHAPES.index(shape), px=float(a), py=float(b), rot=float(c) * 2 * math.pi)
                   for a, b, c in u])
    _, mask = render_shapes(f, s)
    radius = SIZE_FACTOR * s
    area = mask.flatten(1).sum(1).double()
    expected = AREAS[shape] * radius**2
    assert abs(area.mean() - expected) / expected < 0.01, (area.mean(), expected)
    assert ((area - expected).abs() / expected).max() < 0.1


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_centroid_is_centre_landmark_and_covers_it(shape):
    ds = ShapesDataset(400, 32, seed=5, shapes=[shape])
    b = ds.get_batch(range(400))
    mask = b["mask"][:, 0].double()
    rows = torch.arange(32, dtype=torch.float64)
    area = mask.sum((1, 2))
    centroid = torch.stack([(mask.sum(2) * rows).sum(1) / area, (mask.sum(1) * rows).sum(1) / area], 1)
    centre = b["landmarks"][:, 0].double()
    # all five shapes are centrally symmetric or equilateral: centroid == centre (up to pixelisation)
    assert (centroid - centre).norm(dim=1).max() < 0.75
    r, c = centre.round().long().unbind(1)
    on_pixel = mask[torch.arange(400), r, c].bool()
    if shape == "ring":  # the ring's centre is in its hole
        assert not on_pixel.any()
    else:
        assert on_pixel.all()


def test_mask_is_exactly_the_object_pixels():
    ds = ShapesDataset(300, 32, seed=2)
    b = ds.get_batch(range(300))
    img, mask, f = b["image"], b["mask"], b["factors"]
    palette = torch.tensor([COLOURS[c] for c in ds.colour_names], dtype=torch.float32) / 255
    colour = palette[f[:, 1].long()][:, :, None, None].expand_as(img)
    assert torch.equal(img[mask.expand_as(img)], colour[mask.expand_as(img)])
    plain = f[:, 6] == 0
    # plain background: black exactly where the mask is off
    assert (img[plain].sum(1) == 0).eq(~mask[plain, 0]).all()
    noisy = ~plain
    bg = img[noisy][~mask[noisy].expand(-1, 3, -1, -1)]
    assert bg.min() >= 0 and bg.max() <= 0.6 and bg.std() > 0.1
    # grey noise: the three channels are equal off the object
    grey = img[noisy]
    assert torch.equal(grey[:, 0][~mask[noisy, 0]], grey[:, 2][~mask[noisy, 0]])


def test_corner_landmarks_lie_on_the_shape_boundary():
    s = 32
    ds = ShapesDataset(500, s, seed=11)
    b = ds.get_batch(range(500))
    f, lm, mask = b["factors"].double(), b["landmarks"].double(), b["mask"][:, 0]
    kind = f[:, 0].long()
    corners = lm[:, 1:]
    radius = f[:, 2] * SIZE_FACTOR * s
    has = ~corners.isnan().any(-1)
    expected_count = torch.tensor([4, 0, 3, 0, 4])[kind]
    assert torch.equal(has.sum(1), expected_count)
    # distance from the centre: R for square corners and triangle vertices, 0.95 R for the cross tips
    rho = torch.tensor([1.0, float("nan"), 1.0, float("nan"), 0.95], dtype=torch.float64)[kind]
    dist = (corners - lm[:, :1]).norm(dim=-1)
    ok = has
    torch.testing.assert_close(dist[ok], (rho * radius)[:, None].expand_as(dist)[ok], rtol=0, atol=1e-4)
    # each corner is within 2 px of a mask pixel (sharp 60-degree vertices included)
    grid = torch.stack(torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij"), -1).double()  # (S,S,2)
    d = (grid[None, None] - corners[:, :, None, None]).norm(dim=-1)  # (N,4,S,S)
    d = torch.where(mask[:, None], d, torch.full_like(d, float("inf"))).flatten(2).min(-1).values
    assert d[ok].max() < 2.0
    # and at least 0.3 px outside... not required; but corners are never deep inside: the pixel at
    # 1.5 px beyond the corner (radially) is off the mask
    beyond = lm[:, :1] + (corners - lm[:, :1]) * (1 + 1.5 / dist[..., None])
    rr, cc = beyond.round().long().clamp(0, s - 1).unbind(-1)
    n = torch.arange(500)[:, None].expand_as(rr)
    assert not mask[n[ok], rr[ok], cc[ok]].any()


def test_boundary_round_landmarks_and_rotation_follow():
    f = torch.cat([_factors(1, rot=0.3), _factors(3, rot=0.3), _factors(2, rot=0.3)])
    lm = shape_landmarks(f, 32, round_landmarks="boundary")
    assert not lm.isnan().any()
    radius = SIZE_FACTOR * 32
    d = (lm[:, 1:] - lm[:, :1]).norm(dim=-1)
    torch.testing.assert_close(d[0], torch.full((4,), 0.85 * radius))
    torch.testing.assert_close(d[1], torch.full((4,), 0.9 * radius))
    torch.testing.assert_close(lm[2, 4], lm[2, 1])  # triangle pads by repeating its first vertex
    # angle of the first boundary point = rotation (counter-clockwise on screen: row decreases)
    dy, dx = (lm[0, 1] - lm[0, 0]).tolist()
    assert math.isclose(math.atan2(-dy, dx), 0.3, abs_tol=1e-5)


@pytest.mark.parametrize("shape,period", [("square", math.pi / 2), ("cross", math.pi / 2),
                                          ("triangle", 2 * math.pi / 3), ("circle", 1.234), ("ring", 0.77)])
def test_rotation_symmetry(shape, period):
    k = SHAPES.index(shape)
    f = torch.cat([_factors(k, rot=0.2), _factors(k, rot=0.2 + period)])
    _, m = render_shapes(f.double(), 64)
    assert (m[0] != m[1]).sum() <= 2  # float rounding at exact pixel-boundary hits
    f2 = torch.cat([_factors(k, rot=0.2), _factors(k, rot=0.2 + period / 2 + 0.1)])
    _, m2 = render_shapes(f2.double(), 64)
    if shape in ("circle", "ring"):
        assert torch.equal(m2[0], m2[1])
    else:
        assert (m2[0] != m2[1]).sum() > 10


def test_position_factors_move_the_shape_monotonically():
    f = torch.cat([_factors(0, scale=0.7, px=x, py=0.5) for x in (0.0, 0.5, 1.0)])
    _, m = render_shapes(f, 32)
    cols = torch.arange(32, dtype=torch.float32)
    cx = (m[:, 0].sum(1) * cols).sum(1) / m[:, 0].sum((1, 2))
    assert cx[0] < cx[1] < cx[2]
    # the shape never touches the border at the extremes (margin = R + 0.5)
    assert not m[0, 0, :, 0].any() and not m[2, 0, :, -1].any() and m[0, 0, :, 1].any() is not None


# ---------------------------------------------------------------- labels and concepts


def test_concept_matrix_columns_match_factors():
    ds = ShapesDataset(600, 32, seed=4)
    cm, names, f = ds.concept_matrix(), ds.concept_names, ds.factor_values
    assert cm.dtype == torch.bool and cm.shape == (600, len(names)) and len(set(names)) == len(names)
    col = {n: cm[:, i] for i, n in enumerate(names)}
    for group in ("shape=", "colour=", "scale=", "pos_x=", "pos_y=", "rotation=", "background="):
        members = torch.stack([v for n, v in col.items() if n.startswith(group)], 1)
        assert torch.equal(members.sum(1), torch.ones(600, dtype=torch.long)), group
    assert torch.equal(col["shape=triangle"], f[:, 0] == SHAPES.index("triangle"))
    assert torch.equal(col["colour=blue"], f[:, 1] == ds.colour_names.index("blue"))
    assert torch.equal(col["scale=large"], f[:, 2] >= 5 / 6)
    assert torch.equal(col["rotation=90..180"], (f[:, 5] >= math.pi / 2) & (f[:, 5] < math.pi))
    centre_col = ds.get_batch(range(600))["landmarks"][:, 0, 1]
    assert torch.equal(col["left_half"], centre_col < 15.5)
    assert torch.equal(col["left_half"], ~col["right_half"]) and torch.equal(col["large"], ~col["small"])
    warm = torch.tensor([c in ("red", "orange", "yellow") for c in ds.colour_names])[f[:, 1].long()]
    assert torch.equal(col["warm_colour"], warm) and torch.equal(col["cool_colour"], ~warm)
    assert torch.equal(col["noisy_background"], col["background=noise"])
    forbidden = set(" &|~(),;")
    assert all(not (set(n) & forbidden) for n in names)
    assert set(ds.factors()) == set(FACTOR_NAMES) and ds.factors()["shape"].dtype == torch.long


@pytest.mark.parametrize("factor,k", [("shape", 5), ("colour", 6), ("background", 2), ("scale", 3), ("pos_x", 3),
                                      ("rotation", 4)])
def test_label_factor(factor, k):
    ds = ShapesDataset(300, 32, seed=0, label_factor=factor)
    assert ds.num_classes == k == len(ds.label_names)
    labels = ds.get_batch(range(300))["label"]
    assert labels.dtype == torch.long and labels.min() >= 0 and labels.max() < k
    names = ds.concept_names
    cm = ds.concept_matrix()
    onehot = cm[:, [names.index(f"{factor}={v}") for v in ds.label_names]]
    assert torch.equal(onehot.long().argmax(1), labels)


def test_subsets_plain_background_and_64px():
    ds = ShapesDataset(100, 64, seed=0, shapes=["ring", "cross"], colours=["red"], background="plain")
    b = ds.get_batch(range(100))
    assert b["image"].shape == (100, 3, 64, 64) and ds.num_classes == 2
    assert set(b["label"].tolist()) == {0, 1} and (b["factors"][:, 6] == 0).all()
    assert ds.concept_names[:2] == ["shape=ring", "shape=cross"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"image_size": 8}, "too small"),
        ({"shapes": ["square", "hexagon"]}, "hexagon"),
        ({"shapes": []}, "non-empty"),
        ({"colours": ["teal"]}, "red"),
        ({"label_factor": "size"}, "pos_x"),
        ({"background": "stripes"}, "mixed"),
        ({"round_landmarks": "zero"}, "boundary"),
        ({"num_samples": 0}, "num_samples"),
        ({"split": "dev"}, "train"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"num_samples": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        ShapesDataset(**args)


def test_index_errors():
    ds = ShapesDataset(5, 32)
    with pytest.raises(IndexError):
        ds.get_batch([5])
    with pytest.raises(TypeError):
        ds["a"]  # noqa: B018
    assert torch.equal(ds[-1]["image"], ds[4]["image"])


# ---------------------------------------------------------------- augmentation


def test_flip_only_augmentation_is_an_exact_mirror_and_moves_landmarks():
    ds = ShapesDataset(16, 32, seed=0)
    b = ds.get_batch(range(16))
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0, jitter_prob=0.0,
                        grayscale_prob=0.0)
    v, lm = augment_batch(b["image"], b["index"], key=9, config=cfg, landmarks=b["landmarks"])
    torch.testing.assert_close(v, b["image"].flip(-1), atol=1e-5, rtol=0)
    expected = b["landmarks"].clone()
    expected[..., 1] = 31 - expected[..., 1]
    torch.testing.assert_close(lm, expected, equal_nan=True, atol=1e-4, rtol=0)


def test_crop_landmarks_follow_the_image():
    # a view's centre landmark is where the view's (rendered) shape centroid is
    ds = ShapesDataset(64, 32, seed=1, background="plain", shapes=["square", "circle", "cross"])
    b = ds.get_batch(range(64))
    cfg = AugmentConfig(crop_scale=(0.6, 0.9), jitter_prob=0.0, grayscale_prob=0.0)
    mask = b["mask"].float().expand(-1, 3, -1, -1)
    mv, lm = augment_batch(mask, b["index"], key=5, config=cfg, landmarks=b["landmarks"])
    w = mv[:, 0].double()
    grid = torch.arange(32, dtype=torch.float64)
    area = w.sum((1, 2))
    centroid = torch.stack([(w.sum(2) * grid).sum(1) / area, (w.sum(1) * grid).sum(1) / area], 1)
    inside = ~lm[:, 0].isnan().any(-1)
    # shapes fully inside the crop (centroid far from the border) keep centroid == mapped centre
    far = inside & (lm[:, 0] > 8).all(-1) & (lm[:, 0] < 23).all(-1)
    assert far.sum() > 10
    assert (centroid[far] - lm[far, 0].double()).norm(dim=1).max() < 1.0


def test_two_views_deterministic_per_epoch_and_view():
    ds = ShapesDataset(32, 32, seed=0, two_views=True)
    b1, b2 = ds.get_batch(range(8)), ds.get_batch(range(8))
    assert torch.equal(b1["views"][0], b2["views"][0]) and torch.equal(b1["views"][1], b2["views"][1])
    assert not torch.equal(b1["views"][0], b1["views"][1])
    assert not torch.equal(b1["views"][0], b1["image"])
    # the view of an example does not depend on its batch
    b3 = ds.get_batch([5, 3])
    assert torch.equal(b3["views"][0][1], b1["views"][0][3])
    ds.set_epoch(1)
    assert not torch.equal(ds.get_batch(range(8))["views"][0], b1["views"][0])
    for v in b1["views"]:
        assert v.shape == b1["image"].shape and v.min() >= 0 and v.max() <= 1
    assert "views" not in ds.without_views().get_batch([0])


def test_augment_config_validation():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentConfig(flip_prob=2.0)


# ---------------------------------------------------------------- datamodule


def test_datamodule_splits_loaders_and_properties():
    dm = ShapesDataModule(num_train=96, num_val=40, num_test=24, batch_size=32, seed=7, label_factor="colour")
    assert dm.num_classes == 6 and dm.image_shape == (3, 32, 32)
    train = list(dm.train_dataloader())
    assert [len(b["label"]) for b in train] == [32, 32, 32]
    seen = torch.cat([b["index"] for b in train])
    assert sorted(seen.tolist()) == list(range(96)) and not torch.equal(seen, torch.arange(96))  # shuffled
    ev = list(dm.eval_dataloader("val"))
    assert torch.equal(torch.cat([b["index"] for b in ev]), torch.arange(40))
    assert torch.equal(torch.cat([b["image"] for b in ev]), dm.dataset("val").get_batch(range(40))["image"])
    # splits are different draws
    assert not torch.equal(dm.dataset("train").factor_values[:24], dm.dataset("test").factor_values)
    assert dm.concept_matrix("val").shape == (40, len(dm.concept_names))
    assert set(dm.factors("test")) == set(FACTOR_NAMES)
    pred = next(iter(dm.predict_dataloader()))
    assert torch.equal(pred["index"], torch.arange(24)[:32])


def test_datamodule_two_views_train_and_val_but_not_eval():
    dm = ShapesDataModule(num_train=32, num_val=16, num_test=0, batch_size=8, two_views=True)
    tb = next(iter(dm.train_dataloader()))
    vb = next(iter(dm.val_dataloader()))
    eb = next(iter(dm.eval_dataloader("val")))
    assert len(tb["views"]) == 2 and tb["views"][0].shape == (8, 3, 32, 32)
    assert len(vb["views"]) == 2 and "views" not in eb
    with pytest.raises(ValueError, match="test split .* is empty"):
        dm.test_dataloader()


def test_datamodule_bad_arguments():
    with pytest.raises(ValueError, match="label_factor"):
        ShapesDataModule(label_factor="hue")
    with pytest.raises(ValueError, match="num_train"):
        ShapesDataModule(num_train=0)
    with pytest.raises(ValueError, match="too small"):
        ShapesDataModule(image_size=12)
    with pytest.raises(ValueError, match="split"):
        ShapesDataModule(num_train=8).dataset("dev")


def test_default_collate_also_works():
    ds = ShapesDataset(10, 32, two_views=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)  # default collate stacks per-item dicts
    b = next(iter(loader))
    ref = collate_dict_batch(ds.__getitems__([0, 1, 2, 3]))
    assert torch.equal(b["image"], ref["image"]) and torch.equal(b["views"][1], ref["views"][1])


def test_lightning_fit_sets_epoch_for_views():
    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3 * 32 * 32, 2)
            self.views = {}

        def training_step(self, batch, batch_idx):
            order = batch["index"].argsort()
            self.views[self.current_epoch] = (batch["index"][order], batch["views"][0][order])
            return self.lin(batch["views"][0].flatten(1)).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            assert len(batch["views"]) == 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = ShapesDataModule(num_train=8, num_val=8, num_test=8, batch_size=8, two_views=True)
    model = Probe()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    (i0, v0), (i1, v1) = model.views[0], model.views[1]
    assert torch.equal(i0, i1) and not torch.equal(v0, v1)  # new augmentations each epoch
    ds = dm.dataset("train")
    ds.set_epoch(1)
    assert torch.equal(ds.get_batch(i1)["views"][0], v1)  # and reproducible from (seed, epoch, index)


class _DDPProbe(pl.LightningModule):
    """Records the example ids every rank trains on (module level so ddp_spawn can pickle it)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.seen = []

    def training_step(self, batch, batch_idx):
        gathered = self.all_gather(batch["index"])  # (world, B)
        self.seen.append(gathered.reshape(-1).cpu())
        return self.lin(batch["views"][0].mean((1, 2, 3))[:, None]).mean() * 0

    def on_train_end(self):
        if self.global_rank == 0:
            torch.save(torch.cat(self.seen), self.trainer.default_root_dir + "/seen.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_ddp_two_ranks_partition_the_train_split(tmp_path):
    dm = ShapesDataModule(num_train=32, num_val=8, num_test=8, batch_size=4, two_views=True)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(_DDPProbe(), datamodule=dm)
    seen = torch.load(tmp_path / "seen.pt")
    assert sorted(seen.tolist()) == list(range(32))  # each example once, split across the two ranks


def test_dataloader_workers_share_the_epoch_stream():
    dm = ShapesDataModule(num_train=32, num_val=8, num_test=8, batch_size=8, num_workers=2, two_views=True)
    dl = dm.train_dataloader()
    dl.sampler.set_epoch(1)  # what Lightning calls before each epoch; workers start after it
    got = {int(i): v for b in dl for i, v in zip(b["index"], b["views"][0])}
    ds = dm.dataset("train")
    ds.set_epoch(1)
    ref = ds.get_batch(range(32))["views"][0]
    assert sorted(got) == list(range(32)) and all(torch.equal(got[i], ref[i]) for i in range(32))


@pytest.mark.gpu
def test_cuda_renders_the_same_images(cuda_device):
    ds = ShapesDataset(256, 32, seed=0)
    f, idx = ds.factor_values, torch.arange(256)
    img_cpu, mask_cpu = render_shapes(f, 32, index=idx)
    img_gpu, mask_gpu = render_shapes(f.to(cuda_device), 32, index=idx.to(cuda_device))
    # counter-based noise is bit-identical; masks may differ only at exact pixel-boundary ties
    assert (mask_cpu != mask_gpu.cpu()).sum() <= 5
    same = (mask_cpu == mask_gpu.cpu()).expand_as(img_cpu)
    # the uint8 rendering is bit-identical; x / 255 itself may differ by 1 ulp between CPU and CUDA kernels
    assert torch.equal((img_cpu[same] * 255).round(), (img_gpu.cpu()[same] * 255).round())
    lm = shape_landmarks(f.to(cuda_device), 32)
    torch.testing.assert_close(lm.cpu(), shape_landmarks(f, 32), equal_nan=True)
    v_cpu, _ = augment_batch(img_cpu, idx, key=1)
    v_gpu, _ = augment_batch(img_gpu, idx.to(cuda_device), key=1)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, atol=1e-4, rtol=0)

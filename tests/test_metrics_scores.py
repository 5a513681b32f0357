"""Tests of reprlens.scores.metrics: equal to the functional API, forward/full_state_update, DDP sync, Lightning."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reprlens.scores import Disentanglement, Informativeness, disentanglement, informativeness

D64 = torch.float64


def _batches(seed: int = 0, n_batches: int = 4, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 1, 4, 2][:n_batches]
    maps = [torch.rand(n, k, 3, 3, generator=g, dtype=D64) for n in sizes]
    ref = torch.rand(5, k, 3, 3, generator=g, dtype=D64)
    return maps, ref


class _FullStateInformativeness(Informativeness):
    full_state_update = True


class _FullStateDisentanglement(Disentanglement):
    full_state_update = True


def test_metric_attributes():
    for cls, upper in ((Informativeness, 1.0), (Disentanglement, 0.25)):
        assert cls.is_differentiable is True and cls.higher_is_better is True and cls.full_state_update is False
        assert cls.plot_lower_bound == 0.0 and cls.plot_upper_bound == upper
        metric = cls()
        assert metric._reductions["score_sum"] is not None and set(metric._defaults) == {"score_sum", "num_samples"}


@pytest.mark.parametrize("kwargs", [{}, {"reduce_dims": "var", "ddof": 1, "normalize_dims": True},
                                    {"reduce_dims": "abs", "normalization": "max"}])
def test_informativeness_metric_equals_functional(kwargs):
    maps, ref = _batches()
    metric = Informativeness(**kwargs).set_dtype(D64)
    for m in maps:
        metric.update(m, ref)
    expected = informativeness(torch.cat(maps), ref, **kwargs)
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-14, atol=0)
    assert int(metric.num_samples) == 10
    # float32 states (the default) agree to float32 precision
    metric32 = Informativeness(**kwargs)
    for m in maps:
        metric32.update(m, ref)
    assert metric32.compute().item() == pytest.approx(expected.item(), rel=1e-6)
    metric.reset()
    assert int(metric.num_samples) == 0 and float(metric.score_sum) == 0.0


@pytest.mark.parametrize("kwargs", [{}, {"ddof": 1}, {"spatial_reduction": "var"}, {"num_dims_total": 9},
                                    {"normalize": False}])
def test_disentanglement_metric_equals_functional(kwargs):
    maps, _ = _batches(1)
    metric = Disentanglement(**kwargs).set_dtype(D64)
    for m in maps:
        metric.update(m)
    torch.testing.assert_close(metric.compute(), disentanglement(torch.cat(maps), **kwargs), rtol=1e-14, atol=0)


@pytest.mark.parametrize(("cls", "full_cls", "with_ref"), [(Informativeness, _FullStateInformativeness, True),
                                                           (Disentanglement, _FullStateDisentanglement, False)])
def test_full_state_update_true_and_false_identical(cls, full_cls, with_ref):
    maps, ref = _batches(2)
    fast, full = cls().set_dtype(D64), full_cls().set_dtype(D64)
    assert full.full_state_update is True and fast.full_state_update is False
    fn = informativeness if with_ref else disentanglement
    for m in maps:
        args = (m, ref) if with_ref else (m,)
        batch_fast, batch_full = fast(*args), full(*args)
        torch.testing.assert_close(batch_fast, batch_full, rtol=0, atol=0)
        torch.testing.assert_close(batch_fast, fn(*args), rtol=1e-14, atol=0)
    torch.testing.assert_close(fast.compute(), full.compute(), rtol=0, atol=0)
    all_args = (torch.cat(maps), ref) if with_ref else (torch.cat(maps),)
    torch.testing.assert_close(fast.compute(), fn(*all_args), rtol=1e-14, atol=0)


def test_forward_is_differentiable_and_accumulates_detached():
    maps, ref = _batches(3)
    leaf = maps[0].clone().requires_grad_(True)
    metric = Disentanglement().set_dtype(D64)
    value = metric(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    leaf2 = maps[0].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(disentanglement(leaf2), leaf2)
    torch.testing.assert_close(grad, expected, rtol=1e-14, atol=0)
    assert not metric.score_sum.requires_grad  # the accumulated state holds no graph
    ns_leaf = maps[1].clone().requires_grad_(True)
    ns = Informativeness()(ns_leaf, ref)
    assert ns.requires_grad and ns.grad_fn is not None


def test_metric_validation_and_bad_arguments():
    maps, ref = _batches()
    bad = maps[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Disentanglement().update(bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        Informativeness().update(bad, ref)
    with pytest.raises(ValueError, match="agree in every axis"):
        Informativeness().update(maps[0], ref[:, :2])
    with pytest.raises(ValueError, match="got K=1"):
        Disentanglement().update(maps[0][:, :1])
    with pytest.raises(ValueError, match="`reduce_dims`"):
        Informativeness(reduce_dims="max")
    with pytest.raises(ValueError, match="spatial_reduction"):
        Disentanglement(spatial_reduction="none")
    with pytest.raises(TypeError, match="validate_args"):
        Disentanglement(validate_args="no")
    metric = Disentanglement(validate_args=False)
    metric.update(maps[0])  # no checks, same value
    assert metric.compute().item() == pytest.approx(disentanglement(maps[0]).item(), rel=1e-6)


def test_metric_state_dict_roundtrip():
    maps, _ = _batches(4)
    metric = Disentanglement()
    metric.persistent(True)
    for m in maps[:2]:
        metric.update(m)
    restored = Disentanglement()
    restored.persistent(True)
    restored.load_state_dict(metric.state_dict())
    for m in maps[2:]:
        restored.update(m)
        metric.update(m)
    torch.testing.assert_close(restored.compute(), metric.compute())


# ----------------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes, each updating its shard; compute() must equal the single-process result
# ----------------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        maps, ref = _batches(5)
        ns, vs = Informativeness().set_dtype(D64), Disentanglement().set_dtype(D64)
        for i, m in enumerate(maps):
            if i % world_size == rank:  # uneven shards: 3+4 samples on rank 0, 1+2 on rank 1
                ns.update(m, ref)
                vs.update(m)
        torch.save({"ns": ns.compute(), "vs": vs.compute(), "n": ns.num_samples.clone()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_sync_two_processes(tmp_path):
    world_size = 2
    # fork (Linux) avoids re-importing torch in the children; the workers use CPU tensors and gloo only
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size,
                       join=True, start_method=method)
    maps, ref = _batches(5)
    expected_ns = informativeness(torch.cat(maps), ref)
    expected_vs = disentanglement(torch.cat(maps))
    local_vs = disentanglement(torch.cat([maps[0], maps[2]]))  # what rank 0 would report without sync
    for rank in range(world_size):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(out["ns"], expected_ns, rtol=1e-14, atol=0)
        torch.testing.assert_close(out["vs"], expected_vs, rtol=1e-14, atol=0)
        assert int(out["n"]) == (7 if rank == 0 else 3)  # local state is restored after the synced compute
    assert (local_vs - expected_vs).abs() > 1e-4  # the check can fail: shards differ


# ----------------------------------------------------------------------------------------------------------
# usable from self.log in a LightningModule
# ----------------------------------------------------------------------------------------------------------


def test_log_from_lightning_module(tmp_path):
    import lightning.pytorch as pl

    maps, ref = _batches(6)
    data = torch.cat(maps).float()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.vs = Disentanglement()
            self.ns = Informativeness()

        def validation_step(self, batch, batch_idx):
            self.vs(batch)
            self.ns(batch, ref.float())
            self.log("val/vs", self.vs, on_epoch=True, batch_size=batch.shape[0])
            self.log("val/ns", self.ns, on_epoch=True, batch_size=batch.shape[0])

    loader = torch.utils.data.DataLoader(data, batch_size=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    (result,) = trainer.validate(Module(), loader, verbose=False)
    assert result["val/vs"] == pytest.approx(disentanglement(data.double()).item(), rel=1e-6)
    assert result["val/ns"] == pytest.approx(informativeness(data.double(), ref).item(), rel=1e-6)


def test_metric_plot_over_epochs():
    pytest.importorskip("matplotlib")
    maps, _ = _batches(7)
    metric = Disentanglement()
    values = [metric(m) for m in maps]
    fig, ax = metric.plot(values)
    assert ax.get_ylim()[0] <= 0.0 and ax.get_ylim()[1] >= 0.25 - 1e-9  # plot bounds [0, 0.25]
    import matplotlib.pyplot as plt

    plt.close(fig)

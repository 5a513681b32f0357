"""ActivationCollector / Activations / ActivationWriter."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from reprlens.invert import ActivationCollector, Activations
from reprlens.invert.collector import aggregate_output


class _Net(nn.Module):
    """conv (known weights) -> relu -> pool; layer "conv" output is 2 * x and -x per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([2.0, -1.0]).reshape(2, 1, 1, 1))
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        h = self.drop(torch.relu(self.conv(x)))
        return self.head(h.mean((2, 3)))


class _DictDS(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "index": i}


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(23, 1, 3, 3, generator=g) - 0.3


@pytest.mark.parametrize("aggregate", ["mean", "max", "none", "callable"])
def test_aggregations_match_manual(data, aggregate):
    model = _Net()
    out = torch.cat([2 * data, -data], 1)  # (N, 2, 3, 3)
    expect = {
        "mean": out.mean((2, 3)), "max": out.amax((2, 3)), "none": out.reshape(23, -1),
        "callable": out[:, :, 0, 0],
    }[aggregate]
    agg = (lambda o: o[:, :, 0, 0]) if aggregate == "callable" else aggregate
    loader = DataLoader(TensorDataset(data), batch_size=5)
    acts = ActivationCollector("conv", aggregate=agg).collect(model, loader)
    torch.testing.assert_close(acts.tensor(), expect, rtol=1e-6, atol=1e-6)
    if aggregate == "none":
        assert acts.meta["feature_shape"] == [2, 3, 3]


def test_rows_land_at_dataset_index_with_shuffle_and_workers(data, tmp_path):
    model = _Net()
    model.train()
    loader = DataLoader(_DictDS(data), batch_size=4, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(1))
    path = tmp_path / "acts.npy"
    acts = ActivationCollector("conv", path=path).collect(model, loader)
    torch.testing.assert_close(acts.tensor(), torch.cat([2 * data, -data], 1).mean((2, 3)))
    # training flags restored, hook removed
    assert model.training and model.drop.training
    assert len(model.conv._forward_hooks) == 0
    meta = json.loads((tmp_path / "acts.npy.json").read_text())
    assert meta["complete"] is True and meta["layer"] == "conv" and meta["N"] == 23 and meta["D"] == 2
    assert meta["aggregate"] == "mean" and meta["model"] == "_Net" and meta["dataset"] == "_DictDS"
    loaded = Activations.load(path)
    assert np.array_equal(np.asarray(loaded.array), acts.tensor().numpy())
    # an incomplete file is refused
    meta["complete"] = False
    (tmp_path / "acts.npy.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="incomplete"):
        Activations.load(path)
    with pytest.raises(ValueError, match="exists"):
        ActivationCollector("conv", path=path)


def test_hook_removed_after_exception_and_errors(data):
    model = _Net()

    def bad_input(batch):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        ActivationCollector("conv", input_fn=bad_input).collect(model, DataLoader(TensorDataset(data), batch_size=5))
    assert len(model.conv._forward_hooks) == 0
    with pytest.raises(ValueError, match="Closest"):
        ActivationCollector("cnv").collect(model, DataLoader(TensorDataset(data), batch_size=5))
    with pytest.raises(ValueError, match="aggregate"):
        ActivationCollector("conv", aggregate="median")
    nan = data.clone()
    nan[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ActivationCollector("conv").collect(model, DataLoader(TensorDataset(nan), batch_size=5))
    # drop_last leaves rows unwritten
    with pytest.raises(RuntimeError, match="never written"):
        ActivationCollector("conv").collect(model, DataLoader(TensorDataset(data), batch_size=5, drop_last=True))


def test_tokens_channel_last():
    out = torch.arange(24.0).reshape(2, 3, 4)  # (batch, tokens, channels)
    torch.testing.assert_close(aggregate_output(out, "mean", channel_dim=-1), out.mean(1))
    torch.testing.assert_close(aggregate_output(out, "max", channel_dim=-1), out.amax(1))


class _LitNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _Net()

    def forward(self, x):
        return self.net(x)

    def predict_step(self, batch, batch_idx):
        return self(batch["image"])


def test_activation_writer_matches_collect(data, tmp_path):
    lit = _LitNet()
    loader = DataLoader(_DictDS(data), batch_size=6, shuffle=False)
    ref = ActivationCollector("net.conv", aggregate="max").collect(lit, loader)
    writer = ActivationCollector("net.conv", aggregate="max", path=tmp_path / "w.npy").callback()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer], default_root_dir=tmp_path)
    trainer.predict(lit, loader, return_predictions=False)
    assert writer.result is not None
    assert np.array_equal(writer.result.tensor().numpy(), ref.tensor().numpy())
    assert len(lit.net.conv._forward_hooks) == 0
    assert json.loads((tmp_path / "w.npy.json").read_text())["complete"] is True


def _ddp_worker(rank, world, path, port, data):
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        ds = _DictDS(data)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(ds, batch_size=3, sampler=sampler)
        ActivationCollector("conv", path=path, overwrite=True).collect(_Net(), loader)
        mem = ActivationCollector("conv").collect(_Net(), loader)
        if rank == 0:
            torch.save(mem.tensor(), str(path) + ".mem.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_cpu_ranks_gives_single_process_file(tmp_path):
    import socket

    import torch.multiprocessing as mp

    data = torch.rand(10, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "ddp.npy"
    mp.spawn(_ddp_worker, args=(2, path, port, data), nprocs=2, join=True)
    single = ActivationCollector("conv").collect(_Net(), DataLoader(_DictDS(data), batch_size=4)).tensor()
    assert np.array_equal(Activations.load(path).tensor().numpy(), single.numpy())
    assert torch.equal(torch.load(str(path) + ".mem.pt"), single)


def test_explain_accepts_activation_files(data, tmp_path):
    from reprlens.invert import ConceptSet, Invert

    model = _Net()
    path = tmp_path / "a.npy"
    acts = ActivationCollector("conv", aggregate="max", path=path).collect(model, DataLoader(TensorDataset(data)))
    cs = ConceptSet(torch.stack([data[:, 0, 0, 0] > 0.2, data[:, 0, 1, 1] > 0.4], 1), names=["p", "q"], warn=False)
    inv = Invert(cs, max_length=2, beam_size=2, alpha=0.05)
    direct = inv.explain(acts.tensor())
    for src in (path, str(path), acts):
        other = inv.explain(src)
        assert other.formula == direct.formula and np.array_equal(other.auc, direct.auc)
    sub = inv.explain(path, neurons=[1])
    assert set(sub.neuron.tolist()) == {1} and sub.formula == direct.for_neuron(1).formula

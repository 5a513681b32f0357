"""ClassPureBatchSampler, ghost BatchNorm, id adapters, plots and the `info` CLI."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from reprlens.trace import ClassPureBatchSampler, real_rows, use_ghost_batchnorm
from reprlens.trace.ids import WithIndex, hash_id, index_key, lightly, position, to_id_tensor


def labels(n=50, k=3):
    return torch.tensor([i % k for i in range(n)] + [0] * 7)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_pure_ghosts_once_per_epoch(drop_last):
    y = labels()
    s = ClassPureBatchSampler(y, batch_size=8, ghost_samples=3, seed=1, drop_last=drop_last)
    batches = list(s)
    assert len(batches) == len(s)
    counts = collections.Counter()
    for b in batches:
        real, ghosts = b[:-3], b[-3:]
        assert len(ghosts) == 3 and len(set(ghosts)) == 3
        assert len({int(y[i]) for i in real}) == 1
        assert 1 <= len(real) <= 5
        counts.update(real)
    if not drop_last:
        assert sorted(counts) == list(range(len(y))) and set(counts.values()) == {1}
    else:
        assert set(counts.values()) == {1} and all(len(b) == 8 for b in batches)
    # deterministic per seed and epoch
    assert batches == list(ClassPureBatchSampler(y, 8, 3, seed=1, drop_last=drop_last))
    s.set_epoch(1)
    assert list(s) != batches


def test_sampler_ddp_ranks_share_the_class_with_disjoint_members():
    y = labels()
    r0 = list(ClassPureBatchSampler(y, 6, 2, seed=0, num_replicas=2, rank=0))
    r1 = list(ClassPureBatchSampler(y, 6, 2, seed=0, num_replicas=2, rank=1))
    assert len(r0) == len(r1)
    seen = []
    for b0, b1 in zip(r0, r1):
        real0, real1 = b0[:-2], b1[:-2]
        assert not set(real0) & set(real1)
        assert {int(y[i]) for i in real0 + real1} == {int(y[real0[0]])}
        seen += real0 + real1
    assert sorted(seen) == list(range(len(y)))


def test_sampler_bad_args():
    with pytest.raises(ValueError, match="ghost_samples < batch_size"):
        ClassPureBatchSampler(labels(), 4, 4)
    with pytest.raises(ValueError, match="rank"):
        ClassPureBatchSampler(labels(), 4, 1, num_replicas=2, rank=2)


def test_ghost_batchnorm_uses_ghost_statistics():
    bn = nn.BatchNorm1d(3)
    net = use_ghost_batchnorm(nn.Sequential(bn), ghost_samples=4)
    x = torch.randn(10, 3) * 2 + 1
    y = net(x)
    g = x[-4:]
    ref = (x - g.mean(0)) / torch.sqrt(g.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(bn.running_mean, 0.1 * g.mean(0))
    net.eval()
    torch.testing.assert_close(net(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                                                 bn.bias, False, 0.1, bn.eps))
    assert torch.equal(real_rows(torch.arange(10), 4), torch.arange(6))


def test_id_adapters():
    ds = WithIndex([(torch.zeros(2), 1), (torch.ones(2), 0)])
    assert ds[1][0] == 1 and len(ds) == 2
    assert WithIndex([{"image": 1}])[0] == {"image": 1, "index": 0}
    assert position(0)((torch.tensor([3, 4]), None)).tolist() == [3, 4]
    assert index_key("idx")({"idx": torch.tensor([5])}).tolist() == [5]
    ids = lightly()((None, None, ["a.png", "b.png"]))
    assert ids.tolist() == [hash_id("a.png"), hash_id("b.png")]
    with pytest.raises(TypeError, match="integer"):
        to_id_tensor(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="idx"):
        index_key("idx")({"index": torch.tensor([1])})


def _cc(n_classes, single=False):
    from reprlens.trace.reader import ClassContributions

    g = torch.Generator().manual_seed(0)
    pts = []
    for c in range(n_classes):
        k = 1 if single and c == 0 else 12
        pts.append((torch.rand(k, generator=g) * 2 - 1, torch.rand(k, generator=g)))
    score = torch.randn(1, n_classes, generator=g)
    return ClassContributions(torch.arange(n_classes), score, score.abs(), score, [pts])


@pytest.mark.parametrize("n_classes", [1, 3, 10])
def test_plots_return_figures(n_classes):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from reprlens.plotting import plot_class_ridges, plot_top_examples
    from reprlens.trace.reader import TopK

    fig = plot_class_ridges(_cc(n_classes, single=True), layer="fc", row_scale="mass", top_classes=5)
    assert isinstance(fig, Figure)
    tk = TopK(torch.arange(6)[None], torch.linspace(1, 0, 6)[None], torch.zeros(1, 6, dtype=torch.long), True, "score")
    op = TopK(torch.arange(3)[None], -torch.ones(1, 3), None, False, "score")
    fig2 = plot_top_examples((tk, op), lambda i: torch.rand(3, 8, 8), ncols=4, test_image=torch.rand(8, 8))
    assert isinstance(fig2, Figure)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_info_cli(tmp_path, capsys):
    from reprlens.trace import TraceRecorder
    from reprlens.trace.__main__ import main

    net = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with TraceRecorder(net, ["0"], tmp_path) as rec:
        rec.begin_step(torch.arange(4))
        net(torch.randn(4, 3)).sum().backward()
        rec.before_optimizer_step(opt)
        opt.step()
        rec.end_step()
    assert main(["info", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "last complete step: 1" in out and "layer 0" in out

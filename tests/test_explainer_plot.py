"""Explainer plots: part maps with receptive-field boxes and the p / rel_err trajectory."""

from __future__ import annotations

import pytest
import torch

from reprlens.explainer_net import ReceptiveField


def test_plot_part_maps_and_trajectory(tmp_path):
    pytest.importorskip("matplotlib")
    from reprlens.plotting import plot_p_rel_err, plot_part_maps, save_figure

    rf = ReceptiveField((1.5, 1.5), (4.0, 4.0), (18.0, 18.0))
    maps = torch.zeros(6, 3, 8, 8)
    maps[torch.arange(6), 0, torch.arange(6), 2] = torch.arange(1, 7).float()  # image 5 fires most
    fig = plot_part_maps(torch.rand(6, 1, 32, 32), maps, rf, filters=[0, 1], top=3,
                         landmarks=torch.rand(6, 2, 2) * 31)
    assert len(fig.axes) == 6
    assert fig.axes[0].get_title().startswith("#5")  # sorted by peak value
    box = fig.axes[0].patches[0]  # receptive field at the peak (row 5, col 2) -> centre (21.5, 9.5)
    assert box.get_xy() == (9.5 - 9, 21.5 - 9) and box.get_width() == 18
    fig2 = plot_p_rel_err([{"p_mean": 0.5, "rel_err": 0.6, "p_q05": 0.4, "p_q95": 0.6},
                           {"p_mean": 0.8, "rel_err": 0.3, "p_q05": 0.7, "p_q95": 0.9}])
    assert len(fig2.axes) == 2
    save_figure(fig2, tmp_path / "traj.png")
    assert (tmp_path / "traj.png").stat().st_size > 0

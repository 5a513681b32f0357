"""plot_attribution_maps: grid layout, normalisation, bad input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")

from reprlens.plotting import plot_attribution_maps  # noqa: E402


def test_grid_shape_and_normalised_images():
    images = torch.rand(5, 3, 8, 8)
    maps = torch.randn(5, 4, 4, 4) * 10
    fig = plot_attribution_maps(images, maps, dims=[2, 0], max_samples=3, dim_names=["a", "b"])
    assert len(fig.axes) == 3 * 3
    assert fig.axes[1].get_title() == "a"
    shown = fig.axes[1].images[0].get_array()
    assert shown.min() == pytest.approx(0.0) and shown.max() == pytest.approx(1.0)
    matplotlib.pyplot.close(fig)


def test_bad_input():
    with pytest.raises(ValueError, match="transform"):
        plot_attribution_maps(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 3, 4, 4))
    with pytest.raises(ValueError, match="dims"):
        plot_attribution_maps(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 4, 4), dims=[3])
    with pytest.raises(ValueError, match="N=2"):
        plot_attribution_maps(torch.rand(3, 3, 8, 8), torch.rand(2, 3, 4, 4))

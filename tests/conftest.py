"""Shared test fixtures. Tests run on CPU with few threads so the suite fits a 2-core CI machine."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HYDRA_FULL_ERROR", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        yield


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")

"""Run by tests/test_regularization.py: 2-process gloo DDP fit of one regularised step; saves per-rank grads."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_regularization import GradRecorder, TinyNet, _data, _loader  # noqa: E402

from reprlens.callbacks import ExplanationRegularization  # noqa: E402


def main(out_dir: str, strategy: str) -> None:
    torch.manual_seed(0)
    model = TinyNet().double()
    x, y = _data(n=8)
    noise = torch.rand(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rec = GradRecorder()
    cb = ExplanationRegularization("backbone", "head", informativeness=0.2, disentanglement=0.5, noise=noise)
    trainer = pl.Trainer(
        callbacks=[cb, rec], max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=2, strategy=strategy, precision="64-true",
        use_distributed_sampler=True,
    )
    trainer.fit(model, _loader(x, y, 4))
    if rec.grads:
        torch.save(rec.grads[0], Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp")

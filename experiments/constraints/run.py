#!/usr/bin/env python
"""E1: training with explanation constraints (the attribution paper's section 4.5 analogue), small scale.

Autoencoder + jointly trained linear head on scikit-learn digits (bilinearly upsampled to 28x28), the
reference architecture (spec 5.5 E1): encoder conv1 1->8 5x5 -> BN(no stats, no affine, eps 1e-4) ->
softplus -> maxpool -> conv2 8->4 5x5 -> BN -> softplus -> maxpool -> flatten -> fc1 196->K (no bias);
decoder Linear(K, 32) -> ReLU -> Linear(32, 784); classifier Linear(K, 10) on z. Loss CE + MSE.
Constraint: source = input of conv2, target = fc1, head BatchNorm per sample (the reference's batch-of-one
semantics), dense schedule (every step, 16 explained images, grad x act, lin, ddof 0, 8 noise images),
alpha = 0.1. Objectives: normal / informativeness / disentanglement / both.

Reports the joint head's validation accuracy (last and best epoch), a frozen linear probe's accuracy on
the embedding (reprlens LinearProbe), the final scores and the step time, as mean +- sd over seeds, and the
paired difference to `normal` per seed. Also SimCLR on shapes (normal vs both) with `--simclr`.

    python experiments/constraints/run.py --dims 2 3 5 10 --seeds 0 1 2 --epochs 15
    python experiments/constraints/run.py --simclr --seeds 0 1 2 --epochs 4
    python experiments/constraints/run.py --collect          # rebuild the tables from results/*.json

Results go to experiments/constraints/results/ (one JSON per run) and the tables to results/tables.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from reprlens.callbacks import ExplanationRegularization, LinearProbe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OBJECTIVES = {
    "normal": (0.0, 0.0),
    "informativeness": (0.1, 0.0),
    "disentanglement": (0.0, 0.1),
    "both": (0.1, 0.1),
}


class ReferenceEncoder(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8, affine=False, track_running_stats=False, eps=1e-4)
        self.act1 = nn.Softplus()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 4, 5, padding=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4, affine=False, track_running_stats=False, eps=1e-4)
        self.act2 = nn.Softplus()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(196, k, bias=False)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Input of conv2 -> z."""
        return self.fc1(self.flatten(self.pool2(self.act2(self.bn2(self.conv2(h))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool1(self.act1(self.bn1(self.conv1(x)))))


class ReferenceAE(pl.LightningModule):
    """An ordinary LightningModule: no reprlens code inside."""

    def __init__(self, k: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = ReferenceEncoder(k)
        self.decoder = nn.Sequential(nn.Linear(k, 32), nn.ReLU(), nn.Linear(32, 784))
        self.classifier = nn.Linear(k, 10)

    def forward(self, x):
        return self.encoder(x)

    def _losses(self, batch):
        x, y = batch["image"], batch["label"]
        z = self.encoder(x)
        logits = self.classifier(z)
        ce = F.cross_entropy(logits, y)
        mse = F.mse_loss(torch.sigmoid(self.decoder(z)), x.flatten(1))
        acc = (logits.argmax(1) == y).float().mean()
        return ce, mse, acc

    def training_step(self, batch, batch_idx):
        ce, mse, acc = self._losses(batch)
        self.log_dict({"train/ce": ce, "train/mse": mse, "train/acc": acc}, on_step=False, on_epoch=True)
        return ce + mse

    def validation_step(self, batch, batch_idx):
        ce, mse, acc = self._losses(batch)
        self.log_dict({"val/ce": ce, "val/mse": mse, "val/acc": acc}, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class History(pl.Callback):
    def __init__(self) -> None:
        self.val_acc: list[float] = []
        self.step_times: list[float] = []
        self.scores: dict[str, float] = {}
        self._t = 0.0

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val/acc" in trainer.callback_metrics:
            self.val_acc.append(float(trainer.callback_metrics["val/acc"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_times.append(time.process_time() - self._t)
        for key in ("reg/informativeness", "reg/disentanglement"):
            if key in trainer.callback_metrics:
                self.scores[key] = float(trainer.callback_metrics[key])


def _trainer(epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, deterministic=False,
    )


def run_ae(objective: str, k: int, seed: int, epochs: int, alpha: float = 0.1) -> dict:
    from reprlens.data import DigitsDataModule

    pl.seed_everything(seed, workers=True)
    dm = DigitsDataModule(image_size=28, channels=1, batch_size=64, seed=0)
    model = ReferenceAE(k)
    hist = History()
    probe = LinearProbe(progress_bar=False)
    callbacks: list = [hist, probe]
    w_ns, w_vs = (w * alpha / 0.1 for w in OBJECTIVES[objective])
    if w_ns or w_vs:
        callbacks.append(ExplanationRegularization(
            "encoder.conv2", "encoder.fc1", informativeness=w_ns, disentanglement=w_vs,
            attribute_to_source_input=True, head=lambda m, h: m.encoder.head(h), head_batchnorm="per_sample",
            num_samples=16, num_noise=8, seed=seed,
        ))
    t0 = time.time()
    _trainer(epochs, callbacks).fit(model, datamodule=dm)
    return {
        "study": "autoencoder_digits", "objective": objective if alpha == 0.1 or objective == "normal"
        else f"{objective} (alpha={alpha:g})", "K": k, "seed": seed, "epochs": epochs, "alpha": alpha,
        "val_acc_last": hist.val_acc[-1], "val_acc_best": max(hist.val_acc),
        "probe_val_acc": probe.results.get("linear_val_acc"), "probe_test_acc": probe.results.get("linear_test_acc"),
        "knn_val_acc": probe.results.get("knn_val_acc"),
        "step_ms": 1000 * statistics.median(hist.step_times), **{k_: v for k_, v in hist.scores.items()},
        "wall_s": time.time() - t0,
    }


def run_simclr(objective: str, seed: int, epochs: int) -> dict:
    from reprlens.data import ShapesDataModule
    from reprlens.models import SimCLR

    pl.seed_everything(seed, workers=True)
    dm = ShapesDataModule(num_train=4000, num_val=1000, num_test=1000, batch_size=128, two_views=True, seed=0)
    model = SimCLR(width=16)
    hist = History()
    probe = LinearProbe(progress_bar=False)
    callbacks: list = [hist, probe]
    w_ns, w_vs = OBJECTIVES[objective]
    if w_ns or w_vs:
        callbacks.append(ExplanationRegularization("backbone.layer3", "projector", informativeness=w_ns,
                                                   disentanglement=w_vs, seed=seed))
    t0 = time.time()
    _trainer(epochs, callbacks).fit(model, datamodule=dm)
    return {
        "study": "simclr_shapes", "objective": objective, "K": 64, "seed": seed, "epochs": epochs,
        "probe_val_acc": probe.results.get("linear_val_acc"), "probe_test_acc": probe.results.get("linear_test_acc"),
        "knn_val_acc": probe.results.get("knn_val_acc"),
        "step_ms": 1000 * statistics.median(hist.step_times), **{k_: v for k_, v in hist.scores.items()},
        "wall_s": time.time() - t0,
    }


def _fmt(values: list[float], scale: float = 100.0) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    digits = 1 if scale == 100.0 else 3
    return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def collect() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    lines = []
    for study, cols in (
        ("autoencoder_digits", ("val_acc_last", "val_acc_best", "probe_val_acc", "probe_test_acc")),
        ("simclr_shapes", ("probe_val_acc", "probe_test_acc", "knn_val_acc")),
    ):
        sub = [r for r in rows if r["study"] == study]
        if not sub:
            continue
        lines.append(f"\n### {study}\n")
        head = ["objective", "K", "seeds", *cols, "Δ probe_val vs normal (paired)", "NS", "VS", "step ms"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for k in sorted({r["K"] for r in sub}):
            base = {r["seed"]: r for r in sub if r["K"] == k and r["objective"] == "normal"}
            for obj in sorted({r["objective"] for r in sub}, key=lambda o: (o.split(" ")[0] not in OBJECTIVES,
                                                                              list(OBJECTIVES).index(o.split(" ")[0]), o)):
                rs = [r for r in sub if r["K"] == k and r["objective"] == obj]
                if not rs:
                    continue
                diffs = [r["probe_val_acc"] - base[r["seed"]]["probe_val_acc"] for r in rs if r["seed"] in base]
                cells = [obj, str(k), str(len(rs)), *(_fmt([r.get(c) for r in rs]) for c in cols),
                         _fmt(diffs) if obj != "normal" else "—",
                         _fmt([r.get("reg/informativeness") for r in rs], 1.0) if obj.split(" ")[0] in ("informativeness", "both") else "—",
                         _fmt([r.get("reg/disentanglement") for r in rs], 1.0) if obj.split(" ")[0] in ("disentanglement", "both") else "—",
                         f"{statistics.median([r['step_ms'] for r in rs]):.1f}"]
                lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "tables.md").write_text(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3, 5, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--alpha", type=float, default=0.1, help="weight of each active score (reference: 0.1)")
    p.add_argument("--simclr", action="store_true", help="run the SimCLR-on-shapes study instead")
    p.add_argument("--collect", action="store_true", help="only rebuild the tables from results/*.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        for seed in args.seeds:
            for obj in args.objectives:
                if args.simclr:
                    if obj not in ("normal", "both"):
                        continue
                    out, name = run_simclr(obj, seed, args.epochs), f"simclr_{obj}_s{seed}.json"
                    (RESULTS / name).write_text(json.dumps(out, indent=2))
                    print(json.dumps(out))
                    continue
                for k in args.dims:
                    suffix = "" if args.alpha == 0.1 or obj == "normal" else f"_a{args.alpha:g}"
                    out, name = run_ae(obj, k, seed, args.epochs, args.alpha), f"ae_{obj}{suffix}_K{k}_s{seed}.json"
                    (RESULTS / name).write_text(json.dumps(out, indent=2))
                    print(json.dumps(out))
    print(collect())


if __name__ == "__main__":
    main()

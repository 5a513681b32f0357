"""Does the linear probe measure what SimCLR learns? Probe accuracy of raw pixels, a random-init backbone
and the backbone after each SimCLR epoch, on procedural shapes (label = shape, 5 classes).

    python experiments/linear_probe/run.py                      # defaults below, CPU
    python experiments/linear_probe/run.py --epochs 2 --num-train 500   # smoke run

Writes ``results.json`` next to this file (or ``--out``) and prints a table. Expectation: the probe and
kNN accuracies of the trained backbone rise above the random-init backbone; raw pixels are a reference.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from reprlens.callbacks import LinearProbe
from reprlens.callbacks.linear_probe import collect_embeddings, fit_linear_probe, knn_accuracy
from reprlens.data import ShapesDataModule
from reprlens.models import SimCLR


def probe_features(train, val, test, k: int = 20) -> dict[str, float]:
    res = fit_linear_probe(*train, *val, *test)
    out = {f"linear_{key}": v for key, v in res.items()}
    out["knn_val_acc"] = knn_accuracy(*train, *val, k)
    out["knn_test_acc"] = knn_accuracy(*train, *test, k)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-eval", type=int, default=500)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    start = time.time()

    dm = ShapesDataModule(num_train=args.num_train, num_val=args.num_eval, num_test=args.num_eval,
                          batch_size=args.batch_size, two_views=True, seed=args.seed)
    dm.setup("fit")
    results: dict[str, dict[str, float]] = {}

    # raw pixels (flattened) as a reference representation
    flat = torch.nn.Flatten()
    pix = {s: collect_embeddings(flat, dm.eval_dataloader(s), device="cpu") for s in ("train", "val", "test")}
    results["pixels"] = probe_features(pix["train"], pix["val"], pix["test"])

    model = SimCLR(width=args.width)
    dev = torch.device(args.device)
    model.to(dev)
    emb = {s: collect_embeddings(model, dm.eval_dataloader(s), device=dev) for s in ("train", "val", "test")}
    results["random_init"] = probe_features(emb["train"], emb["val"], emb["test"])
    model.cpu()

    probe = LinearProbe(every_n_epochs=1, knn_k=20, progress_bar=False)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1,
                         callbacks=[probe], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    for h in probe.history:
        results[f"simclr_epoch{int(h['epoch']) + 1}"] = {k: v for k, v in h.items() if k not in ("epoch", "step")}

    keys = ["linear_train_acc", "linear_val_acc", "linear_test_acc", "knn_val_acc", "knn_test_acc"]
    print(f"{'representation':<18}" + "".join(f"{k:>18}" for k in keys))
    for name, res in results.items():
        print(f"{name:<18}" + "".join(f"{res[k]:>18.3f}" for k in keys))
    meta = {k.replace("-", "_"): v for k, v in vars(args).items() if k != "out"}
    meta["wall_s"] = round(time.time() - start, 1)
    Path(args.out).write_text(json.dumps({"config": meta, "results": results}, indent=2))
    print(f"wrote {args.out} ({meta['wall_s']} s)")


if __name__ == "__main__":
    main()

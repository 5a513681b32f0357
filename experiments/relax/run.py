"""RELAX on procedural shapes: does a trained SimCLR encoder look at the object more than an untrained one?

The shapes data set knows each image's object mask, so we can measure how much of the RELAX importance
falls inside the object. Trains a small SimCLR (reprlens.models.SimCLR) for a few epochs on CPU with a
RelaxMonitor callback attached (its PNG grids show the maps move during training), then explains the same
validation images with the untrained (same initial weights) and the trained backbone.

Metrics per image (mean +- standard error over images):
  top-k precision: fraction of the k most important pixels inside the object, k = object area
                   (chance = object area fraction; 1 = all top pixels on the object)
  mass inside:     share of the min-max scaled importance that lies inside the object
  pointing game:   argmax of the importance inside the object
  mean R inside - mean R outside, in units of the per-pixel standard error

Run (about 5-10 min on a busy 2-core CPU):
    python experiments/relax/run.py
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from reprlens.callbacks import RelaxMonitor
from reprlens.data import ShapesDataModule
from reprlens.models import SimCLR
from reprlens.plotting import plot_relax, save_figure
from reprlens.relax import Relax

HERE = Path(__file__).resolve().parent


def metrics(result, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image localisation metrics of the importance maps against boolean object masks (N, H, W)."""
    imp = result.importance.float().flatten(1)
    inside = masks.flatten(1)
    area = inside.sum(1)
    order = imp.argsort(1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(imp.shape[1]).expand_as(order))
    topk = ((ranks < area[:, None]) & inside).sum(1) / area
    lo, hi = imp.amin(1, keepdim=True), imp.amax(1, keepdim=True)
    scaled = (imp - lo) / (hi - lo).clamp_min(1e-12)
    mass = (scaled * inside).sum(1) / scaled.sum(1)
    pointing = inside.gather(1, imp.argmax(1, keepdim=True))[:, 0].float()
    se = result.standard_error.float().flatten(1)
    gap = (imp * inside).sum(1) / area - (imp * ~inside).sum(1) / (~inside).sum(1)
    gap_se = gap / se.mean(1)
    return {
        "topk_precision": topk,
        "mass_inside": mass,
        "pointing_game": pointing,
        "gap_in_SE": gap_se,
        "chance(area)": area.float() / imp.shape[1],
    }


def summarize(m: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    return {k: (float(v.mean()), float(v.std() / v.numel() ** 0.5)) for k, v in m.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--num-train", type=int, default=2048)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--num-masks", type=int, default=2000)
    p.add_argument("--num-cells", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, workers=True)
    t0 = time.time()

    dm = ShapesDataModule(num_train=args.num_train, num_val=256, num_test=64, batch_size=128, two_views=True, seed=0)
    dm.setup("fit")
    batches, count = [], 0
    for b in dm.eval_dataloader("val"):
        batches.append(b)
        count += b["image"].shape[0]
        if count >= args.num_images:
            break
    images = torch.cat([b["image"] for b in batches])[: args.num_images]
    masks = torch.cat([b["mask"] for b in batches])[: args.num_images, 0]
    background = torch.cat([b["factors"] for b in batches])[: args.num_images, -1]  # 0 plain, 1 noise
    subsets = {"all": torch.ones_like(background, dtype=torch.bool), "plain bg": background == 0, "noise bg": background != 0}

    model = SimCLR(width=16, lr=2e-3)
    untrained = copy.deepcopy(model.backbone).eval()
    relax_kwargs = {"num_cells": args.num_cells}
    monitor = RelaxMonitor(
        images[:8], every_n_epochs=max(1, args.epochs // 2), num_masks=500, relax_kwargs=relax_kwargs,
        dirpath=args.out / "monitor", seed=0,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[monitor], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=args.out / "run",
    )
    trainer.fit(model, datamodule=dm)
    t_train = time.time() - t0
    trained = model.backbone.eval()
    (args.out / "run").mkdir(parents=True, exist_ok=True)
    torch.save({"trained": trained.state_dict(), "untrained": untrained.state_dict()}, args.out / "run" / "backbones.pt")

    results, summary = {}, {}
    explainer_kw = dict(num_masks=args.num_masks, num_cells=args.num_cells, seed=0, batch_size=200)
    for name, enc in (("untrained", untrained), ("trained", trained)):
        t = time.time()
        res = Relax(enc, **explainer_kw).explain(images)
        results[name] = res
        m = metrics(res, masks)
        for sub, sel in subsets.items():
            summary[f"{name} / {sub} (n={int(sel.sum())})"] = summarize({k: v[sel] for k, v in m.items()})
        summary[name] = summarize(m)
        summary[name]["relax_seconds"] = (time.time() - t, 0.0)
        fig = plot_relax(images, res, max_images=6, title=f"RELAX, {name} SimCLR backbone ({args.num_masks} masks, min-max per map)",
                         scale="per_image")
        save_figure(fig, args.out / "figures" / f"relax_{name}.png")

    # bar chart of the headline metrics
    from reprlens.plotting import require_matplotlib

    plt = require_matplotlib()
    keys = ["topk_precision", "mass_inside", "pointing_game"]
    fig, ax = plt.subplots(figsize=(6, 3))
    w = 0.27
    for i, name in enumerate(("untrained", "trained")):
        ax.bar([j + (i - 0.5) * w for j in range(3)], [summary[name][k][0] for k in keys], w,
               yerr=[summary[name][k][1] for k in keys], label=name)
    chance = summary["trained"]["chance(area)"][0]
    ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance (object area {chance:.2f})")
    ax.set_xticks(range(3), keys)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"Importance on the object, {args.num_images} val images")
    fig.tight_layout()
    save_figure(fig, args.out / "figures" / "relax_localisation.png")

    print(f"training {t_train:.0f}s ({args.epochs} epochs, {args.num_train} images), threads={torch.get_num_threads()}")
    cols = [k for k in summary["trained"] if k != "relax_seconds"]
    print("| encoder / images | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for key, val in summary.items():
        if " / " in key:
            print(f"| {key} | " + " | ".join(f"{val[c][0]:.3f} ± {val[c][1]:.3f}" for c in cols) + " |")
    for name in ("untrained", "trained"):
        print(f"RELAX time {name}: {summary[name]['relax_seconds'][0]:.1f}s for {args.num_images} images")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "train_seconds": t_train, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()

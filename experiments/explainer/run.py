"""Explainer network on procedural shapes (spec explainer_network.md, issue 8 item 6).

For several seeds: train a small ``Classifier`` (the performer) on ``ShapesDataModule`` for a few epochs,
then distil explainers from its last conv stage (``features.relu3``, 8x8 grid, start 1.5, jump 4) on
cached features, 8 epochs each, in three variants:

* ``default``: spec defaults (``λ_f = 0.5``, ``batch_peak`` κ=4, p reward η=0.05 capped at 0.9);
* ``no_filter_loss``: ``λ_f = 0`` (masks only), the filter-loss ablation;
* ``uncapped``: p reward without the cap (the p-collapse direction of spec 5.6).

Reported per run and epoch: ``rel_err`` and ``p_mean`` jointly (p-collapse guard), performer-head accuracy
on reconstructed vs original features, location instability of the explainer's interpretable filters vs
the performer's target filters (shape centre + corner landmarks), ``filter_loss`` and ``p_collapsed``.
Figures: part maps of explainer and performer filters (seed 0), p / rel_err trajectories.

Run: ``python experiments/explainer/run.py [--seeds 0 1 2] [--epochs 8] [--out experiments/explainer/results]``
(about 6-8 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reprlens.data import ShapesDataModule
from reprlens.explainer_net import ExplainerModule, FeatureCache
from reprlens.models import Classifier
from reprlens.plotting import plot_p_rel_err, plot_part_maps, save_figure

VARIANTS = {
    "default": {},
    "no_filter_loss": {"filter_loss_weight": 0.0},
    "uncapped": {"p_cap": None},
}
TARGET = "features.relu3"


def train_performer(dm: ShapesDataModule, seed: int, epochs: int) -> tuple[Classifier, float]:
    torch.manual_seed(seed)
    net = Classifier(in_channels=3, num_classes=dm.num_classes, channels=(16, 32, 32))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(epochs):
        for batch in dm.train_dataloader():
            loss = F.cross_entropy(net(batch["image"]), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in dm.eval_dataloader("val"):
            correct += int((net(batch["image"]).argmax(1) == batch["label"]).sum())
            total += batch["label"].numel()
    return net, correct / total


def distil(net, dm, cache, seed, epochs, **kw):
    torch.manual_seed(seed)
    example = next(iter(dm.eval_dataloader("train")))
    steps = math.ceil(len(cache) / 64)
    mod = ExplainerModule(net, TARGET, example_batch=example, steps_per_epoch=steps, **kw)
    opt = mod.configure_optimizers()
    history, step = [], 0
    for ep in range(epochs):
        mod.train()
        fl, nb = 0.0, 0
        for b in cache.dataloader(64, generator=torch.Generator().manual_seed(seed * 100 + ep)):
            loss, _, logs = mod.compute_loss(mod.features(b), mod.current_p_reward_weight(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            fl += float(logs["filter_loss"])
            nb += 1
        mod.eval()
        for b in dm.eval_dataloader("val"):
            mod.update_metrics(b)
        mod._fl_sum, mod._fl_count = torch.tensor(fl), nb
        res = mod.compute_metrics()
        res["epoch"] = ep + 1
        res["p_reward_weight"] = mod.current_p_reward_weight(step)
        history.append(res)
    return mod, history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--performer-epochs", type=int, default=3)
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results: dict = {"config": vars(args), "runs": {}}
    for seed in args.seeds:
        dm = ShapesDataModule(num_train=args.num_train, num_val=500, num_test=1, batch_size=64, seed=seed)
        dm.setup("fit")
        net, acc = train_performer(dm, seed, args.performer_epochs)
        print(f"seed {seed}: performer val acc {acc:.3f} ({time.time() - t0:.0f}s)", flush=True)
        cache = FeatureCache.build(net, TARGET, dm.eval_dataloader("train"), progress=False)
        for name, kw in VARIANTS.items():
            mod, hist = distil(net, dm, cache, seed, args.epochs, **kw)
            results["runs"][f"{name}/seed{seed}"] = {"performer_val_acc": acc, "history": hist}
            last = hist[-1]
            print(f"  {name:15s} p={last['p_mean']:.3f} rel_err={last['rel_err']:.3f} "
                  f"acc rec/orig={last.get('acc_reconstructed', float('nan')):.3f}/"
                  f"{last.get('acc_original', float('nan')):.3f} instab expl/perf="
                  f"{last['location_instability/explainer']:.4f}/{last['location_instability/performer']:.4f} "
                  f"collapsed={last['p_collapsed']:+.0f} ({time.time() - t0:.0f}s)", flush=True)
            if seed == args.seeds[0]:
                save_figure(plot_p_rel_err(hist, title=f"{name}, seed {seed}"), out / f"p_rel_err_{name}.png")
                if name == "default":
                    batch = next(iter(dm.eval_dataloader("val")))
                    expl = mod.explain(batch)
                    tgt = mod.features(batch)["target"]
                    lm = batch["landmarks"]
                    save_figure(plot_part_maps(batch["image"], expl.interpretable, mod.rf, filters=range(6), top=5,
                                               landmarks=lm, title="explainer interpretable filters"),
                                out / "part_maps_explainer.png")
                    save_figure(plot_part_maps(batch["image"], tgt, mod.rf, filters=range(6), top=5, landmarks=lm,
                                               title="performer filters (features.relu3)"),
                                out / "part_maps_performer.png")
    summary = {}
    for name in VARIANTS:
        lasts = [results["runs"][f"{name}/seed{s}"]["history"][-1] for s in args.seeds]
        summary[name] = {k: (statistics.mean(d[k] for d in lasts), statistics.pstdev(d[k] for d in lasts))
                         for k in ("p_mean", "rel_err", "acc_reconstructed", "acc_original",
                                   "location_instability/explainer", "location_instability/performer",
                                   "filter_loss", "p_collapsed") if all(k in d for d in lasts)}
    results["summary"] = summary
    results["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print("\nsummary, mean ± sd over seeds", args.seeds)
    for name, s in summary.items():
        print(f"  {name}: " + ", ".join(f"{k}={m:.4f}±{sd:.4f}" for k, (m, sd) in s.items()))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

"""INVERT on the shapes dataset: labels of a trained SimCLR's units vs an untrained one, and planted concepts.

1. Planted-concept recovery: synthetic units built from the shapes concepts (single, AND, OR, NOT,
   anti-concept in negative mode) plus Gaussian noise, labelled with the default semantics and with the
   reference's [0, 0.5] fraction interval.
2. A SimCLR (reprlens.models.SimCLR) trained a few epochs on two-view shapes, with the ConceptLabeler
   callback on ``backbone.pool`` every epoch (label drift); the same architecture at initialisation
   (same seed) labelled the same way. Reported: best AUC, share of units with a significant label
   after Bonferroni and after permutation correction, top labels, figures.

Usage: python experiments/invert/run.py [--epochs 4] [--num-train 4000] [--out experiments/invert]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from reprlens.callbacks import ConceptLabeler
from reprlens.data import ShapesDataModule
from reprlens.invert import ActivationCollector, ConceptSet, Invert
from reprlens.models import SimCLR
from reprlens.plotting.common import save_figure
from reprlens.plotting.invert import plot_concept_labels

ALPHA = 0.01  # labels must hold on >= 1 % and <= 99 % of the images (20 of 2000)
PLANTED = [
    ("single", "shape=circle", "positive"),
    ("AND", "shape=square & colour=red", "positive"),
    ("OR", "shape=ring | shape=circle", "positive"),
    ("AND-NOT", "warm_colour & ~shape=triangle", "positive"),
    ("NOT (anti-concept)", "~background=noise", "positive"),
    ("negative mode", "pos_x=left", "negative"),
]


def planted_table(cs: ConceptSet, noise: float, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    cols = []
    for _, formula, mode in PLANTED:
        t = cs.evaluate(formula).double()
        sign = -1.0 if mode == "negative" else 1.0
        cols.append(sign * t + noise * torch.randn(cs.num_samples, generator=g, dtype=torch.float64))
    acts = torch.stack(cols, 1)
    out = []
    default_pos = Invert(cs, max_length=3, beam_size=3).explain(acts).best()
    default_neg = Invert(cs, max_length=3, beam_size=3, mode="negative").explain(acts).best()
    ref_pos = Invert(cs, max_length=3, beam_size=3, compat="reference", min_fraction=0.002).explain(acts).best()
    own = Invert(cs, correction=None).score(acts, [f for _, f, _ in PLANTED])
    for d, (kind, formula, mode) in enumerate(PLANTED):
        length = sum(1 for tok in formula.split() if tok not in "&|")
        short = Invert(cs, max_length=length, beam_size=3, mode=mode).explain(acts[:, d]).best()
        own_auc = float(own.auc[(own.neuron == d) & (own.rank == d)][0])
        dm = default_neg if mode == "negative" else default_pos
        i = int(np.nonzero(dm.neuron == d)[0][0])
        j = int(np.nonzero(ref_pos.neuron == d)[0][0])
        truth = cs.evaluate(formula)
        found = torch.equal(dm.truth_vector(i), truth)
        out.append({
            "kind": kind, "planted": formula, "mode": mode, "noise": noise,
            "default": dm.formula[i], "default_auc": float(dm.auc[i]), "recovered": found,
            "log10_p_corr": float(dm.log_p_corrected[i] / np.log(10)), "planted_auc": own_auc,
            "default_L_planted": short.formula[0], "default_L_planted_auc": float(short.auc[0]),
            "recovered_L_planted": bool(torch.equal(short.truth_vector(0), truth)),
            "reference_positive": ref_pos.formula[j], "reference_auc": float(ref_pos.auc[j]),
        })
    return out


def label_units(model: torch.nn.Module, loader, cs: ConceptSet, layer: str, n_perm: int) -> dict:
    acts = ActivationCollector(layer, aggregate="mean").collect(model, loader, device="cpu").tensor()
    shapes = cs.select([n for n in cs.names if n.startswith("shape=")])
    res_s = Invert(shapes, max_length=1, beam_size=1, alpha=ALPHA).explain(acts).best()
    res_s2 = Invert(shapes, max_length=2, beam_size=3, alpha=ALPHA).explain(acts).best()
    res_b = Invert(cs, max_length=3, beam_size=3, alpha=ALPHA).explain(acts)
    res_p = Invert(cs, max_length=3, beam_size=3, alpha=ALPHA, correction="permutation",
                   n_permutations=n_perm).explain(acts)
    best_b, best_p = res_b.best(), res_p.best()
    return {
        "result": res_b,
        "units": int(acts.shape[1]),
        "best_auc_mean": float(best_b.auc.mean()),
        "best_auc_median": float(np.median(best_b.auc)),
        "frac_auc_gt_0.9": float((best_b.auc > 0.9).mean()),
        "sig_uncorrected": float((best_b.p_value <= 0.05).mean()),
        "sig_bonferroni": float((best_b.p_corrected <= 0.05).mean()),
        "sig_permutation": float((best_p.p_corrected <= 0.05).mean()),
        "distinct_best_labels": len(set(best_b.formula)),
        "acts": acts,
        "shape_L1_auc_mean": float(res_s.auc.mean()),
        "shape_L1_frac_auc_gt_0.75": float((res_s.auc > 0.75).mean()),
        "shape_L1_sig_bonferroni": float((res_s.p_corrected <= 0.05).mean()),
        "shape_L2_auc_mean": float(res_s2.auc.mean()),
        "shape_L2_best": sorted(zip(res_s2.auc.round(4).tolist(), res_s2.formula), reverse=True)[:5],
        "best_label_mentions_shape": float(np.mean(["shape=" in f for f in best_b.formula])),
        "concepts_used": sorted({tok.strip("~()") for f in best_b.formula for tok in f.split() if tok not in "&|"}),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-val", type=int, default=2000)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--permutations", type=int, default=200)
    p.add_argument("--out", default="experiments/invert")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    pl.seed_everything(args.seed, workers=True)
    dm = ShapesDataModule(num_train=args.num_train, num_val=args.num_val, num_test=0, image_size=32,
                          batch_size=128, two_views=True, seed=args.seed)
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cs = ConceptSet.from_shapes(dm, split="val")
    summary: dict = {"num_concepts": cs.num_concepts, "concept_names": cs.names, "num_val": cs.num_samples}

    # 1. planted concepts
    planted = planted_table(cs, 0.5) + planted_table(cs, 1.5)
    summary["planted"] = planted

    # 2. untrained vs trained SimCLR (same initialisation)
    torch.manual_seed(args.seed)
    model = SimCLR(width=args.width)
    untrained = SimCLR(width=args.width)
    untrained.load_state_dict(model.state_dict())
    loader = dm.eval_dataloader("val")
    t0 = time.time()
    summary["untrained"] = label_units(untrained, loader, cs, "backbone.pool", args.permutations)
    t_label = time.time() - t0
    labeler = ConceptLabeler("backbone.pool", cs, loader, every_n_epochs=1, max_length=3, beam_size=3,
                             alpha=ALPHA, dirpath=out / "run" / "concept_labels", top_k=20)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, callbacks=[labeler],
                         limit_val_batches=0, default_root_dir=out / "run")
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    t_fit = time.time() - t0
    summary["trained"] = label_units(model, loader, cs, "backbone.pool", args.permutations)
    torch.save(model.state_dict(), out / "run" / "simclr_trained.pt")
    summary["drift"] = [
        {"epoch": r["epoch"], "label_change_fraction": r["label_change_fraction"],
         "best_auc_mean": float(np.mean(list(r["aucs"].values())))} for r in labeler.runs
    ]
    for name in ("untrained", "trained"):
        res = summary[name].pop("result")
        np.save(out / "run" / f"activations_{name}.npy", summary[name].pop("acts").numpy())
        fig = plot_concept_labels(res, top_k=20, title=f"SimCLR backbone.pool ({name}), top 20 units")
        save_figure(fig, out / f"labels_{name}.png")
        res.to_csv(out / f"labels_{name}.csv")
        b = res.best()
        order = np.argsort(-b.auc, kind="stable")[:10]
        summary[name]["top10"] = [
            {"unit": int(b.neuron[i]), "formula": b.formula[i], "auc": round(float(b.auc[i]), 4),
             "fraction": round(float(b.fraction[i]), 4), "p_corrected": float(b.p_corrected[i])} for i in order
        ]
    summary["timing_s"] = {"label_untrained": round(t_label, 1), "fit_with_labeler": round(t_fit, 1),
                           "total": round(time.time() - t_start, 1)}
    summary["args"] = vars(args)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "concept_names"}, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Training-trace experiment on the bundled digits with deliberately mislabelled training examples.

A small CNN is trained with plain SGD (so the representation-mode trace is exact) while two ``TrainingTrace``
callbacks record:

* ``mode="tracin"`` on the last Linear layer ``fc`` (a checkpoint pass at every epoch end), and
* ``mode="representation"`` on ``fc1`` (the 64-d embedding) and ``fc`` (logits).

Then:

1. **Self-influence ranking** (TracIn): do the flipped examples rank first?
2. **Influential examples** for chosen test images (representation mode, layer ``fc1``): the top proponents and
   opponents of the change of the test image's embedding, and the per-class ridge plot.
3. **Completeness** (``W_0 + Σ_i A_i = W_T``, ``Σ_i s_i = ‖Δz‖``).

Run from the repository root (about 2-4 minutes on one CPU thread):

    python experiments/trace/run.py                # writes figures + results.json next to this file
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning.pytorch as L
from reprlens.callbacks import TrainingTrace
from reprlens.data.digits import load_digits_tensors
from reprlens.plotting.common import save_figure
from reprlens.trace.plots import plot_class_ridges, plot_top_examples

HERE = Path(__file__).resolve().parent


class DictDS(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "index": i}


class SmallCNN(L.LightningModule):
    def __init__(self, lr=0.05):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc = nn.Linear(64, 10)
        self.lr = lr

    def forward(self, x):
        return self.fc(torch.relu(self.fc1(self.features(x).flatten(1))))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def per_example_ce(module, batch):
    return nn.functional.cross_entropy(module(batch["image"]), batch["label"], reduction="none")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--n-flip", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the trace stores go (default: a temp dir)")
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    out = Path(args.out)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="reprlens_trace_exp_"))

    x, y = load_digits_tensors(16)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(y), generator=g)
    tr_idx, te_idx = perm[:1400], perm[1400:]
    x_tr, y_clean, x_te, y_te = x[tr_idx], y[tr_idx], x[te_idx], y[te_idx]
    y_tr = y_clean.clone()
    flipped = torch.randperm(len(y_tr), generator=g)[: args.n_flip]
    y_tr[flipped] = (y_tr[flipped] + torch.randint(1, 10, (args.n_flip,), generator=g)) % 10
    ds = DictDS(x_tr, y_tr)
    train_dl = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    eval_dl = DataLoader(ds, batch_size=256, shuffle=False)

    tracin = TrainingTrace("fc", mode="tracin", dirpath=work / "tracin", loss_fn=per_example_ce,
                           tracin_dataloader=eval_dl, dtype="float32", overwrite=True)
    rep = TrainingTrace(["fc1", "fc"], dirpath=work / "representation", dtype="float32", overwrite=True,
                        flush_every_n_steps=100)
    model = SmallCNN()
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[tracin, rep], default_root_dir=work)
    t0 = time.time()
    trainer.fit(model, train_dl)
    train_s = time.time() - t0
    model.eval()
    with torch.no_grad():
        test_acc = float((model(x_te).argmax(1) == y_te).float().mean())
        train_pred = model(x_tr).argmax(1)

    # 1. self-influence
    r_tr = tracin.reader()
    si = r_tr.self_influence()
    order = torch.argsort(si.scores, descending=True)
    ranked_ids = si.ids[order]
    is_flipped = torch.zeros(len(y_tr), dtype=torch.bool)
    is_flipped[flipped] = True
    flags = is_flipped[ranked_ids]
    k = args.n_flip
    ranks_of_flipped = sorted(int(torch.nonzero(ranked_ids == int(f))[0, 0]) + 1 for f in flipped)
    # AUC of self-influence for flipped vs clean
    s_np = si.scores.numpy()
    pos, neg = s_np[is_flipped.numpy()], s_np[~is_flipped.numpy()]
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    loss_rank = None
    with torch.no_grad():
        losses = per_example_ce(model, {"image": x_tr, "label": y_tr})
    loss_order = torch.argsort(losses, descending=True)
    loss_prec = float(is_flipped[loss_order[:k]].float().mean())
    loss_rank = loss_prec
    results = {
        "epochs": args.epochs, "n_train": len(y_tr), "n_flipped": k, "test_acc": test_acc, "train_seconds": train_s,
        "checkpoints": len(r_tr.checkpoints()),
        "self_influence_precision_at_k": float(flags[:k].float().mean()),
        "self_influence_precision_at_2k": float(flags[: 2 * k].float().sum() / k),
        "self_influence_auc": auc, "ranks_of_flipped": ranks_of_flipped,
        "final_loss_precision_at_k": loss_rank,
        "flipped_fit_to_wrong_label": int((train_pred[flipped] == y_tr[flipped]).sum()),
        "flipped_ids": sorted(flipped.tolist()),
        "flipped_true_labels": {int(i): int(y_clean[i]) for i in flipped},
        "flipped_recorded_labels": {int(i): int(y_tr[i]) for i in flipped},
    }

    plt = __import__("reprlens.plotting.common", fromlist=["require_matplotlib"]).require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(np.arange(1, len(order) + 1), si.scores[order].numpy(), color="0.5", lw=1)
    fr = np.array(ranks_of_flipped)
    ax.scatter(fr, si.scores[order][fr - 1].numpy(), color="tab:red", zorder=3, s=14, label="flipped label")
    ax.set_xscale("log")
    ax.set_xlabel("rank by self-influence")
    ax.set_ylabel("TracIn self-influence")
    ax.legend()
    ax.set_title(f"{k} flipped of {len(y_tr)}: precision@{k} = {results['self_influence_precision_at_k']:.2f}")
    fig.tight_layout()
    save_figure(fig, out / "self_influence.png")
    top = r_tr.top_k(si, 16)
    fig = plot_top_examples(top, lambda i: x_tr[i], ncols=8,
                            title="highest self-influence (title: id, recorded label, score); true labels "
                                  + ", ".join(f"{int(i)}:{int(y_clean[i])}" for i in top.ids[0][:8]))
    save_figure(fig, out / "self_influence_top16.png")

    # 2. representation mode: influential examples for chosen test images
    r_rep = rep.reader()
    comp = r_rep.completeness()
    results["weight_completeness_rel"] = comp.weight_error_rel
    chosen = [0, 1, 2]
    res = r_rep.contributions(x_te[chosen], "fc1", model=model)
    results["score_sum_rel_error"] = float(((res.score.double().sum(1) - res.delta_z_norm.double()).abs()
                                            / res.delta_z_norm.double()).max())
    results["sum_c_rel_error"] = float(res.completeness_error.max())
    cc = r_rep.class_contributions(res)
    results["test_images"] = []
    for j, m in enumerate(chosen):
        pro = r_rep.top_k(res, 8, proponents=True)
        opp = r_rep.top_k(res, 8, proponents=False)
        fig = plot_top_examples((pro, opp), lambda i: x_tr[i], index=j, ncols=8, test_image=x_te[m],
                                title=f"test image {m} (label {int(y_te[m])}): proponents / opponents of Δz at fc1")
        save_figure(fig, out / f"influential_test{m}.png")
        fig = plot_class_ridges(cc, layer="fc1", index=j, highlight=int(y_te[m]))
        save_figure(fig, out / f"ridges_test{m}.png")
        results["test_images"].append({
            "test_index": m, "label": int(y_te[m]),
            "top_proponents": pro.ids[j].tolist(), "proponent_labels": pro.labels[j].tolist(),
            "top_opponents": opp.ids[j].tolist(), "opponent_labels": opp.labels[j].tolist(),
            "class_scores": {int(c): float(s) for c, s in zip(cc.classes, cc.score[j])},
            "flipped_among_top8_proponents": int(is_flipped[pro.ids[j]].sum()),
            "flipped_among_top8_opponents": int(is_flipped[opp.ids[j]].sum()),
            "proponent_true_labels": y_clean[pro.ids[j]].tolist(),
            "opponent_true_labels": y_clean[opp.ids[j]].tolist(),
            "proponents_with_same_label": int((pro.labels[j] == int(y_te[m])).sum()),
        })
    plt.close("all")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print("trace stores in", work)


if __name__ == "__main__":
    main()

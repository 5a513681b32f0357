"""Downstream evaluation of a representation: linear probe and kNN accuracy on frozen embeddings.

Functional core (plain torch, runs on the embeddings' device):

* :func:`collect_embeddings`: frozen embeddings + labels of a data loader (eval mode, no grad).
* :func:`fit_linear_probe`: a linear classifier on standardised train embeddings (full-batch L-BFGS
  multinomial logistic regression, or closed-form ridge), accuracy on every given split.
* :func:`knn_predict` / :func:`knn_accuracy`: cosine k-nearest-neighbour classification, vectorised.

The :class:`LinearProbe` callback calls them at the end of training (and every ``n`` epochs) and reports
``probe/linear_val_acc``, ``probe/knn_val_acc``, ... through the trainer's loggers. This is how reprlens
measures "downstream performance" of a representation trained without labels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from tqdm.auto import tqdm

from reprlens.utils import check_finite_nonneg, check_positive_int, get_module

try:  # Lightning >= 2.0 ships typing_extensions; fall back to a no-op decorator
    from typing_extensions import override
except ImportError:  # pragma: no cover
    def override(f):  # type: ignore[no-redef]
        return f

__all__ = ["LinearProbe", "collect_embeddings", "fit_linear_probe", "knn_accuracy", "knn_predict"]

EmbeddingFn = Callable[[nn.Module, Tensor], Tensor]
_PROBES = ("logistic", "ridge")
_KNN_WEIGHTS = ("uniform", "exp")
_SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------------------ helpers
def _unpack(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(images, labels)`` of a reprlens dict batch or an ``(x, y, ...)`` tuple."""
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(
                f"LinearProbe expected dict batches with 'image' and 'label', but got keys {sorted(batch)}."
            )
        return batch["image"], batch.get("label")
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Sequence) and len(batch) > 0 and isinstance(batch[0], Tensor):
        return batch[0], batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
    raise TypeError(
        f"LinearProbe expected batches as dicts ('image', 'label') or (images, labels) tuples, but got "
        f"{type(batch).__name__}."
    )


def _pool(out: Any) -> Tensor:
    """Module output -> ``(N, D)``: first element of tuples, spatial mean of 4D maps, flatten otherwise."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"Expected the embedding to be a tensor, but got {type(out).__name__}.")
    if out.dim() == 4:
        return out.mean(dim=(2, 3))
    if out.dim() == 1:
        return out.unsqueeze(1)
    return out.flatten(1)


def _check_xy(x: Tensor, y: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"Expected `{name}_x` and `{name}_y` to be tensors, but got {type(x).__name__} and "
            f"{type(y).__name__}."
        )
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Expected `{name}_x` of shape (N, D) and `{name}_y` of shape (N,), but got {tuple(x.shape)} and "
            f"{tuple(y.shape)}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"The {name} split is empty: the probe needs at least one example.")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"Expected integer class labels in `{name}_y`, but got dtype {y.dtype}.")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        rows = (~torch.isfinite(x)).any(1).nonzero().flatten()
        raise ValueError(
            f"Expected finite embeddings in `{name}_x`, but {rows.numel()} of {x.shape[0]} rows contain NaN or Inf "
            f"(e.g. rows {rows[:5].tolist()}). The representation has diverged or overflowed; check the training "
            "loss (or embed in float32) before probing."
        )


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------ embeddings
@torch.no_grad()
def collect_embeddings(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    embedding_fn: EmbeddingFn | None = None,
    layer: str | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress_bar: bool = False,
    desc: str = "embeddings",
) -> tuple[Tensor, Tensor]:
    """Frozen embeddings and labels of every batch of ``dataloader``.

    The model is put in eval mode under ``torch.no_grad`` and every submodule's training flag is restored
    afterwards. Embeddings are ``embedding_fn(model, x)`` if given, else the output of the submodule
    ``layer`` (dotted name; 4D outputs are average-pooled over space) during ``model(x)``, else
    ``model(x)``.

    Args:
        model: the network (a LightningModule or any ``nn.Module``).
        dataloader: yields dict batches (``"image"``, ``"label"``) or ``(x, y)`` tuples.
        embedding_fn: ``(model, x) -> (N, D)`` embeddings.
        layer: dotted module name whose output is the embedding (exclusive with ``embedding_fn``).
        max_batches: stop after this many batches.
        device: where to run the model and keep the embeddings (default: the model's parameters' device).
        progress_bar: show a tqdm bar.
        desc: tqdm description.

    Returns:
        ``(embeddings (N, D) float, labels (N,) int64)`` on ``device``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> loader = [(torch.randn(5, 1, 2, 2), torch.arange(5))]
        >>> x, y = collect_embeddings(net, loader, layer="1")
        >>> x.shape, y.tolist()
        (torch.Size([5, 3]), [0, 1, 2, 3, 4])
    """
    if embedding_fn is not None and layer is not None:
        raise ValueError("Pass either `embedding_fn` or `layer`, not both.")
    check_positive_int(max_batches, "max_batches", allow_none=True)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    captured: list[Tensor] = []
    handle = None
    if layer is not None:
        module = get_module(model, layer)
        handle = module.register_forward_hook(lambda m, i, o: captured.append(_pool(o)))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        total = None
        try:
            total = len(dataloader)  # type: ignore[arg-type]
        except TypeError:
            pass
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        bar = tqdm(dataloader, desc=desc, total=total, disable=not progress_bar, leave=False)
        for i, batch in enumerate(bar):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _unpack(batch)
            if y is None:
                raise ValueError(
                    "LinearProbe needs class labels: the batches have none. Pass loaders whose batches carry "
                    "'label' (dict) or (images, labels) tuples."
                )
            x = x.to(device, non_blocking=True)
            if embedding_fn is not None:
                emb = _pool(embedding_fn(model, x))
            elif layer is not None:
                captured.clear()
                model(x)
                if not captured:
                    raise RuntimeError(
                        f"Layer {layer!r} was not called during model(x); pick a layer on the forward path."
                    )
                emb = captured[0]
            else:
                emb = _pool(model(x))
            feats.append(emb.detach().to(_work_dtype(emb)))
            labels.append(y.to(device).long())
    finally:
        if handle is not None:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    if not feats:
        raise ValueError("The data loader yielded no batches; the probe needs at least one.")
    return torch.cat(feats), torch.cat(labels)


# ------------------------------------------------------------------------------------------------ kNN
def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    query_x: Tensor,
    k: int = 20,
    *,
    num_classes: int | None = None,
    weights: str = "uniform",
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Cosine k-nearest-neighbour class predictions, vectorised over queries (in chunks).

    ``weights="uniform"`` is a majority vote among the ``k`` most cosine-similar training points (ties go
    to the smallest class index, like scikit-learn's ``KNeighborsClassifier(metric="cosine")``);
    ``weights="exp"`` weights each neighbour by ``exp(similarity / temperature)`` (the kNN monitor of
    InstDisc / solo-learn).

    Args:
        train_x: ``(N, D)`` reference embeddings.
        train_y: ``(N,)`` integer labels.
        query_x: ``(M, D)`` embeddings to classify.
        k: neighbours (clamped to ``N``).
        num_classes: number of classes (default ``train_y.max() + 1``).
        weights: ``"uniform"`` or ``"exp"``.
        temperature: temperature of ``"exp"`` weights.
        chunk_size: queries per similarity block (memory ``chunk_size * N``).

    Returns:
        ``(M,)`` int64 predicted labels.

    Example:
        >>> tx = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> knn_predict(tx, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.05], [0.1, 1.0]]), k=1).tolist()
        [0, 1]
    """
    _check_xy(train_x, train_y, "train")
    if query_x.dim() != 2 or query_x.shape[1] != train_x.shape[1]:
        raise ValueError(
            f"Expected `query_x` of shape (M, {train_x.shape[1]}), but got {tuple(query_x.shape)}."
        )
    check_positive_int(k, "k")
    check_positive_int(chunk_size, "chunk_size")
    if weights not in _KNN_WEIGHTS:
        raise ValueError(f"Expected `weights` in {list(_KNN_WEIGHTS)}, but got {weights!r}.")
    if temperature <= 0:
        raise ValueError(f"Expected `temperature` > 0, but got {temperature!r}.")
    c = int(num_classes) if num_classes is not None else int(train_y.max()) + 1
    if int(train_y.min()) < 0 or int(train_y.max()) >= c:
        raise ValueError(
            f"Expected train labels in [0, {c}) (num_classes={c}), but got range "
            f"[{int(train_y.min())}, {int(train_y.max())}]."
        )
    k = min(k, train_x.shape[0])
    dtype = _work_dtype(train_x)
    ref = F.normalize(train_x.to(dtype), dim=1)
    labels = train_y.to(ref.device).long()
    preds = []
    for start in range(0, query_x.shape[0], chunk_size):
        q = F.normalize(query_x[start : start + chunk_size].to(ref.device, dtype), dim=1)
        sim, idx = (q @ ref.T).topk(k, dim=1)
        vote = torch.ones_like(sim) if weights == "uniform" else (sim / temperature).exp()
        counts = torch.zeros(q.shape[0], c, device=ref.device, dtype=dtype).scatter_add_(1, labels[idx], vote)
        preds.append(counts.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=ref.device)


def knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    k: int = 20,
    **kwargs: Any,
) -> float:
    """Accuracy of :func:`knn_predict` on ``(query_x, query_y)``; keyword arguments are passed on.

    Example:
        >>> tx = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> knn_accuracy(tx, torch.tensor([0, 1]), tx, torch.tensor([0, 1]), k=1)
        1.0
    """
    _check_xy(query_x, query_y, "query")
    pred = knn_predict(train_x, train_y, query_x, k, **kwargs)
    return float((pred == query_y.to(pred.device)).to(torch.float64).mean())


# ---------------------------------------------------------------------------------------------- linear probe
def _standardizer(x: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    if not standardize:
        return torch.zeros_like(x[0]), torch.ones_like(x[0])
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-8 * std.abs().max().clamp_min(1e-30), std, torch.ones_like(std))


def _fit_logistic(
    x: Tensor, y: Tensor, c: int, max_iter: int, weight_decay: float, tol: float
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression by L-BFGS with the analytic gradient (no autograd graph).

    Objective ``mean_i CE(x_i W + b, y_i) + weight_decay / 2 * ||W||^2``; gradient
    ``X^T (softmax - onehot) / N + weight_decay * W`` and ``sum_i (softmax - onehot)_i / N``.
    Computed in the class-major layout (``(C, N)`` logits, ``(C, D)`` weights): on CPU BLAS the skinny
    products ``(C, D) @ (D, N)`` and ``(C, N) @ (N, D)`` are several times faster than ``(N, D) @ (D, C)``.
    """
    with torch.inference_mode(False), torch.no_grad():
        x = x.clone()  # normal (non-inference) tensors, so L-BFGS may update them in place
        xt = x.T
        onehot_t = F.one_hot(y.clone(), c).to(x.dtype).T.contiguous()  # (C, N)
        n = x.shape[0]
        w = torch.zeros(c, x.shape[1], device=x.device, dtype=x.dtype)  # (C, D)
        b = torch.zeros(c, 1, device=x.device, dtype=x.dtype)
        opt = torch.optim.LBFGS(
            [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=tol, tolerance_change=1e-12,
        )

        def closure() -> Tensor:
            with torch.no_grad():
                logits = torch.addmm(b, w, xt)  # (C, N)
                lse = logits.logsumexp(dim=0, keepdim=True)
                nll = (lse - (logits * onehot_t).sum(dim=0, keepdim=True)).mean()
                loss = nll + 0.5 * weight_decay * (w * w).sum()
                resid = (logits - lse).exp_().sub_(onehot_t).div_(n)  # (softmax - onehot) / N
                w.grad = torch.addmm(w, resid, x, beta=weight_decay)
                b.grad = resid.sum(dim=1, keepdim=True)
            return loss

        opt.step(closure)
    return w.T, b.squeeze(1)


def _fit_ridge(x: Tensor, y: Tensor, c: int, alpha: float) -> tuple[Tensor, Tensor]:
    target = F.one_hot(y, c).to(x.dtype)
    x_mean, t_mean = x.mean(dim=0), target.mean(dim=0)
    xc, tc = x - x_mean, target - t_mean
    n, d = xc.shape
    if d <= n:  # primal: (X^T X + a I) W = X^T T
        w = torch.linalg.solve(xc.T @ xc + alpha * torch.eye(d, device=x.device, dtype=x.dtype), xc.T @ tc)
    else:  # dual: W = X^T (X X^T + a I)^-1 T
        w = xc.T @ torch.linalg.solve(xc @ xc.T + alpha * torch.eye(n, device=x.device, dtype=x.dtype), tc)
    return w, t_mean - x_mean @ w


def fit_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor | None = None,
    val_y: Tensor | None = None,
    test_x: Tensor | None = None,
    test_y: Tensor | None = None,
    *,
    num_classes: int | None = None,
    method: str = "logistic",
    max_iter: int = 100,
    weight_decay: float = 1e-4,
    tol: float = 1e-5,
    ridge_alpha: float = 1.0,
    standardize: bool = True,
) -> dict[str, float]:
    """Fit a linear classifier on frozen train embeddings and report its accuracy on each split.

    Features are standardised with the train mean/std. ``method="logistic"`` fits multinomial logistic
    regression with full-batch L-BFGS (strong-Wolfe line search, zero initialisation, so the result is
    deterministic without a seed) and an L2 penalty ``weight_decay / 2 * ||W||^2``;
    ``method="ridge"`` solves one-vs-rest ridge regression on one-hot targets in closed form (primal or
    dual, whichever system is smaller). Everything runs on the embeddings' device.

    Args:
        train_x, train_y: ``(N, D)`` embeddings and ``(N,)`` integer labels to fit on.
        val_x, val_y: optional validation split.
        test_x, test_y: optional test split.
        num_classes: number of classes (default: 1 + largest label over all splits).
        method: ``"logistic"`` or ``"ridge"``.
        max_iter: at most this many L-BFGS iterations (logistic).
        weight_decay: L2 penalty on the weights (logistic).
        tol: stop L-BFGS when the largest absolute gradient entry is below ``tol`` (logistic; the
            objective is a mean over samples, as scikit-learn's ``LogisticRegression(tol=...)``).
        ridge_alpha: ridge penalty (ridge).
        standardize: standardise features with the train statistics.

    Returns:
        ``{"train_acc": ..., "val_acc": ..., "test_acc": ...}`` (only the splits given).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(40) % 2
        >>> x = torch.randn(40, 3, generator=g) + 4 * y[:, None]
        >>> fit_linear_probe(x, y, x, y)["val_acc"]
        1.0
    """
    _check_xy(train_x, train_y, "train")
    splits: dict[str, tuple[Tensor, Tensor]] = {"train": (train_x, train_y)}
    for name, (sx, sy) in (("val", (val_x, val_y)), ("test", (test_x, test_y))):
        if (sx is None) != (sy is None):
            raise ValueError(f"Pass both `{name}_x` and `{name}_y`, or neither.")
        if sx is not None and sy is not None:
            _check_xy(sx, sy, name)
            if sx.shape[1] != train_x.shape[1]:
                raise ValueError(
                    f"Expected `{name}_x` with {train_x.shape[1]} features like `train_x`, "
                    f"but got {sx.shape[1]}."
                )
            splits[name] = (sx, sy)
    if method not in _PROBES:
        raise ValueError(f"Expected `method` in {list(_PROBES)}, but got {method!r}.")
    check_positive_int(max_iter, "max_iter")
    weight_decay = check_finite_nonneg(weight_decay, "weight_decay")
    tol = check_finite_nonneg(tol, "tol")
    ridge_alpha = check_finite_nonneg(ridge_alpha, "ridge_alpha")
    if num_classes is None:
        num_classes = int(max(int(sy.max()) for _, sy in splits.values())) + 1
    check_positive_int(num_classes, "num_classes")
    device, dtype = train_x.device, _work_dtype(train_x)
    x = train_x.to(dtype)
    y = train_y.to(device).long()
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(
            f"Expected train labels in [0, {num_classes}), but got range [{int(y.min())}, {int(y.max())}]."
        )
    mean, std = _standardizer(x, standardize)
    xs = (x - mean) / std
    if method == "logistic":
        w, b = _fit_logistic(xs, y, num_classes, max_iter, weight_decay, tol)
    else:
        w, b = _fit_ridge(xs, y, num_classes, ridge_alpha)
    out: dict[str, float] = {}
    for name, (sx, sy) in splits.items():
        logits = ((sx.to(device, dtype) - mean) / std) @ w + b
        out[f"{name}_acc"] = float((logits.argmax(dim=1) == sy.to(device)).to(torch.float64).mean())
    return out


# ------------------------------------------------------------------------------------------------ callback
class LinearProbe(Callback):
    """Linear-probe and kNN accuracy of frozen embeddings, at the end of training and every n epochs.

    At the end of training (``on_train_end``: the model is still on its device and the loggers are open;
    Lightning's ``on_fit_end`` runs after the strategy has moved the model to CPU) and, if
    ``every_n_epochs`` is set, at the end of every n-th training epoch, the callback

    1. collects frozen embeddings (eval mode, ``no_grad``, training flags restored) of the train, val and
       (if available) test splits, from the given loaders, else from
       ``trainer.datamodule.eval_dataloader(split)``;
    2. fits a linear classifier on the train embeddings (:func:`fit_linear_probe`) and runs cosine kNN
       (:func:`knn_accuracy`) with the train embeddings as reference;
    3. logs ``{prefix}linear_train_acc``, ``{prefix}linear_val_acc``, ``{prefix}linear_test_acc``,
       ``{prefix}knn_val_acc``, ``{prefix}knn_test_acc`` through ``trainer.loggers`` at the current
       global step, puts them in ``trainer.callback_metrics``, and keeps them in :attr:`results` (latest)
       and :attr:`history` (all evaluations), both saved in the checkpoint.

    Under DDP the probe runs on global rank zero only (the loaders are not sharded, so the other ranks
    would repeat identical work); the results are then broadcast so every rank holds the same
    :attr:`results`. Under ``fast_dev_run`` one batch per split is used. With ``strategy="ddp_spawn"``
    the callback is pickled, so ``embedding_fn`` must then be a module-level function (not a lambda).

    Args:
        every_n_epochs: also evaluate after every ``n``-th training epoch (``None``: only at the end).
        on_fit_end: evaluate at the end of training.
        embedding_fn: ``(pl_module, x) -> (N, D)`` embeddings; default ``pl_module(x)``.
        layer: dotted module name whose output (average-pooled over space if 4D) is the embedding.
        train_dataloader, val_dataloader, test_dataloader: data for the probe (labelled batches).
        max_batches: at most this many batches per split.
        knn_k: neighbours of the kNN classifier (0 disables kNN).
        knn_weights: ``"uniform"`` (majority vote) or ``"exp"`` (``exp(sim / knn_temperature)``).
        knn_temperature: temperature of ``"exp"`` kNN weights.
        probe: ``"logistic"`` (L-BFGS) or ``"ridge"`` (closed form).
        epochs: L-BFGS iterations of the logistic probe.
        weight_decay: L2 penalty of the logistic probe.
        ridge_alpha: penalty of the ridge probe.
        standardize: standardise features with train statistics before the linear probe.
        num_classes: number of classes (default: inferred from the labels).
        prefix: metric name prefix.
        progress_bar: tqdm bars while collecting embeddings.

    Example:
        >>> import lightning.pytorch as pl
        >>> from torch.utils.data import DataLoader
        >>> from reprlens.models import ConvAutoencoder
        >>> x, y = torch.rand(32, 1, 16, 16), torch.arange(32) % 2
        >>> loader = DataLoader(list(zip(x, y)), batch_size=16)
        >>> probe = LinearProbe(layer="encoder.fc", knn_k=5, train_dataloader=loader,
        ...                     val_dataloader=loader, progress_bar=False)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[probe], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ConvAutoencoder(in_channels=1, image_size=16, embedding_dim=4, num_classes=2), loader)
        >>> sorted(probe.results)
        ['knn_val_acc', 'linear_train_acc', 'linear_val_acc']
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        on_fit_end: bool = True,
        embedding_fn: EmbeddingFn | None = None,
        layer: str | None = None,
        train_dataloader: Iterable[Any] | None = None,
        val_dataloader: Iterable[Any] | None = None,
        test_dataloader: Iterable[Any] | None = None,
        max_batches: int | None = None,
        knn_k: int = 20,
        knn_weights: str = "uniform",
        knn_temperature: float = 0.07,
        probe: str = "logistic",
        epochs: int = 100,
        weight_decay: float = 1e-4,
        ridge_alpha: float = 1.0,
        standardize: bool = True,
        num_classes: int | None = None,
        prefix: str = "probe/",
        progress_bar: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(every_n_epochs, "every_n_epochs", allow_none=True)
        check_positive_int(max_batches, "max_batches", allow_none=True)
        check_positive_int(knn_k, "knn_k", minimum=0)
        check_positive_int(epochs, "epochs")
        check_positive_int(num_classes, "num_classes", allow_none=True)
        if embedding_fn is not None and not callable(embedding_fn):
            raise TypeError(
                "Expected `embedding_fn` to be a callable (pl_module, x) -> Tensor, but got "
                f"{type(embedding_fn).__name__}."
            )
        if layer is not None and not isinstance(layer, str):
            raise TypeError(
                f"Expected `layer` to be a dotted module name (str), but got {type(layer).__name__}."
            )
        if embedding_fn is not None and layer is not None:
            raise ValueError("Pass either `embedding_fn` or `layer` to LinearProbe, not both.")
        if probe not in _PROBES:
            raise ValueError(f"Expected `probe` in {list(_PROBES)}, but got {probe!r}.")
        if knn_weights not in _KNN_WEIGHTS:
            raise ValueError(f"Expected `knn_weights` in {list(_KNN_WEIGHTS)}, but got {knn_weights!r}.")
        if not isinstance(knn_temperature, (int, float)) or knn_temperature <= 0:
            raise ValueError(f"Expected `knn_temperature` > 0, but got {knn_temperature!r}.")
        if not isinstance(prefix, str):
            raise TypeError(f"Expected `prefix` to be a str, but got {type(prefix).__name__}.")
        if not on_fit_end and every_n_epochs is None:
            raise ValueError("LinearProbe would never run: set `on_fit_end=True` or `every_n_epochs`.")
        self.every_n_epochs = every_n_epochs
        self.on_fit_end_enabled = bool(on_fit_end)
        self.embedding_fn = embedding_fn
        self.layer = layer
        self.loaders: dict[str, Iterable[Any] | None] = {
            "train": train_dataloader,
            "val": val_dataloader,
            "test": test_dataloader,
        }
        self.max_batches = max_batches
        self.knn_k = knn_k
        self.knn_weights = knn_weights
        self.knn_temperature = float(knn_temperature)
        self.probe = probe
        self.epochs = epochs
        self.weight_decay = check_finite_nonneg(weight_decay, "weight_decay")
        self.ridge_alpha = check_finite_nonneg(ridge_alpha, "ridge_alpha")
        self.standardize = bool(standardize)
        self.num_classes = num_classes
        self.prefix = prefix
        self.progress_bar = bool(progress_bar)
        self.results: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._last_step: int | None = None

    @property
    @override
    def state_key(self) -> str:
        # several probes (different layers / prefixes) can live in one Trainer and checkpoint
        return self._generate_state_key(prefix=self.prefix, layer=self.layer)

    # -------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.layer is not None:
            get_module(pl_module, self.layer)  # fail fast with the closest valid names
        if stage == "fit":
            if self.loaders["train"] is None and not self._has_datamodule(trainer):
                self._loader(trainer, "train")  # raises the "no data" error now rather than at the end
            no_eval = self.loaders["val"] is None and self.loaders["test"] is None
            if no_eval and not self._has_datamodule(trainer):
                raise ValueError(
                    "LinearProbe needs an evaluation split: pass `val_dataloader=` (or `test_dataloader=`), "
                    "or use a datamodule with `eval_dataloader(split)`."
                )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_fit_end_enabled and self._last_step != trainer.global_step:
            self.run(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._last_step = None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._last_step = None  # hooks are removed by collect_embeddings' finally clause

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": dict(self.results), "history": copy.deepcopy(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
        self.history = list(state_dict.get("history", []))

    # -------------------------------------------------------------------------------------------- work
    @staticmethod
    def _has_datamodule(trainer: pl.Trainer) -> bool:
        dm = getattr(trainer, "datamodule", None)
        return dm is not None and callable(getattr(dm, "eval_dataloader", None))

    def _loader(self, trainer: pl.Trainer, split: str) -> Iterable[Any] | None:
        given = self.loaders[split]
        if given is not None:
            return given
        if self._has_datamodule(trainer):
            return trainer.datamodule.eval_dataloader(split)  # type: ignore[union-attr]
        if split == "train":
            raise ValueError(
                "LinearProbe has no data: pass `train_dataloader=` and `val_dataloader=` (labelled batches), "
                "or fit with a datamodule that has `eval_dataloader(split)` (the reprlens datamodules do)."
            )
        return None

    def _embed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str
    ) -> tuple[Tensor, Tensor] | None:
        loader = self._loader(trainer, split)
        if loader is None:
            return None
        max_batches = self.max_batches
        if trainer.fast_dev_run:
            max_batches = int(trainer.fast_dev_run)  # True -> 1
        return collect_embeddings(
            pl_module,
            loader,
            embedding_fn=self.embedding_fn,
            layer=self.layer,
            max_batches=max_batches,
            device=pl_module.device,
            progress_bar=self.progress_bar and trainer.is_global_zero,
            desc=f"probe {split} embeddings",
        )

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Collect embeddings and return the probe accuracies (no logging); runs on the calling rank."""
        data = {split: self._embed(trainer, pl_module, split) for split in _SPLITS}
        train = data["train"]
        if train is None:  # pragma: no cover - _loader raises for train
            raise RuntimeError("LinearProbe found no train data.")
        evals = {s: d for s, d in data.items() if s != "train" and d is not None}
        num_classes = self.num_classes
        if num_classes is None:
            num_classes = max(int(d[1].max()) for d in data.values() if d is not None) + 1
        kwargs: dict[str, Any] = {}
        for split, (x, y) in evals.items():
            kwargs[f"{split}_x"], kwargs[f"{split}_y"] = x, y
        fit = fit_linear_probe(
            train[0],
            train[1],
            **kwargs,
            num_classes=num_classes,
            method=self.probe,
            max_iter=self.epochs,
            weight_decay=self.weight_decay,
            ridge_alpha=self.ridge_alpha,
            standardize=self.standardize,
        )
        results = {f"linear_{k}": v for k, v in fit.items()}
        if self.knn_k > 0:
            for split, (x, y) in evals.items():
                results[f"knn_{split}_acc"] = knn_accuracy(
                    train[0], train[1], x, y, self.knn_k, num_classes=num_classes,
                    weights=self.knn_weights, temperature=self.knn_temperature,
                )
        return results

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Evaluate now (rank zero), broadcast, log through ``trainer.loggers`` and store the results."""
        results: dict[str, float] = {}
        if trainer.is_global_zero:
            results = self.compute(trainer, pl_module)
        results = trainer.strategy.broadcast(results, src=0)
        self.results = dict(results)
        where = {"epoch": float(trainer.current_epoch), "step": float(trainer.global_step)}
        self.history.append({**where, **results})
        self._last_step = trainer.global_step
        metrics = {f"{self.prefix}{k}": v for k, v in results.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        return self.results

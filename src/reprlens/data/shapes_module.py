"""Lightning datamodule over :class:`reprlens.data.ShapesDataset` (train/val/test with disjoint seeds)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from reprlens.data._common import SPLITS, DictDataModule
from reprlens.data.augment import AugmentConfig
from reprlens.data.shapes import ShapesDataset
from reprlens.utils import check_positive_int

__all__ = ["ShapesDataModule"]


class ShapesDataModule(DictDataModule):
    """Procedural shapes, generated on the fly from ``seed`` (no download), as dict batches.

    Each split is its own deterministic stream (``seed`` salted with the split), so the splits are
    disjoint draws. Batches: ``"image"``, ``"label"``, ``"index"``, ``"factors"``, ``"mask"``,
    ``"landmarks"``; with ``two_views=True`` train *and* val batches also carry ``"views"`` (two
    augmented images, so a SimCLR validation loss works) and ``"view_landmarks"``.
    ``eval_dataloader(split)`` never has views and is never shuffled.

    Args:
        num_train: train examples (>= 1).
        num_val: validation examples (0 disables the split).
        num_test: test examples (0 disables the split).
        image_size: 32 (default) or any size >= 16 (64 for finer shapes).
        batch_size: train batch size; ``eval_batch_size`` for val/test/predict (default the same).
        num_workers: DataLoader workers (rendered images are cached per process; with workers the
            datasets are rendered once in ``setup`` so forked workers share them).
        seed: seed of everything (factors, noise, shuffling, augmentations).
        two_views: add two augmented views per example (contrastive learning).
        label_factor: the class label: "shape" (default), "colour", "background", or binned
            "scale", "pos_x", "pos_y", "rotation".
        background: "plain", "noise" or "mixed".
        shapes, colours: subsets of the shape / colour names.
        round_landmarks: "nan" or "boundary" (see :mod:`reprlens.data.shapes`).
        cache: cache rendered images (4 bytes per pixel and example, see the module doc).
        pin_memory, drop_last, predict_split, augment: loader options and augmentation parameters.

    Example:
        >>> dm = ShapesDataModule(num_train=64, num_val=32, num_test=32, batch_size=16)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["image"].shape, batch["label"].shape, dm.num_classes, dm.image_shape
        (torch.Size([16, 3, 32, 32]), torch.Size([16]), 5, (3, 32, 32))
    """

    def __init__(
        self,
        num_train: int = 10_000,
        num_val: int = 2_000,
        num_test: int = 2_000,
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        two_views: bool = False,
        label_factor: str = "shape",
        background: Literal["plain", "noise", "mixed"] = "mixed",
        *,
        shapes: Sequence[str] | None = None,
        colours: Sequence[str] | None = None,
        round_landmarks: Literal["nan", "boundary"] = "nan",
        cache: bool = True,
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        predict_split: str = "test",
        augment: AugmentConfig | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, drop_last=drop_last, seed=seed, two_views=two_views,
                         predict_split=predict_split, augment=augment)
        check_positive_int(num_train, "num_train")
        check_positive_int(num_val, "num_val", minimum=0)
        check_positive_int(num_test, "num_test", minimum=0)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.image_size = image_size
        self.label_factor = label_factor
        self.background = background
        self.shapes = shapes
        self.colours = colours
        self.round_landmarks = round_landmarks
        self.cache = cache
        # validate every dataset argument now (cheap: one example), not at setup time
        self._probe = ShapesDataset(1, image_size, seed, shapes=shapes, colours=colours, background=background,
                                    label_factor=label_factor, round_landmarks=round_landmarks, cache=False)
        self.save_hyperparameters(ignore=["augment"])

    def _build(self) -> dict[str, ShapesDataset | None]:  # type: ignore[override]
        out: dict[str, ShapesDataset | None] = {}
        for split in SPLITS:
            n = self.sizes[split]
            out[split] = None if n == 0 else ShapesDataset(
                n, self.image_size, self.seed, split=split, shapes=self.shapes, colours=self.colours,
                background=self.background, label_factor=self.label_factor, round_landmarks=self.round_landmarks,
                cache=self.cache,
            )
            if out[split] is not None and self.num_workers > 0:
                out[split].materialize()  # type: ignore[union-attr]
        return out

    def dataset(self, split: str) -> ShapesDataset:  # type: ignore[override]
        return super().dataset(split)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return self._probe.num_classes

    @property
    def label_names(self) -> tuple[str, ...]:
        return self._probe.label_names

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._probe.image_shape

    @property
    def factor_names(self) -> tuple[str, ...]:
        return self._probe.factor_names

    @property
    def factor_categories(self) -> dict[str, tuple[str, ...]]:
        return self._probe.factor_categories

    @property
    def concept_names(self) -> list[str]:
        return self._probe.concept_names

    @property
    def landmark_names(self) -> tuple[str, ...]:
        return self._probe.landmark_names

    def factors(self, split: str = "val") -> dict[str, Tensor]:
        """Factor columns of ``split`` by name (the input of ``ConceptSet.from_factors``)."""
        return self.dataset(split).factors()

    def concept_matrix(self, split: str = "val") -> Tensor:
        """``(N, K)`` bool concepts of ``split``; rows follow ``eval_dataloader(split)`` order."""
        return self.dataset(split).concept_matrix()

"""scikit-learn's bundled handwritten digits (1,797 8x8 images), upsampled, as a Lightning datamodule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reprlens.data._common import SPLITS, DictDataModule, TensorImageDataset, split_counts
from reprlens.data.augment import AugmentConfig
from reprlens.utils import check_positive_int, require

__all__ = ["DIGITS_AUGMENT", "DigitsDataModule", "TensorImageDataset", "load_digits_tensors"]

#: Cheap augmentation for digits: milder crops, no flips (a flipped digit is another symbol), no colour.
DIGITS_AUGMENT = AugmentConfig(crop_scale=(0.6, 1.0), flip_prob=0.0, saturation=0.0, grayscale_prob=0.0)


def load_digits_tensors(image_size: int = 32) -> tuple[Tensor, Tensor]:
    """All 1,797 digits: ``(N, 1, S, S)`` float32 in [0, 1] (pixel / 16, bilinear upsampling) and labels.

    Example:
        >>> x, y = load_digits_tensors(16)
        >>> x.shape, y.shape, float(x.min()) >= 0.0, float(x.max()) <= 1.0
        (torch.Size([1797, 1, 16, 16]), torch.Size([1797]), True, True)
    """
    check_positive_int(image_size, "image_size", minimum=8)
    datasets = require("sklearn.datasets", extra="all", purpose="DigitsDataModule")
    bunch = datasets.load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.contiguous(), torch.as_tensor(bunch.target, dtype=torch.long)


class DigitsDataModule(DictDataModule):
    """The 8x8 digits of ``sklearn.datasets.load_digits``, upsampled, with seed-fixed splits.

    Batches: ``"image"`` (N, C, S, S) float in [0, 1], ``"label"`` (digit), ``"index"`` (position in
    the split's dataset; ``source_indices(split)`` maps it to the ``load_digits`` row), plus
    ``"views"`` with ``two_views=True`` (crop + brightness/contrast jitter, no flips).

    Args:
        image_size: output size (default 32; the attribution experiments use 28). Must be >= 8.
        channels: 1 (default; for models built with ``in_channels=1``) or 3 (the grey image repeated,
            for RGB models such as the example SimCLR ResNet and Classifier defaults).
        val_fraction, test_fraction: split fractions (default 0.15 each, train gets the rest); a
            fraction of 0 disables that split.
        batch_size, eval_batch_size, num_workers, seed, two_views, pin_memory, drop_last,
        predict_split, augment: as in :class:`reprlens.data.ShapesDataModule`.

    Example:
        >>> dm = DigitsDataModule(image_size=16, batch_size=32)
        >>> dm.setup()
        >>> [len(dm.dataset(s)) for s in ("train", "val", "test")], dm.num_classes, dm.image_shape
        ([1257, 270, 270], 10, (1, 16, 16))
    """

    num_examples = 1797

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        two_views: bool = False,
        *,
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        predict_split: str = "test",
        augment: AugmentConfig | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, drop_last=drop_last, seed=seed, two_views=two_views,
                         predict_split=predict_split, augment=augment or DIGITS_AUGMENT)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"Expected `image_size` to be an int >= 8 (the digits are 8x8), but got {image_size!r}.")
        if channels not in (1, 3):
            raise ValueError(f"Expected `channels` to be 1 or 3, but got {channels!r}.")
        self.counts = dict(zip(SPLITS, split_counts(self.num_examples, val_fraction, test_fraction)))
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self._source: dict[str, Tensor] = {}
        self.save_hyperparameters(ignore=["augment"])

    def _build(self) -> dict[str, TensorImageDataset | None]:  # type: ignore[override]
        x, y = load_digits_tensors(self.image_size)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        out: dict[str, TensorImageDataset | None] = {}
        start = 0
        for split in SPLITS:
            n = self.counts[split]
            idx = perm[start:start + n]
            start += n
            self._source[split] = idx
            out[split] = None if n == 0 else TensorImageDataset(x[idx], y[idx], channels=self.channels)
        return out

    def source_indices(self, split: str) -> Tensor:
        """Rows of ``load_digits()`` in ``split``, in dataset order."""
        self.dataset(split)
        return self._source[split]

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

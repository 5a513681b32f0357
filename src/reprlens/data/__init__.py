"""Data for reprlens: procedural shapes with known factors, digits, torchvision wrappers.

Every dataset yields dict items (batched by the datamodules' loaders): ``"image"`` (N, C, H, W)
float in [0, 1], ``"label"`` (N,) int64, ``"index"`` (N,) int64 example id; the shapes data adds
``"factors"``, ``"mask"`` and ``"landmarks"``; two-view mode adds ``"views"`` (list of 2 images).

* :class:`ShapesDataset`, :class:`ShapesDataModule`: procedural dSprites-like shapes (no download).
* :class:`DigitsDataModule`: scikit-learn's bundled 8x8 digits, upsampled.
* :class:`TorchvisionDataModule`: CIFAR10 / MNIST / FashionMNIST from files on disk.
* :class:`IndexedDataset`: any ``(x, y)`` dataset as dict items with example ids.
"""

from reprlens.data._common import BatchedDictDataset, DictDataModule, EpochSampler, IndexedDataset, collate_dict_batch
from reprlens.data.augment import AugmentConfig, augment_batch
from reprlens.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    FACTOR_NAMES,
    LANDMARK_NAMES,
    SHAPES,
    ShapesDataset,
    render_shapes,
    shape_landmarks,
)
from reprlens.data.shapes_module import ShapesDataModule
from reprlens.data.digits import DigitsDataModule, TensorImageDataset
from reprlens.data.vision import TorchvisionDataModule

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "FACTOR_NAMES",
    "LANDMARK_NAMES",
    "SHAPES",
    "AugmentConfig",
    "BatchedDictDataset",
    "DictDataModule",
    "DigitsDataModule",
    "EpochSampler",
    "IndexedDataset",
    "ShapesDataModule",
    "ShapesDataset",
    "TensorImageDataset",
    "TorchvisionDataModule",
    "augment_batch",
    "collate_dict_batch",
    "render_shapes",
    "shape_landmarks",
]

"""Fashion-MNIST as a three-task vision set: fine class, coarse group, foreground mask.

Every image carries three targets, all derived here from Fashion-MNIST's own images and labels
(`moekit.train.images.load_fashion_mnist`: the Debian package ``dataset-fashion-mnist``, fetched
once into the cache, sha256-checked):

- ``fine``: the 10-way class label, as released;
- ``coarse``: a 4-way group of the class — upper-body garments {T-shirt/top, Pullover, Coat,
  Shirt}, trousers and dresses {Trouser, Dress}, footwear {Sandal, Sneaker, Ankle boot}, bags
  {Bag};
- ``mask``: per-pixel foreground segmentation, 28×28 binary: pixel intensity > 25 of 255 (≈ 0.1)
  in the raw image — the garment's silhouette, holes and all.

Inputs are the raw images scaled to [0, 1] and standardised with the training set's mean and
standard deviation. Splits are Fashion-MNIST's own: 60,000 training and 10,000 test images;
nothing is tuned on the test set (the settings are fixed in `run.py` before any run).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moekit.models import TaskSpec

# Fashion-MNIST class → coarse group (see the module docstring).
COARSE_OF_CLASS = np.array([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])
COARSE_NAMES = ("upper-body", "trousers & dresses", "footwear", "bags")
MASK_THRESHOLD = 25

TASKS = (TaskSpec("fine", "classify", 10), TaskSpec("coarse", "classify", 4), TaskSpec("mask", "segment", 2))


@dataclass
class Split:
    """x: (N, 1, 28, 28) float32 standardised images; fine, coarse: (N,) int64; mask: (N, 28, 28) int64."""

    x: torch.Tensor
    fine: torch.Tensor
    coarse: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def targets(self, idx=None) -> list:
        """The targets of the three tasks in `TASKS` order (rows `idx`, default all)."""
        pick = (lambda t: t) if idx is None else (lambda t: t[idx])
        return [pick(self.fine), pick(self.coarse), pick(self.mask)]

    def subset(self, n: int) -> "Split":
        return Split(self.x[:n], self.fine[:n], self.coarse[:n], self.mask[:n])


def make_split(images_NHW: np.ndarray, labels_N: np.ndarray, mean: float, std: float) -> Split:
    """uint8 images (N, H, W) and class labels (N,) → the three-task `Split`."""
    images_NHW = np.asarray(images_NHW)
    labels_N = np.asarray(labels_N).astype(np.int64)
    if images_NHW.dtype != np.uint8 or images_NHW.ndim != 3:
        raise ValueError(f"images must be uint8 (N, H, W), got {images_NHW.dtype} {images_NHW.shape}")
    if labels_N.shape != images_NHW.shape[:1] or labels_N.min(initial=0) < 0 or labels_N.max(initial=0) > 9:
        raise ValueError(f"labels must be ({images_NHW.shape[0]},) ints in [0, 10), got {labels_N.shape}")
    x = (torch.from_numpy(images_NHW).float() / 255 - mean) / std
    return Split(x=x.unsqueeze(1), fine=torch.from_numpy(labels_N), coarse=torch.from_numpy(COARSE_OF_CLASS[labels_N]),
                 mask=torch.from_numpy((images_NHW > MASK_THRESHOLD).astype(np.int64)))


def load(train_images: int = 60000, test_images: int = 10000) -> tuple[Split, Split]:
    """(train, test) splits: the first `train_images` / `test_images` of Fashion-MNIST's own."""
    from moekit.train.images import load_fashion_mnist

    fm = load_fashion_mnist()
    train = fm.train_images[:train_images]
    scaled = train.astype(np.float64) / 255
    mean, std = float(scaled.mean()), float(scaled.std())
    return (make_split(train, fm.train_labels[:train_images], mean, std),
            make_split(fm.test_images[:test_images], fm.test_labels[:test_images], mean, std))

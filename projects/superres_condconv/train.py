"""The super-resolution study's training loop and test metric, on `moekit.models.superres` nets.

Legend: B batch (N a whole split), C image channels, H×W low-res size, sH×sW high-res size.

- `train_sr`: Adam (`moekit.optim.build_optimizer`) on the MSE — the loss PSNR measures — with
  the learning rate decayed by a cosine from `learning_rate` to 0 at the last step
  (`moekit.optim.UpdateStep`).
- `evaluate_psnr`: `moekit.models.psnr` of the predictions clamped to [0, 1].
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.superres import SRNet, psnr
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_instance, check_int, check_tensor

__all__ = ["train_sr", "evaluate_psnr"]


@torch.no_grad()
def evaluate_psnr(model: Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]], lr_NCHW: torch.Tensor,
                  hr_NCHW: torch.Tensor, *, batch_size: int = 1000) -> float:
    """Test PSNR (max 1) of ``model(lr)`` clamped to [0, 1] against ``hr``; `model` may be any callable."""
    check_int("batch_size", batch_size, min=1)
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    pred = torch.cat([model(lr_NCHW[i:i + batch_size]) for i in range(0, lr_NCHW.shape[0], batch_size)])
    if isinstance(model, nn.Module):
        model.train(was_training)
    return psnr(pred.clamp(0, 1), hr_NCHW).item()


def train_sr(model: SRNet, lr_NCHW: torch.Tensor, hr_NCHW: torch.Tensor, *, steps: int, batch_size: int = 64,
             learning_rate: float = 1e-3, seed: int = 0) -> list:
    """Train on (low-res, high-res) pairs with MSE for `steps` Adam steps; returns the losses.

    Batches are drawn with a generator seeded by `seed`, so models trained with one seed see the
    same batches in the same order.
    """
    check_instance("model", model, SRNet)
    check_int("steps", steps, min=1)
    check_int("batch_size", batch_size, min=1)
    check_tensor("lr", lr_NCHW, ndim=4, floating=True)
    if lr_NCHW.shape[1] != model.channels:
        raise ValueError(f"lr must have {model.channels} channel(s), got shape {tuple(lr_NCHW.shape)}")
    expected = (lr_NCHW.shape[0], model.channels, lr_NCHW.shape[2] * model.scale, lr_NCHW.shape[3] * model.scale)
    if tuple(hr_NCHW.shape) != expected:
        raise ValueError(f"hr must have shape {expected} for lr of shape {tuple(lr_NCHW.shape)}, "
                         f"got {tuple(hr_NCHW.shape)}")
    gen = torch.Generator().manual_seed(seed)
    update = UpdateStep(model, build_optimizer(model, name="adam", lr=learning_rate), lr=learning_rate,
                        total_steps=steps, schedule="cosine", min_lr_ratio=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(lr_NCHW.shape[0], (batch_size,), generator=gen)
        losses.append(update(F.mse_loss(model(lr_NCHW[idx]), hr_NCHW[idx]))["loss"])
    return losses

"""The Swin2-MoSE study's training loop, evaluation and latency measurement.

Legend: B batch, C bands, H×W low-res size, sH×sW high-res size.

- `sr_loss`: the paper's image losses — ``"ncc_ssim"``: ``ncc_loss + ssim_loss`` (weights 1 and
  1, SSIM on predictions and targets clamped to [0, 1] as the official ``norm_0_to_1`` does),
  or ``"mse"`` — plus ``0.2 · moekit.aux_loss(model)`` (the MoE-SM balance losses).
- `train_swin`: Adam (`moekit.optim.build_optimizer`) with a linear warmup and cosine decay to 0
  (`moekit.optim.UpdateStep`), on random train crops drawn by a generator seeded by `seed`, so
  every model of one seed sees the same crops in the same order.
- `evaluate`: PSNR and SSIM (max 1) of predictions clamped to [0, 1], averaged over test tiles.
- `latency`: the median wall time of one forward pass in eval mode.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

import moekit
from moekit.models import ncc_loss, psnr, ssim, ssim_loss
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_choice, check_int, check_number
from projects.swin2_mose.data import SRSplit, make_pairs, random_crops

__all__ = ["LOSSES", "AUX_WEIGHT", "sr_loss", "train_swin", "evaluate", "latency"]

LOSSES = ("ncc_ssim", "mse")
AUX_WEIGHT = 0.2            # the paper's weight of the MoE balance loss in the total loss


def sr_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The image loss of `kind` (see the module docstring), without the MoE term."""
    check_choice("kind", kind, LOSSES)
    if kind == "mse":
        return F.mse_loss(pred, target)
    return ncc_loss(pred, target) + ssim_loss(pred.clamp(0, 1), target.clamp(0, 1))


def train_swin(model: nn.Module, split: SRSplit, *, steps: int, batch_size: int = 8, tile: int = 64,
               lr: float = 5e-4, warmup_steps: int = 100, loss: str = "ncc_ssim", scale: int = 2,
               seed: int = 0, log_every: int = 0) -> list:
    """Train `model` (low-res → high-res) for `steps` Adam steps; returns the per-step losses."""
    check_int("steps", steps, min=1)
    check_int("batch_size", batch_size, min=1)
    check_number("lr", lr, min=0, min_open=True)
    check_choice("loss", loss, LOSSES)
    gen = torch.Generator().manual_seed(seed)
    update = UpdateStep(model, build_optimizer(model, name="adam", lr=lr), lr=lr, total_steps=steps,
                        warmup_steps=min(warmup_steps, steps - 1), schedule="cosine", min_lr_ratio=0.0)
    model.train()
    losses = []
    for step in range(steps):
        hr = random_crops(split, batch_size, tile, generator=gen)
        pred = model(make_pairs(hr, scale))
        total = sr_loss(pred, hr, loss) + AUX_WEIGHT * moekit.aux_loss(model)
        losses.append(update(total)["loss"])
        if log_every and (step + 1) % log_every == 0:
            print(f"    step {step + 1}: loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    return losses


@torch.no_grad()
def evaluate(model: Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]], hr_BCHW: torch.Tensor, *,
             scale: int = 2, batch_size: int = 32) -> tuple[float, float]:
    """(PSNR dB, SSIM) of ``model(low-res)`` clamped to [0, 1] against the high-res tiles."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    preds = [model(make_pairs(hr_BCHW[i:i + batch_size], scale)) for i in range(0, hr_BCHW.shape[0], batch_size)]
    if isinstance(model, nn.Module):
        model.train(was_training)
    pred = torch.cat(preds).clamp(0, 1)
    target = hr_BCHW.clamp(0, 1)
    return float(psnr(pred, target)), float(ssim(pred, target).mean())


@torch.no_grad()
def latency(model: nn.Module, shape: tuple, *, repeats: int = 5) -> float:
    """Median seconds of one eval-mode forward pass on a random input of `shape` (one warm-up first)."""
    model.eval()
    x = torch.rand(shape)
    model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)

"""The vision side of the study: a ViT on Fashion-MNIST with an exit after every block
(`moekit.layers.EarlyExit`, METHODS.md CC2), accuracy against FLOPs per image over thresholds.

Legend: N images, B batch, S tokens per image (49 patches + class token), D model dim, X exits.

The ViT is `moekit.models.vision.ViTMoE` without MoE layers (4 blocks, D = 64, 4 heads, 4×4
patches, GELU MLP of hidden 256). Its patch embedding is folded into the first block and every
exit is LayerNorm + a linear classifier on the class token, so the stack is exactly the ViT with
three more heads. `EarlyExit.forward_early` really skips: the blocks after a sample's exit run
only on the samples still active, and the FLOPs per image are counted from the blocks and heads
each image went through.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from moekit.layers import EarlyExit
from moekit.models.vision import ViTConfig, ViTMoE
from moekit.optim import UpdateStep, build_optimizer

CONFIG = ViTConfig(moe_every=0)          # the dense 4-block ViT of projects/vmoe_fashion_mnist


class _Stem(nn.Module):
    """Images (B, 1, 28, 28) → tokens (B, S, D): patch embedding, class token, positions."""

    def __init__(self, vit: ViTMoE):
        super().__init__()
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed

    def forward(self, images_BCHW):
        x_BSD = self.patch_embed(images_BCHW).flatten(2).transpose(1, 2)
        x_BSD = torch.cat([self.cls_token.expand(len(x_BSD), -1, -1), x_BSD], dim=1)
        return x_BSD + self.pos_embed


class _ClassHead(nn.Module):
    """(B, S, D) → logits (B, L) from the class token, ViT's head (zero-initialised)."""

    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x_BSD):
        return self.head(self.norm(x_BSD[:, 0]))


def build_exit_vit(config: ViTConfig = CONFIG, *, threshold: float = 0.9) -> EarlyExit:
    vit = ViTMoE(config)
    blocks = [nn.Sequential(_Stem(vit), vit.blocks[0]), *vit.blocks[1:]]
    heads = [_ClassHead(config.d_model, config.num_classes) for _ in blocks]
    return EarlyExit(blocks, heads, criterion="confidence", threshold=threshold)


def vit_costs(config: ViTConfig = CONFIG) -> tuple[float, float]:
    """Forward FLOPs of one image through one block (matmuls of S tokens + bidirectional
    attention, 2·2·S²·D) and through one exit head."""
    S, D = config.num_patches + 1, config.d_model
    F_ = config.dense_hidden
    block = S * 2 * (4 * D * D + 2 * D * F_) + 2 * 2 * S * S * D
    stem = 2 * config.num_patches * config.patch_size ** 2 * config.in_channels * D
    head = 2 * D * config.num_classes
    return block + stem / config.n_layers, head      # the stem is spread over the blocks (small)


def as_inputs(images_NHW: np.ndarray, mean: float, std: float) -> torch.Tensor:
    return ((torch.from_numpy(images_NHW).float() / 255 - mean) / std).unsqueeze(1)


def train_vit(model: EarlyExit, x_N1HW, y_N, *, steps: int, batch_size: int = 128, lr: float = 2e-3,
              seed: int = 0, log=print) -> float:
    """AdamW (weight decay 0.05) on shuffled epochs, the sum of the exits' losses; wall seconds."""
    update = UpdateStep(model, build_optimizer(model.parameters(), name="adamw", lr=lr, weight_decay=0.05), lr=lr,
                        total_steps=steps, warmup_steps=max(1, steps // 20), min_lr_ratio=0.01, grad_clip=1.0)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(y_N), generator=gen), 0
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(y_N), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        info = update(model.loss(model(x_N1HW[idx]), y_N[idx]))
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"    step {step + 1:4d}/{steps}  loss {info['loss']:.3f}  {time.perf_counter() - t0:6.1f}s")
    return time.perf_counter() - t0


@torch.no_grad()
def vit_sweep(model: EarlyExit, x_N1HW, y_N, thresholds, *, config: ViTConfig = CONFIG,
              batch_size: int = 1000) -> list[dict]:
    """Accuracy, mean blocks run, exit shares and FLOPs per image at each confidence threshold,
    plus every exit alone (``"exit_k"``: threshold above 1 forced to that exit)."""
    model.eval()
    block, head = vit_costs(config)
    X = len(model.heads)
    out = []
    for t in thresholds:
        correct, depths, t0 = 0, [], time.perf_counter()
        for i in range(0, len(y_N), batch_size):
            z = model(x_N1HW[i:i + batch_size], threshold=t)
            correct += int((z.argmax(-1) == y_N[i:i + batch_size]).sum())
            depths.append(model.last_exit_depth)
        d = torch.cat(depths).double()
        blocks_run = torch.tensor(model.exit_after, dtype=torch.double)[d.long()] + 1
        flops = blocks_run * block + (d + 1) * head
        out.append({"threshold": t, "accuracy": correct / len(y_N), "mean_blocks": float(blocks_run.mean()),
                    "exit_share": [float((d == i).double().mean()) for i in range(X)],
                    "flops_forward": float(flops.mean()), "wall_s": time.perf_counter() - t0})
    return out


__all__ = ["CONFIG", "build_exit_vit", "vit_costs", "as_inputs", "train_vit", "vit_sweep"]

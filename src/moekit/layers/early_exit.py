"""Early-exit networks — METHODS.md CC2.

Teerapittayanon, McDanel & Kung (2016), "BranchyNet: Fast Inference via Early Exiting from Deep
Neural Networks" (ICPR).

Legend: B samples, C classes, L blocks, X exits (heads).

Classifier heads ("exits") are attached after chosen blocks of a stack. Training minimises the
weighted sum of every exit's loss, ``Σ_i w_i · loss(head_i(h_i), y)``. At inference a sample
leaves at the first exit whose prediction is sure enough,

    confidence:  max_c softmax(z)_c > threshold       (threshold 0: always the first exit)
    entropy:     −Σ_c p_c log p_c   < threshold       (BranchyNet's rule; threshold 0: never)

and the last exit answers for every sample still running. Blocks after a sample's exit are not
run for it: the remaining blocks see only the samples still active (gathered along the batch).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.validate import check_bool, check_choice, check_instance, check_int, check_number

__all__ = ["EarlyExit", "exit_scores"]


def exit_scores(logits_BC: torch.Tensor, criterion: str) -> torch.Tensor:
    """(B,) score of each sample's prediction, in float32 (float64 for float64 logits): the max
    softmax probability (``"confidence"``) or the entropy in nats (``"entropy"``)."""
    z = logits_BC.detach()
    logp = torch.log_softmax(z.to(torch.promote_types(torch.float32, z.dtype)), dim=-1)
    if criterion == "confidence":
        return logp.max(-1).values.exp()
    return -(logp.exp() * logp).sum(-1)


class EarlyExit(nn.Module):
    """A stack of blocks with classifier heads attached along it.

    Args:
        blocks: L modules, each mapping hidden states ``(B, ...)`` to ``(B, ...)`` (any trailing
            shape; samples must be independent along the batch).
        heads: X modules, each mapping hidden states ``(B, ...)`` to logits ``(B, C)`` (C the
            same for every head).
        exit_after: the block index (0-based) each head follows, strictly increasing, the last
            one L − 1 (so every sample gets an answer from the full stack at worst). Default:
            one head after every block (X = L).
        exit_weights: X non-negative loss weights, not all zero (default all 1).
        criterion: ``"confidence"`` (exit when max prob > threshold) or ``"entropy"`` (exit
            when entropy < threshold).
        threshold: the default threshold of early-exit inference.

    ``forward(x)`` in training mode returns the list of the X exits' logits (for `loss`); in
    eval mode (or with ``early_exit=True``) it returns one ``(B, C)`` tensor, each sample's
    logits from its exit, and sets ``last_exit_depth`` (B,) int64: the index of that exit
    (head ``i`` follows block ``exit_after[i]``, so ``exit_after[i] + 1`` blocks ran for it).
    """

    def __init__(self, blocks: Sequence[nn.Module], heads: Sequence[nn.Module], *,
                 exit_after: Optional[Sequence[int]] = None, exit_weights: Optional[Sequence[float]] = None,
                 criterion: str = "confidence", threshold: float = 0.9):
        super().__init__()
        for name, mods in (("blocks", blocks), ("heads", heads)):
            if isinstance(mods, nn.Module) and not isinstance(mods, (nn.ModuleList, nn.Sequential)):
                raise TypeError(f"{name} must be a sequence of modules, got a single {type(mods).__name__}")
            check_instance(name, mods, (list, tuple, nn.ModuleList, nn.Sequential), what="a sequence of modules")
            if len(mods) == 0:
                raise ValueError(f"{name} must hold at least one module, got none")
            for i, m in enumerate(mods):
                check_instance(f"{name}[{i}]", m, nn.Module)
        L, X = len(blocks), len(heads)
        if exit_after is None:
            if X != L:
                raise ValueError(f"heads must have one module per block ({L}) when exit_after is None, got {X}")
            exit_after = list(range(L))
        check_instance("exit_after", exit_after, (list, tuple), what="a list of block indices")
        exit_after = [check_int(f"exit_after[{i}]", a, min=0, max=L - 1) for i, a in enumerate(exit_after)]
        if len(exit_after) != X:
            raise ValueError(f"exit_after must have one index per head ({X}), got {len(exit_after)}")
        if any(b <= a for a, b in zip(exit_after, exit_after[1:])):
            raise ValueError(f"exit_after must be strictly increasing, got {exit_after}")
        if exit_after[-1] != L - 1:
            raise ValueError(f"the last head must follow the last block: exit_after[-1] must be {L - 1}, "
                             f"got {exit_after[-1]}")
        if exit_weights is None:
            exit_weights = [1.0] * X
        check_instance("exit_weights", exit_weights, (list, tuple), what="a list of numbers")
        exit_weights = [check_number(f"exit_weights[{i}]", w, min=0.0) for i, w in enumerate(exit_weights)]
        if len(exit_weights) != X:
            raise ValueError(f"exit_weights must have one weight per head ({X}), got {len(exit_weights)}")
        if sum(exit_weights) == 0:
            raise ValueError(f"exit_weights must not all be zero, got {exit_weights}")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.exit_after = exit_after
        self.exit_weights = exit_weights
        self.criterion = check_choice("criterion", criterion, ("confidence", "entropy"))
        self.threshold = self._check_threshold(threshold)
        self.last_exit_depth: Optional[torch.Tensor] = None

    @staticmethod
    def _check_threshold(threshold) -> float:
        return check_number("threshold", threshold, min=0.0)

    def passes(self, logits_BC: torch.Tensor, threshold: float) -> torch.Tensor:
        """(B,) bool: which samples may leave at an exit with these logits."""
        s = exit_scores(logits_BC, self.criterion)
        return s > threshold if self.criterion == "confidence" else s < threshold

    def _head(self, i: int, h: torch.Tensor) -> torch.Tensor:
        z = self.heads[i](h)
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != h.shape[0]:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"heads[{i}] must return logits of shape (B, C) with B={h.shape[0]}, got {got}")
        return z

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits ``[(B, C)] * X`` on the whole batch (training, and the reference
        of early-exit inference)."""
        check_instance("x", x, torch.Tensor)
        out, h, heads = [], x, dict(zip(self.exit_after, range(len(self.heads))))
        for j, block in enumerate(self.blocks):
            h = block(h)
            if j in heads:
                out.append(self._head(heads[j], h))
        return out

    def forward_early(self, x: torch.Tensor, *, threshold: Optional[float] = None) -> torch.Tensor:
        """``(B, ...) → (B, C)``: each sample's logits from the first exit it passes (the last exit
        otherwise); sets ``last_exit_depth``. Samples that left are not carried through later blocks."""
        check_instance("x", x, torch.Tensor)
        if x.dim() == 0:
            raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
        threshold = self.threshold if threshold is None else self._check_threshold(threshold)
        B = x.shape[0]
        depth_B = torch.full((B,), len(self.heads) - 1, dtype=torch.long, device=x.device)
        ids, h, out = torch.arange(B, device=x.device), x, None
        heads = dict(zip(self.exit_after, range(len(self.heads))))
        for j, block in enumerate(self.blocks):
            h = block(h)
            if j not in heads:
                continue
            i = heads[j]
            z_AC = self._head(i, h)                               # A: samples still active
            if out is None:
                out = z_AC.new_empty((B,) + tuple(z_AC.shape[1:]))
            elif z_AC.shape[1:] != out.shape[1:]:
                raise ValueError(f"every head must return the same number of classes: heads[{i}] gives "
                                 f"{tuple(z_AC.shape[1:])}, earlier heads {tuple(out.shape[1:])}")
            leave = torch.ones_like(ids, dtype=torch.bool) if i == len(self.heads) - 1 else self.passes(z_AC, threshold)
            out[ids[leave]] = z_AC[leave].to(out.dtype)
            depth_B[ids[leave]] = i
            ids, h = ids[~leave], h[~leave]
            if ids.numel() == 0:                                   # a host sync: stop when all left
                break
        self.last_exit_depth = depth_B
        return out

    def forward(self, x: torch.Tensor, *, early_exit: Optional[bool] = None,
                threshold: Optional[float] = None):
        """Training mode: `forward_all`. Eval mode, or ``early_exit=True``: `forward_early`."""
        early = (not self.training) if early_exit is None else check_bool("early_exit", early_exit)
        if not early:
            if threshold is not None:
                raise ValueError(f"threshold applies to early-exit inference only, got threshold={threshold!r} "
                                 "with early_exit=False (or in training mode)")
            return self.forward_all(x)
        return self.forward_early(x, threshold=threshold)

    def loss(self, logits: Sequence[torch.Tensor], target: torch.Tensor, *,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> torch.Tensor:
        """``Σ_i w_i · loss_fn(logits[i], target)`` over the X exits (BranchyNet's joint loss)."""
        check_instance("logits", logits, (list, tuple), what="a list of exit logits")
        if len(logits) != len(self.heads):
            raise ValueError(f"logits must hold one tensor per exit ({len(self.heads)}), got {len(logits)}")
        total = None
        for w, z in zip(self.exit_weights, logits):
            term = w * loss_fn(z, target)
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        return (f"exit_after={self.exit_after}, exit_weights={self.exit_weights}, criterion={self.criterion!r}, "
                f"threshold={self.threshold}")

"""One optimizer, learning-rate schedule and update step for every training loop of moekit.

The LM trainer (`moekit.train`), distillation (`moekit.recipes.distill`), the paradigm methods
of `moekit.models` and every project build their optimizer with `build_optimizer`, take the
learning rate from `lr_at` and make each update with `UpdateStep`, so "the trainer's update"
means one thing:

1. set the learning rate of step s (linear warmup to ``lr`` over ``warmup_steps``, then cosine
   decay to ``min_lr_ratio · lr`` at the last step, or constant);
2. backward of the loss (when given; gradient accumulation calls ``backward`` itself);
3. global-norm clipping (``grad_clip > 0``) — or any ``clip_fn``, e.g. the expert-parallel one;
4. a non-finite loss or gradient norm raises `NonFiniteError` *before* the update, so the
   parameters stay those of the last good step;
5. ``optimizer.step()``, ``zero_grad``, then the aux-loss-free bias update of every MoE layer
   (`moekit.update_router_biases`, DeepSeek-V3), which must follow the parameter update, and
   the start of a new global-batch balance window (`moekit.losses.reset_balance_windows`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from moekit.losses import reset_balance_windows, update_router_biases
from moekit.validate import check_choice, check_int, check_number

__all__ = ["OPTIMIZERS", "SCHEDULES", "NonFiniteError", "param_groups", "build_optimizer", "lr_at", "UpdateStep"]

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN or inf; no parameter was changed."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and stacked expert weights; never norms, biases or embeddings (GPT-2's rule).

    Frozen parameters are left out, so freezing before building the optimizer keeps them exact.
    """
    weight_decay = check_number("weight_decay", weight_decay, min=0)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(params: Union[nn.Module, Iterable], *, name: str = "adamw", lr: float,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    momentum: float = 0.0, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over a module (with `param_groups`) or an iterable of parameters or groups.

    ``weight_decay`` is decoupled for AdamW and L2 for Adam and SGD, as torch defines them;
    ``fused`` is torch's fused Adam(W) implementation (CUDA; the CPU since torch 2.4), None = torch's default.
    """
    check_choice("name", name, OPTIMIZERS)
    lr = check_number("lr", lr, min=0, min_open=True)
    weight_decay = check_number("weight_decay", weight_decay, min=0)
    eps = check_number("eps", eps, min=0, min_open=True)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
    betas = tuple(check_number(f"betas[{i}]", b, min=0, max=1, max_open=True) for i, b in enumerate(betas))
    momentum = check_number("momentum", momentum, min=0, max=1, max_open=True)
    if isinstance(params, nn.Module):
        groups = param_groups(params, weight_decay) if name == "adamw" else \
            [p for p in params.parameters() if p.requires_grad]
    else:
        groups = list(params)
    if not groups or all(isinstance(g, dict) and not list(g["params"]) for g in groups):
        raise ValueError("build_optimizer got no trainable parameters (all frozen or none given)")
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool or None, got {fused!r}")
    extra = {} if fused is None else {"fused": fused}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra)
    if fused:
        raise ValueError("fused=True is an Adam / AdamW option; name='sgd' has none")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
          schedule: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based).

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over `warmup_steps`, then cosine decay
    reaching ``min_lr_ratio · lr`` at the last step (``schedule="constant"``: ``lr`` after warmup).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class UpdateStep:
    """The update of one optimizer step, shared by every training loop (see the module docstring).

        update = UpdateStep(model, optimizer, lr=3e-3, total_steps=1000, warmup_steps=50, grad_clip=1.0)
        for batch in batches:
            loss = criterion(model(x), y) + moekit.aux_loss(model)
            info = update(loss)            # {"lr", "loss", "grad_norm"}; update.step counts steps

    Args:
        model: the module trained (clipping, zero_grad and the bias update walk it).
        optimizer: any ``torch.optim.Optimizer`` (e.g. from `build_optimizer`).
        lr, total_steps, warmup_steps, min_lr_ratio, schedule: see `lr_at`. ``lr=None`` leaves
            the optimizer's learning rates alone (for loops with their own scheduler).
        grad_clip: global L2 norm bound; 0 = no clipping (the norm is still measured and checked).
        clip_fn: ``clip_fn(model, max_norm) -> norm`` replacing torch's clipping (expert parallel).
        bias_update: run `moekit.update_router_biases` after each step (default True).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, lr: Optional[float] = None,
                 total_steps: Optional[int] = None, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 schedule: str = "cosine", grad_clip: float = 0.0,
                 clip_fn: Optional[Callable[[nn.Module, float], float]] = None, bias_update: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.lr = check_number("lr", lr, min=0, min_open=True, allow_none=True)
        if self.lr is not None and total_steps is None:
            raise ValueError("total_steps is required when lr is given (the schedule ends there), got None")
        self.total_steps = check_int("total_steps", total_steps, min=1, allow_none=self.lr is None)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, min=0)
        self.min_lr_ratio = check_number("min_lr_ratio", min_lr_ratio, min=0, max=1)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.grad_clip = check_number("grad_clip", grad_clip, min=0)
        self.model, self.optimizer, self.clip_fn, self.bias_update = model, optimizer, clip_fn, bias_update
        self.step = 0

    def current_lr(self) -> Optional[float]:
        """The learning rate the next update uses (None when the schedule is the caller's)."""
        if self.lr is None:
            return None
        return lr_at(self.step, lr=self.lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     min_lr_ratio=self.min_lr_ratio, schedule=self.schedule)

    def set_lr(self) -> Optional[float]:
        """Write this step's learning rate into the optimizer (call before accumulating, or let
        `__call__` do it)."""
        lr = self.current_lr()
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        return lr

    def grad_norm(self) -> float:
        """Clip (if asked) and return the global gradient norm before clipping."""
        if self.grad_clip > 0 and self.clip_fn is not None:
            return float(self.clip_fn(self.model, self.grad_clip))
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        if self.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                                        self.grad_clip))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def __call__(self, loss: Optional[torch.Tensor] = None, *, loss_value: Optional[float] = None) -> dict:
        """One update. `loss`: backward is run on it; ``loss=None``: gradients are already
        accumulated and `loss_value` (if given) is only checked and reported."""
        lr = self.set_lr()
        if loss is not None:
            loss.backward()
            loss_value = float(loss.detach())
        gnorm = self.grad_norm()
        if (loss_value is not None and not math.isfinite(loss_value)) or not math.isfinite(gnorm):
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if loss_value is not None and not math.isfinite(loss_value) else "gradient norm"
            raise NonFiniteError(f"{what} became non-finite at step {self.step + 1} (loss {loss_value}, "
                                 f"grad norm {gnorm}); stopped before the update. Try a lower lr or grad_clip > 0.")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.bias_update:
            update_router_biases(self.model)
        reset_balance_windows(self.model)          # global-batch balance: the next step's window
        self.step += 1
        return {"lr": lr, "loss": loss_value, "grad_norm": gnorm}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = check_int("step", state.get("step"), min=0)

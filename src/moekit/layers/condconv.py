"""Conditionally parameterised convolutions (CondConv) — METHODS.md X7.

Yang, Bender, Le & Ngiam (2019), NeurIPS, "CondConv: Conditionally Parameterized
Convolutions for Efficient Inference".

Legend: B batch, C in channels, O out channels, E experts, H×W spatial, k kernel size.

Per example, ``r(x) = sigmoid(GAP(x) R + b)`` ∈ (0, 1)^E (sigmoid, not softmax: each expert's
weight is independent) and the kernel ``W(x) = Σ_e r_e(x) W_e``; the output is one convolution
with that kernel, ``conv(x, W(x)) = Σ_e r_e conv(x, W_e)`` by linearity, so the cost is one
convolution plus the kernel mix instead of E convolutions. The B per-example kernels run as a
single grouped convolution (examples stacked on the channel axis, ``groups = B · groups``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from moekit.layers.protocol import MoELayer, mixture_stats
from moekit.validate import check_bool, check_int, check_number

__all__ = ["CondConv2d"]

IntPair = Union[int, Tuple[int, int]]


class CondConv2d(MoELayer):
    """``(B, C, H, W) → (B, O, H', W')`` with a per-example mixture of E kernels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as ``nn.Conv2d`` (padding modes other than zeros are not offered).
        num_experts: E kernels (8 typical in the paper).
        routing_dropout: dropout on the pooled features before the routing layer (paper: 0 in
            most models).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, *, num_experts: int = 8,
                 stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                 bias: bool = True, routing_dropout: float = 0.0):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("num_experts", num_experts), ("groups", groups)):
            check_int(name, v, min=1)
        for name, v, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                             ("dilation", dilation, 1)):
            for i, vi in enumerate(v if isinstance(v, (tuple, list)) else (v,)):
                check_int(name if isinstance(v, int) else f"{name}[{i}]", vi, min=low)
            if isinstance(v, (tuple, list)) and len(v) != 2:
                raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
        check_bool("bias", bias)
        check_number("routing_dropout", routing_dropout, min=0, max=1, max_open=True)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible "
                             f"by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_experts, self.groups = num_experts, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        # (E, O, C/groups, kh, kw): expert e's kernel laid out like nn.Conv2d.weight.
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self.routing = nn.Linear(in_channels, num_experts)
        self.routing_dropout = nn.Dropout(routing_dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = self.weight[0, 0].numel()
        for e in range(self.num_experts):     # each expert initialised like nn.Conv2d
            nn.init.kaiming_uniform_(self.weight.data[e], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def routing_weights(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, E) ``sigmoid(GAP(x) R + b)``, each in (0, 1)."""
        pooled = self.routing_dropout(x_BCHW.mean(dim=(2, 3)))
        return torch.sigmoid(self.routing(pooled))

    def expert_conv(self, e: int, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Expert e's convolution alone (the reference the mixed kernel must reproduce)."""
        b = None if self.bias is None else self.bias[e]
        return F.conv2d(x_BCHW, self.weight[e], b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor, routing_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``routing_weights`` (B, E) overrides the learned routing (e.g. to share it across layers)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x)}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        B = x.shape[0]
        r_BE = self.routing_weights(x) if routing_weights is None else routing_weights
        if r_BE.shape != (B, self.num_experts):
            raise ValueError(f"routing_weights must have shape ({B}, {self.num_experts}), got {tuple(r_BE.shape)}")
        r_BE = r_BE.to(x.dtype)
        w = torch.einsum("be,eoikl->boikl", r_BE, self.weight.to(x.dtype))          # (B, O, C/g, kh, kw)
        w = w.reshape(B * self.out_channels, *w.shape[2:])
        y = F.conv2d(x.reshape(1, B * self.in_channels, *x.shape[2:]), w, None, self.stride, self.padding,
                     self.dilation, B * self.groups)                                 # (1, B·O, H', W')
        y = y.reshape(B, self.out_channels, *y.shape[2:])
        if self.bias is not None:
            y = y + (r_BE @ self.bias.to(x.dtype))[:, :, None, None]
        self.last_routing_weights = r_BE.detach()
        self.last_stats = mixture_stats(r_BE, normalize=True)
        self.aux_loss = torch.zeros((), device=x.device)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, num_experts="
                f"{self.num_experts}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")

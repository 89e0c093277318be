"""Swin Transformer V2 blocks and Swin2-MoSE, the ×s super-resolution network of Rossi,
Bernuzzi, Fontanini, Bertozzi & Prati (2024) in the Swin2SR layout (Conde et al. 2022) —
METHODS.md CV2.

Legend: B images, C image channels, H×W low-res size, D model dim, L = H·W tokens, Wn windows
of all images, N = w² tokens per window, h heads, E experts, K experts per image, s scale.

`WindowAttentionV2` (Liu et al. 2022, "Swin Transformer V2"): multi-head attention inside
w×w windows with *scaled cosine* logits ``cos(q, k) · exp(min(τ_h, log 100))`` (τ_h learned
per head, starting at log 10), a relative-position bias added to them, then softmax:

- ``position_bias="cpb"``: the *continuous* bias of Swin V2: a 2→512→h ReLU MLP of the
  log-spaced relative coordinates ``sign(Δ) log2(1 + 8|Δ|/(w−1)) / 3``, squashed to
  ``16 · sigmoid``;
- ``position_bias="table"``: Swin V1's learned table of (2w−1)² biases per head — what the
  official Swin2-MoSE configuration uses (``use_cpb_bias: false, use_rpe_bias: true``);
- ``lepe=True``: LePE (Dong et al. 2022, CSWin), a depthwise 3×3 convolution of each window's
  values added to the attention output — Swin2-MoSE's positional encoding.

Queries and values have biases, keys none (Swin V2's ``q_bias`` / ``v_bias``).

`SwinV2Block`: the cyclic shift by `shift_size` (windows that straddle the wrap-around are
masked with −100 between the regions that were not neighbours), window attention, and
*res-post-norm*: ``x = x + LN(attn(x)); x = x + LN(ffn(x))``. The FFN sees the whole
(B, L, D) token map of each image, so a per-example MoE routes each image as one example, as
the official code does.

`Swin2MoSE`: shallow 3×3 conv → residual groups (RSTB: Swin V2 blocks alternating shift 0 and
w/2, a 3×3 conv, a skip) → LayerNorm → 3×3 conv + the shallow features → pixel-shuffle
upsampler (``pixelshuffledirect``: one conv to C·s² channels and PixelShuffle(s)). Its block
FFNs are, by ``ffn=``:

- ``"mlp"``: Swin2SR's two-layer GELU MLP (hidden ``mlp_ratio · D``);
- ``"moe"``: `moekit.layers.MoESM` with ``merger="sum"`` — the paper's "MoE 8/2 without
  Smart-Merger": the same per-image gate, experts and balance loss, outputs summed by gate;
- ``"moe_sm"``: `MoESM` with the Smart-Merger (the paper's model).

``residual="bicubic"`` (not in the official model, off by default) adds the bicubic upsampling of
the input to the output and zero-initialises the upsampler's convolution, so an untrained
network *is* bicubic (VDSR's global residual; Swin2SR's ``pixelshuffle_aux`` upsampler also
adds a bicubic branch): short trainings then start from the classical baseline.

Departures from the official code: no stochastic depth (its ``drop_path_rate=0.1`` comment
says "no impact on SR results"), no input mean subtraction (it is 0 for C ≠ 3), the attention
mask is built for each input size rather than stored, and the window never shrinks to the
input size: inputs are reflect-padded to a multiple of the window, as the official
``check_image_size`` does, and the output cropped.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers import MoESM
from moekit.validate import check_bool, check_choice, check_instance, check_int, check_number

__all__ = ["POSITION_BIASES", "FFNS", "RESIDUALS", "window_partition", "window_reverse", "shifted_window_mask",
           "WindowAttentionV2", "SwinMLP", "SwinV2Block", "Swin2MoSE", "swin_param_counts"]

POSITION_BIASES = ("cpb", "table", "none")
FFNS = ("mlp", "moe", "moe_sm")
RESIDUALS = ("none", "bicubic")
MASK_VALUE = -100.0          # Swin's value for the logits between non-neighbouring shifted regions


def window_partition(x_BHWD: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, D) → (B·H/w·W/w, w·w, D), windows in row-major order within each image."""
    B, H, W, D = x_BHWD.shape
    x = x_BHWD.view(B, H // w, w, W // w, w, D).permute(0, 1, 3, 2, 4, 5)     # (B, H/w, W/w, w, w, D)
    return x.reshape(-1, w * w, D)


def window_reverse(win_WND: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B·H/w·W/w, w·w, D) → (B, H, W, D)."""
    D = win_WND.shape[-1]
    x = win_WND.view(-1, H // w, W // w, w, w, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, D)


def shifted_window_mask(H: int, W: int, w: int, shift: int, *, device=None) -> torch.Tensor:
    """(H/w·W/w, w², w²) additive mask of shifted-window attention: 0 within a region, −100 across.

    After the cyclic shift by −`shift`, each axis has three regions — ``[0, H−w)``, ``[H−w, H−shift)``
    and ``[H−shift, H)`` — and tokens of different regions were not neighbours in the image.
    """
    def regions(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - w).long() + (i >= n - shift).long()

    label_HW = regions(H)[:, None] * 3 + regions(W)[None, :]
    label_WN = window_partition(label_HW[None, :, :, None].float(), w).squeeze(-1)   # (nW, w²)
    diff = label_WN[:, None, :] - label_WN[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, MASK_VALUE)


def _relative_index(w: int) -> torch.Tensor:
    """(w², w²) index into the (2w−1)² relative offsets: ``(Δr + w−1)(2w−1) + Δc + w−1``."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, w²)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)                       # (w², w², 2)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def _log_spaced_coords(w: int) -> torch.Tensor:
    """((2w−1)², 2) relative coordinates ``sign(Δ) log2(1 + 8|Δ|/(w−1)) / log2(8)`` (Swin V2)."""
    d = torch.arange(-(w - 1), w, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1)               # (2w−1, 2w−1, 2)
    if w > 1:
        table = table / (w - 1)
    table = table * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.reshape(-1, 2)


class WindowAttentionV2(nn.Module):
    """``(Wn, N, D) → (Wn, N, D)``: scaled-cosine multi-head attention within windows of N = w² tokens.

    Args:
        dim: D. num_heads: h (D divisible by h). window_size: w.
        position_bias: ``"cpb"`` | ``"table"`` | ``"none"`` (see the module docstring).
        lepe: add LePE (a depthwise 3×3 convolution of the values within each window).
        qkv_bias: learned query and value biases (the key has none).
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int, position_bias: str = "cpb",
                 lepe: bool = False, qkv_bias: bool = True):
        super().__init__()
        check_int("dim", dim, min=1)
        check_int("num_heads", num_heads, min=1)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads={num_heads}, got {dim}")
        check_int("window_size", window_size, min=1)
        check_choice("position_bias", position_bias, POSITION_BIASES)
        check_bool("lepe", lepe)
        check_bool("qkv_bias", qkv_bias)
        self.dim, self.num_heads, self.window_size, self.position_bias = dim, num_heads, window_size, position_bias
        w = window_size
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)
        if position_bias != "none":
            self.register_buffer("relative_index", _relative_index(w), persistent=False)
        if position_bias == "cpb":
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True),
                                         nn.Linear(512, num_heads, bias=False))
            self.register_buffer("relative_coords", _log_spaced_coords(w), persistent=False)
        elif position_bias == "table":
            self.bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, num_heads))
            nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if lepe else None

    def relative_bias(self) -> Optional[torch.Tensor]:
        """(h, N, N) bias added to the logits (None for ``position_bias="none"``)."""
        if self.position_bias == "none":
            return None
        N = self.window_size ** 2
        if self.position_bias == "cpb":
            table = 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords))      # ((2w−1)², h)
        else:
            table = self.bias_table
        return table[self.relative_index.view(-1)].view(N, N, -1).permute(2, 0, 1)

    def forward(self, x_WND: torch.Tensor, mask_MNN: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`mask_MNN`: the (M, N, N) additive mask of the M windows of one image (`shifted_window_mask`),
        applied to every image; Wn must be a multiple of M."""
        Wn, N, D = x_WND.shape
        h = self.num_heads
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x_WND, self.qkv.weight, bias).view(Wn, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                           # (Wn, h, N, D/h)
        scale_h = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * scale_h   # (Wn, h, N, N)
        rel = self.relative_bias()
        if rel is not None:
            attn = attn + rel.unsqueeze(0)
        if mask_MNN is not None:
            M = mask_MNN.shape[0]
            attn = (attn.view(Wn // M, M, h, N, N) + mask_MNN.unsqueeze(1).unsqueeze(0)).view(Wn, h, N, N)
        out = attn.softmax(-1) @ v                                                  # (Wn, h, N, D/h)
        if self.lepe is not None:
            w = self.window_size
            v_img = v.transpose(-2, -1).reshape(Wn, D, w, w)                        # channel = head·D/h + j
            out = out + self.lepe(v_img).view(Wn, h, D // h, N).transpose(-2, -1)
        return self.proj(out.transpose(1, 2).reshape(Wn, N, D))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"position_bias={self.position_bias!r}, lepe={self.lepe is not None}")


class SwinMLP(nn.Module):
    """``(..., D) → (..., D)``: Swin's FFN, ``fc2(GELU(fc1(x)))`` with hidden `d_hidden`."""

    def __init__(self, *, d_model: int, d_hidden: int):
        super().__init__()
        check_int("d_model", d_model, min=1)
        check_int("d_hidden", d_hidden, min=1)
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinV2Block(nn.Module):
    """``(B, H·W, D) → (B, H·W, D)``: (shifted-)window attention and an FFN, each with res-post-norm.

    Args:
        dim, num_heads, window_size, position_bias, lepe, qkv_bias: see `WindowAttentionV2`.
        shift_size: the cyclic shift (0: regular windows; Swin uses w/2 on every other block).
        ffn: the module applied to the (B, H·W, D) token map (default `SwinMLP` of hidden
            ``mlp_ratio · D``); an MoE layer here routes each image as one example.
        mlp_ratio: hidden size of the default FFN over D.
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int, shift_size: int = 0,
                 ffn: Optional[nn.Module] = None, mlp_ratio: float = 4.0, position_bias: str = "cpb",
                 lepe: bool = False, qkv_bias: bool = True, norm_eps: float = 1e-5):
        super().__init__()
        check_int("shift_size", shift_size, min=0)
        if shift_size >= window_size:
            raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size}")
        check_instance("ffn", ffn, nn.Module, allow_none=True)
        mlp_ratio = check_number("mlp_ratio", mlp_ratio, min=0, min_open=True)
        self.window_size, self.shift_size = window_size, shift_size
        self.attn = WindowAttentionV2(dim=dim, num_heads=num_heads, window_size=window_size,
                                      position_bias=position_bias, lepe=lepe, qkv_bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = ffn if ffn is not None else SwinMLP(d_model=dim, d_hidden=int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self._masks: dict = {}

    def attn_mask(self, H: int, W: int, device) -> Optional[torch.Tensor]:
        if self.shift_size == 0:
            return None
        key = (H, W, str(device))
        if key not in self._masks:
            self._masks[key] = shifted_window_mask(H, W, self.window_size, self.shift_size, device=device)
        return self._masks[key]

    def forward(self, x_BLD: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        H, W = size
        B, L, D = x_BLD.shape
        w, s = self.window_size, self.shift_size
        if L != H * W or H % w or W % w:
            raise ValueError(f"x must be (B, H·W, D) with H, W multiples of window_size={w}; got {tuple(x_BLD.shape)} "
                             f"for size {size}")
        x = x_BLD.view(B, H, W, D)
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(x, w), self.attn_mask(H, W, x.device).to(x.dtype) if s else None)
        y = window_reverse(y, w, H, W)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x_BLD + self.norm1(y.reshape(B, L, D))                 # res-post-norm
        return x + self.norm2(self.ffn(x))


class _ResidualGroup(nn.Module):
    """RSTB: Swin V2 blocks (shift 0, w/2, 0, …), a 3×3 conv on the token map, and a skip."""

    def __init__(self, blocks: Sequence[SwinV2Block], dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x_BLD: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = x_BLD
        for blk in self.blocks:
            y = blk(y, size)
        B, L, D = y.shape
        y_img = y.transpose(1, 2).reshape(B, D, *size)
        return self.conv(y_img).flatten(2).transpose(1, 2) + x_BLD


class Swin2MoSE(nn.Module):
    """``(B, C, H, W) → (B, C, sH, sW)``: Swin2SR / Swin2-MoSE super-resolution (module docstring).

    Defaults are the official Sen2Venus ×2 configuration (``cfgs/swin2_mose``): D = 90, four
    groups of 6 blocks with 6 heads, window 16, MoE-SM 8/2 with mlp_ratio 1, table bias + LePE.
    After a forward pass, `moekit.aux_loss(model)` sums the MoE layers' balance losses (the paper
    weights it 0.2 in the total loss).

    Args:
        in_channels: C (4 bands in the paper). scale: s.
        embed_dim: D. depths: blocks per residual group. num_heads: heads per group.
        window_size: w. ffn: ``"mlp"`` | ``"moe"`` | ``"moe_sm"``.
        mlp_ratio: FFN (or expert) hidden over D (default 1 for MoE FFNs, 2 for the MLP, as the
            official configurations).
        num_experts, top_k, balance_coef, with_noise: the MoE-SM layers' (E, K, 1e-2, off).
        position_bias, lepe: see `WindowAttentionV2`.
        residual: ``"none"`` (official) or ``"bicubic"`` (see the module docstring).
        backend: the expert banks' backend.
    """

    def __init__(self, *, in_channels: int = 4, scale: int = 2, embed_dim: int = 90,
                 depths: Sequence[int] = (6, 6, 6, 6), num_heads: Sequence[int] = (6, 6, 6, 6),
                 window_size: int = 16, ffn: str = "moe_sm", mlp_ratio: Optional[float] = None,
                 num_experts: int = 8, top_k: int = 2, balance_coef: float = 1e-2, with_noise: bool = False,
                 position_bias: str = "table", lepe: bool = True, residual: str = "none", backend: str = "auto"):
        super().__init__()
        check_int("in_channels", in_channels, min=1)
        check_int("scale", scale, min=1)
        check_int("embed_dim", embed_dim, min=1)
        check_int("window_size", window_size, min=1)
        check_choice("ffn", ffn, FFNS)
        check_choice("residual", residual, RESIDUALS)
        depths, num_heads = tuple(depths), tuple(num_heads)
        if not depths or len(depths) != len(num_heads):
            raise ValueError(f"depths and num_heads must be non-empty and of one length, got {depths} and {num_heads}")
        for i, (d, h) in enumerate(zip(depths, num_heads)):
            check_int(f"depths[{i}]", d, min=1)
            check_int(f"num_heads[{i}]", h, min=1)
        if mlp_ratio is None:
            mlp_ratio = 2.0 if ffn == "mlp" else 1.0
        mlp_ratio = check_number("mlp_ratio", mlp_ratio, min=0, min_open=True)
        self.in_channels, self.scale, self.window_size, self.ffn_kind = in_channels, scale, window_size, ffn
        self.residual = residual
        D, hidden = embed_dim, max(1, int(embed_dim * mlp_ratio))

        def make_ffn() -> nn.Module:
            if ffn == "mlp":
                return SwinMLP(d_model=D, d_hidden=hidden)
            return MoESM(d_model=D, num_experts=num_experts, top_k=top_k, d_hidden=hidden,
                         merger="smart" if ffn == "moe_sm" else "sum", balance_coef=balance_coef,
                         with_noise=with_noise, backend=backend)

        self.conv_first = nn.Conv2d(in_channels, D, 3, padding=1)
        self.embed_norm = nn.LayerNorm(D)                                      # Swin2SR's patch_norm
        self.groups = nn.ModuleList(
            _ResidualGroup([SwinV2Block(dim=D, num_heads=h, window_size=window_size,
                                        shift_size=0 if i % 2 == 0 else window_size // 2, ffn=make_ffn(),
                                        position_bias=position_bias, lepe=lepe) for i in range(depth)], D)
            for depth, h in zip(depths, num_heads))
        self.norm = nn.LayerNorm(D)
        self.conv_after_body = nn.Conv2d(D, D, 3, padding=1)
        self.upsample = nn.Sequential(nn.Conv2d(D, in_channels * scale ** 2, 3, padding=1), nn.PixelShuffle(scale))
        self.apply(_init_weights)
        if residual == "bicubic":
            nn.init.zeros_(self.upsample[0].weight)
            nn.init.zeros_(self.upsample[0].bias)

    def forward(self, lr_BCHW: torch.Tensor) -> torch.Tensor:
        if not isinstance(lr_BCHW, torch.Tensor) or not lr_BCHW.is_floating_point() or lr_BCHW.dim() != 4 \
                or lr_BCHW.shape[1] != self.in_channels:
            what = f"{lr_BCHW.dtype} tensor of shape {tuple(lr_BCHW.shape)}" if isinstance(lr_BCHW, torch.Tensor) \
                else type(lr_BCHW).__name__
            raise ValueError(f"lr must be a float tensor of shape (B, {self.in_channels}, H, W), got {what}")
        B, C, H, W = lr_BCHW.shape
        w = self.window_size
        pad_h, pad_w = (-H) % w, (-W) % w
        x = F.pad(lr_BCHW, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else lr_BCHW
        Hp, Wp = x.shape[-2:]
        shallow = self.conv_first(x)                                            # (B, D, Hp, Wp)
        t = self.embed_norm(shallow.flatten(2).transpose(1, 2))                 # (B, L, D)
        for group in self.groups:
            t = group(t, (Hp, Wp))
        t = self.norm(t)
        deep = t.transpose(1, 2).reshape(B, -1, Hp, Wp)
        out = self.upsample(self.conv_after_body(deep) + shallow)              # (B, C, s·Hp, s·Wp)
        out = out[:, :, :H * self.scale, :W * self.scale]
        if self.residual == "bicubic":
            out = out + F.interpolate(lr_BCHW, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return out


def _init_weights(m: nn.Module) -> None:
    """Swin2SR's initialisation: truncated-normal (std 0.02) linear weights, zero biases, unit norms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def swin_param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per image) parameters: an MoE-SM layer of E experts, K per image, counts K
    experts as active (its gate and merger always); every other parameter is active."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for m in model.modules():
        if isinstance(m, MoESM):
            per_expert = sum(p.numel() for p in m.experts.parameters()) // m.num_experts
            idle += (m.num_experts - m.top_k) * per_expert
    return total, total - idle

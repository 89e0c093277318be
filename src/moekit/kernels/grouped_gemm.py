"""Triton grouped GEMM: forward (optionally gathering, SwiGLU-fused, scaling, scatter-adding)
and the per-expert weight gradient (MegaBlocks-style dropless execution, Gale et al. 2023).

Legend: N rows grouped by expert, T tokens, E experts, I input dim, O output dim, F hidden.

Forward kernel, for row r of expert e (rows of e are ``offs[e-1] ≤ r < offs[e]``)::

    a_r   = A[a_idx[r]]        if GATHER  else A[r]          (rows read through an index list)
    z_r   = a_r @ W[e]                                          (fp32 accumulation)
    z_r   = silu(a_r @ W[e][:, :F]) · (a_r @ W[e][:, F:])     if SWIGLU (output width F)
    z_r   = scale[r] · z_r                                     if ROW_SCALE
    Y[y_idx[r]] += z_r (fp32 atomics)   if SCATTER_ADD
    Y[y_idx[r]]  = z_r                  if SCATTER (rows are distinct: a permutation)
    Y[r]         = z_r                  otherwise

A third epilogue is the SwiGLU backward (``g_r = a_r @ W[e]`` is ∂L/∂h_r before the combine
weight): it reads the saved pre-activations, writes ``d(gate, up)`` and accumulates the
combine weight's gradient ``Σ_f g_r · h_r``.

Row tiles are assigned inside the kernel from ``offs`` (a cumulative sum over experts in
registers), so a launch needs neither a host sync nor a precomputed schedule: the grid is
bounded from shapes alone, ``Σ_e ceil(n_e / BM) ≤ ceil(N / BM) + min(E, N)``.

Weight-gradient kernel: ``dW[e] = Σ_{r of e} (s_r · A[ia(r)])ᵀ B[ib(r)]`` with optional
gathers on either side, an optional row scale on A, and optionally ``B = silu(gate) · up``
computed on the fly from saved pre-activations; experts with no rows get zeros.

Launchers, one per use of the forward kernel, each with one return type:

- `gmm`: ``Y[r] = a_r @ W[e]``;
- `gmm_scatter_add`: ``Y[rows[r]] += s_r · a_r @ W[e]`` into fp32 (the atomic combine);
- `gmm_scatter`: ``Y[rows[r]] = s_r · a_r @ W[e]`` (distinct rows: the slot combine);
- `gmm_swiglu` / `gmm_swiglu_with_pre`: the SwiGLU epilogue, without / with the saved
  pre-activations;
- `gmm_swiglu_backward`: the SwiGLU backward epilogue;

and `gmm_wgrad` launches the weight-gradient kernel. Each takes ``tiles=`` (see
`moekit.kernels.launch.check_tiles`) to force tile sizes, e.g. in a benchmark's sweep.
The autograd ops built on them live in `moekit.ops` (`grouped_mm_triton`, `fused_moe`).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import triton
import triton.language as tl

from moekit.kernels.launch import gemm_config, launch_context, num_tiles_bound, upcast_for_dot, wgrad_config

__all__ = ["gmm", "gmm_scatter_add", "gmm_scatter", "gmm_swiglu", "gmm_swiglu_with_pre", "gmm_swiglu_backward",
           "gmm_wgrad", "check_operands"]

Tiles = Optional[Mapping[str, int]]

# Values of the forward kernel's EPILOGUE constexpr.
_PLAIN, _SWIGLU, _DSWIGLU = 0, 1, 2


@triton.jit
def _gmm_kernel(
    a_ptr, w_ptr, y_ptr, pre_ptr, offs_ptr, a_idx_ptr, y_idx_ptr, scale_ptr, dscale_ptr,
    E, I, O,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_ym, stride_yn, stride_pm, stride_pn,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, SCATTER_ADD: tl.constexpr, ROW_SCALE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    STORE_PRE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # EPILOGUE: 0 plain, 1 SwiGLU (two accumulators, gate and up halves of W[e]),
    # 2 SwiGLU backward (acc is dL/dh·(1/w); reads the saved pre-activations, writes d(gate, up)
    #   and atomically accumulates the combine-weight gradient Σ_f acc·h).
    # Grouped program order (Triton matmul tutorial): a wave of programs covers GROUP_M row
    # tiles × many column tiles, so row tiles and weight columns are re-read from L2, not HBM.
    pid = tl.program_id(0)
    num_n = tl.cdiv(O, BLOCK_N)
    num_m = tl.num_programs(0) // num_n
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    # Tile schedule without host sync or extra launches: expert e owns row tiles
    # [tile_end[e] - tiles[e], tile_end[e]); programs past the last tile exit.
    ee = tl.arange(0, BLOCK_E)
    e_ok = ee < E
    ends = tl.load(offs_ptr + ee, mask=e_ok, other=0)
    starts = tl.load(offs_ptr + ee - 1, mask=e_ok & (ee > 0), other=0)
    tiles = tl.where(e_ok, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_end = tl.cumsum(tiles, 0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    if e < E:
        this = ee == e
        row0 = tl.sum(tl.where(this, starts, 0), 0) + (pid_m - tl.sum(tl.where(this, tile_end - tiles, 0), 0)) * BLOCK_M
        row_end = tl.sum(tl.where(this, ends, 0), 0)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        if GATHER:
            a_rows = tl.load(a_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < O
        ks = tl.arange(0, BLOCK_K)
        a_base = a_ptr + a_rows[:, None] * stride_am
        w_base = w_ptr + e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EPILOGUE == 1:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k = k0 + ks
            k_ok = k < I
            a = tl.load(a_base + k[None, :].to(tl.int64) * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            w_ptrs = w_base + k[:, None].to(tl.int64) * stride_wk
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
            if EPILOGUE == 1:
                # Up columns sit O columns after the gate columns of W[e].
                wu = tl.load(w_ptrs + O * stride_wn, mask=w_mask, other=0.0)
                if UPCAST:
                    wu = wu.to(tl.float32)
                if IEEE:
                    acc_up += tl.dot(a, wu, input_precision="ieee")
                else:
                    acc_up += tl.dot(a, wu)
        out_mask = row_ok[:, None] & col_ok[None, :]
        p_ptrs = pre_ptr + rows[:, None].to(tl.int64) * stride_pm + cols[None, :].to(tl.int64) * stride_pn
        if EPILOGUE == 1:
            # Round the pre-activations to the input dtype first, as the unfused
            # matmul → silu · up chain does (and as the backward, which reads them, sees them).
            g = acc.to(a_ptr.dtype.element_ty).to(tl.float32)
            u = acc_up.to(a_ptr.dtype.element_ty).to(tl.float32)
            if STORE_PRE:
                tl.store(p_ptrs, g.to(pre_ptr.dtype.element_ty), mask=out_mask)
                tl.store(p_ptrs + O * stride_pn, u.to(pre_ptr.dtype.element_ty), mask=out_mask)
            acc = g * tl.sigmoid(g) * u
        if EPILOGUE == 2:
            g = tl.load(p_ptrs, mask=out_mask, other=0.0).to(tl.float32)
            u = tl.load(p_ptrs + O * stride_pn, mask=out_mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            # h as the forward stored it (rounded to the activation dtype).
            h = (silu * u).to(pre_ptr.dtype.element_ty).to(tl.float32)
            tl.atomic_add(dscale_ptr + rows, tl.sum(acc * h, 1), mask=row_ok)
            s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            dh = acc * s[:, None]
            y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :].to(tl.int64) * stride_yn
            tl.store(y_ptrs, (dh * u * sig * (1 + g * (1 - sig))).to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.store(y_ptrs + O * stride_yn, (dh * silu).to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            if ROW_SCALE:
                s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
                acc = acc * s[:, None]
            if SCATTER:
                y_rows = tl.load(y_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
                y_ptrs = y_ptr + y_rows[:, None] * stride_ym + cols[None, :].to(tl.int64) * stride_yn
                if SCATTER_ADD:
                    tl.atomic_add(y_ptrs, acc, mask=out_mask)
                else:
                    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
            else:
                y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :].to(tl.int64) * stride_yn
                tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gmm_wgrad_kernel(
    a_ptr, b_ptr, dw_ptr, offs_ptr, a_idx_ptr, b_idx_ptr, scale_ptr,
    I, O,
    stride_am, stride_ai, stride_bm, stride_bo, stride_we, stride_wi, stride_wo,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, ROW_SCALE: tl.constexpr, B_SWIGLU: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_I: tl.constexpr,
):
    # Axis 0: (I, O) tiles of one expert in grouped order (L2 reuse of row slabs); axis 1: expert.
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_i = tl.cdiv(I, BLOCK_I)
    num_o = tl.cdiv(O, BLOCK_O)
    in_group = GROUP_I * num_o
    first_i = (pid // in_group) * GROUP_I
    group_i = tl.minimum(num_i - first_i, GROUP_I)
    pid_i = first_i + (pid % in_group) % group_i
    pid_o = (pid % in_group) // group_i
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    oo = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    i_ok = ii < I
    o_ok = oo < O
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + rr
        r_ok = rows < end
        if A_GATHER:
            a_rows = tl.load(a_idx_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        if B_GATHER:
            b_rows = tl.load(b_idx_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        # A loaded transposed, (BLOCK_I, BLOCK_R): the reduction runs over rows.
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_am + ii[:, None].to(tl.int64) * stride_ai,
                      mask=i_ok[:, None] & r_ok[None, :], other=0.0)
        b_ptrs = b_ptr + b_rows[:, None] * stride_bm + oo[None, :].to(tl.int64) * stride_bo
        b_mask = r_ok[:, None] & o_ok[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if B_SWIGLU:
            # B = silu(gate) · up from the saved (N, 2O) pre-activations: h is never stored.
            gate = b.to(tl.float32)
            up = tl.load(b_ptrs + O * stride_bo, mask=b_mask, other=0.0).to(tl.float32)
            b = (gate * tl.sigmoid(gate) * up).to(b_ptr.dtype.element_ty)
        if ROW_SCALE:
            s = tl.load(scale_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
            a_t = (a_t.to(tl.float32) * s[None, :]).to(a_ptr.dtype.element_ty)
        if UPCAST:
            a_t = a_t.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc += tl.dot(a_t, b, input_precision="ieee")
        else:
            acc += tl.dot(a_t, b)
    w_ptrs = (dw_ptr + e.to(tl.int64) * stride_we + ii[:, None].to(tl.int64) * stride_wi
              + oo[None, :].to(tl.int64) * stride_wo)
    tl.store(w_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=i_ok[:, None] & o_ok[None, :])


def check_operands(a: torch.Tensor, w: torch.Tensor, offs_E: torch.Tensor) -> None:
    """a (rows, I) and w (E, I, O) of one dtype and device, offs (E,)."""
    if a.dim() != 2 or w.dim() != 3:
        raise ValueError(f"expected a (rows, I) and w (E, I, O), got {tuple(a.shape)} and {tuple(w.shape)}")
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"inner dims differ: a has I={a.shape[1]}, w has I={w.shape[1]}")
    if a.dtype != w.dtype:
        raise TypeError(f"a and w must share a dtype, got {a.dtype} and {w.dtype}")
    if offs_E.numel() != w.shape[0]:
        raise ValueError(f"offs has {offs_E.numel()} entries for {w.shape[0]} experts")
    if a.device != w.device or offs_E.device != a.device:
        raise ValueError(f"operands on different devices: {a.device}, {w.device}, {offs_E.device}")


def _launch(a, w_EIO, offs_E, y, *, n_rows: int, n_out: int, tiles: Tiles, epilogue: int = _PLAIN,
            pre=None, store_pre: bool = False, a_idx_N=None, y_idx_N=None, scatter_add: bool = False,
            scale_N=None, dscale_N=None) -> None:
    """Run `_gmm_kernel` over ``n_rows`` rows into the caller's buffers (y, pre, dscale_N).

    ``pre`` is the pre-activation buffer: written when ``store_pre``, read by the SwiGLU
    backward epilogue, unused (y stands in) otherwise.
    """
    E, I, _ = w_EIO.shape
    if n_rows == 0 or n_out == 0:
        return
    if I == 0:
        # Empty reduction: every product is 0, and so is silu(0) · 0.
        y.zero_()
        if store_pre:
            pre.zero_()
        return
    dev = a.device
    cfg = gemm_config(n_rows, I, n_out, E, dev, a.dtype, two_outputs=epilogue == _SWIGLU, tiles=tiles)
    offs_E = offs_E.to(torch.int32)
    pre = y if pre is None else pre
    dummy = offs_E
    grid = (num_tiles_bound(n_rows, E, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    with launch_context(dev):
        _gmm_kernel[grid](
            a, w_EIO, y, pre, offs_E,
            a_idx_N if a_idx_N is not None else dummy,
            y_idx_N if y_idx_N is not None else dummy,
            scale_N if scale_N is not None else dummy,
            dscale_N if dscale_N is not None else dummy,
            E, I, n_out,
            a.stride(0), a.stride(1), w_EIO.stride(0), w_EIO.stride(1), w_EIO.stride(2),
            y.stride(0), y.stride(1), pre.stride(0), pre.stride(1),
            GATHER=a_idx_N is not None, SCATTER=y_idx_N is not None,
            SCATTER_ADD=y_idx_N is not None and scatter_add, ROW_SCALE=scale_N is not None,
            EPILOGUE=epilogue, STORE_PRE=store_pre, UPCAST=upcast_for_dot(a.dtype, dev),
            IEEE=a.dtype == torch.float32,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
            BLOCK_E=max(16, triton.next_power_of_2(E)),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def _rows(a: torch.Tensor, a_idx_N: Optional[torch.Tensor]) -> int:
    return a.shape[0] if a_idx_N is None else a_idx_N.shape[0]


def _swiglu_width(w_EIO: torch.Tensor) -> int:
    if w_EIO.shape[2] % 2:
        raise ValueError(f"the SwiGLU epilogue needs an even output width (gate and up halves), got {w_EIO.shape[2]}")
    return w_EIO.shape[2] // 2


def _check_scatter(rows_N: torch.Tensor, n_rows: int, num_rows: int) -> None:
    if rows_N.shape != (n_rows,):
        raise ValueError(f"rows_N must have shape ({n_rows},), one output row per input row, got {tuple(rows_N.shape)}")
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be an int >= 0, got {num_rows!r}")


def gmm(a_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, *, tiles: Tiles = None) -> torch.Tensor:
    """``y[r] = a[r] @ W[e(r)]``: (N, O) in a's dtype; rows past ``offs_E[-1]`` are left
    uninitialised. w_EIO: any strides (a transposed view costs no copy)."""
    check_operands(a_NI, w_EIO, offs_E)
    N, O = a_NI.shape[0], w_EIO.shape[2]
    y = torch.empty(N, O, dtype=a_NI.dtype, device=a_NI.device)
    _launch(a_NI, w_EIO, offs_E, y, n_rows=N, n_out=O, tiles=tiles)
    return y


def gmm_scatter_add(a_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, rows_N: torch.Tensor,
                    num_rows: int, *, scale_N: Optional[torch.Tensor] = None, tiles: Tiles = None) -> torch.Tensor:
    """``Y[rows[r]] += s_r · a[r] @ W[e(r)]`` into a zeroed fp32 ``(num_rows, O)`` (fp32 atomics,
    so the order of additions into a row is not fixed); ``s_r = scale_N[r]``, or 1."""
    check_operands(a_NI, w_EIO, offs_E)
    N, O = a_NI.shape[0], w_EIO.shape[2]
    _check_scatter(rows_N, N, num_rows)
    y = torch.zeros(num_rows, O, dtype=torch.float32, device=a_NI.device)
    _launch(a_NI, w_EIO, offs_E, y, n_rows=N, n_out=O, tiles=tiles, y_idx_N=rows_N, scatter_add=True,
            scale_N=scale_N)
    return y


def gmm_scatter(a_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, rows_N: torch.Tensor,
                num_rows: int, *, scale_N: Optional[torch.Tensor] = None, tiles: Tiles = None) -> torch.Tensor:
    """``Y[rows[r]] = s_r · a[r] @ W[e(r)]`` into ``(num_rows, O)`` in a's dtype. The rows must
    be distinct (a permutation, or part of one); rows that no index names stay uninitialised."""
    check_operands(a_NI, w_EIO, offs_E)
    N, O = a_NI.shape[0], w_EIO.shape[2]
    _check_scatter(rows_N, N, num_rows)
    y = torch.empty(num_rows, O, dtype=a_NI.dtype, device=a_NI.device)
    _launch(a_NI, w_EIO, offs_E, y, n_rows=N, n_out=O, tiles=tiles, y_idx_N=rows_N, scatter_add=False,
            scale_N=scale_N)
    return y


def gmm_swiglu(a: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, *,
               a_idx_N: Optional[torch.Tensor] = None, tiles: Tiles = None) -> torch.Tensor:
    """``h[r] = silu(a_r @ W[e][:, :F]) · (a_r @ W[e][:, F:])``: (N, F) in a's dtype, with
    ``O = 2F`` and ``a_r = a[a_idx_N[r]]`` when ``a_idx_N`` is given (else ``a[r]``)."""
    check_operands(a, w_EIO, offs_E)
    N, F = _rows(a, a_idx_N), _swiglu_width(w_EIO)
    h = torch.empty(N, F, dtype=a.dtype, device=a.device)
    _launch(a, w_EIO, offs_E, h, n_rows=N, n_out=F, tiles=tiles, epilogue=_SWIGLU, a_idx_N=a_idx_N)
    return h


def gmm_swiglu_with_pre(a: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, *,
                        a_idx_N: Optional[torch.Tensor] = None, tiles: Tiles = None):
    """`gmm_swiglu` that also stores the pre-activations for a backward pass:
    ``(h (N, F), pre (N, 2F))``, both in a's dtype (gate columns first)."""
    check_operands(a, w_EIO, offs_E)
    N, F = _rows(a, a_idx_N), _swiglu_width(w_EIO)
    h = torch.empty(N, F, dtype=a.dtype, device=a.device)
    pre = torch.empty(N, 2 * F, dtype=a.dtype, device=a.device)
    _launch(a, w_EIO, offs_E, h, n_rows=N, n_out=F, tiles=tiles, epilogue=_SWIGLU, pre=pre, store_pre=True,
            a_idx_N=a_idx_N)
    return h, pre


def gmm_swiglu_backward(a: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, pre_N2O: torch.Tensor,
                        scale_N: torch.Tensor, *, a_idx_N: Optional[torch.Tensor] = None, tiles: Tiles = None):
    """The SwiGLU backward epilogue on ``g_r = a_r @ W[e]`` (∂L/∂h_r before the combine weight
    ``s_r = scale_N[r]``), with the saved pre-activations (N, 2O).

    Returns ``(d_pre (N, 2O) in a's dtype, d_scale (N,) fp32)``: ``d_pre`` the gradient of
    (gate, up) given ``∂L/∂h = s_r · g_r``, ``d_scale[r] = Σ_f g_r · h_r``.
    """
    check_operands(a, w_EIO, offs_E)
    N, O = _rows(a, a_idx_N), w_EIO.shape[2]
    if pre_N2O.shape != (N, 2 * O) or scale_N.shape != (N,):
        raise ValueError(f"the SwiGLU backward needs pre-activations ({N}, {2 * O}) and scale ({N},), got "
                         f"{tuple(pre_N2O.shape)} and {tuple(scale_N.shape)}")
    d_pre = torch.empty(N, 2 * O, dtype=a.dtype, device=a.device)
    d_scale = torch.zeros(N, dtype=torch.float32, device=a.device)
    _launch(a, w_EIO, offs_E, d_pre, n_rows=N, n_out=O, tiles=tiles, epilogue=_DSWIGLU, pre=pre_N2O,
            a_idx_N=a_idx_N, scale_N=scale_N, dscale_N=d_scale)
    return d_pre, d_scale


def gmm_wgrad(a: torch.Tensor, b: torch.Tensor, offs_E: torch.Tensor, *, out_dtype: torch.dtype,
              a_idx_N: Optional[torch.Tensor] = None, b_idx_N: Optional[torch.Tensor] = None,
              scale_N: Optional[torch.Tensor] = None, b_swiglu: bool = False, tiles: Tiles = None) -> torch.Tensor:
    """``dW[e] = Σ_{r of e} (s_r · a[ia(r)])ᵀ b[ib(r)]``, shape (E, I, O), zeros for empty experts.

    b_swiglu: b holds (N, 2O) SwiGLU pre-activations and ``silu(gate) · up`` is used in its place.
    """
    E = offs_E.numel()
    I, O = a.shape[1], b.shape[1]
    if b_swiglu:
        if O % 2:
            raise ValueError(f"b_swiglu needs (N, 2O) pre-activations, got width {O}")
        O //= 2
    dev = a.device
    dw = torch.empty(E, I, O, dtype=out_dtype, device=dev)
    if dw.numel() == 0:
        return dw
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    cfg = wgrad_config(dev, a.dtype, tiles)
    offs_E = offs_E.to(torch.int32)
    dummy = offs_E
    grid = (triton.cdiv(I, cfg["BLOCK_I"]) * triton.cdiv(O, cfg["BLOCK_O"]), E)
    with launch_context(dev):
        _gmm_wgrad_kernel[grid](
            a, b, dw, offs_E,
            a_idx_N if a_idx_N is not None else dummy,
            b_idx_N if b_idx_N is not None else dummy,
            scale_N if scale_N is not None else dummy,
            I, O, a.stride(0), a.stride(1), b.stride(0), b.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
            A_GATHER=a_idx_N is not None, B_GATHER=b_idx_N is not None, ROW_SCALE=scale_N is not None,
            B_SWIGLU=b_swiglu, UPCAST=upcast_for_dot(a.dtype, dev), IEEE=a.dtype == torch.float32,
            BLOCK_I=cfg["BLOCK_I"], BLOCK_O=cfg["BLOCK_O"], BLOCK_R=cfg["BLOCK_R"], GROUP_I=cfg["GROUP_I"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return dw

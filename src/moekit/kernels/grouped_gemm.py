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

`gmm` / `gmm_wgrad` launch them; `grouped_mm_triton` is the autograd op with the
``(x_NI, w_EIO, offs_E) -> y_NO`` signature of `moekit.ops.grouped_mm.grouped_mm_reference`:
backward is dx = dy @ W[e]ᵀ (the same kernel on a transposed view, no copy) and
dW[e] = x_eᵀ dy_e.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moekit.kernels.launch import gemm_config, launch_context, num_tiles_bound, upcast_for_dot

__all__ = ["gmm", "gmm_wgrad", "grouped_mm_triton", "CONFIG_OVERRIDE"]

# Benchmarks may set tile sizes here (keys of `gemm_config`) to sweep configurations.
CONFIG_OVERRIDE: dict = {}


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


def _check_operands(a: torch.Tensor, w: torch.Tensor, offs_E: torch.Tensor) -> None:
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


def gmm(a: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, *,
        a_idx_N: Optional[torch.Tensor] = None, swiglu: bool = False, store_pre: bool = False,
        scale_N: Optional[torch.Tensor] = None, scatter_idx_N: Optional[torch.Tensor] = None,
        out_rows: Optional[int] = None, scatter_add: bool = True,
        dswiglu_pre_N2O: Optional[torch.Tensor] = None):
    """Launch the grouped forward kernel. See the module docstring for the formula.

    a: (N, I), or (T, I) read through ``a_idx_N`` (N,) when gathering. w_EIO: any strides.
    swiglu: output width ``O/2``; with ``store_pre`` also returns the (N, O) pre-activations.
    scatter_idx_N: rows of an fp32 ``(out_rows, ·)`` output that receive ``+=`` (atomics), or,
    with ``scatter_add=False``, rows of an ``(out_rows, ·)`` output in a's dtype that receive
    ``=`` (the indices must then be distinct; rows no index names are left uninitialised).
    dswiglu_pre_N2O: SwiGLU backward epilogue. ``a @ W`` is then ``g = ∂L/∂h / w`` (N, O);
    with the saved pre-activations and the combine weights ``scale_N`` it returns
    ``(d_pre (N, 2O), d_scale (N,) fp32)``.
    Returns ``y`` (N, O') in a's dtype, or fp32 ``(out_rows, O')`` when scattering; plus the
    pre-activations when ``store_pre``.
    """
    _check_operands(a, w_EIO, offs_E)
    N = a.shape[0] if a_idx_N is None else a_idx_N.shape[0]
    E, I, O_w = w_EIO.shape
    if swiglu and O_w % 2:
        raise ValueError(f"swiglu needs an even output width (gate and up halves), got {O_w}")
    O = O_w // 2 if swiglu else O_w
    dev = a.device
    epilogue = 1 if swiglu else (2 if dswiglu_pre_N2O is not None else 0)
    cfg = dict(gemm_config(N, I, O, E, dev, a.dtype, two_outputs=swiglu))
    cfg.update(CONFIG_OVERRIDE)
    dscale = None
    if epilogue == 2:
        if scale_N is None or dswiglu_pre_N2O.shape != (N, 2 * O):
            raise ValueError(f"the SwiGLU backward needs scale_N and pre-activations of shape ({N}, {2 * O})")
        y = torch.empty(N, 2 * O, dtype=a.dtype, device=dev)
        dscale = torch.zeros(N, dtype=torch.float32, device=dev)
        pre = dswiglu_pre_N2O
    elif scatter_idx_N is not None:
        if out_rows is None:
            raise ValueError("scatter_idx_N needs out_rows (the number of output rows)")
        if scatter_add:
            y = torch.zeros(out_rows, O, dtype=torch.float32, device=dev)
        else:
            y = torch.empty(out_rows, O, dtype=a.dtype, device=dev)
        pre = torch.empty(N, O_w, dtype=a.dtype, device=dev) if store_pre else y
    else:
        y = torch.empty(N, O, dtype=a.dtype, device=dev)
        pre = torch.empty(N, O_w, dtype=a.dtype, device=dev) if store_pre else y

    def result():
        if epilogue == 2:
            return y, dscale
        return (y, pre) if store_pre else y

    if N == 0 or O == 0:
        return result()
    if I == 0:
        # Empty reduction: every product is 0, and so is silu(0) · 0.
        for t in (y, pre) if store_pre else (y,):
            t.zero_()
        return result()
    offs_E = offs_E.to(torch.int32)
    dummy = offs_E
    grid = (num_tiles_bound(N, E, cfg["BLOCK_M"]) * triton.cdiv(O, cfg["BLOCK_N"]),)
    with launch_context(dev):
        _gmm_kernel[grid](
            a, w_EIO, y, pre, offs_E,
            a_idx_N if a_idx_N is not None else dummy,
            scatter_idx_N if scatter_idx_N is not None else dummy,
            scale_N if scale_N is not None else dummy,
            dscale if dscale is not None else dummy,
            E, I, O,
            a.stride(0), a.stride(1), w_EIO.stride(0), w_EIO.stride(1), w_EIO.stride(2),
            y.stride(0), y.stride(1), pre.stride(0), pre.stride(1),
            GATHER=a_idx_N is not None, SCATTER=scatter_idx_N is not None,
            SCATTER_ADD=scatter_idx_N is not None and scatter_add, ROW_SCALE=scale_N is not None,
            EPILOGUE=epilogue, STORE_PRE=store_pre, UPCAST=upcast_for_dot(a.dtype, dev),
            IEEE=a.dtype == torch.float32,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
            BLOCK_E=max(16, triton.next_power_of_2(E)),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return result()


def gmm_wgrad(a: torch.Tensor, b: torch.Tensor, offs_E: torch.Tensor, *, out_dtype: torch.dtype,
              a_idx_N: Optional[torch.Tensor] = None, b_idx_N: Optional[torch.Tensor] = None,
              scale_N: Optional[torch.Tensor] = None, b_swiglu: bool = False) -> torch.Tensor:
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
    if dev.type != "cuda":
        bi, bo, br, warps, stages = 32, 32, 16, 4, 1
    else:
        bi, bo, br, warps, stages = 128, 128, 64, 8, 2 if a.dtype == torch.float32 else 3
    bi = CONFIG_OVERRIDE.get("WG_BLOCK_I", bi)
    bo = CONFIG_OVERRIDE.get("WG_BLOCK_O", bo)
    br = CONFIG_OVERRIDE.get("WG_BLOCK_R", br)
    offs_E = offs_E.to(torch.int32)
    dummy = offs_E
    grid = (triton.cdiv(I, bi) * triton.cdiv(O, bo), E)
    with launch_context(dev):
        _gmm_wgrad_kernel[grid](
            a, b, dw, offs_E,
            a_idx_N if a_idx_N is not None else dummy,
            b_idx_N if b_idx_N is not None else dummy,
            scale_N if scale_N is not None else dummy,
            I, O, a.stride(0), a.stride(1), b.stride(0), b.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
            A_GATHER=a_idx_N is not None, B_GATHER=b_idx_N is not None, ROW_SCALE=scale_N is not None,
            B_SWIGLU=b_swiglu, UPCAST=upcast_for_dot(a.dtype, dev), IEEE=a.dtype == torch.float32,
            BLOCK_I=bi, BLOCK_O=bo, BLOCK_R=br, GROUP_I=CONFIG_OVERRIDE.get("WG_GROUP_I", 8), num_warps=warps, num_stages=stages,
        )
    return dw


class _GroupedMMTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, w_EIO, offs_E):
        ctx.save_for_backward(x_NI, w_EIO, offs_E)
        return gmm(x_NI, w_EIO, offs_E)

    @staticmethod
    def backward(ctx, gy_NO):
        x_NI, w_EIO, offs_E = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = gmm(gy_NO, w_EIO.transpose(1, 2), offs_E)
        if ctx.needs_input_grad[1]:
            gw = gmm_wgrad(x_NI, gy_NO, offs_E, out_dtype=w_EIO.dtype)
        return gx, gw, None


def grouped_mm_triton(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Triton grouped matmul with the signature of `grouped_mm_reference` (autograd-aware)."""
    _check_operands(x_NI, w_EIO, offs_E)
    return _GroupedMMTriton.apply(x_NI, w_EIO, offs_E)

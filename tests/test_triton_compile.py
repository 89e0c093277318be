"""The Triton kernels compile for an H100 (sm90) on a machine without a GPU.

The interpreter (tests/test_triton_kernels.py) is permissive: it never lowers a kernel.
This test lowers every kernel variant the library launches to PTX for sm90 with the
specialisation the JIT applies at run time (unit strides as constants, 16-divisible
pointers and strides) and checks the bf16 GEMMs use Hopper tensor cores (``wgmma``) and a
software pipeline (``cp.async``). It runs in a subprocess (compiled mode must be fixed at
triton's first import) and takes a minute or two: marked slow.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SCRIPT = textwrap.dedent('''
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from moekit.kernels.grouped_gemm import _gmm_kernel, _gmm_wgrad_kernel
    from moekit.kernels.router import _topk_gate_kernel

    target = GPUTarget("cuda", 90, 32)

    def lower(fn, sig, consts, unit, opts):
        full = {n: ("constexpr" if n in consts or n in unit else sig[n]) for n in fn.arg_names}
        c = dict(consts, **{u: 1 for u in unit})
        names = list(full)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, ty in full.items()
                 if ty != "constexpr" and (ty.startswith("*") or n.startswith("stride") or n in ("I", "O"))}
        return triton.compile(ASTSource(fn=fn, signature=full, constexprs=c, attrs=attrs), target=target,
                              options=opts).asm["ptx"]

    bad = []
    for dt in ("bf16", "fp16", "fp32"):
        sig = dict(a_ptr=f"*{dt}", w_ptr=f"*{dt}", y_ptr=f"*{dt}", pre_ptr=f"*{dt}", offs_ptr="*i32",
                   a_idx_ptr="*i32", y_idx_ptr="*i32", scale_ptr="*fp32", dscale_ptr="*fp32", E="i32", I="i32",
                   O="i32", stride_am="i32", stride_ak="i32", stride_we="i32", stride_wk="i32", stride_wn="i32",
                   stride_ym="i32", stride_yn="i32", stride_pm="i32", stride_pn="i32")
        variants = [  # gather, scatter, scatter_add, row_scale, epilogue, store_pre, W contiguous along
            (False, False, False, False, 0, False, "k"), (False, False, False, False, 0, False, "n"),
            (True, False, False, False, 1, True, "k"), (True, False, False, False, 1, False, "k"),
            (False, True, True, True, 0, False, "k"), (False, True, False, True, 0, False, "k"),
            (True, False, False, True, 2, False, "n"), (False, True, True, False, 0, False, "n")]
        for g, s, sa, sc, epi, pre, wc in variants:
            ysig = "*fp32" if sa else f"*{dt}"
            cfg = dict(BLOCK_M=128, BLOCK_N=64 if epi == 1 else 128, BLOCK_K=64, GROUP_M=8)
            consts = dict(GATHER=g, SCATTER=s, SCATTER_ADD=sa, ROW_SCALE=sc, EPILOGUE=epi, STORE_PRE=pre,
                          UPCAST=False, IEEE=dt == "fp32", BLOCK_E=128, **cfg)
            unit = ("stride_ak", "stride_wk" if wc == "k" else "stride_wn", "stride_yn", "stride_pn")
            name = f"gmm {dt} {(g, s, sa, sc, epi, pre, wc)}"
            try:
                ptx = lower(_gmm_kernel, dict(sig, y_ptr=ysig), consts, unit,
                            dict(num_warps=8, num_stages=2 if dt == "fp32" else 3))
                if dt != "fp32" and not ("wgmma" in ptx and "cp.async" in ptx):
                    bad.append(name + ": no wgmma / cp.async pipeline")
            except Exception as e:
                bad.append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
        wsig = dict(a_ptr=f"*{dt}", b_ptr=f"*{dt}", dw_ptr=f"*{dt}", offs_ptr="*i32", a_idx_ptr="*i32",
                    b_idx_ptr="*i32", scale_ptr="*fp32", I="i32", O="i32", stride_am="i32", stride_ai="i32",
                    stride_bm="i32", stride_bo="i32", stride_we="i32", stride_wi="i32", stride_wo="i32")
        for ag, bg, sc, bsw in [(False, False, False, False), (True, False, True, True), (False, True, False, False)]:
            consts = dict(A_GATHER=ag, B_GATHER=bg, ROW_SCALE=sc, B_SWIGLU=bsw, UPCAST=False, IEEE=dt == "fp32",
                          BLOCK_I=128, BLOCK_O=128, BLOCK_R=64, GROUP_I=8)
            name = f"wgrad {dt} {(ag, bg, sc, bsw)}"
            try:
                ptx = lower(_gmm_wgrad_kernel, wsig, consts, ("stride_ai", "stride_bo", "stride_wo"),
                            dict(num_warps=8, num_stages=2 if dt == "fp32" else 3))
                if dt != "fp32" and "wgmma" not in ptx:
                    bad.append(name + ": no wgmma")
            except Exception as e:
                bad.append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
    gsig = dict(logits_ptr="*fp32", bias_ptr="*fp32", ids_ptr="*i64", w_ptr="*fp32", probs_ptr="*fp32",
                T="i32", E="i32", stride_lt="i32", route_scale="fp32")
    for sigm in (False, True):
        try:
            lower(_topk_gate_kernel, gsig, dict(SIGMOID=sigm, HAS_BIAS=sigm, NORMALIZE=True, K=8, BLOCK_T=32,
                                                BLOCK_E=128, BLOCK_K=8), (), dict(num_warps=4))
        except Exception as e:
            bad.append(f"gate sigmoid={sigm}: {type(e).__name__}: {str(e)[:500]}")
    print("\\n".join(bad) if bad else "ALL OK")
    sys.exit(1 if bad else 0)
''')


def test_kernels_lower_to_sm90_with_wgmma(tmp_path):
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"written against triton 3.9's ASTSource / attrs API, found {triton.__version__}")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]

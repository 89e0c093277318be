#!/usr/bin/env python
"""moekit's MoE layer against every peer of BENCHMARKS.md, in one process and one call.

Legend: T tokens, D model dim, F expert hidden, E experts, K experts per token.

Per shape: (1) check each moekit variant's output and input gradient against an fp64 eager
reference with a derived tolerance (error ≤ 2 × the bf16 eager path's error + 2 ulp), and each
peer's (Hugging Face Mixtral and Qwen3-MoE blocks with every ``experts_implementation`` the
installed transformers offers, torchtitan's MoE — all on the same weights, see
``benchmarks/peers.py``) with a relative tolerance of max(8 bf16 ulp, 2 × the eager path's);
a peer that fails is not timed, (2)
time forward + backward (decode: forward only, no grad) with
``triton.testing.do_bench(..., return_mode="median")``, (3) record peak memory of one step.
Every peer runs in its own try/except: a failure (e.g. out of memory) is a row in the table,
not the end of the run. The table is printed last; JSON goes to ``$OUT/bench_gpu.json`` (or
``--json PATH``).

TFLOP/s = 18·T·K·D·F / time (forward + backward) or 6·T·K·D·F / time (forward only).
Floors measured in the same run: an 8192³ bf16 matmul (FLOP rate) and a 1 GiB device copy
(bandwidth); decode rows report time / (active experts' weight bytes / bandwidth) and time /
the measured weight-read floor (a dense SwiGLU over the active experts' weights, each read
once: the row "weight-read floor").

Usage (H100):   python benchmarks/bench_gpu.py            # all BENCHMARKS.md shapes (+ tile sweep)
                python benchmarks/bench_gpu.py --quick    # small shapes, a quick look
                python benchmarks/bench_gpu.py --shapes decode-1 decode-8 decode-64
CPU dry run:    python benchmarks/bench_gpu.py --cpu-smoke   (tiny shapes, fp32, Triton interpreted)
Options: --no-sweep (skip the tile presets), --budget-s (no new shape after this many seconds,
default 480, so the table prints inside a 10-minute limit), --impls SUBSTR..., BENCH_TRACE=1
prints tracebacks of failing rows.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

# Benchmark the working tree's moekit, installed or not; peers.py sits beside this file.
_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(_HERE, os.pardir, "src")
if os.path.isdir(os.path.join(_SRC, "moekit")):
    sys.path.insert(0, os.path.abspath(_SRC))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Peers are built from installed code only: a backend that would fetch kernels from the Hub
# (transformers' deepgemm, sonicmoe) fails at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CPU_SMOKE = "--cpu-smoke" in sys.argv
if CPU_SMOKE:
    # Must precede the first `import triton` (interpreter mode is fixed at import).
    os.environ["TRITON_INTERPRET"] = "1"

import peers as P  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {  # name: (T, D, F, E, K)
    "mixtral-like": (8192, 4096, 14336, 8, 2),
    "olmoe-like": (16384, 2048, 1024, 64, 8),
    "qwen3-30b-a3b-like": (16384, 2048, 768, 128, 8),
    "decode-1": (1, 2048, 768, 128, 8),
    "decode-8": (8, 2048, 768, 128, 8),
    "decode-64": (64, 2048, 768, 128, 8),
}
QUICK_SHAPES = {
    "quick-coarse": (2048, 1024, 2048, 8, 2),
    "quick-fine": (4096, 1024, 512, 64, 8),
    "decode-8": (8, 2048, 768, 128, 8),
}
SMOKE_SHAPES = {
    "smoke-coarse": (24, 32, 48, 4, 2),
    "smoke-fine": (20, 32, 16, 8, 3),
    "smoke-decode": (1, 32, 16, 8, 2),
}


def is_decode(name: str) -> bool:
    return name.startswith("decode") or name.endswith("decode")


# ---------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------
def bench(fn, device, grad_to_none=None, reps: int = 100) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=reps, grad_to_none=grad_to_none, return_mode="median")
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def peak_memory_gib(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def measure_floors(device, dtype):
    """(matmul TFLOP/s, bandwidth GB/s) measured here and now."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench(lambda: a @ b, device)
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    a = b = None
    src = torch.empty(2**30 // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    gbs = 2 * 2**30 / (ms * 1e-3) / 1e9
    src = dst = None
    torch.cuda.empty_cache()
    return tflops, gbs


# ---------------------------------------------------------------------------------------
# the problem and the implementations (each: x_TD -> y_TD, differentiable)
# ---------------------------------------------------------------------------------------
class Problem:
    """One MoE layer's weights (moekit layout = Hugging Face v5 layout) shared by every impl."""

    def __init__(self, T, D, Fh, E, K, device, dtype, seed=0):
        import moekit

        torch.manual_seed(seed)
        self.T, self.D, self.F, self.E, self.K = T, D, Fh, E, K
        self.device, self.dtype = device, dtype
        self.moe = moekit.MoE(d_model=D, num_experts=E, top_k=K, d_hidden=Fh, router="topk",
                              aux_loss_coef=0.0, backend="eager").to(device=device, dtype=dtype)
        # A wider router init than Switch's so routing is not near-uniform ties.
        with torch.no_grad():
            self.moe.router.weight.normal_(0, 1 / math.sqrt(D))
        self.x = torch.randn(T, D, device=device, dtype=dtype)
        self.dy = torch.randn(T, D, device=device, dtype=dtype)

    def params(self):
        return list(self.moe.parameters())

    def routing(self, x_TD):
        return self.moe.router(x_TD)


def impl_moekit(backend):
    def make(p: Problem):
        def fn(x):
            p.moe.backend = backend
            return p.moe(x)
        return fn, p.params()
    return make


def impl_moekit_fused(p: Problem, combine: str = "atomic", tiles=None):
    from moekit.ops.fused_moe import fused_moe_forward

    def fn(x):
        return fused_moe_forward(x, p.routing(x), p.moe.experts, combine=combine, tiles=tiles)
    return fn, p.params()


def impl_moekit_fused_slots(p: Problem):
    return impl_moekit_fused(p, combine="slots")


def impl_moekit_fused_gate(p: Problem):
    """Fused top-k gate (Triton) + fused experts: the whole layer on moekit's kernels."""
    from moekit.ops.fused_moe import fused_moe_forward
    from moekit.ops.topk_gate import fused_topk_gate
    from moekit.routing.base import Routing

    router = p.moe.router

    def fn(x):
        logits = router.logits(x)
        ids_TK, w_TK, probs = fused_topk_gate(logits, p.K)
        T = x.shape[0]
        r = Routing(token_ids=torch.arange(T, device=x.device).repeat_interleave(p.K),
                    expert_ids=ids_TK.reshape(-1), weights=w_TK.reshape(-1), logits=logits,
                    dropped=torch.zeros((), dtype=torch.long, device=x.device), num_experts=p.E, probs=probs)
        return fused_moe_forward(x, r, p.moe.experts)
    return fn, p.params()


def impl_moekit_graph(p: Problem):
    """The whole layer (backend "auto", eval, no grad) captured once in a CUDA graph and
    replayed per call — decode rows only: at T ≤ 64 the dozen small launches of the router,
    the sort and the kernels cost more than reading the weights; one graph launch does not."""
    if p.device.type != "cuda":
        raise RuntimeError("CUDA graphs need a GPU")
    moe = p.moe
    was_training, moe.backend = moe.training, "auto"
    moe.eval()
    static_x = p.x.detach().clone()
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(3):               # compile kernels and settle the allocator outside capture
                moe(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_y = moe(static_x)
    finally:
        moe.train(was_training)

    def fn(x):
        static_x.copy_(x)
        graph.replay()
        return static_y
    return fn, []


# Tile presets tried for the fused path in the same run (GPU time is short: sweep here, not
# in a second call). Keys of `moekit.kernels.launch.GEMM_TILE_KEYS` / `WGRAD_TILE_KEYS`, passed as
# `fused_moe_forward(..., tiles=preset)`; the heuristic fills the keys a preset leaves out.
SWEEP_PRESETS = {
    "m64n128k64w4s4": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    "m128n128k64w8s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    "m128n64k128w8s3": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    "wg128x128r32": dict(WG_BLOCK_I=128, WG_BLOCK_O=128, WG_BLOCK_R=32),
    "wg64x128r64": dict(WG_BLOCK_I=64, WG_BLOCK_O=128, WG_BLOCK_R=64),
}


def impl_moekit_fused_preset(preset: dict):
    """The fused path with tile sizes forced in every launch, forward and backward."""
    def make(p: Problem):
        return impl_moekit_fused(p, tiles=preset)
    return make


def impl_loop(p: Problem):
    """A per-expert Python loop with index_add_ (what most research code does)."""
    ex = p.moe.experts

    def fn(x):
        r = p.routing(x)
        y = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
        for e in range(p.E):
            sel = (r.expert_ids == e).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            tok = r.token_ids[sel]
            gate, up = F.linear(x[tok], ex.gate_up_proj[e]).chunk(2, dim=-1)
            out = F.linear(F.silu(gate) * up, ex.down_proj[e])
            y = y.index_add(0, tok, out.float() * r.weights[sel, None])
        return y.to(x.dtype)
    return fn, p.params()


def impl_sort_grouped_mm(p: Problem):
    """Sort + torch._grouped_mm written plainly (an afternoon's careful work)."""
    ex = p.moe.experts

    def fn(x):
        r = p.routing(x)
        order = torch.argsort(r.expert_ids, stable=True)
        tok = r.token_ids[order]
        offs = torch.cumsum(torch.bincount(r.expert_ids, minlength=p.E), 0, dtype=torch.int32)
        h = torch._grouped_mm(x[tok], ex.gate_up_proj.transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        out = torch._grouped_mm(F.silu(gate) * up, ex.down_proj.transpose(1, 2), offs=offs)
        y = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        y = y.index_add(0, tok, out.float() * r.weights[order, None])
        return y.to(x.dtype)
    return fn, p.params()


def impl_hf(family, name):
    """transformers' sparse-MoE block of `family` with ``experts_implementation=name``, on the
    problem's own parameters (HF v5 layout = moekit's)."""
    def make(p: Problem):
        if name == "batched_mm":        # one weight copy per (token, expert) pair, plus its gradient
            need = p.T * p.K * 3 * p.D * p.F * torch.finfo(p.dtype).bits // 8 * 2
            free = torch.cuda.mem_get_info()[0] if p.device.type == "cuda" else float("inf")
            if need > 0.5 * free:
                raise MemoryError(f"skipped: batched_mm needs ~{need / 2**30:.0f} GiB of gathered weights")
        fn, block = P.hf_peer(family, name, p.moe)
        return fn, list(block.parameters())
    return make


def impl_torchtitan(p: Problem):
    """torchtitan's MoE (router, local dispatcher, bf16 grouped experts), weights copied."""
    fn, module = P.torchtitan_peer(p.moe)
    return fn, list(module.parameters())


def impl_weight_floor(p: Problem):
    """Decode floor: a dense SwiGLU over the weights of the experts p.x hits, read once."""
    fn, _ = P.weight_read_floor(p.moe, p.x)
    return fn, []


def dense_equal(p: Problem):
    """Dense SwiGLU over T·K rows: the same FLOPs with no routing (the ceiling)."""
    w_gu = torch.randn(2 * p.F, p.D, device=p.device, dtype=p.dtype, requires_grad=True)
    w_d = torch.randn(p.D, p.F, device=p.device, dtype=p.dtype, requires_grad=True)
    with torch.no_grad():
        w_gu /= math.sqrt(p.D)
        w_d /= math.sqrt(p.F)
    x_rep = torch.randn(p.T * p.K, p.D, device=p.device, dtype=p.dtype)

    def fn(_x):
        gate, up = F.linear(x_rep_leaf, w_gu).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_d)
    x_rep_leaf = x_rep.requires_grad_(True)
    return fn, [w_gu, w_d, x_rep_leaf]


def build_impls(device, sweep: bool):
    impls = [("dense-equal", dense_equal), ("weight-read floor", impl_weight_floor), ("loop", impl_loop),
             ("sort+_grouped_mm", impl_sort_grouped_mm)]
    reason = P.hf_unavailable()
    for family in P.HF_FAMILIES:
        for name in (P.hf_experts_implementations() if reason is None else ["(any)"]):
            impls.append((f"{P.HF_NAMES[family]} {name}", impl_hf(family, name)))
    impls.append(("torchtitan MoE", impl_torchtitan))
    from moekit.ops.backends import available_backends

    for b in available_backends():
        if b != "auto":
            impls.append((f"moekit[{b}]", impl_moekit(b)))
    impls.append(("moekit[fused]", impl_moekit_fused))
    impls.append(("moekit[fused-slots]", impl_moekit_fused_slots))
    impls.append(("moekit[fused+gate]", impl_moekit_fused_gate))
    if device.type == "cuda":
        impls.append(("moekit[auto+graph]", impl_moekit_graph))  # decode rows only (forward)
    if sweep:
        for name, preset in SWEEP_PRESETS.items():
            impls.append((f"moekit[fused] {name}", impl_moekit_fused_preset(preset)))
    return impls


# ---------------------------------------------------------------------------------------
# correctness before timing
# ---------------------------------------------------------------------------------------
def is_peer(name: str) -> bool:
    return name.startswith(("HF ", "torchtitan"))


def check_impls(p: Problem, names_makers, n_check: int):
    """Each moekit variant vs fp64 eager: err ≤ 2 · err(eager in the same dtype) + 2 ulp · max|ref|.
    Each peer: relative err ≤ max(P.peer_tolerance, 2 · the eager path's relative err)."""
    import copy

    x = p.x[:n_check].detach().clone()
    dy = p.dy[:n_check]
    ref_moe = copy.deepcopy(p.moe).double()
    ref_moe.backend = "eager"
    xr = x.double().requires_grad_(True)
    y_ref = ref_moe(xr)
    (gx_ref,) = torch.autograd.grad(y_ref, xr, dy.double())
    del ref_moe

    def run(fn):
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        (gx,) = torch.autograd.grad(y, xx, dy)
        return y.double(), gx.double()

    def run_forward_only(fn):           # a captured graph: fixed input rows, no autograd
        return fn(x).double(), None

    base_y, base_gx = run(impl_moekit("eager")(p)[0])
    eb_y = (base_y - y_ref).abs().max().item()
    eb_gx = (base_gx - gx_ref).abs().max().item()
    ulp = 2 * torch.finfo(p.dtype).eps
    results = {}
    for name, make in names_makers:
        try:
            y, gx = (run_forward_only if "graph" in name else run)(make(p)[0])
            ey = (y - y_ref).abs().max().item()
            egx = 0.0 if gx is None else (gx - gx_ref).abs().max().item()
            ymax, gmax = y_ref.abs().max().item(), gx_ref.abs().max().item()
            if is_peer(name):
                tol = max(P.peer_tolerance(name, p.dtype), 2 * eb_y / ymax, 2 * eb_gx / gmax)
                ok = ey <= tol * ymax and egx <= tol * gmax
            else:
                ok = ey <= 2 * eb_y + ulp * ymax and egx <= 2 * eb_gx + ulp * gmax
            results[name] = dict(ok=ok, err_y=ey, err_dx=egx, eager_err_y=eb_y, eager_err_dx=eb_gx)
        except Exception as exc:  # noqa: BLE001 — report, keep going
            results[name] = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    return results


# ---------------------------------------------------------------------------------------
def run_shape(name, shape, device, dtype, impls, reps, floors, check_rows):
    T, D, Fh, E, K = shape
    decode = is_decode(name)
    p = Problem(T, D, Fh, E, K, device, dtype)
    rows = []
    if not decode:
        impls = [(n, m) for n, m in impls if "graph" not in n and n != "weight-read floor"]
    checked = [(n, m) for n, m in impls if n.startswith("moekit") or is_peer(n)]
    checks = check_impls(p, checked, min(T, check_rows))
    flops = (6 if decode else 18) * T * K * D * Fh
    with torch.no_grad():
        r = p.routing(p.x)
        active = int(torch.unique(r.expert_ids).numel())
    weight_bytes = active * 3 * D * Fh * torch.finfo(dtype).bits // 8
    floor_row = None
    for impl_name, make in impls:
        row = dict(shape=name, impl=impl_name, T=T, D=D, F=Fh, E=E, K=K, mode="fwd" if decode else "fwd+bwd")
        if impl_name in checks:
            row["check"] = checks[impl_name]
        try:
            chk = checks.get(impl_name)
            if chk is not None and is_peer(impl_name) and not chk.get("ok"):
                raise RuntimeError(chk.get("error") or "not timed: check failed")
            fn, params = make(p)
            x = p.x.detach().clone()
            if decode:
                def step():
                    with torch.no_grad():
                        return fn(x)
                grads = None
            else:
                x.requires_grad_(True)
                with torch.no_grad():
                    y0 = fn(x)
                # dense-equal returns (T·K, D): its own upstream gradient of that shape.
                dy = p.dy if y0.shape == p.dy.shape else torch.randn_like(y0)
                del y0

                def step():
                    y = fn(x)
                    y.backward(dy)
                grads = [x] + [q for q in params if q.requires_grad]
            step()
            row["ms"] = bench(step, device, grad_to_none=grads, reps=reps)
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            for q in (grads or []):
                q.grad = None      # peak counts the gradients' allocation for every impl alike
            row["peak_gib"] = peak_memory_gib(step, device)
            if decode and not math.isnan(floors[1]):
                floor_ms = weight_bytes / (floors[1] * 1e9) * 1e3
                row["weight_floor_ms"] = floor_ms
                row["x_floor"] = row["ms"] / floor_ms
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            if os.environ.get("BENCH_TRACE"):
                traceback.print_exc()
        finally:
            fn = params = step = None  # noqa: F841
            for q in p.params():
                q.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if impl_name == "weight-read floor" and "ms" in row:
            floor_row = row
        print(f"  {name:20s} {impl_name:22s} " + (f"{row['ms']:9.3f} ms" if "ms" in row else row.get("error", "")),
              flush=True)
    if floor_row is not None:
        for row in rows:
            if "ms" in row:
                row["x_measured_floor"] = row["ms"] / floor_row["ms"]
    return rows


def print_table(rows, floors, device_name):
    print()
    print(f"# moekit benchmark — {time.strftime('%Y-%m-%d')} — {device_name} — torch {torch.__version__}")
    print(f"# measured floors: matmul {floors[0]:.0f} TFLOP/s (8192³ bf16), copy {floors[1]:.0f} GB/s")
    by_shape = {}
    for r in rows:
        by_shape.setdefault(r["shape"], []).append(r)
    for shape, rs in by_shape.items():
        r0 = rs[0]
        print(f"\n## {shape}  T={r0['T']} D={r0['D']} F={r0['F']} E={r0['E']} K={r0['K']}  ({r0['mode']})")
        dense = next((r for r in rs if r["impl"] == "dense-equal" and "ms" in r), None)
        plain = next((r for r in rs if r["impl"] == "sort+_grouped_mm" and "ms" in r), None)
        print("| impl | ms | TFLOP/s | % dense | × vs sort+gmm | peak GiB | × weight floor (bandwidth / measured) "
              "| check |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rs:
            if "ms" not in r:
                print(f"| {r['impl']} | failed: {r.get('error', '?')[:80]} | | | | | | |")
                continue
            pct = f"{100 * dense['ms'] / r['ms']:.0f} %" if dense else "-"
            vs = f"{plain['ms'] / r['ms']:.2f}" if plain else "-"
            chk = r.get("check")
            chk_s = "-" if chk is None else ("ok" if chk.get("ok") else "FAIL " + str(chk.get(
                "error", f"err y {chk.get('err_y', 0):.2e} dx {chk.get('err_dx', 0):.2e} vs eager "
                         f"{chk.get('eager_err_y', 0):.2e} {chk.get('eager_err_dx', 0):.2e}"))[:90])
            xf = " / ".join(f"{r[k]:.2f}" if k in r else "-" for k in ("x_floor", "x_measured_floor"))
            print(f"| {r['impl']} | {r['ms']:.3f} | {r['tflops']:.1f} | {pct} | {vs} | {r['peak_gib']:.2f} | {xf} "
                  f"| {chk_s} |")
        mk = [r for r in rs if r["impl"].startswith("moekit") and "ms" in r and r.get("check", {}).get("ok")]
        if mk:
            best = min(mk, key=lambda r: r["ms"])
            peers = [r for r in rs if not r["impl"].startswith("moekit") and "ms" in r
                     and r["impl"] != "weight-read floor"]
            ratios = ", ".join(f"{r['impl']} {r['ms'] / best['ms']:.2f}×" for r in peers)
            print(f"best moekit: {best['impl']} — speed-up over: {ratios}")
            if plain is not None:
                print(f"peak memory: best moekit {best['peak_gib']:.2f} GiB, "
                      f"sort+_grouped_mm {plain['peak_gib']:.2f} GiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (fp32, Triton interpreted)")
    ap.add_argument("--shapes", nargs="*", help="subset of shape names")
    ap.add_argument("--impls", nargs="*", help="subset of implementation names (substring match)")
    ap.add_argument("--reps", type=int, default=200, help="do_bench rep budget in ms")
    ap.add_argument("--budget-s", type=float, default=480,
                    help="start no new shape after this many seconds (the table still prints)")
    ap.add_argument("--check-rows", type=int, default=2048, help="tokens used for the correctness check")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tile-preset sweep of the fused path")
    ap.add_argument("--sweep", action="store_true", help="run the sweep even with --cpu-smoke")
    ap.add_argument("--json", default=None, help="output JSON path (default $OUT/bench_gpu.json if $OUT)")
    args = ap.parse_args()

    if args.cpu_smoke:
        device, dtype, shapes = torch.device("cpu"), torch.float32, SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu-smoke for a dry run")
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes}
    impls = build_impls(device, sweep=args.sweep or not (args.no_sweep or args.cpu_smoke))
    if args.cpu_smoke:
        impls = [(n, m) for n, m in impls if "batched_mm" not in n]
    if args.impls:
        impls = [(n, m) for n, m in impls if any(s in n for s in args.impls)]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "absent"
    print(f"device {device_name}, torch {torch.__version__}, triton {tv}, dtype {dtype}", flush=True)
    floors = measure_floors(device, dtype)
    out = args.json or (os.path.join(os.environ["OUT"], "bench_gpu.json") if os.environ.get("OUT") else None)

    def dump(rows):
        if out:
            with open(out, "w") as f:
                json.dump(dict(device=device_name, torch=torch.__version__, triton=tv, date=time.strftime("%Y-%m-%d"),
                               floors=dict(matmul_tflops=floors[0], bandwidth_gbs=floors[1]), rows=rows), f,
                          indent=1)

    rows = []
    t_start = time.time()
    for name, shape in shapes.items():
        if time.time() - t_start > args.budget_s:
            print(f"[{name}] skipped: time budget of {args.budget_s} s spent", flush=True)
            rows.append(dict(shape=name, impl="(skipped)", T=shape[0], D=shape[1], F=shape[2], E=shape[3],
                             K=shape[4], mode="-", error=f"time budget {args.budget_s} s spent"))
            continue
        print(f"[{name}] {shape}", flush=True)
        try:
            rows += run_shape(name, shape, device, dtype, impls, args.reps, floors, args.check_rows)
        except Exception as exc:  # noqa: BLE001 — e.g. OOM building the problem
            rows.append(dict(shape=name, impl="(setup)", T=shape[0], D=shape[1], F=shape[2], E=shape[3],
                             K=shape[4], mode="-", error=f"{type(exc).__name__}: {exc}"[:300]))
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dump(rows)              # after every shape: a run cut short still leaves its rows
    print_table(rows, floors, device_name)
    failed_checks = [r for r in rows if r.get("check") and not r["check"].get("ok")]
    if failed_checks:
        peer_fail = [r for r in failed_checks if is_peer(r["impl"]) and "error" not in r["check"]]
        if peer_fail:
            print("\npeers that differ from moekit's reference (not timed): "
                  + ", ".join(f"{r['shape']}/{r['impl']}" for r in peer_fail))
        failed_checks = [r for r in failed_checks if not is_peer(r["impl"])]
    if failed_checks:
        print("\nCORRECTNESS CHECK FAILED for: " + ", ".join(f"{r['shape']}/{r['impl']}" for r in failed_checks))
        sys.exit(1)


if __name__ == "__main__":
    main()

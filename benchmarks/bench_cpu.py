"""CPU benchmark of the MoE layer against real peers, as ratios measured side by side.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

Forward + backward (float32) at the two CPU shapes of BENCHMARKS.md, of:
  - the dense SwiGLU of equal FLOPs over T·K rows (the ceiling),
  - a per-expert Python loop with ``index_add_`` (typical research code),
  - sort + ``torch._grouped_mm`` written plainly,
  - Hugging Face transformers' Mixtral and Qwen3-MoE sparse-MoE blocks, each with every
    ``experts_implementation`` it offers that fits in memory (``batched_mm`` gathers one
    weight copy per (token, expert) pair and is skipped when that exceeds ``--max-gib``),
  - torchtitan's MoE (router + local dispatcher + grouped experts; bf16 experts by design),
  - moekit's default backend (``auto``), each explicit backend that runs natively here
    (``grouped_mm``; Triton only interprets on a CPU and is left out) and its eager reference.
Every peer runs on the same weights and is checked equal to moekit's eager reference (output
and input gradient, fp32, relative error ≤ 1e-5; torchtitan ≤ 8 bf16 ulp) before it is timed.

Decode (forward only, inference mode, D=2048 F=768 E=128 K=8 at T = 1, 8, 64): the same
implementations against the weight-read floor — the weights of the experts the batch hits
(K of them at T = 1) streamed once through a one-row SwiGLU (`peers.weight_read_floor`) —
each call timed as a layer of a deeper model runs it: caches flushed, then the same
implementation on a second layer's weights, untimed (warm code, cold weights).
Forward + backward also has moekit under bf16 autocast beside torchtitan (whose experts
compute in bf16 whatever the weights' dtype).

Repetitions are interleaved (every round in a fresh seeded random order) so machine noise
and the after-effects of one implementation hit every implementation alike;
medians with min–max are reported, and the machine's load average at the start and the end.
The first rows time ``import torch`` and ``import moekit`` in fresh interpreters.

    python benchmarks/bench_cpu.py                       # everything above
    python benchmarks/bench_cpu.py --quick               # small shapes, a smoke run (seconds)
    python benchmarks/bench_cpu.py --json benchmarks/cpu_results.json
    python benchmarks/bench_cpu.py --keep-freed-memory   # the allocator `moekit train` sets up
Peers: ``pip install 'moekit[bench]'``; a missing one is a row saying why.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.abspath(os.path.join(_HERE, os.pardir, "src"))
if os.path.isdir(os.path.join(_SRC, "moekit")):     # benchmark the working tree's moekit
    sys.path.insert(0, _SRC)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # peers from installed code only, no downloads

import peers as P  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import moekit  # noqa: E402
from moekit.validate import check_int, check_number  # noqa: E402

SHAPES = {
    "T=4096 D=512 F=1024 E=8 K=2": dict(T=4096, D=512, F=1024, E=8, K=2),
    "T=4096 D=512 F=256 E=64 K=8": dict(T=4096, D=512, F=256, E=64, K=8),
}
QUICK = {"T=256 D=64 F=128 E=8 K=2": dict(T=256, D=64, F=128, E=8, K=2),
         "T=256 D=64 F=32 E=32 K=8": dict(T=256, D=64, F=32, E=32, K=8)}
DECODE = dict(D=2048, F=768, E=128, K=8, T=(1, 8, 64))
QUICK_DECODE = dict(D=128, F=64, E=16, K=4, T=(1, 8, 64))


def make_layer(D, F_, E, K, seed=0):
    """The benchmarked layer: dropless top-k, softmax → top-k → renormalise (every peer's routing)."""
    torch.manual_seed(seed)
    moe = moekit.MoE(d_model=D, num_experts=E, top_k=K, d_hidden=F_, router="topk", aux_loss_coef=0.0)
    with torch.no_grad():       # wider than Switch's init, so routing is far from uniform ties
        moe.router.weight.normal_(0, 1 / math.sqrt(D))
    return moe


def with_backend(moe, backend):
    def fn(x_TD):
        moe.backend = backend
        return moe(x_TD)
    return fn


def baselines(moe):
    """dense-equal, per-expert loop, sort + _grouped_mm: each fn(x_TD) -> y over `moe`'s weights."""
    E, D = moe.router.weight.shape
    K = moe.router.top_k
    w_gu = moe.experts.gate_up_proj          # (E, 2F, D)
    w_d = moe.experts.down_proj              # (E, D, F)
    dense_gu = torch.nn.Parameter(w_gu[0].detach().clone())
    dense_d = torch.nn.Parameter(w_d[0].detach().clone())

    def route(x_TD):            # written out, as research code does
        probs = torch.softmax(F.linear(x_TD, moe.router.weight), -1)
        w_TK, ids_TK = probs.topk(K, -1)
        return w_TK / w_TK.sum(-1, keepdim=True), ids_TK

    def glu(h):
        g, u = h.chunk(2, -1)
        return F.silu(g) * u

    def dense_equal(x_TD):
        rows = x_TD.repeat_interleave(K, 0)               # the same T·K rows of work, one matrix
        return F.linear(glu(F.linear(rows, dense_gu)), dense_d)

    def loop(x_TD):
        w_TK, ids_TK = route(x_TD)
        out = torch.zeros_like(x_TD)
        for e in range(E):
            tok, slot = torch.where(ids_TK == e)
            if tok.numel() == 0:
                continue
            y = F.linear(glu(F.linear(x_TD[tok], w_gu[e])), w_d[e])
            out = out.index_add(0, tok, y * w_TK[tok, slot, None])
        return out

    def sort_grouped_mm(x_TD):
        w_TK, ids_TK = route(x_TD)
        flat = ids_TK.reshape(-1)
        order = flat.argsort()
        tok = order // K
        offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x_TD[tok], w_gu.transpose(1, 2), offs=offs)
        y = torch._grouped_mm(glu(h), w_d.transpose(1, 2), offs=offs)
        return torch.zeros_like(x_TD).index_add(0, tok, y * w_TK.reshape(-1)[order, None])

    return {"dense-equal": (dense_equal, [dense_gu, dense_d]), "per-expert loop": (loop, []),
            "sort + _grouped_mm": (sort_grouped_mm, [])}


# Explicit backends timed beside "auto" (a test checks that "auto" resolves to the fastest of these).
EXPLICIT_BACKENDS = ("grouped_mm",)


def bf16_autocast(moe):
    """moekit with float32 weights and routing, its expert matmuls in bf16 (``torch.autocast``):
    what torchtitan's MoE computes, for the like-for-like row beside it."""
    def fn(x_TD):
        moe.backend = "auto"
        with torch.autocast(x_TD.device.type, dtype=torch.bfloat16):
            return moe(x_TD)
    return fn


def implementations(moe, tokens, train, max_gib, torchtitan=True):
    """name -> (fn, extra params) or name -> reason; moekit's eager reference first."""
    impls = {"moekit (eager)": (with_backend(moe, "eager"), []), "moekit (auto)": (with_backend(moe, "auto"), [])}
    impls.update({f"moekit ({b})": (with_backend(moe, b), []) for b in EXPLICIT_BACKENDS})
    if train:
        impls["moekit (auto, bf16 autocast)"] = (bf16_autocast(moe), [])
    impls.update(baselines(moe))
    for name, peer in P.build_peers(moe, max_pair_weight_bytes=max_gib * 2**30, tokens=tokens, train=train,
                                    torchtitan=torchtitan).items():
        impls[name] = peer if isinstance(peer, str) else (peer[0], list(peer[1].parameters()))
    return impls


def check(impls, x_TD, train, dy=None):
    """name -> {ok, err_y, err_dx, tol} against moekit's eager path on the same input."""
    def run(fn):
        if not train:
            with torch.inference_mode():
                return fn(x_TD), None
        x = x_TD.detach().clone().requires_grad_(True)
        y = fn(x)
        (gx,) = torch.autograd.grad(y, x, dy)
        return y, gx

    ref_y, ref_gx = run(impls["moekit (eager)"][0])
    out = {}
    for name, impl in impls.items():
        if isinstance(impl, str) or name in ("dense-equal", "moekit (eager)"):
            continue
        try:
            y, gx = run(impl[0])
            tol = P.peer_tolerance(name, x_TD.dtype)
            e_y = P.rel_err(y, ref_y)
            e_dx = P.rel_err(gx, ref_gx) if train else 0.0
            out[name] = dict(ok=bool(e_y <= tol and e_dx <= tol), err_y=e_y, err_dx=e_dx, tol=tol)
        except Exception as exc:  # noqa: BLE001 — a backend this machine cannot run (e.g. CUDA-only)
            out[name] = dict(ok=False, unavailable=f"{type(exc).__name__}: {exc}"[:200])
    return out


def _untimed(c) -> str:
    return f"unavailable: {c['unavailable']}" if "unavailable" in c else "not timed: check failed"


def interleaved(steps: dict, reps: int, warmup: int, before=None, seed: int = 0) -> dict:
    """name -> [seconds] from `reps` passes over every step, after `warmup` passes, each pass in
    a fresh random order (seeded), so no step always runs after the same neighbour (a peer that
    maps and frees gigabytes leaves the kernel work that slows whatever runs next);
    `before(name)`, when given, runs untimed before each step."""
    times = {k: [] for k in steps}
    rng = random.Random(seed)
    names = list(steps)
    for i in range(warmup + reps):
        rng.shuffle(names)
        for name in names:
            step = steps[name]
            if before is not None:
                before(name)
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def train_shape(s, reps, warmup, max_gib, seed=0):
    """Checks, then forward + backward times of every implementation at one shape."""
    moe = make_layer(s["D"], s["F"], s["E"], s["K"], seed)
    impls = implementations(moe, s["T"], True, max_gib)
    x = torch.randn(s["T"], s["D"])
    dy = torch.randn(s["T"], s["D"])
    checks = check(impls, x, True, dy)
    params = {id(q): q for q in moe.parameters()}      # HF blocks share these; others bring their own
    for impl in impls.values():
        if not isinstance(impl, str):
            params.update((id(q), q) for q in impl[1])
    params = list(params.values())
    xg = x.clone().requires_grad_(True)

    def step_of(fn):
        def step():
            for q in params:
                q.grad = None
            xg.grad = None
            fn(xg).square().mean().backward()
        return step

    timed = {n: step_of(i[0]) for n, i in impls.items()
             if not isinstance(i, str) and (n == "dense-equal" or n == "moekit (eager)" or checks[n]["ok"])}
    times = interleaved(timed, reps, warmup)
    rows = {}
    for name, impl in impls.items():
        row = {"status": impl} if isinstance(impl, str) else {}
        if name in checks:
            row["check"] = checks[name]
        if name in times:
            row.update(P.summary(times[name]))
        elif not isinstance(impl, str):
            row["status"] = _untimed(checks[name])
        rows[name] = row
    return rows


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine (sysfs), 64 MiB when it cannot be read."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in (os.listdir(base) if os.path.isdir(base) else []):
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=64 * 2**20)


def cache_flusher():
    """A step that evicts the CPU caches (reads twice the last-level cache; reads, so no dirty
    lines are left to write back during the timed call)."""
    buf = torch.ones(2 * last_level_cache_bytes() // 4, dtype=torch.float32)

    def flush():
        buf.max()
    return flush


def decode_rows(d, reps, warmup, max_gib, seed=0):
    """Forward-only times at each T against the weight-read floor (inference mode), as a layer
    of a deeper model decodes: before each timed call the caches are flushed and the same
    implementation runs once untimed on a second layer's weights (the "previous layer"), so
    the timed call finds its code warm and its weights cold. Without this, the experts one
    T = 1 batch hits (75 MB at the decode shape) stay in a large L3 from one call to the next
    and whichever implementation runs first after the floor row pays DRAM while the others
    read the cache; with a flush alone, every call also pays a cold instruction cache and
    TLB, which no layer of a real model does."""
    moe = make_layer(d["D"], d["F"], d["E"], d["K"], seed).eval()
    previous = make_layer(d["D"], d["F"], d["E"], d["K"], seed + 1).eval()
    flush = cache_flusher()
    out = {}
    for T in d["T"]:
        x = torch.randn(T, d["D"])
        impls = implementations(moe, T, False, max_gib)
        # The twins share the previous layer's parameters (no copies): torchtitan, which copies
        # its weights and is far off the floor anyway, gets the flush alone.
        twins = implementations(previous, T, False, max_gib, torchtitan=False)
        for table in (impls, twins):
            del table["dense-equal"]
        checks = check(impls, x, False)
        floor_fn, A = P.weight_read_floor(moe, x)
        steps = {"weight-read floor": floor_fn}
        steps.update({n: i[0] for n, i in impls.items()
                      if not isinstance(i, str) and (n == "moekit (eager)" or checks[n]["ok"])})
        warm = {"weight-read floor": P.weight_read_floor(previous, x)[0]}
        warm.update({n: twins[n][0] if n in twins and not isinstance(twins[n], str) else (lambda x_: None)
                     for n in steps if n != "weight-read floor"})

        def inference(fn):
            def step():
                with torch.inference_mode():
                    fn(x)
            return step

        def before(name):
            flush()
            inference(warm[name])()
        times = interleaved({n: inference(fn) for n, fn in steps.items()}, reps, warmup, before=before)
        floor = statistics.median(times["weight-read floor"])
        rows = {"weight-read floor": dict(P.summary(times["weight-read floor"]), active_experts=A,
                                          weight_bytes=A * 3 * d["D"] * d["F"] * 4)}
        for name, impl in impls.items():
            row = {"status": impl} if isinstance(impl, str) else {}
            if name in checks:
                row["check"] = checks[name]
            if name in times:
                row.update(P.summary(times[name]))
                row["x_floor"] = statistics.median(times[name]) / floor
            elif not isinstance(impl, str):
                row["status"] = _untimed(checks[name])
            rows[name] = row
        out[f"T={T}"] = rows
        impls = twins = warm = steps = floor_fn = None        # the next T builds its own
        gc.collect()
        print(f"  decode T={T}: " + ", ".join(f"{n} {r['median_ms']:.2f} ms" for n, r in rows.items()
                                              if "median_ms" in r), flush=True)
    return out


# ---------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------
def _ms(r) -> str:
    return f"{r['median_ms']:.0f} ({r['min_ms']:.0f}–{r['max_ms']:.0f})" if r["median_ms"] >= 10 else \
        f"{r['median_ms']:.2f} ({r['min_ms']:.2f}–{r['max_ms']:.2f})"


def _check_text(impl, r) -> str:
    c = r.get("check")
    if c is None:
        return "reference" if impl == "moekit (eager)" else "-"
    if "unavailable" in c:
        return "-"
    return ("ok " if c["ok"] else "FAIL ") + f"{max(c['err_y'], c['err_dx']):.1e}"


def train_table(name, rows) -> str:
    dense = rows["dense-equal"].get("median_ms")
    mk = rows["moekit (auto)"].get("median_ms")
    lines = [f"### {name} (forward + backward, fp32)",
             "| implementation | ms, median (min–max) | dense-equal / it | it / moekit (auto) | check (rel. err) |",
             "|---|---|---|---|---|"]
    for impl, r in rows.items():
        if "median_ms" not in r:
            lines.append(f"| {impl} | {r.get('status', '?')[:90]} | | | {_check_text(impl, r)} |")
            continue
        m = r["median_ms"]
        lines.append(f"| {impl} | {_ms(r)} | {dense / m:.0%} | {m / mk:.2f}× | {_check_text(impl, r)} |")
    return "\n".join(lines)


def decode_table(d, rows_by_T) -> str:
    Ts = list(rows_by_T)
    lines = [f"### decode D={d['D']} F={d['F']} E={d['E']} K={d['K']} (forward, inference mode, fp32): "
             "ms median (min–max), × weight-read floor",
             "| implementation | " + " | ".join(Ts) + " | check (worst rel. err) |", "|---|" + "---|" * (len(Ts) + 1)]
    names = list(rows_by_T[Ts[0]])
    for impl in names:
        cells = []
        for T in Ts:
            r = rows_by_T[T].get(impl, {})
            if "median_ms" not in r:
                cells.append(r.get("status", "-")[:50])
            elif impl == "weight-read floor":
                cells.append(f"{_ms(r)}, A={r['active_experts']}")
            else:
                cells.append(f"{_ms(r)}, {r['x_floor']:.1f}×")
        cs = [rows_by_T[T][impl]["check"] for T in Ts if "err_y" in rows_by_T[T].get(impl, {}).get("check", {})]
        chk = ("reference" if impl == "moekit (eager)" else "-") if not cs else \
            ("ok " if all(c["ok"] for c in cs) else "FAIL ") + f"{max(c['err_y'] for c in cs):.1e}"
        lines.append(f"| {impl} | " + " | ".join(cells) + f" | {chk} |")
    return "\n".join(lines)


def import_line(t) -> str:
    a, b = P.summary(t["import torch"]), P.summary(t["import moekit"])
    return (f"import torch {_ms(a)} ms, import moekit (torch included) {_ms(b)} ms: "
            f"{b['median_ms'] / a['median_ms']:.2f}× (fresh interpreters, {a['n']} each, alternating)")


def failed_checks(results) -> list[str]:
    bad = []
    for section in ("train", "decode"):
        for shape, rows in results.get(section, {}).items():
            bad += [f"{shape}/{n}" for n, r in rows.items()
                    if r.get("check") and not r["check"]["ok"] and "unavailable" not in r["check"]]
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds, forward + backward (9; --quick 2)")
    ap.add_argument("--decode-reps", type=int, default=None, help="timed rounds, decode (20; --quick 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--import-reps", type=int, default=5)
    ap.add_argument("--max-gib", type=float, default=4.0,
                    help="skip HF batched_mm where its gathered weights would exceed this")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode table")
    ap.add_argument("--no-train", action="store_true", help="skip the forward + backward tables")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="tune glibc's allocator as `moekit train` does (moekit.train.keep_freed_memory): "
                         "large blocks from the heap, no page faults; applies to every row alike")
    args = ap.parse_args()
    if args.reps is None:
        args.reps = 2 if args.quick else 9
    if args.decode_reps is None:
        args.decode_reps = 3 if args.quick else 20
    for flag in ("reps", "decode_reps", "import_reps"):
        check_int(f"--{flag.replace('_', '-')}", getattr(args, flag), min=1)
    check_int("--warmup", args.warmup, min=0)
    check_number("--max-gib", args.max_gib, min=0)

    allocator = "glibc default"
    if args.keep_freed_memory:
        from moekit.train.allocator import keep_freed_memory
        allocator = "keep_freed_memory" if keep_freed_memory() else "glibc default (keep_freed_memory unavailable)"
    load_start = os.getloadavg()
    v = P.versions()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} — torch {v['torch']}, transformers {v['transformers']}, "
          f"torchtitan {v['torchtitan']} — {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, float32, "
          f"allocator: {allocator}")
    print("load average at start (1/5/15 min): " + " ".join(f"{v:.2f}" for v in load_start), flush=True)
    results = dict(date=time.strftime("%Y-%m-%d"), versions=v, threads=torch.get_num_threads(),
                   cpus=os.cpu_count(), allocator=allocator, load_start=load_start)

    results["import"] = P.import_times(1 if args.quick else args.import_reps, _SRC)
    print(import_line(results["import"]), flush=True)

    results["train"] = {}
    for name, s in ({} if args.no_train else QUICK if args.quick else SHAPES).items():
        print(f"[{name}]", flush=True)
        rows = train_shape(s, args.reps, args.warmup, args.max_gib)
        results["train"][name] = rows
        print("  " + ", ".join(f"{n} {r['median_ms']:.0f} ms" for n, r in rows.items() if "median_ms" in r), flush=True)
        gc.collect()
    d = QUICK_DECODE if args.quick else DECODE
    if not args.no_decode:
        print("[decode]", flush=True)
        results["decode"] = decode_rows(d, args.decode_reps, args.warmup, args.max_gib)
    load_end = os.getloadavg()
    results["load_end"] = load_end

    print()
    print(import_line(results["import"]))
    for name, rows in results["train"].items():
        print()
        print(train_table(name, rows))
    if "decode" in results:
        print()
        print(decode_table(d, results["decode"]))
    print(f"\nload average (1/5/15 min): start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
          f"end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = failed_checks(results)
    if bad:
        print("\nEQUALITY CHECK FAILED for: " + ", ".join(bad))
        sys.exit(1)


if __name__ == "__main__":
    main()

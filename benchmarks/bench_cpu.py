"""CPU benchmark of the MoE layer, forward + backward, as ratios measured side by side.

Peers (BENCHMARKS.md): the dense SwiGLU of equal FLOPs over T·K rows (the ceiling), a
per-expert Python loop with ``index_add_`` (typical research code), and sort +
``torch._grouped_mm`` written plainly. moekit runs its default backend (``auto``) and the
eager reference. Repetitions are interleaved (round-robin) so machine noise hits every
peer alike; medians are reported.

    python benchmarks/bench_cpu.py            # both CPU shapes of BENCHMARKS.md
    python benchmarks/bench_cpu.py --quick    # small shapes, a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import moekit

SHAPES = {
    "T=4096 D=512 F=1024 E=8 K=2": dict(T=4096, D=512, F=1024, E=8, K=2),
    "T=4096 D=512 F=256 E=64 K=8": dict(T=4096, D=512, F=256, E=64, K=8),
}
QUICK = {"T=256 D=64 F=128 E=8 K=2": dict(T=256, D=64, F=128, E=8, K=2),
         "T=256 D=64 F=32 E=32 K=8": dict(T=256, D=64, F=32, E=32, K=8)}


def make_peers(T, D, F_, E, K, seed=0):
    torch.manual_seed(seed)
    moe = moekit.MoE(d_model=D, num_experts=E, top_k=K, d_hidden=F_, aux_loss_coef=0.0)
    moe_eager = moekit.MoE(d_model=D, num_experts=E, top_k=K, d_hidden=F_, aux_loss_coef=0.0, backend="eager")
    moe_eager.load_state_dict(moe.state_dict())
    w_gu = moe.experts.gate_up_proj          # (E, 2F, D)
    w_d = moe.experts.down_proj              # (E, D, F)
    router_w = moe.router.weight
    dense_gu = torch.nn.Parameter(w_gu[0].detach().clone())
    dense_d = torch.nn.Parameter(w_d[0].detach().clone())
    x = torch.randn(T, D)

    def route(x_TD):
        probs = torch.softmax(F.linear(x_TD, router_w), -1)
        w, ids = probs.topk(K, -1)
        return w / w.sum(-1, keepdim=True), ids

    def glu(h):
        g, u = h.chunk(2, -1)
        return F.silu(g) * u

    def dense_equal():
        rows = x.repeat_interleave(K, 0)               # the same T·K rows of work, one matrix
        return F.linear(glu(F.linear(rows, dense_gu)), dense_d)

    def loop():
        w, ids = route(x)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            y = F.linear(glu(F.linear(x[tok], w_gu[e])), w_d[e])
            out.index_add_(0, tok, y * w[tok, slot, None])
        return out

    def sort_grouped_mm():
        w, ids = route(x)
        flat = ids.reshape(-1)
        order = flat.argsort()
        tok = order // K
        offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x[tok], w_gu.transpose(1, 2), offs=offs)
        y = torch._grouped_mm(glu(h), w_d.transpose(1, 2), offs=offs)
        return torch.zeros_like(x).index_add_(0, tok, y * w.reshape(-1)[order, None])

    peers = {"dense-equal": dense_equal, "per-expert loop": loop, "sort + _grouped_mm": sort_grouped_mm,
             "moekit (auto)": lambda: moe(x), "moekit (eager)": lambda: moe_eager(x)}
    params = [p for m in (moe, moe_eager) for p in m.parameters()] + [dense_gu, dense_d]
    return peers, params, (moe, x, loop)


def fwd_bwd(fn, params):
    for p in params:
        p.grad = None
    fn().square().mean().backward()


def run(shapes, reps, warmup):
    results = {}
    for name, s in shapes.items():
        peers, params, (moe, x, loop) = make_peers(s["T"], s["D"], s["F"], s["E"], s["K"])
        # Correctness before timing: moekit vs the plain loop on the same weights.
        moe.eval()
        with torch.no_grad():
            err = (moe(x) - loop()).abs().max().item()
        moe.train()
        assert err < 1e-3, f"moekit differs from the loop by {err}"
        times = {k: [] for k in peers}
        for _ in range(warmup):
            for fn in peers.values():
                fwd_bwd(fn, params)
        for _ in range(reps):
            for k, fn in peers.items():
                t0 = time.perf_counter()
                fwd_bwd(fn, params)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        results[name] = med
        print(f"{name}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in med.items()), flush=True)
    return results


def table(results) -> str:
    lines = ["| shape | dense-equal | per-expert loop | sort + _grouped_mm | moekit (eager) | moekit (auto) "
             "| moekit / dense-equal | moekit vs loop | moekit vs sort+gmm |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        mk = m["moekit (auto)"]
        lines.append(f"| {name} | {m['dense-equal']:.0f} ms | {m['per-expert loop']:.0f} ms | "
                     f"{m['sort + _grouped_mm']:.0f} ms | {m['moekit (eager)']:.0f} ms | {mk:.0f} ms | "
                     f"{m['dense-equal'] / mk:.0%} | {m['per-expert loop'] / mk:.2f}× | "
                     f"{m['sort + _grouped_mm'] / mk:.2f}× |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", help="also write the medians (ms) to this file")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, forward + backward")
    results = run(QUICK if args.quick else SHAPES, args.reps, args.warmup)
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

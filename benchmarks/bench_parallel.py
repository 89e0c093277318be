"""Communication overhead of expert parallelism against the local layer, on the CPU (gloo).

W ranks (default 2) each hold T tokens. Measured side by side, round-robin, forward +
backward, median over repetitions, the slowest rank's median reported (it sets the step time):

- ``local``: the plain `moekit.MoE` (all E experts on this rank) on the rank's T tokens;
- ``expert-parallel``: the same layer after `apply_expert_parallel` (E / W experts per rank,
  two all-to-alls there and back, global balancing loss);
- ``dispatch local`` / ``dispatch EP``: the dispatcher alone (permute → [all-to-all] →
  [all-to-all back] → combine, with identity experts), i.e. the cost the layer pays for moving rows.

Each rank runs one thread, so W ranks use W cores; on a 2-core machine W = 2 is the honest
setting. Ratios are what count (BENCHMARKS.md): the machine is shared and noisy.

    python benchmarks/bench_parallel.py              # 2 ranks, the default shapes
    python benchmarks/bench_parallel.py --quick      # small shapes, a smoke run
    python benchmarks/bench_parallel.py --full       # the CPU shapes of BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moekit
from moekit.ops.dispatch import LocalDispatcher
from moekit.parallel import ExpertParallelDispatcher, apply_expert_parallel

SHAPES = {
    "T=2048 D=256 F=512 E=8 K=2": dict(T=2048, D=256, F=512, E=8, K=2),
    "T=2048 D=256 F=128 E=32 K=8": dict(T=2048, D=256, F=128, E=32, K=8),
}
QUICK = {"T=256 D=64 F=128 E=8 K=2": dict(T=256, D=64, F=128, E=8, K=2)}
FULL = {
    "T=4096 D=512 F=1024 E=8 K=2": dict(T=4096, D=512, F=1024, E=8, K=2),
    "T=4096 D=512 F=256 E=64 K=8": dict(T=4096, D=512, F=256, E=64, K=8),
}


def _bench_shape(rank, W, T, D, F, E, K, reps):
    torch.manual_seed(0)
    local = moekit.MoE(d_model=D, num_experts=E, top_k=K, d_hidden=F, aux_loss_coef=0.01)
    ep = copy.deepcopy(local)
    apply_expert_parallel(ep)
    torch.manual_seed(1 + rank)
    x = torch.randn(T, D, requires_grad=True)
    with torch.no_grad():
        routing = local.router(x.detach())     # fixed pairs: the dispatch rows measure data movement only
    disp_local, disp_ep = LocalDispatcher(), ExpertParallelDispatcher(None, E)

    def layer(m):
        def run():
            y = m(x)
            (y.square().mean() + moekit.aux_loss(m)).backward()
        return run

    def dispatch(d):
        def run():
            x_ND, counts, meta = d.dispatch(x, routing)
            d.combine(x_ND * 1.0, meta).sum().backward()
        return run

    peers = {"local": layer(local), "expert-parallel": layer(ep),
             "dispatch local": dispatch(disp_local), "dispatch EP": dispatch(disp_ep)}
    times = {k: [] for k in peers}
    for k, f in peers.items():                  # warm-up
        f()
    for _ in range(reps):
        for k, f in peers.items():               # round-robin: noise hits every peer alike
            dist.barrier()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = torch.tensor([statistics.median(times[k]) for k in peers], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)   # the slowest rank sets the step time
    return dict(zip(peers, med.tolist()))


def _worker(rank, W, port, shapes, reps, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=W, timeout=datetime.timedelta(seconds=300))
    try:
        results = {name: _bench_shape(rank, W, reps=reps, **s) for name, s in shapes.items()}
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def table(results, W) -> str:
    rows = [f"| shape (per rank, {W} ranks) | local ms | expert-parallel ms | EP / local | "
            f"dispatch local ms | dispatch EP ms | comm cost (EP − local dispatch) / EP layer |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        comm = r["dispatch EP"] - r["dispatch local"]
        rows.append(f"| {name} | {1e3 * r['local']:.1f} | {1e3 * r['expert-parallel']:.1f} | "
                    f"{r['expert-parallel'] / r['local']:.2f} | {1e3 * r['dispatch local']:.1f} | "
                    f"{1e3 * r['dispatch EP']:.1f} | {100 * comm / r['expert-parallel']:.0f} % |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--full", action="store_true")
    p.add_argument("--json", default=None, help="also write the medians (seconds) here")
    args = p.parse_args(argv)
    shapes = QUICK if args.quick else FULL if args.full else SHAPES
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = args.json or f"/tmp/bench_parallel_{os.getpid()}.json"
    mp.start_processes(_worker, args=(args.world, port, shapes, args.reps, out), nprocs=args.world,
                       start_method="spawn")
    with open(out) as f:
        results = json.load(f)
    if not args.json:
        os.remove(out)
    print(f"torch {torch.__version__}, {args.world} gloo ranks x 1 thread, forward + backward, "
          f"median of {args.reps} (slowest rank)")
    print(table(results, args.world))


if __name__ == "__main__":
    main()

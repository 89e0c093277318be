"""MoE-NPs against a latent neural process on multimodal few-shot regression (five function families).

Both models are trained on the same task batches (context 3-10 points, targets = context + 20),
then tested on the same held-out tasks: a context of 5 or 10 points and 50 new target points.
Metrics per target point: the importance-sampled predictive log-likelihood ``log p(y_T | x_T, C) / T``
(`moekit.meta` ``log_likelihood``, 64 samples; higher is better) and the squared error of the
predictive mean.

    python -m projects.moe_neural_processes.run [--seeds 0 1 2] [--steps 3000] [--quick]

The method is the library's (`moekit.meta`: `LatentNP`, `MoENP`, `train_neural_process` — Adam
with a cosine decay through `moekit.optim`); this study picks the tasks and the sizes.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from moekit.meta import LatentNP, MoENP, train_neural_process
from projects.moe_neural_processes.data import FAMILIES, sample_tasks

CONTEXTS = (5, 10)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--experts", type=int, default=3, help="K expert latents of the MoE-NP")
    ap.add_argument("--d-hidden", type=int, default=64)
    ap.add_argument("--z-dim", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--test-tasks", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest for these small nets")
    ap.add_argument("--quick", action="store_true", help="seed 0, 150 steps, 100 test tasks")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.test_tasks = [0], 150, 100
    return args


def build(name: str, args) -> torch.nn.Module:
    if name == "np":
        return LatentNP(z_dim=args.z_dim, d_hidden=args.d_hidden)
    return MoENP(z_dim=args.z_dim, d_hidden=args.d_hidden, num_experts=args.experts)


@torch.no_grad()
def evaluate(model, tasks, *, samples: int = 64, chunk: int = 100) -> dict:
    """Per-task log-likelihood per target point and mean squared error of the predictive mean."""
    model.eval()
    x_c, y_c, x_t, y_t, family = tasks
    ll, se = [], []
    for i in range(0, len(x_c), chunk):
        sl = slice(i, i + chunk)
        gen = torch.Generator().manual_seed(i)
        ll.append(model.log_likelihood(x_c[sl], y_c[sl], x_t[sl], y_t[sl], samples=samples, generator=gen)
                  / x_t.shape[1])
        mean = model.predict(x_c[sl], y_c[sl], x_t[sl], samples=samples, generator=gen)["mean"]
        se.append((mean - y_t[sl]).pow(2).mean((1, 2)))
    return {"ll": torch.cat(ll).numpy(), "mse": torch.cat(se).numpy(), "family": family.numpy()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(args)


def run(args) -> dict:
    """Train and test both models for every seed; print the table; return
    ``{(model, context): {"ll": (seeds, tasks), "mse": (seeds, tasks)}}``."""
    tests = {c: sample_tasks(args.test_tasks, c, 50, seed=10**9 + c, include_context=False) for c in CONTEXTS}
    out = {}
    for seed in args.seeds:
        def batch(step, seed=seed):
            g = torch.Generator().manual_seed(seed * 10**6 + step)
            context = int(torch.randint(3, 11, (1,), generator=g))
            return sample_tasks(args.batch, context, 20, seed=seed * 10**6 + step)[:4]

        for name in ("np", "moe-np"):
            torch.manual_seed(seed)
            model = build(name, args)
            params = sum(p.numel() for p in model.parameters())
            t0 = time.time()
            losses = train_neural_process(model, batch, steps=args.steps, lr=args.lr)
            line = (f"seed {seed} {name:6s} params {params}, train {time.time() - t0:.0f}s, "
                    f"-ELBO/T (last 100) {np.mean(losses[-100:]):.3f}")
            for c, tasks in tests.items():
                r = evaluate(model, tasks)
                for key in ("ll", "mse"):
                    out.setdefault((name, c), {}).setdefault(key, []).append(r[key])
                out[name, c]["family"] = r["family"]
                line += f" | C={c}: ll {r['ll'].mean():.3f} mse {r['mse'].mean():.3f}"
            print(line, flush=True)
    print(f"\n{args.test_tasks} test tasks x 50 new targets, mean over seeds {args.seeds} "
          "(± 1.96 sd / sqrt(seeds) of the per-seed means when there are several seeds):")
    result = {}
    for key, v in out.items():
        result[key] = {k: (np.stack(a) if k != "family" else a) for k, a in v.items()}
    for c in CONTEXTS:
        cells = []
        for name in ("np", "moe-np"):
            for metric in ("ll", "mse"):
                per_seed = result[name, c][metric].mean(1)
                ci = f" ± {1.96 * per_seed.std(ddof=1) / math.sqrt(len(per_seed)):.3f}" if len(per_seed) > 1 else ""
                cells.append(f"{name} {metric} {per_seed.mean():.3f}{ci}")
        print(f"  context {c:2d}: " + "   ".join(cells))
    fams = result["np", CONTEXTS[0]]["family"]
    print(f"  per family, context {CONTEXTS[0]}, log-likelihood per point (np / moe-np):  " + "  ".join(
        f"{f} {result['np', CONTEXTS[0]]['ll'][:, fams == i].mean():.2f} / "
        f"{result['moe-np', CONTEXTS[0]]['ll'][:, fams == i].mean():.2f}" for i, f in enumerate(FAMILIES)
        if (fams == i).any()))
    return result


if __name__ == "__main__":
    main()

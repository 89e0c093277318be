"""Online mixture of MAML initialisations against single MAML on a sequence of task distributions.

Tasks arrive in phases, one function family per phase (sinusoids, then lines, then tanh steps;
x uniform in [-5, 5], y noise std 0.1): 10 support and 10 query points each, seen once. The
mixture (`moekit.meta.OnlineMAMLMixture`, CRP concentration `--alpha`) may open a new
initialisation for a new family; MAML is the same class with α = 0 (one initialisation, which is
exactly MAML — tested). After the stream, both are tested on held-out tasks of every family: the
query MSE after the inner-loop adaptation from the support set (the mixture picks its component
from the support set alone), so forgetting of the early families shows.

    python -m projects.online_maml_mixture.run [--seeds 0 1 2] [--tasks-per-phase 300] [--quick]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from moekit.meta import OnlineMAMLMixture

PHASES = ("sine", "line", "tanh")


def sample_task(family: str, g: torch.Generator, n_support: int = 10, n_query: int = 10, noise: float = 0.1):
    """(x_support, y_support, x_query, y_query) of one task of `family`, shapes (n, 1)."""
    x = torch.rand(n_support + n_query, 1, generator=g) * 10 - 5
    u = torch.rand(3, generator=g)
    if family == "sine":
        y = (0.1 + 4.9 * u[0]) * torch.sin(x - math.pi * u[1])
    elif family == "line":
        y = (6 * u[0] - 3) * x + (6 * u[1] - 3)
    elif family == "tanh":
        y = (6 * u[0] - 3) * torch.tanh(x - (6 * u[1] - 3)) + (6 * u[2] - 3)
    else:
        raise ValueError(f"family must be one of {PHASES}, got {family!r}")
    y = y + noise * torch.randn(y.shape, generator=g)
    return x[:n_support], y[:n_support], x[n_support:], y[n_support:]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks-per-phase", type=int, default=300)
    ap.add_argument("--alpha", type=float, default=0.01, help="CRP concentration of the mixture")
    ap.add_argument("--noise-std", type=float, default=2.0, help="likelihood std of the E-step")
    ap.add_argument("--inner-lr", type=float, default=0.02)
    ap.add_argument("--inner-steps", type=int, default=2)
    ap.add_argument("--meta-lr", type=float, default=3e-3)
    ap.add_argument("--test-tasks", type=int, default=200, help="held-out tasks per family")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="seed 0, 40 tasks per phase, 30 test tasks")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.tasks_per_phase, args.test_tasks = [0], 40, 30
    return args


def build_net(hidden: int = 40) -> nn.Module:
    """MAML's sinusoid regressor (Finn et al. 2017): 1 → 40 → 40 → 1, ReLU."""
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(args)


def run(args, *, hidden: int = 40) -> dict:
    """Stream the phases through both learners for each seed and test them; print the table; return
    ``{(model, family): (seeds, tasks) query MSEs}`` and ``("components", "mixture"): (seeds,)``."""
    out = {}
    for seed in args.seeds:
        learners = {}
        for name, alpha in (("maml", 0.0), ("mixture", args.alpha)):
            torch.manual_seed(seed)
            learners[name] = OnlineMAMLMixture(build_net(hidden), inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                                               meta_lr=args.meta_lr, concentration=alpha, noise_std=args.noise_std)
        line = f"seed {seed}:"
        for name, learner in learners.items():
            g = torch.Generator().manual_seed(seed)            # both learners see the same stream
            t0 = time.time()
            spawned_at = []
            for phase, family in enumerate(PHASES):
                for t in range(args.tasks_per_phase):
                    if learner.observe(*sample_task(family, g))["spawned"]:
                        spawned_at.append(f"{family}#{t}")
            line += f" {name} {time.time() - t0:.0f}s, {len(learner.components)} components"
            if name == "mixture":
                line += f" (new at {', '.join(spawned_at) or 'none'});"
                out.setdefault(("components", name), []).append(len(learner.components))
            for family in PHASES:
                g_test = torch.Generator().manual_seed(10**6 + PHASES.index(family))
                mse = []
                for _ in range(args.test_tasks):
                    xs, ys, xq, yq = sample_task(family, g_test)
                    mse.append(float((learner.predict(xs, ys, xq) - yq).pow(2).mean()))
                out.setdefault((name, family), []).append(np.array(mse))
        print(line, flush=True)
    result = {k: np.stack(v) if k[0] != "components" else np.array(v) for k, v in out.items()}
    print(f"\nquery MSE after adaptation on {args.test_tasks} held-out tasks per family, after the stream "
          f"{' → '.join(PHASES)} ({args.tasks_per_phase} tasks each), mean over seeds {args.seeds}:")
    for name in ("maml", "mixture"):
        cells = []
        for family in PHASES:
            per_seed = result[name, family].mean(1)
            ci = f" ± {1.96 * per_seed.std(ddof=1) / math.sqrt(len(per_seed)):.3f}" if len(per_seed) > 1 else ""
            cells.append(f"{family} {per_seed.mean():.3f}{ci}")
        print(f"  {name:8s} " + "   ".join(cells))
    print(f"  mixture components per seed: {result['components', 'mixture'].tolist()}")
    return result


if __name__ == "__main__":
    main()

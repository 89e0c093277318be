"""MoE-NPs against latent neural processes on two benchmarks: multimodal few-shot regression (five
function families) and MNIST image completion.

Three models see the same training batches: the latent NP, a parameter-matched wider latent NP
(``np-wide``, about as many parameters as the MoE-NP) and the MoE-NP. Test metrics per target point:
the importance-sampled predictive log-likelihood ``log p(y_T | x_T, C) / T`` (`moekit.meta`
``log_likelihood``; higher is better) and the squared error of the predictive mean.

- ``--benchmark sinusoid``: contexts of 3-10 points and 20 new targets per training task; tested on
  the same held-out tasks with 5 or 10 context points and 50 new targets (64 samples).
- ``--benchmark images``: MNIST digits as functions from pixel coordinates to intensity, split
  train / test by image; contexts of 10-200 random pixels and 100 new target pixels per training
  image; tested on held-out digits with 10, 50, 100 or 300 context pixels and 200 new target pixels
  (16 samples); ``--figure`` draws completions of held-out digits (seed 0).

    python -m projects.moe_neural_processes.run [--benchmark sinusoid|images] [--seeds 0 1 2] [--quick]

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
from projects.moe_neural_processes import images as img
from projects.moe_neural_processes.data import FAMILIES, sample_tasks

MODELS = ("np", "np-wide", "moe-np")
CONTEXTS = {"sinusoid": (5, 10), "images": (10, 50, 100, 300)}
DEFAULTS = {"sinusoid": dict(steps=3000, test_tasks=500, samples=64, x_dim=1),
            "images": dict(steps=1200, test_tasks=200, samples=16, x_dim=2)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", choices=tuple(CONTEXTS), default="sinusoid")
    ap.add_argument("--steps", type=int, default=None, help="default 3000 (sinusoid) / 1200 (images)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--experts", type=int, default=3, help="K expert latents of the MoE-NP")
    ap.add_argument("--d-hidden", type=int, default=64)
    ap.add_argument("--z-dim", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--test-tasks", type=int, default=None, help="default 500 tasks / 200 held-out digits")
    ap.add_argument("--figure", default=None, help="images: save completions of held-out digits (seed 0) here")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest for these small nets")
    ap.add_argument("--quick", action="store_true", help="seed 0, 150 steps, 100 test tasks (images: 50 digits)")
    args = ap.parse_args(argv)
    for k, v in DEFAULTS[args.benchmark].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.quick:
        args.seeds, args.steps, args.test_tasks = [0], 150, 100 if args.benchmark == "sinusoid" else 50
    return args


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, args) -> torch.nn.Module:
    """``np``, ``moe-np``, or ``np-wide``: the latent NP whose width gives the parameter count closest
    to the MoE-NP's."""
    kw = dict(x_dim=args.x_dim, z_dim=args.z_dim)
    if name == "np":
        return LatentNP(d_hidden=args.d_hidden, **kw)
    if name == "moe-np":
        return MoENP(d_hidden=args.d_hidden, num_experts=args.experts, **kw)
    target = n_params(MoENP(d_hidden=args.d_hidden, num_experts=args.experts, **kw))
    width = min(range(args.d_hidden, 4 * args.d_hidden + 1), key=lambda h: abs(n_params(LatentNP(d_hidden=h, **kw))
                                                                                - target))
    return LatentNP(d_hidden=width, **kw)


@torch.no_grad()
def evaluate(model, tasks, *, samples: int = 64, chunk: int = 100) -> dict:
    """Per-task log-likelihood per target point and mean squared error of the predictive mean."""
    model.eval()
    x_c, y_c, x_t, y_t = tasks[:4]
    family = tasks[4] if len(tasks) > 4 else torch.zeros(len(x_c), dtype=torch.long)
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


def _benchmark(args):
    """(test tasks per context size, ``batch(seed, step)`` training batches) of the chosen benchmark."""
    if args.benchmark == "sinusoid":
        tests = {c: sample_tasks(args.test_tasks, c, 50, seed=10**9 + c, include_context=False)
                 for c in CONTEXTS["sinusoid"]}

        def batch(seed, step):
            g = torch.Generator().manual_seed(seed * 10**6 + step)
            context = int(torch.randint(3, 11, (1,), generator=g))
            return sample_tasks(args.batch, context, 20, seed=seed * 10**6 + step)[:4]
        return tests, batch
    pixels = args.images if getattr(args, "images", None) is not None else img.load_images()
    train_idx, test_idx = img.split_images(len(pixels), test=min(1000, len(pixels) // 5))
    train_px, test_px = pixels[train_idx], pixels[test_idx[:args.test_tasks]]
    tests = {c: img.completion_tasks(test_px, c, 200, seed=10**9 + c, include_context=False)
             for c in CONTEXTS["images"]}

    def batch(seed, step):
        g = torch.Generator().manual_seed(seed * 10**6 + step)
        rows = torch.randint(len(train_px), (args.batch,), generator=g)
        context = int(torch.randint(10, 201, (1,), generator=g))
        return img.completion_tasks(train_px[rows], context, 100, seed=seed * 10**6 + step)
    args.test_pixels = test_px
    return tests, batch


def run(args) -> dict:
    """Train and test every model for every seed; print the table; return
    ``{(model, context): {"ll": (seeds, tasks), "mse": (seeds, tasks)}}`` and ``("params", model)``."""
    tests, batch = _benchmark(args)
    chunk = 100 if args.benchmark == "sinusoid" else 50
    out, trained = {}, {}
    for seed in args.seeds:
        for name in MODELS:
            torch.manual_seed(seed)
            model = build(name, args)
            out["params", name] = n_params(model)
            t0 = time.time()
            losses = train_neural_process(model, lambda step, seed=seed: batch(seed, step), steps=args.steps,
                                          lr=args.lr)
            line = (f"seed {seed} {name:7s} params {n_params(model)}, train {time.time() - t0:.0f}s, "
                    f"-ELBO/T (last 100) {np.mean(losses[-100:]):.3f}")
            for c, tasks in tests.items():
                r = evaluate(model, tasks, samples=args.samples, chunk=chunk)
                for key in ("ll", "mse"):
                    out.setdefault((name, c), {}).setdefault(key, []).append(r[key])
                out[name, c]["family"] = r["family"]
                line += f" | C={c}: ll {r['ll'].mean():.3f} mse {r['mse'].mean():.4f}"
            print(line, flush=True)
            if seed == args.seeds[0]:
                trained[name] = model
    result = {key: ({k: (np.stack(a) if k != "family" else a) for k, a in v.items()} if isinstance(v, dict) else v)
              for key, v in out.items()}
    report(result, args)
    if args.benchmark == "images" and args.figure:
        img.plot_completions({n: trained[n] for n in MODELS}, args.test_pixels[:3], (10, 50, 300), args.figure)
        print(f"completions of held-out digits written to {args.figure}")
    return result


def report(result: dict, args) -> None:
    unit = "tasks x 50 new targets" if args.benchmark == "sinusoid" else "held-out digits x 200 new target pixels"
    print(f"\n{args.test_tasks} {unit}, mean over seeds {args.seeds} "
          "(± 1.96 sd / sqrt(seeds) of the per-seed means when there are several seeds); params: "
          + ", ".join(f"{n} {result['params', n]}" for n in MODELS))
    for c in CONTEXTS[args.benchmark]:
        cells = []
        for metric in ("ll", "mse"):
            for name in MODELS:
                per_seed = result[name, c][metric].mean(1)
                ci = f" ± {1.96 * per_seed.std(ddof=1) / math.sqrt(len(per_seed)):.4f}" if len(per_seed) > 1 else ""
                cells.append(f"{name} {metric} {per_seed.mean():.4f}{ci}")
        print(f"  context {c:3d}: " + "   ".join(cells))
    if args.benchmark == "sinusoid":
        c0 = CONTEXTS["sinusoid"][0]
        fams = result["np", c0]["family"]
        print(f"  per family, context {c0}, log-likelihood per point ({' / '.join(MODELS)}):  " + "  ".join(
            f"{f} " + " / ".join(f"{result[n, c0]['ll'][:, fams == i].mean():.2f}" for n in MODELS)
            for i, f in enumerate(FAMILIES) if (fams == i).any()))


if __name__ == "__main__":
    main()

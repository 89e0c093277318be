"""Hierarchical expert networks (Hihn & Braun 2020) against single meta-learners: few-shot tasks
from Fashion-MNIST, MNIST and scikit-learn digits.

Per seed, on episodes drawn from all three domains' classes 0-5 (5-way 5-shot, 10 queries):

- ``hen``: a support-set selector over M Prototypical-Network experts, trained with the free
  energy ``E[U] - I(X;M)/β1 - I(X;Y|M)/β2`` (`moekit.meta.HierarchicalExpertNetwork`);
- ``hen-no-info``: the same network with β1 = β2 = inf (no information costs: the best expert
  takes each task);
- ``single``: one ProtoNet of one expert's size; ``single-wide``: one ProtoNet with about as many
  parameters as the whole ``hen`` (experts + selector); both meta-trained on as many episodes.

Every model is tested on the same 4-way episodes of the held-out classes 6-9 of each domain (1 and
5 shots); ``hen`` adapts by choosing one expert from the support set. The selector's
specialisation is I(domain; chosen expert) on those test episodes.

    python -m projects.hierarchical_experts.run [--seeds 0 1 2] [--steps 1000] [--quick]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from moekit.analysis import mutual_information as mi_from_counts
from moekit.meta import (
    DomainEpisodes,
    HierarchicalExpertNetwork,
    evaluate_domain,
    meta_train_domains,
    train_hierarchical_experts,
)
from moekit.models import dense_proto_net
from moekit.models.fewshot import EpisodeSampler
from projects.mxml_multidomain.data import build_domains, load_raw  # the same three domains as MxML
from projects.mxml_multidomain.run import print_accuracy_table

MODELS = ("single", "single-wide", "hen-no-info", "hen")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="training steps of --tasks tasks each (every model)")
    ap.add_argument("--tasks", type=int, default=4, help="episodes per step")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--beta-selector", type=float, default=10.0, help="β1 of hen")
    ap.add_argument("--beta-expert", type=float, default=20.0, help="β2 of hen")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--episodes", type=int, default=300, help="test episodes per domain and shot count")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="one thread: the machine-wide training slots")
    ap.add_argument("--quick", action="store_true", help="seed 0, 30 steps, 20 test episodes")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.episodes = [0], 30, 20
    return args


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_width(in_features: int, target: int) -> int:
    """The d_model (FFN hidden 4 · d_model) whose `dense_proto_net` has the parameter count closest to `target`."""
    return min(range(8, 1025, 8), key=lambda d: abs(n_params(dense_proto_net(in_features=in_features, d_model=d,
                                                                              d_hidden=4 * d)) - target))


def build(name: str, args, X: int, d_model: int, seed: int):
    torch.manual_seed(seed)
    if name.startswith("hen"):
        experts = [dense_proto_net(in_features=X, d_model=d_model, d_hidden=4 * d_model) for _ in range(args.experts)]
        betas = (math.inf, math.inf) if name == "hen-no-info" else (args.beta_selector, args.beta_expert)
        return HierarchicalExpertNetwork(experts, in_features=X, d_hidden=d_model, beta_selector=betas[0],
                                         beta_expert=betas[1])
    if name == "single-wide":
        hen_params = n_params(build("hen", args, X, d_model, seed))
        d = matched_width(X, hen_params)
        torch.manual_seed(seed)
        return dense_proto_net(in_features=X, d_model=d, d_hidden=4 * d)
    return dense_proto_net(in_features=X, d_model=d_model, d_hidden=4 * d_model)


@torch.no_grad()
def chosen_experts(model: HierarchicalExpertNetwork, domain, *, shots: int, episodes: int, seed: int) -> np.ndarray:
    """How often the selector chose each expert (M,) on `episodes` 4-way test episodes of `domain`."""
    model.eval()
    sampler = EpisodeSampler(domain.labels, domain.classes, n_way=4, shots=shots, queries=1, seed=seed)
    counts = np.zeros(model.num_experts)
    for _ in range(episodes):
        counts[int(model.mixing_weights(domain.x_BX[sampler.sample().support_idx_P]).argmax())] += 1
    return counts


def run(train, test, args, *, d_model: int = 64) -> dict:
    """Train and test every model for each seed; print the tables; return ``{(model, domain, shots):
    (seeds, episodes) accuracies}``, ``("params", model)`` and ``("mi", model, shots)``: per seed
    ``(I(domain; expert), I / H(domain))`` of the selector on the test episodes."""
    X = train[0].x_BX.shape[1]
    ep_kw = dict(n_way=5, shots=5, queries=10)
    acc, out = {}, {}
    for seed in args.seeds:
        line = f"seed {seed}:"
        for name in MODELS:
            model = build(name, args, X, d_model, seed)
            out["params", name] = n_params(model)
            t0 = time.time()
            episodes = DomainEpisodes(train, seed=seed, **ep_kw)
            if name.startswith("hen"):
                hist = train_hierarchical_experts(model, episodes, steps=args.steps, tasks_per_step=args.tasks,
                                                  lr=args.lr)
                tail = hist[-max(1, len(hist) // 10):]
                line += (f" {name} {time.time() - t0:.0f}s (train U {np.mean([h['utility'] for h in tail]):.3f}, "
                         f"I(X;M) {np.mean([h['mi_selector'] for h in tail]):.3f})")
            else:
                meta_train_domains(model, episodes, steps=args.steps * args.tasks, lr=args.lr)
                line += f" {name} {time.time() - t0:.0f}s"
            for i, d in enumerate(test):
                for shots in (1, 5):
                    accs = evaluate_domain(model, d, n_way=4, shots=shots, queries=15, episodes=args.episodes,
                                           seed=1000 + 10 * i + shots)[2]
                    acc.setdefault((name, d.name, shots), []).append(accs)
            if name.startswith("hen"):
                for shots in (1, 5):
                    counts = np.stack([chosen_experts(model, d, shots=shots, episodes=args.episodes, seed=2000 + i)
                                       for i, d in enumerate(test)])
                    out.setdefault(("counts", name, shots), []).append(counts)
                    out.setdefault(("mi", name, shots), []).append(mi_from_counts(counts))
        print(line, flush=True)
    out.update({k: np.stack(v) for k, v in acc.items()})
    for k in [k for k in out if k[0] in ("mi", "counts")]:
        out[k] = np.array(out[k])
    report(out, [d.name for d in test], args)
    return out


def report(out: dict, names: list, args) -> None:
    print_accuracy_table(out, names, MODELS, episodes=args.episodes, seeds=args.seeds,
                         params={m: out["params", m] for m in MODELS})
    for name in ("hen-no-info", "hen"):
        for shots in (1, 5):
            mi = out["mi", name, shots]
            share = out["counts", name, shots].sum(0).astype(int)          # (domains, experts) over seeds
            print(f"  {name} {shots}-shot: I(domain; expert) {mi[:, 0].mean():.3f} nats "
                  f"(/H(domain) {mi[:, 1].mean():.2f}; per seed {', '.join(f'{v:.2f}' for v in mi[:, 1])}); "
                  "choices per domain: " + "; ".join(f"{n} {share[i].tolist()}" for i, n in enumerate(names)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = build_domains(load_raw())
    return run(train, test, args)


if __name__ == "__main__":
    main()

"""MxML against one meta-learner trained on all domains: few-shot tasks from Fashion-MNIST, MNIST
and scikit-learn digits.

Per seed: one Prototypical Network per domain, meta-trained on that domain's classes 0-5
(`--steps` episodes each); MxML's gate trained over them on episodes of all three domains
(`--gate-steps`, learners frozen); and the baselines, one net meta-trained on episodes of all
domains for as many episodes as the three learners together — dense, and with a top-2-of-8 MoE
FFN (`moekit.models.moe_proto_net`). "oracle" uses the right domain's learner. Every model is
tested on the same 4-way episodes of the held-out classes 6-9 of each domain.

    python -m projects.mxml_multidomain.run [--seeds 0 1 2] [--steps 800] [--quick]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from moekit.meta import DomainEpisodes, MixtureOfMetaLearners, evaluate_domain, meta_train_domains, train_gate
from moekit.models import dense_proto_net, moe_proto_net
from projects.mxml_multidomain.data import build_domains, load_raw

MODELS = ("joint-dense", "joint-moe", "mxml", "oracle")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800, help="episodes per domain learner")
    ap.add_argument("--gate-steps", type=int, default=300)
    ap.add_argument("--train-way", type=int, default=5)
    ap.add_argument("--train-shots", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=300, help="test episodes per domain and shot count")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="seed 0, 60 steps, 40 gate steps, 30 test episodes")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.gate_steps, args.episodes = [0], 60, 40, 30
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = build_domains(load_raw())
    return run(train, test, args)


def run(train, test, args, *, d_model: int = 64, d_hidden: int = 256) -> dict:
    """Train and test every model for each seed; print the tables; return
    ``{(model, domain, shots): (seeds, episodes) per-episode accuracies}`` and ``("gate", domain)``:
    the gate's mean weight on that domain's own learner, per seed."""
    X = train[0].x_BX.shape[1]
    ep_kw = dict(n_way=args.train_way, shots=args.train_shots, queries=10)
    acc, gate_w = {}, {}
    for seed in args.seeds:
        t0 = time.time()
        learners = []
        for i, d in enumerate(train):
            torch.manual_seed(seed * 100 + i)
            net = dense_proto_net(in_features=X, d_model=d_model, d_hidden=d_hidden)
            meta_train_domains(net, DomainEpisodes([d], seed=seed, **ep_kw), steps=args.steps)
            learners.append(net)
        torch.manual_seed(seed)
        mix = MixtureOfMetaLearners(learners, in_features=X)
        train_gate(mix, DomainEpisodes(train, seed=seed + 500, **ep_kw), steps=args.gate_steps)
        t_mx = time.time() - t0
        joint = {}
        for name, build in (("joint-dense", dense_proto_net), ("joint-moe", moe_proto_net)):
            torch.manual_seed(seed)
            t1 = time.time()
            joint[name] = build(in_features=X, d_model=d_model, d_hidden=d_hidden)
            meta_train_domains(joint[name], DomainEpisodes(train, seed=seed, **ep_kw), steps=len(train) * args.steps)
            joint[name + "_time"] = time.time() - t1
        line = (f"seed {seed}: train mxml {t_mx:.0f}s, joint-dense {joint['joint-dense_time']:.0f}s, "
                f"joint-moe {joint['joint-moe_time']:.0f}s |")
        for i, d in enumerate(test):
            models = {"joint-dense": joint["joint-dense"], "joint-moe": joint["joint-moe"], "mxml": mix,
                      "oracle": learners[i]}
            for shots in (1, 5):
                for name, model in models.items():
                    accs = evaluate_domain(model, d, n_way=4, shots=shots, queries=15, episodes=args.episodes,
                                           seed=1000 + 10 * i + shots)[2]
                    acc.setdefault((name, d.name, shots), []).append(accs)
            with torch.no_grad():
                sampler = DomainEpisodes([d], n_way=4, shots=5, queries=15, seed=77)
                w = np.mean([mix.mixing_weights(d.x_BX[sampler.sample()[1].support_idx_P])[i].item()
                             for _ in range(50)])
            gate_w.setdefault(("gate", d.name), []).append(w)
            line += f" {d.name}: mxml 5-shot {100 * acc['mxml', d.name, 5][-1].mean():.1f}%, gate→own {w:.2f}"
        print(line, flush=True)
    out = {k: np.stack(v) for k, v in acc.items()}
    out.update({k: np.array(v) for k, v in gate_w.items()})
    names = [d.name for d in test]
    print_accuracy_table(out, names, MODELS, episodes=args.episodes, seeds=args.seeds)
    diffs = []
    for shots in (1, 5):
        for n in names:
            d = (out["mxml", n, shots] - out["joint-dense", n, shots]).mean(0)   # seed-averaged, paired by episode
            ci = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
            diffs.append(f"{n} {shots}-shot {100 * d.mean():+.2f} ± {100 * ci:.2f}")
    print("  mxml - joint-dense (paired by episode, points): " + "; ".join(diffs))
    print("  gate weight on the domain's own learner: " + ", ".join(f"{n} {out['gate', n].mean():.2f}" for n in names))
    return out


def print_accuracy_table(out: dict, names: list, models, *, episodes: int, seeds, params: dict = None) -> None:
    """The 4-way accuracy table of ``out[(model, domain, shots)]`` (seeds, episodes) arrays, per shot
    count: mean ± the mean per-seed 95% interval over episodes, per domain and averaged (also used by
    projects/hierarchical_experts); `params` adds a parameter-count column."""
    print(f"\n4-way accuracy (%) on held-out classes 6-9, 15 queries/class, {episodes} episodes per domain, "
          f"mean over seeds {seeds} (± mean per-seed 95% CI over episodes):")
    for shots in (1, 5):
        print(f"  {shots}-shot   " + ("  params " if params else "") + "  ".join(f"{n:>15s}" for n in names + ["mean"]))
        for name in models:
            cells = []
            for n in names:
                a = out[name, n, shots]
                ci = np.mean([1.96 * r.std(ddof=1) / math.sqrt(len(r)) for r in a]) if a.shape[1] > 1 else 0.0
                cells.append(f"{100 * a.mean():7.2f} ± {100 * ci:4.2f}")
            cells.append(f"{100 * np.mean([out[name, n, shots].mean() for n in names]):15.2f}")
            print(f"  {name:11s} " + (f"{params[name]:8d} " if params else "") + "  ".join(f"{c:>15s}" for c in cells))


if __name__ == "__main__":
    main()

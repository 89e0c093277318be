"""Prototypical Networks on Fashion-MNIST: dense vs MoE embedding at equal active parameters.

Meta-train on classes 0-5 (train split), meta-test 4-way 1-shot and 5-shot episodes (15 queries
per class) on the held-out classes 6-9 (test split). Both nets see the same training episodes
and the same test episodes, so the per-episode difference gives a paired CI.

    python -m projects.fewshot_protonet.run [--seeds 0 1 2] [--steps 1500] [--quick]

The library gives the method (`moekit.models`: `EpisodeSampler`, `prototypes`, `proto_logits`,
`meta_train` — Adam with cosine decay through `moekit.optim` — and `evaluate_episodes`); this
study only picks the data, the classes and the two embedding nets.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from moekit.models import active_ffn_params, dense_proto_net, evaluate_episodes, meta_train, moe_proto_net
from moekit.train.images import load_fashion_mnist

TRAIN_CLASSES, TEST_CLASSES = range(0, 6), range(6, 10)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--train-way", type=int, default=6)
    ap.add_argument("--train-shots", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="independent meta-training runs per net")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="seed 0 only, 100 steps, 50 test episodes")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.episodes = [0], 100, 50
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(load_fashion_mnist(), args)


def run(data, args, *, d_model: int = 64, d_hidden: int = 256) -> dict:
    """Meta-train the dense and the MoE embedding for every seed of ``args.seeds`` on `data` (a
    `FashionMNIST`), test on the held-out classes and print the table; return
    ``{(net, shots): (seeds, episodes) array of per-episode accuracies}``."""
    mean, std = data.train_images.mean() / 255.0, data.train_images.std() / 255.0

    def flat(images):
        return (torch.from_numpy(images).float().div(255.0).sub(mean).div(std)).flatten(1)   # (B, 784)

    x_train, x_test = flat(data.train_images), flat(data.test_images)
    builders = {"dense": dense_proto_net, "moe": moe_proto_net}
    per_episode = {}                                  # (net, shots) -> [per-episode accuracies per seed]
    for seed in args.seeds:
        for name, build in builders.items():
            torch.manual_seed(seed)
            net = build(in_features=x_train.shape[1], d_model=d_model, d_hidden=d_hidden)
            active, total = active_ffn_params(net)
            t0 = time.time()
            losses = meta_train(net, x_train, data.train_labels, TRAIN_CLASSES, n_way=args.train_way,
                                shots=args.train_shots, queries=15, steps=args.steps, seed=seed)
            line = (f"seed {seed} {name:5s} FFN active/total params {active}/{total}, train {time.time() - t0:.0f}s, "
                    f"loss(last 100) {sum(losses[-100:]) / len(losses[-100:]):.3f}")
            for shots in (1, 5):
                acc, ci, accs = evaluate_episodes(net, x_test, data.test_labels, TEST_CLASSES, n_way=4, shots=shots,
                                                  queries=15, episodes=args.episodes, seed=1000 + shots)
                per_episode.setdefault((name, shots), []).append(accs)
                line += f" | {shots}-shot {100 * acc:.2f} ± {100 * ci:.2f}%"
            print(line, flush=True)
    print(f"\n4-way, 15 queries/class, {args.episodes} test episodes (classes 6-9), mean over seeds {args.seeds} "
          f"(± mean of the per-seed 95% CIs; paired diff CI over seed-averaged episodes):")
    for shots in (1, 5):
        acc = {n: np.stack(per_episode[n, shots]) for n in builders}             # (seeds, episodes)
        ci = {n: np.mean([1.96 * a.std(ddof=1) / math.sqrt(len(a)) for a in acc[n]]) for n in builders}
        diff = (acc["moe"] - acc["dense"]).mean(0)
        dci = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
        print(f"  {shots}-shot: dense {100 * acc['dense'].mean():.2f} ± {100 * ci['dense']:.2f}%   "
              f"moe {100 * acc['moe'].mean():.2f} ± {100 * ci['moe']:.2f}%   "
              f"moe - dense {100 * diff.mean():+.2f} ± {100 * dci:.2f} points")
    return {key: np.stack(v) for key, v in per_episode.items()}


if __name__ == "__main__":
    main()

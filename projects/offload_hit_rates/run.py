"""Generate from a trained MoE language model with its experts offloaded: cache hit rates.

    python -m projects.offload_hit_rates.run runs/default-.../moe            # a `moekit train` checkpoint
    python -m projects.offload_hit_rates.run runs/default-.../moe --quick
    python -m projects.offload_hit_rates.run runs/default-.../moe --batch 1 --seeds 0 1 2

Decodes B validation prompts token by token (KV cache: each step routes one token per
sequence), once with all experts on the device and then with each layer's experts in host
memory behind an LRU cache of S slots (`moekit.layers.offload_experts`), with and without
prefetching the next layer's experts from the current layer's input. Checks that every
offloaded run generates the same tokens (and says so where one does not), and prints per setting: hit rate, prefetch
precision, the expert bytes per generated token the layers had to wait for (misses) and all
bytes copied (prefetches run while the previous layer computes), next to what copying every
routed expert at every step would cost (no cache).

On a CPU "device" and "host" are the same memory, so wall time says nothing about PCIe and is
not reported; the hit rates and bytes are what carry over to a GPU.
"""
from __future__ import annotations

import argparse
import copy

import torch

from moekit.layers import offload_experts, offload_stats
from moekit.train.sample import load_model


def prompts(tok, cfg, batch: int, length: int, seed: int) -> torch.Tensor:
    """`batch` windows of `length` tokens from the validation documents of the run's data."""
    from moekit.train.config import DataConfig
    from moekit.train.data import build_corpus

    data = dict(cfg["run"]["data"])
    data["paths"] = tuple(data.get("paths", ()))
    _, _, val = build_corpus(DataConfig(**data), tokenizer=tok)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(val) - length, (batch,), generator=g).tolist()
    return torch.stack([val.tokens[s:s + length] for s in starts])


def hit_rates(model, ids: torch.Tensor, new_tokens: int, sizes) -> tuple[list, dict]:
    """Greedy decoding of `ids` with all experts resident, then offloaded behind an LRU cache of
    each size S in `sizes`, without and with prefetching. Returns ``[(S, prefetch, offload_stats
    total)]`` and ``{(S, prefetch): sequences whose tokens differ from the resident run}``."""
    ref = model.generate(ids, new_tokens, temperature=0)
    rows, differ = [], {}
    for S in sizes:
        for prefetch in (False, True):
            m = offload_experts(copy.deepcopy(model), cache_size=S, prefetch=prefetch)
            out = m.generate(ids, new_tokens, temperature=0)
            differ[S, prefetch] = int((out != ref).any(1).sum())
            rows.append((S, prefetch, offload_stats(m)["total"]))
    return rows, differ


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a MoE variant folder of a `moekit train` run (or a checkpoint)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=112,
                    help="prompt + new tokens must fit max_seq_len (beyond it every step recomputes the whole window)")
    ap.add_argument("--cache-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="prompt draws (one table each)")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 24 new tokens, one seed")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.new_tokens, args.seeds = 2, 24, args.seeds[:1]

    model, tok, cfg = load_model(args.checkpoint)
    moe = [b.ffn for b in model.moe_blocks]
    if not moe:
        raise SystemExit(f"{args.checkpoint} holds a dense model; give the MoE variant's folder")
    E, K = moe[0].num_experts, moe[0].top_k
    if args.prompt_len + args.new_tokens > model.config.max_seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the model's "
                         f"max_seq_len={model.config.max_seq_len}")
    sizes = args.cache_sizes or sorted({max(1, s) for s in (1, E // 4, E // 2, 3 * E // 4)})
    per_expert = sum(p[0].numel() * p.element_size() for p in moe[0].experts.parameters())
    print(f"{len(moe)} MoE layers, E={E}, top-{K}, {per_expert / 1024:.1f} KiB per expert; "
          f"{args.batch} prompts x {args.new_tokens} new tokens, greedy")
    tables = {}
    for seed in args.seeds:
        ids = prompts(tok, cfg, args.batch, args.prompt_len, seed)
        rows, differ = hit_rates(model, ids, args.new_tokens, sizes)
        for (S, prefetch), n in differ.items():
            if n:     # possible only through last-bit rounding of the activation (see the module)
                print(f"cache_size={S} prefetch={prefetch}: {n} of {args.batch} sequences differ")
        print_table(rows, E=E, per_expert=per_expert, steps=args.new_tokens * args.batch, seed=seed)
        tables[seed] = rows
    return tables


def print_table(rows, *, E: int, per_expert: int, steps: int, seed: int) -> None:
    # Without a cache every step copies each layer's distinct routed experts (= the requests).
    print(f"\nprompt seed {seed}")
    print(f"| S (of {E}) | prefetch | hit rate | prefetch precision | waited-for copies, KiB / token | "
          f"all copies, KiB / token | all copies vs no cache |")
    print("|---|---|---|---|---|---|---|")
    for S, prefetch, t in rows:
        no_cache = t["requests"] * per_expert
        print(f"| {S} | {'yes' if prefetch else 'no'} | {t['hit_rate']:.1%} | "
              f"{t['prefetch_precision']:.1%} | {t['misses'] * per_expert / steps / 1024:.1f} | "
              f"{t['bytes_copied'] / steps / 1024:.1f} | {t['bytes_copied'] / no_cache:.0%} |")
    print("\nper token: bytes over all steps (prompt included) / generated tokens")


if __name__ == "__main__":
    main()

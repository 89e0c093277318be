"""Branch-Train-MiX against its alternatives at matched training FLOPs, on three text domains.

    python -m projects.btx_domains.run [--quick] [--seeds 0 1 2]

Sukhbaatar et al. (2024), "Branch-Train-MiX" (METHODS.md T7, R10). From one dense seed model
(a character-level `moekit.models.TransformerLM` trained on the mix of Shakespeare, State of the
Union addresses and Django's Python source, `data.py`), three branches each continue on one
domain. Then, every model scored on each domain's validation split, their mean, and windows
that switch domain halfway:

- (a) BTM: the seed and the branches as one ensemble weighted by the domain posterior
  (`moekit.recipes.BTMEnsemble`; no further training — as in the paper, which reuses BTX's
  expert LMs for BTM);
- (b) BTX (`moekit.recipes.btx`, the seed's FFN as a 4th expert like the paper): top-2 routing,
  and sampled top-1 (`router="sampled_top1"`), each fine-tuned on the mix with the Switch
  balance loss (α = 0.01);
- (c) sparse upcycling of the seed (`moekit.recipes.upcycle`, 4 experts, top-2, every layer)
  trained on the mix;
- (d) the seed trained on, dense, on the mix.

Matched compute: training FLOPs per step are `moekit.models.transformer.flops_per_token`
(6 N_active + attention) × tokens per step, summed over every phase. BTX top-2's total (seed +
three branches + its fine-tune) is the budget; sampled top-1's fine-tune, upcycling and the
dense continuation get as many steps as fill the same budget after the seed. BTM spends the
seed and branch FLOPs only (it has no fine-tune) but costs four dense forwards per token.

Every phase is AdamW (β 0.9, 0.95; weight decay 0.1 on matrices, `moekit.optim.param_groups`)
with a warmup and cosine decay to 0.1 · lr, clipping 1.0, one `moekit.optim.UpdateStep` per step.
The router's domain specialisation comes from `moekit.analysis.probe_routing` /
`domain_specialisation` (for BTM: the branch of largest posterior, `group_routing_table`).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import moekit
from moekit.analysis import domain_specialisation, group_counts, group_routing_table, probe_routing
from moekit.models.transformer import TransformerConfig, TransformerLM, flops_per_token
from moekit.optim import UpdateStep, build_optimizer
from moekit.recipes import BTMEnsemble, btx, upcycle
from moekit.train.data import BatchSampler, eval_batches
from projects.btx_domains.data import domain_corpus, load_domains, switch_batches

METHODS = ("seed (dense)", "BTM ensemble", "BTX top-2", "BTX sampled top-1", "sparse upcycling top-2",
           "dense, equal FLOPs")
COLUMNS = ("mean", "switch")


def step_flops(model: TransformerLM, seq_len: int, batch_size: int) -> int:
    """Training FLOPs of one step of `batch_size` windows of `seq_len` tokens."""
    return flops_per_token(model, seq_len)["train"] * seq_len * batch_size


def train(model, sampler, steps: int, *, lr: float, warmup_steps: int = 20) -> dict:
    """`steps` AdamW updates on ``sampler.next_batch()`` (balance loss added); returns
    ``{"steps", "flops", "seconds", "loss"}`` (loss: the mean of the last 20 steps)."""
    x0 = sampler.next_batch()[0]
    flops = step_flops(model, x0.shape[1], x0.shape[0]) * steps
    opt = build_optimizer(model, name="adamw", lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    update = UpdateStep(model, opt, lr=lr, total_steps=steps, warmup_steps=min(warmup_steps, steps // 2),
                        min_lr_ratio=0.1, schedule="cosine", grad_clip=1.0)
    model.train()
    losses = []
    t0 = time.time()
    for _ in range(steps):
        x, y = sampler.next_batch()[:2]
        _, loss = model(x, y)
        update(loss + moekit.aux_loss(model))
        losses.append(float(loss.detach()))
    return {"steps": steps, "flops": flops, "seconds": time.time() - t0, "loss": float(np.mean(losses[-20:]))}


def matched_steps(budget: float, model, seq_len: int, batch_size: int) -> int:
    """Steps of `model` whose training FLOPs come closest to `budget` (at least one)."""
    return max(1, round(budget / step_flops(model, seq_len, batch_size)))


def _token_nll(model, x_BS, y_BS) -> torch.Tensor:
    out = model(x_BS)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return F.cross_entropy(logits.float().flatten(0, 1), y_BS.flatten(), reduction="none").view_as(y_BS)


@torch.no_grad()
def evaluate(model, val_batches, switch, val_corpus) -> dict:
    """Validation loss (nats/char) per domain, their mean, and on the tokens after a domain switch."""
    model.eval()
    G = val_corpus.num_domains
    tot, cnt = torch.zeros(G, dtype=torch.float64), torch.zeros(G, dtype=torch.float64)
    for x, y, doc in val_batches:
        nll = _token_nll(model, x, y).double()
        dom = val_corpus.domain_of_tokens(doc)
        tot += torch.zeros(G, dtype=torch.float64).index_add_(0, dom.flatten(), nll.flatten())
        cnt += torch.bincount(dom.flatten(), minlength=G).double()
    s_tot = s_cnt = 0.0
    for x, y, _, after in switch:
        nll = _token_nll(model, x, y)
        s_tot += float(nll[after].double().sum())
        s_cnt += int(after.sum())
    model.train()
    out = {name: float(tot[g] / cnt[g]) for g, name in enumerate(val_corpus.domain_names)}
    out["mean"] = float(np.mean([out[n] for n in val_corpus.domain_names]))
    out["switch"] = s_tot / s_cnt
    return out


def _summary(table: dict) -> dict:
    keep = ("mi", "nmi", "purity", "chance_purity", "share")
    return {k: table[k] for k in keep} | {"top": table.get("top_domain", table.get("top_group"))}


@torch.no_grad()
def moe_routing(model, val_batches, val_corpus) -> list[dict]:
    """Per MoE layer: the domain × expert share of routed pairs, I(domain; expert) and purity."""
    probe = probe_routing(model, val_batches, num_docs=len(val_corpus.doc_names))
    tables = domain_specialisation(probe, val_corpus.doc_domains.tolist(), val_corpus.domain_names)
    return [{"layer": t["layer"]} | _summary(t) for t in tables]


@torch.no_grad()
def btm_routing(ens: BTMEnsemble, val_batches, val_corpus) -> list[dict]:
    """BTM's 'routing', as one layer: per token, the branch of largest domain posterior,
    tabulated by domain; and the mean posterior of each branch per domain (``soft_share``)."""
    ens.eval()
    G, N = val_corpus.num_domains, ens.num_branches
    ids, doms = [], []
    soft = torch.zeros(G, N, dtype=torch.float64)
    for x, _, doc in val_batches:
        post_BSN = ens.posterior(x)
        dom = val_corpus.domain_of_tokens(doc)
        ids.append(post_BSN.argmax(-1).flatten())
        doms.append(dom.flatten())
        soft.index_add_(0, dom.flatten(), post_BSN.flatten(0, 1).double())
    dom_all = torch.cat(doms)
    counts = group_counts(torch.cat(ids).numpy(), dom_all.numpy(), num_experts=N, num_groups=G)
    soft /= torch.bincount(dom_all, minlength=G).double()[:, None]
    return [{"layer": "posterior"} | _summary(group_routing_table(counts, val_corpus.domain_names))
            | {"soft_share": soft.tolist()}]


def run_seed(args, train_corpus, val_corpus, seed: int) -> dict:
    """The seed, the branches and every method of one seed; returns ``{"losses": {method:
    {column: loss}}, "branches": …, "phases": …, "flops": …, "routing": …, "seconds": …}``."""
    t_start = time.time()
    torch.manual_seed(seed)
    names = val_corpus.domain_names
    S, B = args.seq_len, args.batch_size
    tag = iter(range(1000 * seed + 1, 1000 * seed + 1000))

    def mixed():             # a fresh stream of mixed batches (equal shares of the domains) per phase
        return BatchSampler(train_corpus, seq_len=S, batch_size=B, seed=next(tag))

    val = eval_batches(val_corpus, seq_len=S, batch_size=B, max_batches=args.val_batches)
    switch = switch_batches(val_corpus, seq_len=S, batch_size=B, per_pair=args.switch_windows)

    cfg = TransformerConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.layers,
                            n_heads=args.heads, max_seq_len=S, moe_layers="none")
    seed_model = TransformerLM(cfg)
    phases = {"seed": train(seed_model, mixed(), args.seed_steps, lr=args.lr)}
    branches = []
    for g, d in enumerate(names):
        b = copy.deepcopy(seed_model)
        sampler = BatchSampler(domain_corpus(train_corpus, g), seq_len=S, batch_size=B, seed=next(tag))
        phases[f"branch {d}"] = train(b, sampler, args.branch_steps, lr=args.lr)
        branches.append(b)
    experts = ([seed_model] if args.seed_expert else []) + branches
    E = len(experts)
    branch_flops = sum(phases[f"branch {d}"]["flops"] for d in names)

    btx2 = btx(seed_model, branches, top_k=2, include_base=args.seed_expert, seed=seed)
    merged = evaluate(btx2, val, switch, val_corpus)           # what the merge alone gives, before fine-tuning
    phases["BTX top-2 fine-tune"] = train(btx2, mixed(), args.finetune_steps, lr=args.lr)
    budget = branch_flops + phases["BTX top-2 fine-tune"]["flops"]        # after the seed
    btx1 = btx(seed_model, branches, top_k=1, include_base=args.seed_expert, router="sampled_top1", seed=seed)
    phases["BTX sampled top-1 fine-tune"] = train(
        btx1, mixed(), matched_steps(budget - branch_flops, btx1, S, B), lr=args.lr)
    up = upcycle(copy.deepcopy(seed_model), num_experts=E, top_k=2, seed=seed)
    phases["upcycling"] = train(up, mixed(), matched_steps(budget, up, S, B), lr=args.lr)
    dense = copy.deepcopy(seed_model)
    phases["dense"] = train(dense, mixed(), matched_steps(budget, dense, S, B), lr=args.lr)
    btm = BTMEnsemble(experts)

    seed_fl = phases["seed"]["flops"]
    flops = {"seed (dense)": seed_fl, "BTM ensemble": seed_fl + branch_flops,
             "BTX top-2": seed_fl + budget,
             "BTX sampled top-1": seed_fl + branch_flops + phases["BTX sampled top-1 fine-tune"]["flops"],
             "sparse upcycling top-2": seed_fl + phases["upcycling"]["flops"],
             "dense, equal FLOPs": seed_fl + phases["dense"]["flops"]}
    fwd = flops_per_token(seed_model, S)["forward"]
    infer = {"seed (dense)": fwd, "BTM ensemble": E * fwd, "BTX top-2": flops_per_token(btx2, S)["forward"],
             "BTX sampled top-1": flops_per_token(btx1, S)["forward"],
             "sparse upcycling top-2": flops_per_token(up, S)["forward"], "dense, equal FLOPs": fwd}
    models = dict(zip(METHODS, (seed_model, btm, btx2, btx1, up, dense)))
    losses = {m: evaluate(models[m], val, switch, val_corpus) for m in METHODS}
    branch_losses = {d: evaluate(b, val, switch, val_corpus) for d, b in zip(names, branches)}
    routing = {m: moe_routing(models[m], val, val_corpus)
               for m in ("BTX top-2", "BTX sampled top-1", "sparse upcycling top-2")}
    routing["BTM ensemble"] = btm_routing(btm, val, val_corpus)
    return {"seed": seed, "losses": losses, "branches": branch_losses, "btx_before_finetune": merged,
            "phases": phases, "flops": flops,
            "inference_flops_per_token": infer, "routing": routing, "experts": E,
            "seconds": time.time() - t_start}


def aggregate(results: list[dict], domains) -> dict:
    """``{method: {column: (mean, std over seeds)}}`` of the losses and training FLOPs."""
    cols = list(domains) + list(COLUMNS)
    out = {}
    for m in METHODS:
        row = {c: [r["losses"][m][c] for r in results] for c in cols}
        row["flops"] = [r["flops"][m] for r in results]
        out[m] = {c: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) for c, v in row.items()}
    return out


def paired_gaps(results: list[dict], domains, ref: str = "BTX top-2") -> str:
    """Markdown rows of ``loss(ref) − loss(method)`` per column, mean ± sd over seeds, paired by
    seed (negative: `ref` is better); the seed-to-seed spread of the losses mostly cancels."""
    cols = list(domains) + list(COLUMNS)
    lines = [f"| {ref} minus | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in METHODS[1:]:
        if m == ref:
            continue
        cells = []
        for c in cols:
            d = [r["losses"][ref][c] - r["losses"][m][c] for r in results]
            cells.append(f"{np.mean(d):+.3f}" + (f" ± {np.std(d, ddof=1):.3f}" if len(d) > 1 else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(results: list[dict], domains) -> str:
    agg = aggregate(results, domains)
    infer = results[0]["inference_flops_per_token"]
    cols = list(domains) + list(COLUMNS)
    pm = len(results) > 1
    lines = ["| model | " + " | ".join(cols) + " | training TFLOPs | inference MFLOPs/token |",
             "|---|" + "---|" * (len(cols) + 2)]
    best = {c: min(agg[m][c][0] for m in METHODS[1:]) for c in cols}
    for m in METHODS:
        cells = []
        for c in cols:
            mean, sd = agg[m][c]
            s = f"{mean:.3f}" + (f" ± {sd:.3f}" if pm else "")
            cells.append(f"**{s}**" if m != METHODS[0] and mean == best[c] else s)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {agg[m]['flops'][0] / 1e12:.2f} | "
                     f"{infer[m] / 1e6:.2f} |")
    return "\n".join(lines)


def routing_lines(results: list[dict]) -> str:
    """I(domain; expert) / H(domain) and purity per method and layer (mean over seeds), and the
    first seed's domain × expert shares."""
    domains = list(results[0]["branches"])
    lines = []
    for m, layers in results[0]["routing"].items():
        nmi = np.mean([[t["nmi"] for t in r["routing"][m]] for r in results], 0)
        purity = np.mean([[t["purity"] for t in r["routing"][m]] for r in results], 0)
        lines.append(f"{m}: NMI(domain; expert) per layer " + ", ".join(f"{v:.3f}" for v in nmi)
                     + "; purity " + ", ".join(f"{v:.2f}" for v in purity)
                     + f" (chance {layers[0]['chance_purity']:.2f})")
        for t in layers:
            shares = "; ".join(f"{d} " + " ".join(f"{v:.2f}" for v in row) for d, row in zip(domains, t["share"]))
            lines.append(f"    seed {results[0]['seed']}, layer {t['layer']}, each domain's share per expert: {shares}")
    return "\n".join(lines)


def plot(results: list[dict], domains, path) -> Path | None:
    """Validation loss per method and column (mean ± sd over seeds) beside each router's
    I(domain; expert) / H(domain) per layer."""
    from moekit.analysis.plots import have_matplotlib
    if not have_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(results, domains)
    cols = list(domains) + list(COLUMNS)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.2, 1]},
                                  constrained_layout=True)
    colour = {m: plt.cm.tab10(i) for i, m in enumerate(METHODS)}
    w = 0.8 / len(METHODS)
    x = np.arange(len(cols))
    for i, m in enumerate(METHODS):
        mean = [agg[m][c][0] for c in cols]
        sd = [agg[m][c][1] for c in cols]
        ax.bar(x + (i - (len(METHODS) - 1) / 2) * w, mean, w, yerr=sd, label=m, capsize=2,
               color=colour[m])
    lo = min(agg[m][c][0] for m in METHODS for c in cols)
    hi = max(agg[m][c][0] for m in METHODS for c in cols)
    ax.set_ylim(lo - 0.15 * (hi - lo) - 0.05, hi + 0.05 * (hi - lo) + 0.05)
    ax.set_xticks(x, cols)
    ax.set(ylabel="validation loss (nats/char)", title=f"mean ± sd over {len(results)} seed(s)")
    ax.legend(fontsize=7, ncol=2)
    routed = list(results[0]["routing"])
    n_layers = len(results[0]["routing"][routed[0]])
    for i, m in enumerate(routed):
        nmi = np.mean([[t["nmi"] for t in r["routing"][m]] for r in results], 0)
        if m == "BTM ensemble":                     # one 'layer': the posterior's choice of branch
            ax2.bar([-1], nmi, 0.8 / len(routed), label=m, color=colour[m])
        else:
            ax2.bar(np.arange(n_layers) + (i - (len(routed) - 2) / 2) * 0.8 / len(routed), nmi, 0.8 / len(routed),
                    label=m, color=colour[m])
    ax2.set_xticks(np.arange(-1, n_layers), ["BTM posterior"] + [f"MoE layer {j}" for j in range(n_layers)])
    ax2.set(ylabel="I(domain; expert) / H(domain)", title="domain specialisation of the routing")
    ax2.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a CI-sized run: small model, few steps, one seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--seed-steps", type=int, default=240)
    ap.add_argument("--branch-steps", type=int, default=100)
    ap.add_argument("--finetune-steps", type=int, default=80)
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=18, help="a multiple of 3: equal shares of the domains")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--domain-chars", type=int, default=1_000_000)
    ap.add_argument("--val-batches", type=int, default=12)
    ap.add_argument("--switch-windows", type=int, default=12, help="windows per ordered pair of domains")
    ap.add_argument("--no-seed-expert", dest="seed_expert", action="store_false",
                    help="BTX/BTM without the seed as an extra expert (3 experts, not the paper's 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine's training slots)")
    ap.add_argument("--out", default="runs/btx_domains", help="folder of results.json and btx_domains.png")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seed_steps, args.branch_steps, args.finetune_steps = 40, 20, 16
        args.d_model, args.seq_len, args.domain_chars = 48, 64, 300_000
        args.val_batches, args.switch_windows = 4, 4
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    torch.set_num_threads(args.threads)
    tok, train_corpus, val_corpus = load_domains(domain_chars=args.domain_chars, seq_len=args.seq_len)
    args.vocab_size = tok.vocab_size
    domains = val_corpus.domain_names
    print("domains: " + ", ".join(f"{d} {hi - lo:,}/{vhi - vlo:,} chars (train/val)" for d, (lo, hi), (vlo, vhi)
                                  in zip(domains, train_corpus.domain_bounds(), val_corpus.domain_bounds()))
          + f"; vocab {tok.vocab_size}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in seeds:
        r = run_seed(args, train_corpus, val_corpus, seed)
        results.append(r)
        steps = ", ".join(f"{k} {v['steps']}" for k, v in r["phases"].items())
        print(f"\n=== seed {seed}: {r['seconds']:.0f} s; steps: {steps}", flush=True)
        print(markdown_table([r], domains), flush=True)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"\n=== {len(results)} seed(s) {seeds}: mean ± sd, validation loss in nats/char")
    print(markdown_table(results, domains))
    print("\npaired by seed:")
    print(paired_gaps(results, domains))
    print("\nbranches (each on its own domain), mean over seeds:")
    for d in domains:
        print(f"  branch {d}: " + ", ".join(f"{c} {np.mean([r['branches'][d][c] for r in results]):.3f}"
                                            for c in list(domains) + list(COLUMNS)))
    print("  BTX top-2 before its fine-tune: " + ", ".join(
        f"{c} {np.mean([r['btx_before_finetune'][c] for r in results]):.3f}" for c in list(domains) + list(COLUMNS)))
    print("\nrouting by domain:")
    print(routing_lines(results))
    p = plot(results, domains, out / "btx_domains.png")
    print(f"\nresults: {out / 'results.json'}" + (f"; plot: {p}" if p else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

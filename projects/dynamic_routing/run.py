"""Top-p dynamic routing ("Harder Tasks Need More Experts", Huang et al. 2024) against top-1 and
top-2 routing at equal total parameters, on the main job's model and data.

    python -m projects.dynamic_routing.run [--quick] [--seeds 0 1 2] [--ps 0.2 0.4 0.6] [--sweep-seeds 0] [--out DIR]

The model and data are those of ``moekit train`` (the ``default`` preset: a 4-layer, d = 128
decoder with an MoE of 8 SwiGLU experts of hidden 176 in every layer; Shakespeare's plays, State
of the Union addresses and Django's source, byte-level BPE of 4096 tokens), trained with fewer
steps and shorter, fewer windows per batch so that the study fits the time here (`FULL`). Every
variant has the same 8 experts — equal total parameters — and differs only in its router:

- ``top1``: Switch (top-1, raw gate); ``top2``: top-2, renormalised gates;
- ``top_pP``: top-p with threshold P (METHODS.md G11: the shortest prefix of experts whose
  probability exceeds P, raw weights) and the paper's dynamic (entropy) loss, β = 1e-4; the
  Switch balance loss counts every kept expert.

Top-1, top-2 and top-p at the paper's p = 0.4 train with every seed of ``--seeds``; the other
thresholds of the sweep with the seeds of ``--sweep-seeds`` only (default: the first seed).

Each variant is trained by the library trainer (`moekit.train.run_experiment`: AdamW through
`moekit.optim.UpdateStep`, warmup and cosine decay), which reports active parameters and FLOPs
from the experts each layer actually used. Then every final model routes the validation
batches and the study reports (`difficulty.py`) the mean experts per token overall and per
layer, by the token's loss quantile, by the character class of the token and by domain.
Results go to ``OUT/results.json`` and the tables of the README are printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from moekit.analysis import mean_sd
from moekit.train.config import RunConfig, apply_overrides, config_from_dict, get_preset
from moekit.train.data import eval_batches
from moekit.train.experiment import train_seeds, validation_corpus
from moekit.train.sample import load_model
from projects.dynamic_routing.difficulty import (
    CLASSES,
    by_group,
    by_quantile,
    char_class,
    rank_correlation,
    token_routing,
)

# Shorter runs of the main job (the `default` preset trains 600 steps of 24 windows): the
# training schedule is the trainer's own, cosine over `steps`.
FULL = ["train.steps=250", "data.seq_len=64", "data.batch_size=12", "train.eval_every=125", "train.eval_batches=8",
        "train.ckpt_every=250", "train.log_every=25", "optim.warmup_steps=25"]
MAIN_P = 0.4            # the paper's (and the released config's) threshold
# CI-sized: a small model on the same data, a few steps.
QUICK = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.num_experts=4", "model.expert_hidden=32",
         "data.seq_len=32", "data.batch_size=6", "train.steps=6", "train.eval_every=3", "train.eval_batches=2",
         "train.ckpt_every=6", "train.log_every=3", "optim.warmup_steps=2"]


def variants(ps: Sequence[float]) -> dict:
    """The routers compared: top-1, top-2 and top-p for each threshold in `ps`."""
    out = {"top1": {"router": "switch", "top_k": 1}, "top2": {"router": "topk", "top_k": 2}}
    for p in ps:
        out[f"top_p{p:g}"] = {"router": "top_p", "top_k": None, "router_kwargs": {"p": float(p)}}
    return out


def study_config(*, quick: bool = False, ps: Sequence[float] = (0.2, 0.4, 0.6)) -> RunConfig:
    """The main job's preset with this study's variants and (shorter) schedule."""
    d = get_preset("default").to_dict()
    d["name"] = "dynamic_routing"
    d["variants"] = variants(ps)
    return apply_overrides(config_from_dict(d), QUICK if quick else FULL)


def analyse(run: RunConfig, ckpt: Path, val, *, quantiles: int = 4) -> dict:
    """Experts per token of one trained variant on the validation batches the trainer evaluates:
    overall and per layer, by loss quantile, by character class, by domain."""
    model, tok, _ = load_model(ckpt)
    batches = eval_batches(val, seq_len=run.data.seq_len, batch_size=run.data.batch_size,
                           max_batches=run.train.eval_batches)
    tr = token_routing(model, batches)
    ce, n_LT = tr["ce"], tr["experts"]
    cls_of_id = {i: char_class(tok.token_str(i)) for i in np.unique(tr["ids"]).tolist()}
    classes = [cls_of_id[i] for i in tr["ids"].tolist()]
    dom_T = val.doc_domains[tr["docs"]].numpy()
    domains = [val.domain_names[g] for g in dom_T.tolist()]
    per_token = n_LT.mean(0)
    return {"experts": float(n_LT.mean()), "per_layer": n_LT.mean(1).tolist(), "layers": tr["layers"],
            "ce": float(ce.mean()), "tokens": int(ce.size),
            "spearman_ce_experts": rank_correlation(ce, per_token),
            "histogram": [np.bincount(n, minlength=model.moe_blocks[0].ffn.num_experts + 1).tolist() for n in n_LT],
            "by_quantile": by_quantile(ce, n_LT, quantiles),
            "by_class": by_group(classes, n_LT, ce, CLASSES),
            "by_domain": by_group(domains, n_LT, ce, val.domain_names)}


def study(run: RunConfig, out: Path, seeds: Sequence[int], *, sweep_seeds: Sequence[int] = None,
          progress: bool = False, log=sys.stderr) -> dict:
    """Train the variants of `run` for every seed and analyse each; returns and writes
    ``out/results.json``. Top-1, top-2 and top-p at p = `MAIN_P` train first, with every seed
    (``out/seed<N>/<variant>``); the other top-p variants then with `sweep_seeds` (None: every
    seed; ``out/sweep-seed<N>/<variant>``). Finished variants are kept and not retrained."""
    out = Path(out)
    rows = {v: [] for v in run.variant_names}
    main = [v for v in run.variant_names if not v.startswith("top_p") or v == f"top_p{MAIN_P:g}"]
    val = None
    sweep = [v for v in run.variant_names if v not in main]
    # The main comparison first, every seed; then the sweep, each set in its own run folder.
    jobs = [(seed, main, f"seed{seed}") for seed in seeds]
    jobs += [(seed, sweep, f"sweep-seed{seed}") for seed in (seeds if sweep_seeds is None else sweep_seeds)]
    for seed, result, ckpt in train_seeds(run, jobs, out, progress=progress, stream=log):
        name = result["variant"]
        if val is None:
            val = validation_corpus(run, ckpt)
        rows[name].append({"seed": seed, "val_loss": result["val_loss"],
                           "val_loss_by_domain": result.get("val_loss_by_domain"),
                           "params_total": result["params_total"], "params_active": result["params_active"],
                           "flops_per_token_train": result["flops_per_token_train"],
                           "experts_per_token": result["experts_per_token"],
                           "train_time_s": result["train_time_s"],
                           "analysis": analyse(run, ckpt, val)})
    summary = {"config": run.to_dict(), "seeds": list(seeds),
               "sweep_seeds": None if sweep_seeds is None else list(sweep_seeds),
               "variants": rows, "table": summarise(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarise(rows: dict) -> dict:
    """Per variant, mean and standard deviation over seeds of what the README tables show."""
    out = {}
    for name, rs in rows.items():
        if not rs:
            continue
        a = [r["analysis"] for r in rs]
        L = len(a[0]["per_layer"])
        out[name] = {
            "seeds": len(rs), "val_loss": mean_sd([r["val_loss"] for r in rs]),
            "experts": mean_sd([x["experts"] for x in a]),
            "per_layer": [mean_sd([x["per_layer"][j] for x in a])[0] for j in range(L)],
            "params_total": rs[0]["params_total"], "params_active": mean_sd([r["params_active"] for r in rs])[0],
            "flops_per_token_train": mean_sd([r["flops_per_token_train"] for r in rs])[0],
            "train_time_s": mean_sd([r["train_time_s"] for r in rs])[0],
            "spearman_ce_experts": mean_sd([x["spearman_ce_experts"] for x in a]),
            "by_quantile": [mean_sd([x["by_quantile"][b]["experts"] for x in a])[0]
                            for b in range(len(a[0]["by_quantile"]))],
            "by_class": {g["group"]: mean_sd([next(y["experts"] for y in x["by_class"] if y["group"] == g["group"])
                                          for x in a if any(y["group"] == g["group"] for y in x["by_class"])])[0]
                         for g in a[0]["by_class"]},
            "by_domain": {g["group"]: mean_sd([next(y["experts"] for y in x["by_domain"] if y["group"] == g["group"])
                                           for x in a])[0] for g in a[0]["by_domain"]},
            "val_loss_by_domain": ({d: mean_sd([r["val_loss_by_domain"][d] for r in rs])[0]
                                    for d in rs[0]["val_loss_by_domain"]} if rs[0]["val_loss_by_domain"] else None),
        }
    return out


def markdown(table: dict) -> str:
    """The README's tables from `summarise`'s output."""
    lines = ["| router | seeds | val loss (mean ± sd) | experts/token | per layer | active params | "
             "train FLOPs/token | train s |", "|---|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        lines.append(f"| {name} | {t['seeds']} | {t['val_loss'][0]:.4f} ± {t['val_loss'][1]:.4f} | "
                     f"{t['experts'][0]:.2f} | "
                     + " / ".join(f"{v:.2f}" for v in t["per_layer"])
                     + f" | {t['params_active']:,.0f} | {t['flops_per_token_train']:.3g} | {t['train_time_s']:.0f} |")
    q = len(next(iter(table.values()))["by_quantile"])
    lines += ["", "Experts per token by the token's loss quantile (Q1 easiest), and Spearman ρ(loss, experts):", "",
              "| router | " + " | ".join(f"Q{b + 1}" for b in range(q)) + " | ρ |",
              "|---|" + "---|" * (q + 1)]
    for name, t in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in t["by_quantile"])
                     + f" | {t['spearman_ce_experts'][0]:+.3f} |")
    classes = [c for c in CLASSES if any(c in t["by_class"] for t in table.values())]
    domains = list(next(iter(table.values()))["by_domain"])
    lines += ["", "Experts per token by character class of the token and by domain:", "",
              "| router | " + " | ".join(classes + domains) + " |", "|---|" + "---|" * (len(classes) + len(domains))]
    for name, t in table.items():
        cells = [f"{t['by_class'][c]:.2f}" if c in t["by_class"] else "-" for c in classes]
        cells += [f"{t['by_domain'][d]:.2f}" for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model for a few steps (a CI smoke run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ps", type=float, nargs="+", default=[0.2, 0.4, 0.6], help="top-p thresholds")
    ap.add_argument("--sweep-seeds", type=int, nargs="+", default=None,
                    help=f"seeds of the top-p variants other than p={MAIN_P} (default: the first of --seeds)")
    ap.add_argument("--out", default=None, help="run folder (default: runs/dynamic_routing[-quick])")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of the run (as `moekit train --set`)")
    args = ap.parse_args(argv)
    run = apply_overrides(study_config(quick=args.quick, ps=args.ps), args.overrides)
    out = Path(args.out or ("runs/dynamic_routing" + ("-quick" if args.quick else "")))
    t0 = time.time()
    sweep = args.sweep_seeds if args.sweep_seeds is not None else args.seeds[:1]
    summary = study(run, out, args.seeds, sweep_seeds=sweep, progress=False)
    print(markdown(summary["table"]))
    print(f"\n{len(args.seeds)} seed(s) x {len(run.variant_names)} variants in {time.time() - t0:.0f} s; "
          f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

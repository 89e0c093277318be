"""Three families of conditional computation on one axis of compute: MoE (top-1 / top-2 / top-p),
Mixture-of-Depths and early exits, on the main job's text and on Fashion-MNIST.

    python -m projects.conditional_compute.run [--quick] [--seeds 0] [--lm-steps 60] [--vit-steps 150]

LM (`lm.py`): the main job's data (`moekit train`'s default preset: Shakespeare, State of the
Union, Django source; BPE of 4,096 tokens), windows of 128 tokens, batches of 16. The dense
baseline trains `--lm-steps`; the MoD models (every other block, c = 12.5 % and 50 %) train as many
steps as the baseline's training FLOPs buy them (the paper's isoFLOP comparison); the MoE models
and the early-exit LM train the baseline's steps. ViT (`vit.py`): exits after each of 4 blocks.
Writes ``results.json`` and ``compute.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # spinning OpenMP waiters slow a shared CPU

import numpy as np
import torch

from moekit.models.transformer import DepthRoutedBlock, TransformerLM, flops_per_token
from projects.conditional_compute.lm import ExitLM, evaluate_lm, exit_sweep, train_lm, variant_configs

LM_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)
VIT_THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.01)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lm-steps", type=int, default=60, help="optimizer steps of the dense LM baseline")
    p.add_argument("--vit-steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--out", default="projects/conditional_compute/results")
    p.add_argument("--skip-vit", action="store_true")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps of everything")
    p.add_argument("--from-results", default=None, metavar="JSON",
                   help="train nothing: tabulate and plot the seeds of a results.json written before")
    args = p.parse_args(argv)
    if args.quick:
        args.lm_steps, args.vit_steps, args.eval_batches = 4, 4, 1
    return args


def lm_data(seq_len: int = 128, batch_size: int = 16):
    """(vocab size, training sampler factory, validation batches) on the main job's corpus."""
    from moekit.train.config import get_preset
    from moekit.train.data import build_corpus

    cfg = dataclasses.replace(get_preset("default").data, seq_len=seq_len, batch_size=batch_size)
    tok, train, val = build_corpus(cfg)
    return tok.vocab_size, train, val


def run_lm(train, val, vocab_size: int, *, steps: int, seed: int, eval_batches: int, seq_len: int = 128,
           batch_size: int = 16, shape=None, log=print) -> dict:
    from moekit.train.data import BatchSampler
    from moekit.train.data import eval_batches as make_eval

    batches = make_eval(val, seq_len=seq_len, batch_size=batch_size, max_batches=eval_batches)
    configs = variant_configs(vocab_size, seq_len, **(shape or {}))
    base_train = None
    out = {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        model = TransformerLM(cfg)
        f_train = flops_per_token(model, seq_len)["train"]
        if base_train is None:
            base_train = f_train
        # MoD trains on the baseline's FLOP budget (more, cheaper steps); MoE at equal steps.
        n = round(steps * base_train / f_train) if cfg.mod_layers != "none" else steps
        log(f"  [{name}] {n} steps, {f_train / 1e6:.2f} MFLOPs/token in training")
        sampler = BatchSampler(train, seq_len=seq_len, batch_size=batch_size, seed=seed)
        wall = train_lm(model, sampler, steps=n, log=log)
        res = {"steps": n, "train_flops_per_token": f_train,
               "train_flops_total": f_train * n * batch_size * seq_len, "wall_s": wall,
               **evaluate_lm(model, batches, seq_len)}
        if cfg.mod_layers != "none":          # the training rule (top-K over the sequence) in eval too
            for b in model.blocks:
                if isinstance(b, DepthRoutedBlock):
                    b.causal_eval = False
            topk = evaluate_lm(model, batches, seq_len)
            res["val_loss_topk_selection"] = topk["val_loss"]
            res["flops_forward_topk_selection"] = topk["flops_forward"]
        log(f"  [{name}] val loss {res['val_loss']:.4f}  {res['flops_forward'] / 1e6:.3f} MFLOPs/token  "
            f"{wall:.0f}s")
        out[name] = res
    torch.manual_seed(seed)
    exit_model = ExitLM(configs["dense"])
    sampler = BatchSampler(train, seq_len=seq_len, batch_size=batch_size, seed=seed)
    log(f"  [early_exit] {steps} steps")
    wall = train_lm(exit_model, sampler, steps=steps, loss_fn=lambda m, x, y: m.loss(x, y), log=log)
    out["early_exit"] = {"steps": steps, "wall_s": wall,
                         "sweep": exit_sweep(exit_model, batches, seq_len, LM_THRESHOLDS)}
    return out


def run_vit(*, steps: int, seed: int, quick: bool, log=print) -> dict:
    from moekit.train.images import load_fashion_mnist
    from projects.conditional_compute.vit import as_inputs, build_exit_vit, train_vit, vit_sweep

    data = load_fashion_mnist()
    tr = data.train_images[:5000] if quick else data.train_images
    mean, std = float(tr.mean()) / 255, float(tr.std()) / 255
    x, y = as_inputs(tr, mean, std), torch.from_numpy(data.train_labels[:len(tr)]).long()
    n_test = 1000 if quick else len(data.test_labels)
    xt, yt = as_inputs(data.test_images[:n_test], mean, std), torch.from_numpy(data.test_labels[:n_test]).long()
    torch.manual_seed(seed)
    model = build_exit_vit()
    log(f"  [vit early exit] {steps} steps")
    wall = train_vit(model, x, y, steps=steps, seed=seed, log=log)
    return {"steps": steps, "wall_s": wall, "sweep": vit_sweep(model, xt, yt, VIT_THRESHOLDS)}


def across_seeds(runs: list, stat) -> object:
    """`stat` (e.g. np.mean) over seeds of every number in the seeds' result trees, which share
    one structure; other leaves (thresholds excepted, which are equal) are the first seed's."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: across_seeds([r[k] for r in runs], stat) for k in first}
    if isinstance(first, list):
        return [across_seeds([r[i] for r in runs], stat) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return float(stat(np.asarray(runs, dtype=np.float64)))
    return first


def seed_summary(all_results: dict) -> dict:
    """Mean and sample standard deviation (0 for one seed) over seeds of every measured number."""
    runs = list(all_results.values())
    sd = (lambda v: v.std(ddof=1)) if len(runs) > 1 else (lambda v: 0.0)
    return {"seeds": list(all_results), "mean": across_seeds(runs, np.mean), "sd": across_seeds(runs, sd)}


def _pm(mean: float, sd, fmt: str, scale: float = 1.0) -> str:
    return f"{scale * mean:{fmt}}" + ("" if sd is None else f" ± {scale * sd:{fmt}}")


def table(results: dict, sd: dict = None) -> str:
    """Markdown tables (LM variants, LM exits, ViT exits) of one seed's results, or of the mean
    over seeds with `sd` (the same tree of standard deviations) beside losses and accuracies."""
    lm = results["lm"]
    sd_lm = sd["lm"] if sd else None
    ref = lm["dense"]["flops_forward"]
    rows = ["| LM model | steps | val loss | fwd MFLOPs/token | × dense | note |", "|---|---|---|---|---|---|"]
    for name, r in lm.items():
        if name == "early_exit":
            continue
        note = ""
        if "mod_processed_fraction" in r:
            note = (f"causal predictor processes {100 * r['mod_processed_fraction']:.1f} %; top-K selection in "
                    f"eval: loss {r['val_loss_topk_selection']:.4f} at {r['flops_forward_topk_selection'] / 1e6:.3f}")
        if "experts_per_token_last_batch" in r:
            note = f"{r['experts_per_token_last_batch']:.2f} experts/token"
        rows.append(f"| {name} | {r['steps']:.0f} | {_pm(r['val_loss'], sd_lm and sd_lm[name]['val_loss'], '.4f')} | "
                    f"{r['flops_forward'] / 1e6:.3f} | "
                    f"{r['flops_forward'] / ref:.2f} | {note} |")
    rows += ["", "| LM exit threshold | val loss | mean blocks | fwd MFLOPs/token | × dense | exits 1-4 (%) |",
             "|---|---|---|---|---|---|"]
    for i, s in enumerate(lm["early_exit"]["sweep"]):
        e = sd_lm and sd_lm["early_exit"]["sweep"][i]["val_loss"]
        rows.append(f"| {s['threshold']:g} | {_pm(s['val_loss'], e, '.4f')} | {s['mean_blocks']:.2f} | "
                    f"{s['flops_forward'] / 1e6:.3f} | {s['flops_forward'] / ref:.2f} | "
                    f"{' / '.join(f'{100 * e:.0f}' for e in s['exit_share'])} |")
    if "vit" in results:
        sw = results["vit"]["sweep"]
        full = sw[-1]["flops_forward"]
        rows += ["", "| ViT exit threshold | test accuracy | mean blocks | fwd MFLOPs/image | × full | exits 1-4 (%) |",
                 "|---|---|---|---|---|---|"]
        for i, s in enumerate(sw):
            e = sd and sd["vit"]["sweep"][i]["accuracy"]
            rows.append(f"| {s['threshold']:g} | {_pm(s['accuracy'], e, '.2f', 100)} % | {s['mean_blocks']:.2f} | "
                        f"{s['flops_forward'] / 1e6:.3f} | {s['flops_forward'] / full:.2f} | "
                        f"{' / '.join(f'{100 * e:.0f}' for e in s['exit_share'])} |")
    return "\n".join(rows)


def plot(results: dict, path: Path, sd: dict = None) -> None:
    """The compute plot: quality against forward FLOPs (× the dense / full-depth model) of every
    family; with `sd` (the tree of standard deviations over seeds) as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = results["lm"]
    ref = lm["dense"]["flops_forward"]
    panels = 2 if "vit" in results else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    fam = {"MoE (top-1 / top-2 / top-p)": [k for k in lm if k.startswith("moe")],
           "Mixture-of-Depths (isoFLOP training)": [k for k in lm if k.startswith("mod")]}
    err = (lambda n: sd["lm"][n]["val_loss"]) if sd else (lambda n: 0.0)
    ax.errorbar([1.0], [lm["dense"]["val_loss"]], yerr=[err("dense")], c="k", fmt="s", capsize=3,
                label="dense baseline", zorder=3)
    for (label, names), mk in zip(fam.items(), ("o", "^")):
        xs = [lm[n]["flops_forward"] / ref for n in names]
        ys = [lm[n]["val_loss"] for n in names]
        ax.errorbar(xs, ys, yerr=[err(n) for n in names], fmt=mk, capsize=3, label=label, zorder=3)
        for n, x, y in zip(names, xs, ys):
            ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    sw = lm["early_exit"]["sweep"]
    ax.errorbar([s["flops_forward"] / ref for s in sw], [s["val_loss"] for s in sw], fmt="-x", capsize=2,
                yerr=[e["val_loss"] for e in sd["lm"]["early_exit"]["sweep"]] if sd else None,
                label="early exit (threshold sweep)")
    ax.set(xlabel="forward FLOPs per token (× dense baseline)",
           ylabel="validation loss (nats/token)" + (", mean ± sd over seeds" if sd else ""),
           title="LM, main job's data")
    ax.legend(fontsize=7)
    if "vit" in results:
        ax = axes[0][1]
        sw = results["vit"]["sweep"]
        full = sw[-1]["flops_forward"]
        ax.errorbar([s["flops_forward"] / full for s in sw], [100 * s["accuracy"] for s in sw], fmt="-x", capsize=2,
                    yerr=[100 * e["accuracy"] for e in sd["vit"]["sweep"]] if sd else None,
                    label="early exit (threshold sweep)")
        ax.set(xlabel="forward FLOPs per image (× full depth)", ylabel="test accuracy (%)",
               title="ViT, Fashion-MNIST")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, *, lm_inputs=None, lm_shape=None) -> dict:
    """Run everything; `lm_inputs` = (vocab_size, train corpus, val corpus) replaces the main job's
    data and `lm_shape` the LM's size (tests); with `lm_inputs` the ViT part is skipped."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        saved = json.loads(Path(args.from_results).read_text())
        summarise(saved["seeds"], out, saved["meta"])
        return saved["seeds"]
    t0 = time.perf_counter()
    vocab, train, val = lm_inputs if lm_inputs is not None else lm_data()
    seq_len = 32 if lm_inputs is not None else 128
    all_results = {}
    for seed in args.seeds:
        print(f"seed {seed}: language model", flush=True)
        res = {"lm": run_lm(train, val, vocab, steps=args.lm_steps, seed=seed, eval_batches=args.eval_batches,
                            seq_len=seq_len, batch_size=4 if lm_inputs is not None else 16, shape=lm_shape)}
        if not args.skip_vit and lm_inputs is None:
            print(f"seed {seed}: ViT", flush=True)
            res["vit"] = run_vit(steps=args.vit_steps, seed=seed, quick=args.quick)
        all_results[seed] = res
        print(table(res), flush=True)
        plot(res, out / (f"compute_seed{seed}.png" if len(args.seeds) > 1 else "compute.png"))
        # the seeds finished so far, in case a long run is stopped (`--from-results` tabulates them)
        (out / "results_partial.json").write_text(json.dumps({"meta": {"args": vars(args)}, "seeds": all_results}))
    meta = {"args": vars(args), "wall_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d")}
    summarise(all_results, out, meta)
    print(f"total {meta['wall_s']:.0f}s; wrote {out}/results.json", flush=True)
    return all_results


def summarise(all_results: dict, out: Path, meta: dict) -> dict:
    """Write ``results.json`` (every seed, and their mean and sd) and, over several seeds, print
    the mean ± sd tables and draw ``compute.png`` with error bars."""
    summary = seed_summary(all_results)
    (out / "results.json").write_text(json.dumps({"meta": meta, "seeds": all_results, "summary": summary}, indent=1))
    if len(all_results) > 1:
        print(f"\nmean ± sd over seeds {summary['seeds']}:\n" + table(summary["mean"], summary["sd"]), flush=True)
        plot(summary["mean"], out / "compute.png", summary["sd"])
    return summary


if __name__ == "__main__":
    main()

"""Mod-Squad (MT4) and M³ViT (MT5) against shared-backbone baselines on three Fashion-MNIST tasks.

    python -m projects.multitask_vit.run [--seeds 0 1 2] [--steps 200] [--quick]

Data (`data.py`): Fashion-MNIST with three targets per image — the 10-way class, a 4-way coarse
group, and a per-pixel foreground mask. Models (`moekit.models.multitask_vit`): a 4-block ViT,
D = 64, 4 heads, 7×7 patches (16 patch tokens + a class token); blocks 1 and 3 are the MoE
positions; three task heads. Five variants at equal active parameters per token (±2 %):

- ``dense``: shared dense backbone (MLP hidden 256), one pass feeds all heads;
- ``dense_task``: the same with a learned task embedding added to every token, one pass per
  task (the control for the task-routed variants' per-task passes);
- ``moe_shared``: MoE MLPs (8 experts of hidden 128, top-2) with one router for all tasks;
- ``m3vit``: per-task routers, each task restricted to a fixed window of 4 of the 8 experts;
- ``modsquad``: per-task routers over all 8 experts, MoE attention (8 head experts, 4 per
  token) with per-task routers, and the mutual-information loss (weight 0.05) instead of the
  Switch balance loss.

All see the same batches in the same order; the loss is the unweighted sum of the three task
losses plus `moekit.aux_loss(model)`; AdamW from `moekit.optim.build_optimizer` (lr 2e-3, weight
decay 0.05) and `moekit.optim.UpdateStep` (warmup 5 %, cosine to 1 %, clipping at norm 1).
Reported per seed (and as mean ± std over seeds): each task's test metric (accuracy;
foreground IoU for the mask), the mean relative gain over ``dense``, wall time, for the routed
variants the mutual information of task and expert per layer and the experts each task uses,
and for the task-routed ones the size and accuracy of each task's extracted sub-model.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# Sleeping OpenMP waiters: spinning ones make a step many times slower on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

import moekit
from moekit.analysis.plots import have_matplotlib
from moekit.analysis.routing import mutual_information
from moekit.models import (
    MULTITASK_VIT_METHODS,
    MultiTaskViT,
    extract_task_submodel,
    multitask_active_params,
    multitask_vit_config,
    task_expert_counts,
)
from moekit.optim import UpdateStep, build_optimizer
from projects.multitask_vit import data as mt_data

HERE = Path(__file__).resolve().parent
USED_SHARE = 0.05          # an expert "used" by a task: at least 5 % of the task's pairs in the layer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-images", type=int, default=60000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--calib-images", type=int, default=1000, help="training images that measure expert usage")
    p.add_argument("--sub-test-images", type=int, default=2000,
                   help="test images on which sub-models and their full model are compared")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(MULTITASK_VIT_METHODS), choices=MULTITASK_VIT_METHODS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    p.add_argument("--plot", type=str, default=None, help="experts-per-task figure (default: next to run.py, "
                                                         "full runs only)")
    p.add_argument("--quick", action="store_true", help="20 steps on 2,000 images: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        # A smoke run: at most 20 steps on 2,000 images (smaller values given on the command line stay).
        args.steps, args.train_images, args.test_images = min(args.steps, 20), min(args.train_images, 2000), \
            min(args.test_images, 500)
        args.calib_images, args.sub_test_images = min(args.calib_images, 200), min(args.sub_test_images, 200)
    elif args.plot is None:
        args.plot = str(HERE / "experts_per_task.png")
    return args


def train(model: MultiTaskViT, split: mt_data.Split, *, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """AdamW on shuffled epochs; the batch order depends on `seed` only."""
    update = UpdateStep(model, build_optimizer(model, name="adamw", lr=lr, weight_decay=0.05), lr=lr,
                        total_steps=steps, warmup_steps=max(1, steps // 20), min_lr_ratio=0.01, grad_clip=1.0)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(split), generator=gen), 0
    model.train()
    t0, last = time.perf_counter(), []
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(split), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        task_losses = model.losses(model(split.x[idx]), split.targets(idx))
        info = update(sum(task_losses) + moekit.aux_loss(model))
        if step >= steps - 20:
            last.append(info["loss"])
    return {"wall_s": time.perf_counter() - t0, "final_loss": float(np.mean(last))}


def task_metric(kind: str, out: torch.Tensor, target: torch.Tensor) -> float:
    """Accuracy for a classification output, foreground IoU for a segmentation output."""
    pred = out.argmax(1)
    if kind == "classify":
        return float((pred == target).float().mean())
    inter = ((pred == 1) & (target == 1)).sum()
    union = ((pred == 1) | (target == 1)).sum()
    return float(inter) / max(float(union), 1.0)


@torch.no_grad()
def evaluate(model: MultiTaskViT, split: mt_data.Split, *, tasks=None, batch_size: int = 500) -> list:
    """Test metric of each task in `tasks` (default all); a single-task sub-model is task 0."""
    model.eval()
    tasks = range(len(model.tasks)) if tasks is None else tasks
    outs = {t: [] for t in tasks}
    for s in range(0, len(split), batch_size):
        x = split.x[s:s + batch_size]
        for t in tasks:
            outs[t].append(model.forward_task(x, t))
    targets = split.targets()
    return [task_metric(model.tasks[t].kind, torch.cat(outs[t]), targets[mt_data.TASKS.index(model.tasks[t])])
            for t in tasks]


def routing_report(model: MultiTaskViT, calib: mt_data.Split) -> dict:
    """Per routed layer: the (M, E) usage shares, I(task; expert) in nats, experts used per task."""
    counts = task_expert_counts(model, calib.x)
    out = {}
    for name, c_ME in counts.items():
        share = c_ME.double() / c_ME.sum(1, keepdim=True).clamp_min(1)
        out[name] = {"share": share.tolist(), "mi_nats": mutual_information(c_ME.numpy())[0],
                     "used": [int((row >= USED_SHARE).sum()) for row in share]}
    return {"counts": counts, "layers": out}


def extraction_report(model: MultiTaskViT, counts: dict, calib: mt_data.Split, test: mt_data.Split) -> list:
    """Per task: the sub-model of the experts with ≥ USED_SHARE of its pairs, its size and its test
    metric beside the full model's on the same images, and the largest output difference of the
    exact sub-model (every expert the task used) on the calibration images."""
    rows = []
    full = multitask_active_params(model)["total"]
    full_metrics = evaluate(model, test)
    for t, spec in enumerate(model.tasks):
        exact = extract_task_submodel(model, t, counts)
        with torch.no_grad():
            model.eval()
            exact.eval()
            diff = float((exact.forward_task(calib.x[:200], 0) - model.forward_task(calib.x[:200], t)).abs().max())
        sub = extract_task_submodel(model, t, counts, threshold=USED_SHARE)
        rows.append({"task": spec.name, "params": multitask_active_params(sub)["total"], "full_params": full,
                     "kept": {k: len(v) for k, v in sub.kept_experts.items()},
                     "metric": evaluate(sub, test, tasks=[0])[0], "full_metric": full_metrics[t],
                     "exact_max_diff": diff})
    return rows


def run_one(method: str, seed: int, train_split, test_split, calib, args) -> dict:
    torch.manual_seed(seed)
    model = MultiTaskViT(multitask_vit_config(method, mt_data.TASKS))
    fit = train(model, train_split, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed)
    res = {"method": method, "seed": seed, **fit, "params": multitask_active_params(model),
           "metrics": dict(zip([t.name for t in mt_data.TASKS], evaluate(model, test_split)))}
    if model.config.routing != "dense":
        rep = routing_report(model, calib)
        res["routing"] = rep["layers"]
        if model.task_routed:
            res["extraction"] = extraction_report(model, rep["counts"], calib, test_split.subset(args.sub_test_images))
    return res


def relative_gain(metrics: dict, base: dict) -> float:
    """Mean over tasks of (m − m_dense) / m_dense, in percent (the usual multi-task Δ)."""
    return 100 * float(np.mean([(metrics[k] - base[k]) / base[k] for k in base]))


def summarise(results: list) -> str:
    names = [t.name for t in mt_data.TASKS]
    lines = ["| method | seed | " + " | ".join(names) + " | Δ vs dense | I(T;E) per layer | train s |",
             "|---|---|" + "---|" * len(names) + "---|---|---|"]
    dense = {r["seed"]: r["metrics"] for r in results if r["method"] == "dense"}
    for r in results:
        gain = f"{relative_gain(r['metrics'], dense[r['seed']]):+.2f} %" if r["seed"] in dense else "–"
        mi = ", ".join(f"{v['mi_nats']:.2f}" for v in r.get("routing", {}).values()) or "–"
        lines.append(f"| {r['method']} | {r['seed']} | " + " | ".join(f"{100 * r['metrics'][n]:.2f}" for n in names)
                     + f" | {gain} | {mi} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def seed_table(results: list) -> str:
    """Per method: each task's metric, the Δ vs dense and the train time, mean ± std over seeds."""
    names = [t.name for t in mt_data.TASKS]
    dense = {r["seed"]: r["metrics"] for r in results if r["method"] == "dense"}
    lines = ["| method | seeds | " + " | ".join(names) + " | Δ vs dense | train s / run |",
             "|---|---|" + "---|" * len(names) + "---|---|"]

    def cell(xs, fmt="{:.2f} ± {:.2f}"):
        return fmt.format(np.mean(xs), np.std(xs, ddof=1) if len(xs) > 1 else 0.0)

    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        gains = [relative_gain(r["metrics"], dense[r["seed"]]) for r in runs if r["seed"] in dense]
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cell([100 * r["metrics"][n] for r in runs])
                                                                 for n in names)
                     + f" | {cell(gains, '{:+.2f} ± {:.2f} %') if gains else '–'} | "
                     + f"{np.mean([r['wall_s'] for r in runs]):.1f} |")
    return "\n".join(lines)


def plot_experts_per_task(results: list, path) -> None:
    """Share of each task's (token, expert) pairs per expert, per routed layer, one row per method."""
    if not have_matplotlib():
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "routing" in r and r["seed"] == min(x["seed"] for x in results)]
    if not rows:
        return
    ncol = max(len(r["routing"]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(3.0 * ncol + 1, 1.9 * len(rows) + 0.6), squeeze=False,
                             layout="constrained")
    for i, r in enumerate(rows):
        for j in range(ncol):
            ax = axes[i, j]
            if j >= len(r["routing"]):
                ax.axis("off")
                continue
            name, layer = list(r["routing"].items())[j]
            share = np.asarray(layer["share"])
            im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=0.5, interpolation="nearest")
            ax.set_title(f"{r['method']} {name}\nI = {layer['mi_nats']:.2f} nats", fontsize=8)
            ax.set_yticks(range(len(mt_data.TASKS)), [t.name for t in mt_data.TASKS], fontsize=7)
            ax.set_xticks(range(share.shape[1]))
            ax.tick_params(axis="x", labelsize=7)
            ax.set_xlabel("expert", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the task's pairs")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> list:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train_split, test_split = mt_data.load(args.train_images, args.test_images)
    calib = train_split.subset(args.calib_images)
    print(f"train {len(train_split)}, test {len(test_split)}, calibration {len(calib)} images; "
          f"{args.steps} steps of {args.batch_size}; threads {args.threads}", flush=True)
    results = []
    for seed in args.seeds:
        for method in args.methods:
            r = run_one(method, seed, train_split, test_split, calib, args)
            results.append(r)
            print(f"seed {seed} {method:>10}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in r["metrics"].items())
                  + f"  ({r['wall_s']:.0f} s, active {r['params']['active']}, total {r['params']['total']})",
                  flush=True)
            for name, layer in r.get("routing", {}).items():
                print(f"    {name}: I(T;E) {layer['mi_nats']:.3f} nats, experts with >= {USED_SHARE:.0%} "
                      f"per task {layer['used']}", flush=True)
            for row in r.get("extraction", []):
                print(f"    sub-model {row['task']}: {row['params']} of {row['full_params']} params, kept "
                      f"{row['kept']}, metric {100 * row['metric']:.2f} vs full {100 * row['full_metric']:.2f} "
                      f"on {args.sub_test_images} test images (exact sub-model max diff "
                      f"{row['exact_max_diff']:.1e})", flush=True)
    print(summarise(results))
    print(seed_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot_experts_per_task(results, args.plot)
    return results


if __name__ == "__main__":
    main()

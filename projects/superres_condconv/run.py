"""×2 super-resolution on Fashion-MNIST: bicubic, an ESPCN-style CNN, and its CondConv MoE twin.

    python -m projects.superres_condconv.run [--steps 1200] [--train-images 10000] [--seeds 0] [--quick]

Task: the low-res input is the 28×28 image 2×2 average-pooled to 14×14; the target is the
original, pixels scaled to [0, 1]. Metric: PSNR (max 1) per test image, averaged over the
10,000 test images, predictions clamped to [0, 1].

Models (`moekit.models.superres`), all predicting a residual over bicubic upsampling (trained by
`projects.superres_condconv.train.train_sr`: Adam, cosine decay to 0, `moekit.optim`):
- **bicubic**: ``F.interpolate(mode="bicubic")``, no parameters.
- **dense**: 3×3 convs 1 → 32 → 32 → 32 → 4 with ReLU, then PixelShuffle(2) (ESPCN-style).
- **CondConv MoE**: the same net whose two middle convs are `CondConv2d` with E = 4 experts:
  about the dense net's FLOPs, about 4× its parameters.
- **dense, wide**: width 64 instead of 32, about the MoE's parameters at about 4× its FLOPs.

Every network sees the same batches in the same order for the same number of Adam steps, and
is initialised from `torch.manual_seed(seed)`.
"""
from __future__ import annotations

import argparse
import os
import time

# Sleeping OpenMP waiters: spinning ones make a step several times slower on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from moekit.models.superres import SRNet, bicubic_upsample, downsample, sr_macs
from moekit.train.images import load_fashion_mnist
from projects.superres_condconv.train import evaluate_psnr, train_sr


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="Adam steps per network")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-images", type=int, default=10000, help="use the first N training images")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a 50-step smoke run on 2,000 images")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train_images = 50, 2000
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(load_fashion_mnist(), args)


def run(data, args, *, width: int = 32) -> dict:
    """Train the three nets for every seed of ``args.seeds`` on `data` (a `FashionMNIST`) and print
    the table; return ``{seed: {model name: test PSNR}}`` (bicubic included). `width`: the
    dense net's width (the wide one has twice that)."""
    hr_train = torch.from_numpy(data.train_images[:args.train_images]).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    hr_test = torch.from_numpy(data.test_images).float().div(255).unsqueeze(1)
    lr_train, lr_test = downsample(hr_train), downsample(hr_test)                                 # (N, 1, 14, 14)
    print(f"train {tuple(hr_train.shape)}, test {tuple(hr_test.shape)}, {args.steps} steps of "
          f"{args.batch_size}, {args.threads} threads")

    bicubic = evaluate_psnr(bicubic_upsample, lr_test, hr_test)
    by_seed = {}
    for seed in args.seeds:
        builders = {
            f"dense (width {width})": lambda: SRNet(width=width),
            f"CondConv MoE (width {width}, E={args.experts})": lambda: SRNet(width=width, num_experts=args.experts),
            f"dense, wide (width {2 * width})": lambda: SRNet(width=2 * width),
        }
        by_seed[seed] = {"bicubic": bicubic}
        print(f"\nseed {seed}\n{'model':34s} {'params':>8s} {'MMAC/img':>9s} {'train s':>8s} {'test PSNR':>10s}")
        print(f"{'bicubic':34s} {0:8d} {'-':>9s} {'-':>8s} {bicubic:10.3f}")
        for name, build in builders.items():
            torch.manual_seed(seed)             # each net's initialisation depends on the seed only
            net = build()
            start = time.perf_counter()
            train_sr(net, lr_train, hr_train, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                     seed=seed)
            seconds = time.perf_counter() - start
            params = sum(p.numel() for p in net.parameters())
            by_seed[seed][name] = evaluate_psnr(net, lr_test, hr_test)
            macs = sr_macs(net, 14, 14) / 1e6
            print(f"{name:34s} {params:8d} {macs:9.2f} {seconds:8.1f} {by_seed[seed][name]:10.3f}")
            if net.num_experts:
                with torch.no_grad():
                    net(lr_test[:1000])
                for i, conv in enumerate(net.mid):
                    r_BE = conv.last_routing_weights
                    print(f"  mid conv {i}: routing weight per expert mean "
                          f"{[round(v, 2) for v in r_BE.mean(0).tolist()]}, "
                          f"std across images {[round(v, 3) for v in r_BE.std(0).tolist()]}")
    if len(args.seeds) > 1:
        print(f"\nmean test PSNR over seeds {args.seeds}:")
        for name in by_seed[args.seeds[0]]:
            vals = torch.tensor([by_seed[s][name] for s in args.seeds])
            print(f"  {name:34s} {vals.mean():.3f} ± {vals.std():.3f} dB")
    return by_seed


if __name__ == "__main__":
    main()

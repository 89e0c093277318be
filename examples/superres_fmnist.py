"""×2 super-resolution on Fashion-MNIST: bicubic, an ESPCN-style CNN, and its CondConv MoE twin.

    python examples/superres_fmnist.py [--steps 1200] [--train-images 10000] [--quick]

Task: the low-res input is the 28×28 image 2×2 average-pooled to 14×14; the target is the
original, pixels scaled to [0, 1]. Metric: PSNR (max 1) per test image, averaged over the
10,000 test images, predictions clamped to [0, 1].

Models (`moekit.models.superres`), all predicting a residual over bicubic upsampling:
- **bicubic**: ``F.interpolate(mode="bicubic")``, no parameters.
- **dense**: 3×3 convs 1 → 32 → 32 → 32 → 4 with ReLU, then PixelShuffle(2) (ESPCN-style).
- **CondConv MoE**: the same net whose two middle convs are `CondConv2d` with E = 4 experts:
  about the dense net's FLOPs, about 4× its parameters.
- **dense, wide**: width 64 instead of 32, about the MoE's parameters at about 4× its FLOPs.

Every network sees the same batches in the same order for the same number of Adam steps.
"""
from __future__ import annotations

import argparse
import os
import time

# Sleeping OpenMP waiters: spinning ones make a step several times slower on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from moekit.models.superres import SRNet, bicubic_upsample, downsample, evaluate_psnr, sr_macs, train_sr
from moekit.train.images import load_fashion_mnist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="Adam steps per network")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-images", type=int, default=10000, help="use the first N training images")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a 50-step smoke run on 2,000 images")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.steps, args.train_images = 50, 2000
    torch.set_num_threads(args.threads)
    data = load_fashion_mnist()
    hr_train = torch.from_numpy(data.train_images[:args.train_images]).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    hr_test = torch.from_numpy(data.test_images).float().div(255).unsqueeze(1)
    lr_train, lr_test = downsample(hr_train), downsample(hr_test)                                 # (N, 1, 14, 14)
    print(f"train {tuple(hr_train.shape)}, test {tuple(hr_test.shape)}, {args.steps} steps of "
          f"{args.batch_size}, {args.threads} threads")

    nets = {
        "dense (width 32)": SRNet(width=32),
        f"CondConv MoE (width 32, E={args.experts})": SRNet(width=32, num_experts=args.experts),
        "dense, wide (width 64)": SRNet(width=64),
    }
    print(f"{'model':34s} {'params':>8s} {'MMAC/img':>9s} {'train s':>8s} {'test PSNR':>10s}")
    print(f"{'bicubic':34s} {0:8d} {'-':>9s} {'-':>8s} {evaluate_psnr(bicubic_upsample, lr_test, hr_test):10.3f}")
    for name, net in nets.items():
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        train_sr(net, lr_train, hr_train, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                 seed=args.seed)
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in net.parameters())
        print(f"{name:34s} {params:8d} {sr_macs(net, 14, 14) / 1e6:9.2f} {seconds:8.1f} "
              f"{evaluate_psnr(net, lr_test, hr_test):10.3f}")
        if net.num_experts:
            with torch.no_grad():
                net(lr_test[:1000])
            for i, conv in enumerate(net.mid):
                r_BE = conv.last_routing_weights
                print(f"  mid conv {i}: routing weight per expert mean {[round(v, 2) for v in r_BE.mean(0).tolist()]}, "
                      f"std across images {[round(v, 3) for v in r_BE.std(0).tolist()]}")


if __name__ == "__main__":
    main()

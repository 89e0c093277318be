"""The V-MoE study (projects/vmoe_fashion_mnist): its training loop on `moekit.optim` (schedule and
clipping), the blank-patch map, the inference-capacity switch, and the run end to end on fake data."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import moekit
from moekit.models import ViTConfig, ViTMoE
from moekit.models.vision import VMOE_DEFAULTS
from moekit.optim import lr_at
from projects.vmoe_fashion_mnist import run as vmoe_run


def tiny(**kw):
    return ViTConfig(**{"image_size": 8, "patch_size": 4, "d_model": 16, "n_heads": 2, "n_layers": 2,
                        "num_classes": 4, "moe": dataclasses.replace(VMOE_DEFAULTS, num_experts=4), **kw})


def test_train_follows_the_warmup_cosine_schedule_and_clips(monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]
                                                     if p.grad is not None]))
        assert norm <= 1.0 + 1e-5                          # clipped at norm 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    torch.manual_seed(0)
    model = ViTMoE(tiny())
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))
    out = vmoe_run.train(model, x, y, steps=40, batch_size=16, lr=1e-2, seed=0)
    assert seen == pytest.approx([lr_at(s, lr=1e-2, total_steps=40, warmup_steps=2, min_lr_ratio=0.01)
                                  for s in range(40)])
    assert out["wall_s"] > 0 and 0 <= out["train_drop_fraction"] <= 1


def test_blank_tokens_marks_all_zero_patches_after_the_class_token():
    images = np.zeros((2, 8, 8), dtype=np.uint8)
    images[0, :4, :4] = 7                                   # patch 0 of image 0
    images[1, 5, 6] = 1                                     # patch 3 of image 1
    blank = vmoe_run.blank_tokens(images, tiny())
    assert blank.tolist() == [[False, False, True, True, True], [False, True, True, True, False]]
    assert vmoe_run.blank_tokens(images, tiny(pool="mean")).tolist() == [[False, True, True, True],
                                                                        [True, True, True, False]]


def test_set_eval_capacity_changes_inference_only():
    model = ViTMoE(tiny())
    vmoe_run.set_eval_capacity(model, 0.5, "position")
    for moe in moekit.moe_layers(model):
        assert moe.router.capacity_factor == tiny().moe.capacity_factor
        assert moe.router.eval_capacity_factor == 0.5 and moe.router.drop_policy == "position"


def test_run_end_to_end_on_fake_fashion_mnist(capsys):
    gen = np.random.default_rng(0)
    fake = SimpleNamespace(train_images=gen.integers(0, 256, (96, 8, 8), dtype=np.uint8),
                           train_labels=np.arange(96) % 4,
                           test_images=gen.integers(0, 256, (40, 8, 8), dtype=np.uint8),
                           test_labels=np.arange(40) % 4)
    args = vmoe_run.parse_args(["--quick", "--seeds", "0", "1", "--batch-size", "16"])
    assert args.steps == 40 and args.train_images == 5000
    args.steps = 4
    out = vmoe_run.run(fake, args, config=tiny())
    assert sorted(out) == [0, 1]
    for seed in (0, 1):
        assert {"V-MoE", "dense twin"} <= set(out[seed])
        assert 0 <= out[seed]["V-MoE"]["accuracy"] <= 1
    assert [c["capacity_factor"] for c in out[1]["capacity"]] == [None, 1.05, 0.5, 0.5]
    text = capsys.readouterr().out
    assert "V-MoE − dense twin" in text and "Inference capacity" in text

"""The multi-task ViT study (projects/multitask_vit): task derivation, metrics, the training loop
on `moekit.optim`, and the run end to end on fake data."""
import json

import numpy as np
import pytest
import torch

from moekit.models import MultiTaskViT, multitask_vit_config
from moekit.optim import lr_at
from projects.multitask_vit import data as mt_data
from projects.multitask_vit import run as mt_run


def fake_split(n, seed=0):
    g = np.random.default_rng(seed)
    images = (g.random((n, 28, 28)) ** 3 * 255).astype(np.uint8)
    return mt_data.make_split(images, g.integers(0, 10, n), 0.2, 0.3)


def test_tasks_are_derived_from_the_class_and_the_pixels():
    images = np.zeros((3, 28, 28), np.uint8)
    images[0, 5, 6], images[1, 0, 0], images[2, 27, 27] = 26, 25, 255
    s = mt_data.make_split(images, np.array([3, 8, 9]), 0.0, 1.0)
    assert s.fine.tolist() == [3, 8, 9]
    assert s.coarse.tolist() == [1, 3, 2]                  # dress → trousers & dresses, bag, ankle boot → footwear
    assert s.mask.sum().item() == 2 and s.mask[0, 5, 6] == 1 and s.mask[1, 0, 0] == 0 and s.mask[2, 27, 27] == 1
    assert torch.allclose(s.x[2, 0, 27, 27], torch.tensor(1.0))
    groups = {c: [k for k in range(10) if mt_data.COARSE_OF_CLASS[k] == c] for c in range(4)}
    assert groups == {0: [0, 2, 4, 6], 1: [1, 3], 2: [5, 7, 9], 3: [8]}
    with pytest.raises(ValueError, match="labels"):
        mt_data.make_split(images, np.array([3, 8, 10]), 0.0, 1.0)
    with pytest.raises(ValueError, match="images"):
        mt_data.make_split(images.astype(np.float32), np.array([3, 8, 9]), 0.0, 1.0)


def test_metrics():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert mt_run.task_metric("classify", logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    seg = torch.zeros(1, 2, 2, 2)
    seg[0, 1, 0, :] = 1.0                                  # predicts foreground on the top row
    target = torch.tensor([[[1, 0], [1, 0]]])
    assert mt_run.task_metric("segment", seg, target) == pytest.approx(1 / 3)


def test_train_follows_the_warmup_cosine_schedule_and_clips(monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]
                                                     if p.grad is not None]))
        assert norm <= 1.0 + 1e-5
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    torch.manual_seed(0)
    model = MultiTaskViT(multitask_vit_config("modsquad", mt_data.TASKS, d_model=16, n_heads=2, num_experts=4,
                                              attn_experts=4))
    out = mt_run.train(model, fake_split(32), steps=20, batch_size=8, lr=1e-2, seed=0)
    assert seen == pytest.approx([lr_at(s, lr=1e-2, total_steps=20, warmup_steps=1, min_lr_ratio=0.01)
                                  for s in range(20)])
    assert out["wall_s"] > 0 and np.isfinite(out["final_loss"])


def test_quick_run_end_to_end_on_fake_data(monkeypatch, tmp_path):
    monkeypatch.setattr(mt_data, "load", lambda n_train, n_test: (fake_split(96), fake_split(48, seed=1)))
    out, plot = tmp_path / "r.json", tmp_path / "p.png"
    results = mt_run.main(["--quick", "--steps", "4", "--threads", "1", "--out", str(out), "--plot", str(plot)])
    assert [r["method"] for r in results] == ["dense", "dense_task", "moe_shared", "m3vit", "modsquad"]
    by = {r["method"]: r for r in results}
    assert "routing" not in by["dense"] and "routing" not in by["dense_task"] and "extraction" not in by["dense_task"]
    assert all(v["mi_nats"] < 1e-9 for v in by["moe_shared"]["routing"].values())     # task-independent routing
    assert all(max(v["used"]) <= 4 for v in by["m3vit"]["routing"].values())           # windows of 4 of 8 experts
    for method in ("m3vit", "modsquad"):
        rows = by[method]["extraction"]
        assert [r["task"] for r in rows] == ["fine", "coarse", "mask"]
        assert all(r["exact_max_diff"] < 1e-5 and r["params"] < r["full_params"] for r in rows)
    assert "moe_shared" in mt_run.summarise(results)
    table = mt_run.seed_table(results + [dict(r, seed=1) for r in results])
    assert "| dense_task | 2 |" in table and "± 0.00 |" in table
    assert json.loads(out.read_text())[0]["method"] == "dense"
    assert plot.exists() or not mt_run.have_matplotlib()


def test_seed_table_gives_mean_and_std_over_seeds():
    rows = [{"method": "dense", "seed": s, "wall_s": 10.0 + s, "metrics": {"fine": f, "coarse": 0.9, "mask": 0.8}}
            for s, f in ((0, 0.70), (1, 0.74))]
    rows += [{"method": "m3vit", "seed": s, "wall_s": 20.0, "metrics": {"fine": f, "coarse": 0.9, "mask": 0.8}}
             for s, f in ((0, 0.77), (1, 0.81))]
    table = mt_run.seed_table(rows)
    assert "| dense | 2 | 72.00 ± 2.83 | 90.00 ± 0.00 | 80.00 ± 0.00 | +0.00 ± 0.00 % | 10.5 |" in table
    # Δ per seed: (0.77/0.70 − 1)/3 and (0.81/0.74 − 1)/3, in percent
    gains = [100 * (0.77 / 0.70 - 1) / 3, 100 * (0.81 / 0.74 - 1) / 3]
    assert f"{np.mean(gains):+.2f} ± {np.std(gains, ddof=1):.2f} %" in table

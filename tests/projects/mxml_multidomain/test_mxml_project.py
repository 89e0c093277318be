"""The MxML study (projects/mxml_multidomain): domain building (class split, standardisation, the
8×8 upsampling) and the run end to end on fake three-domain data (the method: tests/test_meta_mxml.py)."""
import numpy as np
import torch

from projects.mxml_multidomain import run as mx_run
from projects.mxml_multidomain.data import TEST_CLASSES, TRAIN_CLASSES, build_domains, upsample_digits


def _fake_raw(n=120, seed=0):
    g = np.random.default_rng(seed)
    raw = {}
    for i, name in enumerate(("a", "b", "c")):
        x = g.random((n, 28, 28)) * (0.5 + i)
        y = np.arange(n) % 10
        raw[name] = (x, y, x[::-1].copy(), y[::-1].copy())
    return raw


def test_build_domains_splits_classes_and_standardises():
    train, test = build_domains(_fake_raw(), per_class=8)
    assert [d.name for d in train] == [d.name for d in test] == ["a", "b", "c"]
    for tr, te in zip(train, test):
        assert set(tr.labels.tolist()) == set(TRAIN_CLASSES) and set(te.labels.tolist()) == set(TEST_CLASSES)
        assert tr.x_BX.shape == (8 * 6, 784) and te.x_BX.shape == (8 * 4, 784)
        assert abs(float(tr.x_BX.mean())) < 1e-5 and abs(float(tr.x_BX.std()) - 1) < 1e-2


def test_upsample_digits_keeps_range_and_layout():
    img = np.zeros((1, 8, 8))
    img[0, :, :4] = 16                                     # left half lit
    up = upsample_digits(img)
    assert up.shape == (1, 28, 28) and up.min() >= 0 and up.max() <= 1
    assert up[0, :, :12].mean() > 0.9 and up[0, :, 16:].mean() < 0.1


def test_quick_run_end_to_end(capsys):
    args = mx_run.parse_args(["--quick"])
    assert args.seeds == [0] and args.steps == 60 and args.gate_steps == 40 and args.episodes == 30
    args.seeds, args.steps, args.gate_steps, args.episodes, args.train_way, args.train_shots = [0, 1], 3, 3, 3, 3, 2
    train, test = build_domains(_fake_raw(200), per_class=20)
    torch.manual_seed(0)
    out = mx_run.run(train, test, args, d_model=8, d_hidden=16)
    for name in mx_run.MODELS:
        for d in ("a", "b", "c"):
            for shots in (1, 5):
                a = out[name, d, shots]
                assert a.shape == (2, 3) and ((a >= 0) & (a <= 1)).all()
    # every model is tested on the same episodes: 4-way, 15 queries/class → multiples of 1/60
    assert np.allclose(out["mxml", "a", 1] * 60, np.round(out["mxml", "a", 1] * 60))
    assert all(0 <= out["gate", d].min() and out["gate", d].max() <= 1 for d in ("a", "b", "c"))
    text = capsys.readouterr().out
    assert "mxml - joint-dense" in text and "oracle" in text and "gate weight" in text

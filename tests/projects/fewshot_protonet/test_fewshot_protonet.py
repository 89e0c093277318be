"""The few-shot study (projects/fewshot_protonet): the --quick settings and the run end to end on
fake Fashion-MNIST-shaped data (the method itself is tested in tests/test_fewshot.py)."""
from types import SimpleNamespace

import numpy as np

from projects.fewshot_protonet import run as fs_run


def test_quick_run_on_fake_fashion_mnist(capsys):
    gen = np.random.default_rng(0)
    fake = SimpleNamespace(train_images=gen.integers(0, 256, (300, 28, 28), dtype=np.uint8),
                           train_labels=np.arange(300) % 10,
                           test_images=gen.integers(0, 256, (200, 28, 28), dtype=np.uint8),
                           test_labels=np.arange(200) % 10)
    args = fs_run.parse_args(["--quick"])
    assert args.seeds == [0] and args.steps == 100 and args.episodes == 50
    args.seeds, args.steps, args.episodes = [0, 1], 3, 4
    out = fs_run.run(fake, args, d_model=8, d_hidden=16)
    assert sorted(out) == [("dense", 1), ("dense", 5), ("moe", 1), ("moe", 5)]
    for accs in out.values():
        assert accs.shape == (2, 4) and ((accs >= 0) & (accs <= 1)).all()
    # both nets are tested on the same episodes: 4-way, 15 queries per class → multiples of 1/60
    assert np.allclose(out["dense", 1] * 60, np.round(out["dense", 1] * 60))
    text = capsys.readouterr().out
    assert "1-shot: dense" in text and "5-shot: dense" in text and "moe - dense" in text

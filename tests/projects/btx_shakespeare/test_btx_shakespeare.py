"""projects/btx_shakespeare: the Python domain, the mixed sampler and the training helper, on tiny inputs."""
import torch

from moekit.layers import MoEConfig
from moekit.models.transformer import TransformerConfig, TransformerLM
from projects.btx_shakespeare.data import PY_PACKAGES, Mixed, python_sources
from projects.btx_shakespeare.run import train


def test_python_sources_are_standard_library_modules_without_tests():
    docs = python_sources()
    assert len(docs) > 50
    assert all(name.split("/")[0] in PY_PACKAGES and name.endswith(".py") for name in docs)
    assert all("test" not in name.split("/")[-2:] for name in docs)          # no module in a test/ folder
    assert all(len(src) >= 1000 for src in docs.values())


class _Fixed:
    def __init__(self, fill):
        self.fill = fill

    def next_batch(self):
        return torch.full((2, 4), self.fill), torch.full((2, 4), self.fill + 1), None


def test_mixed_concatenates_one_part_per_domain():
    x, y = Mixed([_Fixed(1), _Fixed(5)]).next_batch()
    assert x.shape == (4, 4) and x[:2].eq(1).all() and x[2:].eq(5).all() and y[2:].eq(6).all()


def test_train_runs_updates_and_skips_frozen_parameters():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, max_seq_len=8,
                                            moe=MoEConfig(num_experts=2, top_k=1, d_hidden=8)))
    frozen = [p for n, p in model.named_parameters() if ".router." not in n]
    for p in frozen:
        p.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    sampler = _Fixed(3)
    sampler.next_batch = lambda: (torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8)), None)
    train(model, sampler, steps=3, lr=1e-2, warmup_steps=2)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    names = [n for n, _ in model.named_parameters()]
    assert all(not c for c, n in zip(changed, names) if ".router." not in n)     # frozen: bit-identical
    assert any(c for c, n in zip(changed, names) if ".router." in n)

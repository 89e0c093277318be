"""The multi-task tabular models (METHODS.md MT1, MT2): embeddings and every backbone, on synthetic
census-shaped data (the Census-Income study itself is tests/projects/census_multitask)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moekit.layers.multigate import PLE, MMoE, SharedBottom
from moekit.models.multitask import ARCHS, MultiTaskConfig, MultiTaskModel, TabularEmbedding

VOCAB = tuple(range(2, 34))          # 32 categorical columns of 2..33 values (id 0 = unseen)


@pytest.fixture(scope="module")
def data():
    """Census-shaped splits: 32 categorical columns, 7 standardised continuous ones, 2 tasks;
    the test split draws each column from its first half of values only, so many ids are absent."""
    gen = np.random.default_rng(0)

    def split(n, half=False):
        cat = np.stack([gen.integers(0, (v + 1) // 2 if half else v, n) for v in VOCAB], 1).astype(np.int64)
        return SimpleNamespace(cat=cat, num=gen.standard_normal((n, 7)).astype(np.float32),
                               labels=gen.integers(0, 2, (n, 2)).astype(np.float32))

    return SimpleNamespace(vocab_sizes=VOCAB, train=split(240), val=split(60), test=split(200, half=True))


def _build(data, arch, **kw):
    return MultiTaskConfig(arch=arch, **kw).build(vocab_sizes=data.vocab_sizes, num_continuous=7, num_tasks=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_every_architecture(data, arch):
    torch.manual_seed(0)
    m = _build(data, arch, expert_hidden=6, tower_hidden=4)
    kind = {"shared_bottom": SharedBottom, "omoe": MMoE, "mmoe": MMoE, "ple": PLE}[arch]
    assert type(m.backbone) is kind
    if arch in ("omoe", "mmoe"):
        assert len(m.backbone.gates) == (1 if arch == "omoe" else 2)
    cat, num = torch.as_tensor(data.test.cat), torch.as_tensor(data.test.num)
    logits = m(cat, num)
    assert logits.shape == (200, 2) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, torch.cat(m.backbone(m.embedding(cat, num)), 1))
    logits.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # embedding rows of values absent from the batch get no gradient
    used = torch.zeros(m.embedding.table.num_embeddings, dtype=torch.bool)
    used[(cat + m.embedding.offsets_C).unique()] = True
    assert (~used).any() and (m.embedding.table.weight.grad[~used] == 0).all()


def test_embedding_equals_one_table_per_column(data):
    torch.manual_seed(1)
    emb = TabularEmbedding(data.vocab_sizes, 7, 3)
    tables = torch.split(emb.table.weight, list(data.vocab_sizes))
    cat, num = torch.as_tensor(data.val.cat), torch.as_tensor(data.val.num)
    expect = torch.cat([tables[c][cat[:, c]] for c in range(cat.shape[1])] + [num], 1)
    torch.testing.assert_close(emb(cat, num), expect)
    assert emb.d_out == 32 * 3 + 7
    with pytest.raises(ValueError, match="vocab_size"):
        emb(cat.clamp(max=0) + torch.tensor(data.vocab_sizes), num)
    with pytest.raises(ValueError, match=r"expected cat \(B, 32\) and num \(B, 7\)"):
        emb(cat[:, :5], num)
    with pytest.raises(ValueError, match="arch must be one of"):
        MultiTaskConfig(arch="moe")
    with pytest.raises(ValueError, match="d_in=10"):
        MultiTaskModel(emb, MMoE(d_model=10, num_experts=2, num_tasks=2, d_hidden=4))

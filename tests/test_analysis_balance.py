"""Router analytics (issue 18 item 5): MaxVio global and per batch, group × expert routing tables
and within-layer co-activation — each against a brute-force loop; the probe's new counts; plots."""
import numpy as np
import pytest
import torch

from moekit import MoEConfig
from moekit.analysis import (
    expert_coactivation,
    group_counts,
    group_routing_table,
    max_vio,
    max_violation,
    mutual_information,
    probe_routing,
)
from moekit.analysis import plots as plots_mod
from moekit.models import TransformerConfig, TransformerLM


def test_max_violation_definition_and_limits():
    assert max_violation([5, 5, 5, 5]) == 0.0
    assert max_violation([8, 0, 0, 0]) == pytest.approx(3.0)          # E − 1
    assert max_violation([0, 0]) == 0.0
    rng = np.random.default_rng(0)
    c = rng.integers(0, 50, size=(6, 3, 8))
    got = max_violation(c)
    for b in range(6):
        for layer in range(3):
            row = [float(v) for v in c[b, layer]]
            assert got[b, layer] == pytest.approx(max(row) / (sum(row) / len(row)) - 1)


def test_max_vio_global_and_per_batch_match_loops():
    rng = np.random.default_rng(1)
    c = rng.integers(0, 30, size=(5, 2, 4))
    out = max_vio(c)
    for layer in range(2):
        total = [sum(int(c[b, layer, e]) for b in range(5)) for e in range(4)]
        assert out["global"][layer] == pytest.approx(max(total) / (sum(total) / 4) - 1)
        per = [max(c[b, layer]) / c[b, layer].mean() - 1 for b in range(5)]
        assert out["batch"][layer] == pytest.approx(sum(per) / 5)
        assert out["batch_max"][layer] == pytest.approx(max(per))
        assert out["global"][layer] <= out["batch"][layer] + 1e-12     # imbalances cancel across batches
    # Two batches skewed in opposite directions: balanced globally, not per batch.
    opposite = np.array([[[10, 0]], [[0, 10]]])
    assert max_vio(opposite) == {"global": [0.0], "batch": [1.0], "batch_max": [1.0]}
    with pytest.raises(ValueError, match=r"\(B, L, E\)"):
        max_vio(np.zeros((3, 4)))


def test_group_table_matches_loop():
    rng = np.random.default_rng(2)
    e = rng.integers(0, 5, size=400)
    g = rng.integers(0, 3, size=400)
    counts = group_counts(e, g, num_experts=5, num_groups=3)
    for gi in range(3):
        for ei in range(5):
            assert counts[gi, ei] == sum(1 for a, b in zip(e, g) if a == ei and b == gi)
    t = group_routing_table(counts, ["a", "b", "c"])
    assert np.allclose(np.asarray(t["share"]).sum(1), 1)
    assert (t["mi"], t["nmi"]) == mutual_information(counts)
    for ei in range(5):
        col = counts[:, ei]
        assert t["purity_expert"][ei] == pytest.approx(col.max() / col.sum())
        assert t["top_group"][ei] == "abc"[int(col.argmax())]
    split = group_routing_table(np.array([[10, 0], [0, 30]]), ["x", "y"])
    assert split["nmi"] == pytest.approx(1.0) and split["purity"] == 1.0 and split["chance_purity"] == 0.75
    with pytest.raises(ValueError, match="group_ids must lie in"):
        group_counts([0], [3], num_experts=2, num_groups=3)


def test_expert_coactivation_matches_loop():
    rng = np.random.default_rng(3)
    T, E = 300, 6
    ids = np.stack([rng.choice(E, size=2, replace=False) for _ in range(T)])
    out = expert_coactivation(ids, E)
    counts, lift = np.asarray(out["counts"]), np.asarray(out["lift"])
    for i in range(E):
        for j in range(E):
            brute = sum(1 for t in range(T) if i in ids[t] and j in ids[t])
            assert counts[i, j] == brute
            if i != j:
                pi, pj = counts[i, i] / T, counts[j, j] / T
                assert lift[i, j] == pytest.approx((brute / T) / (pi * pj))
    # Experts always chosen together: lift 1 / P.
    paired = np.array([[0, 1]] * 5 + [[2, 3]] * 5)
    lift2 = np.asarray(expert_coactivation(paired, 4)["lift"])
    assert lift2[0, 1] == pytest.approx(2.0) and lift2[0, 2] == 0.0


def test_probe_records_batch_counts_and_coactivation():
    V = 13
    torch.manual_seed(0)
    m = TransformerLM(TransformerConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                                        moe=MoEConfig(num_experts=4, top_k=2)))
    g = torch.Generator().manual_seed(0)
    batches = [(x, x, torch.zeros_like(x)) for x in (torch.randint(0, V, (2, 10), generator=g) for _ in range(3))]
    probe = probe_routing(m, batches, num_docs=1)
    assert probe.batch_counts.shape == (3, 2, 4)
    assert (probe.batch_counts.sum((0, 2)) == 3 * 20 * 2).all()
    assert (probe.batch_counts.sum(0) == probe.by_token.sum(2)).all()
    # Co-activation from the probe equals the function on the router's own selections.
    m.eval()
    ids = []
    for x, _, _ in batches:
        m(x)
        ids.append(m.blocks[0].ffn.last_routing.topk_ids.numpy())
    ref = expert_coactivation(np.concatenate(ids), 4)["counts"]
    assert probe.coact[0].tolist() == ref
    out = max_vio(probe.batch_counts)
    assert len(out["global"]) == 2 and all(v >= 0 for v in out["batch"])


def test_max_vio_and_coactivation_plots(tmp_path):
    if plots_mod._plt() is None:
        pytest.skip("matplotlib")
    p = plots_mod.plot_max_vio({"a": {"global": [0.1, 0.5], "batch": [0.3, 0.9]},
                                "b": {"global": [1.0, 2.0], "batch": [1.5, 2.5]}}, tmp_path / "v.png")
    assert p.exists() and p.stat().st_size > 0
    q = plots_mod.plot_expert_coactivation(expert_coactivation(np.array([[0, 1], [1, 2]]), 3), tmp_path / "c.png")
    assert q.exists()


def test_mean_sd_is_the_sample_sd_over_seeds():
    import math

    from moekit.analysis import mean_sd

    m, s = mean_sd([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and s == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                                                      + (4 - 7 / 3) ** 2) / 2))
    assert mean_sd([5]) == (5.0, 0.0)
    assert all(math.isnan(x) for x in mean_sd([]))
    assert mean_sd([1.0, math.nan, 3.0], skip_nan=True) == (2.0, pytest.approx(math.sqrt(2)))
    assert math.isnan(mean_sd([1.0, math.nan])[0])

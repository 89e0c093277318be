"""projects/offload_hit_rates: the hit-rate sweep on a tiny random MoE LM (no checkpoint needed)."""
import torch

from moekit.layers import MoEConfig
from moekit.models.transformer import TransformerConfig, TransformerLM
from projects.offload_hit_rates.run import hit_rates, print_table


def test_hit_rates_sweep_generates_the_resident_tokens(capsys):
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=17, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                                            moe=MoEConfig(num_experts=4, top_k=2, d_hidden=16))).eval()
    ids = torch.randint(0, 17, (2, 5))
    rows, differ = hit_rates(model, ids, new_tokens=6, sizes=[1, 3])
    assert [(S, p) for S, p, _ in rows] == [(1, False), (1, True), (3, False), (3, True)]
    assert all(n == 0 for n in differ.values())            # offloading never changes the tokens
    for S, prefetch, t in rows:
        assert 0.0 <= t["hit_rate"] <= 1.0 and t["requests"] > 0
        assert t["hit_rate"] == t["hits"] / t["requests"] and t["hits"] + t["misses"] == t["requests"]
    no_prefetch = {S: t["hit_rate"] for S, p, t in rows if not p}
    assert no_prefetch[3] >= no_prefetch[1]                # a bigger LRU cache never hits less here
    print_table(rows, E=4, per_expert=1024, steps=12, seed=0)
    assert "| 3 | yes |" in capsys.readouterr().out

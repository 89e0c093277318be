"""projects/dynamic_routing: the difficulty analysis and the study loop, on tiny inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit import MoEConfig
from moekit.models import TransformerConfig, TransformerLM
from moekit.train.config import apply_overrides, config_from_dict, variant_model_config
from projects.dynamic_routing.difficulty import by_group, by_quantile, char_class, rank_correlation, token_routing
from projects.dynamic_routing.run import markdown, study, study_config, variants

DATA = Path(__file__).parents[2] / "data" / "shakespeare"


def test_char_class():
    assert [char_class(t) for t in (" the", "\n", "  ", ",", " 1865", "x2", ").", "Ġ")] == \
        ["letters", "whitespace", "whitespace", "punctuation", "digits", "mixed", "punctuation", "letters"]


def test_by_quantile_and_group_count_every_token():
    rng = np.random.default_rng(0)
    ce = rng.exponential(size=101)
    experts = np.stack([1 + (ce > np.median(ce)), np.ones(101, dtype=int)])          # (L=2, T)
    q = by_quantile(ce, experts, 4)
    assert sum(b["tokens"] for b in q) == 101 and [b["bin"] for b in q] == [0, 1, 2, 3]
    assert all(a["ce_hi"] <= b["ce_lo"] for a, b in zip(q, q[1:]))                     # bins ordered by loss
    assert q[0]["per_layer"] == [1.0, 1.0] and q[3]["per_layer"] == [2.0, 1.0] and q[3]["experts"] == 1.5
    g = by_group(np.where(ce > 1, "hard", "easy"), experts, ce, ["easy", "none", "hard"])
    assert [x["group"] for x in g] == ["easy", "hard"] and sum(x["tokens"] for x in g) == 101
    assert sum(x["share"] for x in g) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one CE per token"):
        by_quantile(ce[:5], experts, 4)


def test_rank_correlation():
    a = np.arange(10.0)
    assert rank_correlation(a, a ** 3) == pytest.approx(1.0) and rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, np.ones(10)) == 0.0
    # ties take their average rank: Pearson's r of the average ranks
    x, y = np.array([1.0, 2, 2, 3, 5]), np.array([2.0, 1, 4, 4, 3])
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 4.5, 4.5, 3])
    assert rank_correlation(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])


def test_token_routing_counts_each_layers_kept_experts():
    torch.manual_seed(0)
    V = 17
    m = TransformerLM(TransformerConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                                        moe=MoEConfig(num_experts=4, router="top_p")))
    g = torch.Generator().manual_seed(0)
    batches = [(x, torch.roll(x, -1, 1), torch.zeros_like(x)) for x in (torch.randint(0, V, (2, 9), generator=g)
                                                                        for _ in range(2))]
    tr = token_routing(m, batches)
    assert tr["experts"].shape == (2, 36) and tr["ce"].shape == (36,) and tr["layers"] == [0, 1]
    assert (tr["experts"] >= 1).all() and (tr["experts"] <= 4).all()
    # the last batch's counts are the layers' own statistics
    for j, b in enumerate(m.moe_blocks):
        assert tr["experts"][j, 18:].mean() == pytest.approx(float(b.ffn.last_stats.experts_per_token))
    with torch.no_grad():
        losses = [float(m(x, y)[1]) for x, y, _ in batches]
    assert tr["ce"].mean() == pytest.approx(np.mean(losses), rel=1e-5)


def test_the_full_study_compares_routers_at_equal_total_parameters():
    run = study_config()
    assert run.variant_names == ["top1", "top2", "top_p0.2", "top_p0.4", "top_p0.6"]
    totals = set()
    for v in run.variant_names:
        c = variant_model_config(run, v, vocab_size=run.data.vocab_size)
        assert c.moe.num_experts == 8 and c.expert_d_hidden == 176 and c.d_model == 128 and c.n_layers == 4
        totals.add(sum(p.numel() for p in TransformerLM(c).parameters()))
    assert len(totals) == 1
    assert variant_model_config(run, "top_p0.4", vocab_size=50).moe.router_kwargs == (("p", 0.4),)
    assert run.data.source == "domains" and run.data.tokenizer == "bpe"


def test_study_trains_analyses_and_tabulates(tmp_path):
    d = {"name": "t", "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 16},
         "data": {"source": "files", "paths": [str(DATA)], "seq_len": 16, "batch_size": 4, "val_fraction": 0.25},
         "optim": {"warmup_steps": 1},
         "train": {"steps": 2, "eval_every": 2, "eval_batches": 2, "log_every": 1, "ckpt_every": 2},
         "variants": variants([0.4, 0.9])}
    run = config_from_dict(d)
    out = study(run, tmp_path / "s", [0, 1], sweep_seeds=[1], log=open("/dev/null", "w"))
    v = out["variants"]
    assert [r["seed"] for r in v["top1"]] == [0, 1] and [r["seed"] for r in v["top_p0.9"]] == [1]
    assert len({r["params_total"] for rs in v.values() for r in rs}) == 1
    a = v["top1"][0]["analysis"]
    assert a["experts"] == 1.0 and a["per_layer"] == [1.0, 1.0] and a["tokens"] == 2 * 4 * 16
    assert [b["experts"] for b in a["by_quantile"]] == [1.0] * 4 and a["by_domain"][0]["group"] == "text"
    assert v["top2"][0]["analysis"]["experts"] == 2.0
    hi, lo = v["top_p0.9"][0]["analysis"], v["top_p0.4"][0]["analysis"]
    assert hi["experts"] > lo["experts"] >= 1.0                    # a higher threshold keeps more experts
    # the trainer's measured eval count and the study's recount agree
    assert np.mean(v["top_p0.4"][0]["experts_per_token"]["eval"]) == pytest.approx(lo["experts"])
    t = out["table"]
    assert t["top1"]["seeds"] == 2 and t["top_p0.9"]["seeds"] == 1 and t["top1"]["val_loss"][1] >= 0
    md = markdown(t)
    assert md.count("| top_p0.4 |") == 3 and "Q4" in md and "letters" in md
    assert json.loads((tmp_path / "s" / "results.json").read_text())["sweep_seeds"] == [1]
    # a second call keeps the finished variants (no retraining) and gives the same numbers
    again = study(run, tmp_path / "s", [0, 1], sweep_seeds=[1], log=open("/dev/null", "w"))
    assert again["table"] == out["table"]
    with pytest.raises(ValueError, match="unknown variant"):
        apply_overrides(run, ["variants=top3"])

"""projects/btx_domains: the domain slicing, the switch windows, the FLOP matching and the whole
study on a tiny synthetic three-domain corpus."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from moekit.models.transformer import TransformerConfig, TransformerLM, flops_per_token
from moekit.recipes import BTMEnsemble, upcycle
from moekit.train.data import Corpus
from projects.btx_domains.data import domain_corpus, switch_batches
from projects.btx_domains.run import (
    METHODS,
    build_parser,
    evaluate,
    markdown_table,
    matched_steps,
    paired_gaps,
    plot,
    run_seed,
    step_flops,
)

V = 12


def synthetic_corpus(n_per_domain=(700, 500, 600), seed=0) -> Corpus:
    """Three domains, two documents each; domain g draws its tokens mostly from its own third of
    the vocabulary, so that the domains are tellable apart."""
    g = torch.Generator().manual_seed(seed)
    toks, docs = [], []
    for d, n in enumerate(n_per_domain):
        own = torch.randint(4 * d, 4 * d + 4, (n,), generator=g)
        other = torch.randint(0, V, (n,), generator=g)
        toks.append(torch.where(torch.rand(n, generator=g) < 0.8, own, other))
        docs.append(torch.cat([torch.full((n // 2,), 2 * d), torch.full((n - n // 2,), 2 * d + 1)]))
    return Corpus(torch.cat(toks), torch.cat(docs), [f"doc{i}" for i in range(6)],
                  torch.tensor([0, 0, 1, 1, 2, 2]), ["a", "b", "c"])


def test_domain_corpus_is_one_domain_with_its_own_documents():
    c = synthetic_corpus()
    one = domain_corpus(c, 1)
    assert torch.equal(one.tokens, c.tokens[700:1200])
    assert one.doc_names == ["doc2", "doc3"] and one.domain_names == ["b"] and one.num_domains == 1
    assert one.doc_ids.min() == 0 and one.doc_ids.max() == 1
    assert torch.equal(one.doc_ids, c.doc_ids[700:1200] - 2)
    with pytest.raises(ValueError, match="g"):
        domain_corpus(c, 3)


def test_switch_windows_change_domain_halfway():
    c = synthetic_corpus()
    S = 10
    batches = switch_batches(c, seq_len=S, batch_size=4, per_pair=3)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    dom = torch.cat([b[2] for b in batches])
    after = torch.cat([b[3] for b in batches])
    assert x.shape == y.shape == dom.shape == after.shape == (6 * 3, S)      # 6 ordered pairs × 3 windows
    assert torch.equal(x[:, 1:], y[:, :-1])                                   # targets are the next tokens
    # Targets 0..3 (tokens 1..4) come from the first domain, targets 4..9 from the second.
    assert bool((~after[:, :4]).all()) and bool(after[:, 4:].all())
    pairs = {(int(d[0]), int(d[-1])) for d in dom}
    assert pairs == {(a, b) for a in range(3) for b in range(3) if a != b}
    bounds = c.domain_bounds()
    # Each token comes from its domain's range: check by value through the window's source slice.
    for row_x, row_y, row_d in zip(x, y, dom):
        a, b = int(row_d[0]), int(row_d[-1])
        stream = c.tokens
        first = row_x[:5]
        lo, hi = bounds[a]
        assert any(torch.equal(stream[s:s + 5], first) for s in range(lo, hi - 4))
        second = torch.cat([row_x[5:], row_y[-1:]])
        lo, hi = bounds[b]
        assert any(torch.equal(stream[s:s + 6], second) for s in range(lo, hi - 5))


def tiny_lm():
    return TransformerLM(TransformerConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                                           moe_layers="none"))


def test_step_flops_and_matched_steps():
    torch.manual_seed(0)
    dense = tiny_lm()
    assert step_flops(dense, 16, 6) == flops_per_token(dense, 16)["train"] * 16 * 6
    up = upcycle(tiny_lm(), num_experts=4, top_k=2)
    budget = 40 * step_flops(up, 16, 6)
    assert matched_steps(budget, up, 16, 6) == 40
    # Top-2 of 4 doubles the FFN: more dense steps fill the same budget, but fewer than twice.
    n_dense = matched_steps(budget, dense, 16, 6)
    assert 40 < n_dense < 80
    assert abs(n_dense * step_flops(dense, 16, 6) - budget) <= step_flops(dense, 16, 6) / 2
    assert matched_steps(1, dense, 16, 6) == 1


class _Uniform(nn.Module):
    def forward(self, idx):
        return torch.zeros(*idx.shape, V), None


def test_evaluate_per_domain_mean_and_switch():
    c = synthetic_corpus()
    from moekit.train.data import eval_batches
    val = eval_batches(c, seq_len=8, batch_size=6, max_batches=3)
    sw = switch_batches(c, seq_len=8, batch_size=6, per_pair=2)
    r = evaluate(_Uniform(), val, sw, c)
    for k in ("a", "b", "c", "mean", "switch"):
        assert r[k] == pytest.approx(math.log(V), abs=1e-6)
    # A BTM ensemble of identical models scores exactly as the model.
    torch.manual_seed(1)
    m = tiny_lm().eval()
    one, ens = evaluate(m, val, sw, c), evaluate(BTMEnsemble([m, m, m]), val, sw, c)
    for k in one:
        assert ens[k] == pytest.approx(one[k], abs=1e-5)


@pytest.fixture(scope="module")
def tiny_study():
    c = synthetic_corpus(seed=1)
    val = synthetic_corpus((300, 300, 300), seed=2)
    args = build_parser().parse_args(["--seed-steps", "6", "--branch-steps", "4", "--finetune-steps", "3",
                                      "--d-model", "16", "--heads", "2", "--seq-len", "16", "--batch-size", "6",
                                      "--val-batches", "2", "--switch-windows", "1"])
    args.vocab_size = V
    return args, run_seed(args, c, val, seed=0)


def test_study_runs_every_method_at_matched_flops(tiny_study):
    args, r = tiny_study
    assert set(r["losses"]) == set(METHODS) and set(r["btx_before_finetune"]) == {"a", "b", "c", "mean", "switch"}
    assert all(math.isfinite(v) for row in r["losses"].values() for v in row.values())
    ph, fl = r["phases"], r["flops"]
    assert ph["seed"]["steps"] == 6 and all(ph[f"branch {d}"]["steps"] == 4 for d in "abc")
    assert ph["BTX top-2 fine-tune"]["steps"] == 3
    # Every trained method spends BTX top-2's FLOPs, to within half a step of its own; BTM the
    # seed and branches only; the seed alone the least.
    for m, phase in (("BTX sampled top-1", "BTX sampled top-1 fine-tune"), ("sparse upcycling top-2", "upcycling"),
                     ("dense, equal FLOPs", "dense")):
        per_step = ph[phase]["flops"] / ph[phase]["steps"]
        assert abs(fl[m] - fl["BTX top-2"]) <= per_step / 2 + 1, m
    branches = sum(ph[f"branch {d}"]["flops"] for d in "abc")
    assert fl["BTM ensemble"] == fl["seed (dense)"] + branches < fl["BTX top-2"]
    assert r["experts"] == 4 and r["inference_flops_per_token"]["BTM ensemble"] == \
        4 * r["inference_flops_per_token"]["seed (dense)"]
    # More steps for the cheaper models: dense > upcycling (top-2 of 4).
    assert ph["dense"]["steps"] > ph["upcycling"]["steps"]


def test_study_routing_tables(tiny_study):
    _, r = tiny_study
    assert set(r["routing"]) == {"BTX top-2", "BTX sampled top-1", "sparse upcycling top-2", "BTM ensemble"}
    for m, layers in r["routing"].items():
        assert len(layers) == (1 if m == "BTM ensemble" else 2)
        for t in layers:
            share = np.asarray(t["share"])
            assert share.shape == (3, 4)
            np.testing.assert_allclose(share.sum(1), 1.0, atol=1e-9)
            assert 0.0 <= t["nmi"] <= 1.0 + 1e-9
            assert t["chance_purity"] <= t["purity"] + 1e-9      # Σ_e max_g c_ge ≥ max_g Σ_e c_ge
    soft = np.asarray(r["routing"]["BTM ensemble"][0]["soft_share"])
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)            # the posterior sums to 1


def test_table_and_plot(tiny_study, tmp_path):
    _, r = tiny_study
    r2 = dict(r, seed=1)
    table = markdown_table([r, r2], ["a", "b", "c"])
    assert table.count("\n") == len(METHODS) + 1 and "± 0.000" in table
    gaps = paired_gaps([r, r2], ["a", "b", "c"]).splitlines()
    assert len(gaps) == 2 + len(METHODS) - 2 and "BTX top-2" not in "".join(g.split("|")[1] for g in gaps[2:])
    btm_row = next(g for g in gaps if g.startswith("| BTM"))
    want = r["losses"]["BTX top-2"]["switch"] - r["losses"]["BTM ensemble"]["switch"]
    assert btm_row.split("|")[-2].strip() == f"{want:+.3f} ± 0.000"
    pytest.importorskip("matplotlib")
    assert plot([r, r2], ["a", "b", "c"], tmp_path / "p.png").stat().st_size > 1000

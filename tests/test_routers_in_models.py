"""Every registered router in the LM, the ViT and the trainer (issue 15, item 1); active
parameters and FLOPs from the routing taken; the report's experts-per-token histograms (item 6)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moekit
from moekit import MoEConfig, cli
from moekit.analysis import experts_per_token_histogram, probe_routing, write_report
from moekit.analysis import plots as plots_mod
from moekit.models import TransformerConfig, TransformerLM, flops_per_token, param_counts
from moekit.models.vision import ViTConfig, ViTMoE, active_param_counts
from moekit.train import Trainer, run_experiment

sys.path.insert(0, str(Path(__file__).parent))
from test_train import DATA, tiny  # noqa: E402

V, D, E = 23, 16, 4
# Routers that cannot be built without a setting of their own.
NEEDS = {"stable_moe": {"vocab_size": V}, "task": {"num_tasks": 2}, "task_topk": {"num_tasks": 2}}
# Routers an autoregressive LM refuses, and the reason its error gives.
REFUSED_LM = {"expert_choice": r"causal_safe=False.*router_kwargs=\{'causal': True\}",
              "task": r"per-token inputs \['task_ids'\]", "task_topk": r"per-token inputs \['task_ids'\]"}

# Routers that give every token the same number of experts (dropless): measured == nominal.
FIXED_K = {"topk": 2, "noisy_topk": 2, "sigmoid": 2, "gshard": 2, "cosine": 2, "gaussian": 2, "dense": E,
           "switch": 1, "base": 1, "sinkhorn": 1, "hash": 1, "random": 1, "multihash": 1}


def _lm(router, **kw):
    moe = MoEConfig(num_experts=E, router=router, router_kwargs={**NEEDS.get(router, {}), **kw})
    return TransformerConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, max_seq_len=24, moe=moe)


@pytest.mark.parametrize("router", moekit.available_routers())
def test_every_router_trains_in_the_lm_or_is_refused_by_name(router):
    if router in REFUSED_LM:
        why = rf"moe.router='{router}' does not suit a causal LM: .*{REFUSED_LM[router]}"
        with pytest.raises(ValueError, match=why):
            _lm(router)
        return
    torch.manual_seed(0)
    m = TransformerLM(_lm(router))
    idx = torch.randint(0, V, (3, 16))
    _, loss = m(idx, idx)
    (loss + moekit.aux_loss(m)).backward()
    assert torch.isfinite(loss)
    m.eval()
    # A causal-safe router routes a token from its own hidden state: decoding one token at a
    # time through the cache equals recomputing the whole prefix at every step.
    # (Random routing is exempt: its eval draw is seeded by the token's index in the flattened
    # batch, which differs between the two ways of decoding — random either way.)
    if router != "random":
        prompt = idx[:, :4]
        cached = m.generate(prompt, 8, temperature=0, use_cache=True)
        full = m.generate(prompt, 8, temperature=0, use_cache=False)
        assert torch.equal(cached, full), router
    # Active parameters from the routing taken; for fixed-K routers they are the nominal count.
    m(idx)
    measured = [float(b.ffn.last_stats.experts_per_token) for b in m.moe_blocks]
    assert param_counts(m, experts=measured) == param_counts(m, measured=True)
    if router in FIXED_K:
        assert measured == [float(FIXED_K[router])] * 2
        assert param_counts(m, measured=True) == param_counts(m)


def test_expert_choice_takes_its_causal_fallback_in_the_lm():
    torch.manual_seed(0)
    m = TransformerLM(_lm("expert_choice", causal=True)).eval()
    prompt = torch.randint(0, V, (2, 5))
    assert torch.equal(m.generate(prompt, 6, temperature=0, use_cache=True),
                       m.generate(prompt, 6, temperature=0, use_cache=False))


def test_measured_counts_from_given_means():
    torch.manual_seed(0)
    m = TransformerLM(_lm("top_p"))
    L = len(m.moe_blocks)
    bank = sum(p.numel() for p in m.moe_blocks[0].ffn.experts.parameters())
    total = param_counts(m)["total"]
    for ks in ([1.0, 1.0], [2.5, 1.25], [E, 0.0]):
        expect = total - sum(bank - round(bank * k / E) for k in ks)
        assert param_counts(m, experts=ks)["active"] == expect
    one, two = flops_per_token(m, 16, experts=[1.0] * L), flops_per_token(m, 16, experts=[2.0] * L)
    # one more expert per token in every layer: 2 FLOPs per weight of one expert, per layer
    assert two["forward"] - one["forward"] == 2 * L * (bank // E) and two["train"] == 3 * two["forward"]
    with pytest.raises(ValueError, match=r"one mean per MoE layer \(2\), got 1"):
        param_counts(m, experts=[1.0])
    with pytest.raises(ValueError, match="experts\\[1\\] must be a finite number in \\[0, 4\\], got 5"):
        param_counts(m, experts=[1.0, 5.0])
    with pytest.raises(ValueError, match="not both"):
        param_counts(m, experts=[1.0, 1.0], measured=True)


@pytest.mark.parametrize("router", moekit.available_routers())
def test_every_router_in_the_vit(router):
    moe = MoEConfig(num_experts=E, router=router, router_kwargs={**NEEDS.get(router, {})})
    if router == "stable_moe":
        with pytest.raises(ValueError, match=r"vocab_size=23; a ViTMoE gives the 50 token positions"):
            ViTConfig(d_model=D, n_layers=2, n_heads=2, moe=moe)
        moe = MoEConfig(num_experts=E, router=router, router_kwargs={"vocab_size": 50})
    if router in ("task", "task_topk"):
        with pytest.raises(ValueError, match=rf"moe.router='{router}' routes by per-token inputs \['task_ids'\]"):
            ViTConfig(d_model=D, n_layers=2, n_heads=2, moe=moe)
        return
    torch.manual_seed(0)
    m = ViTMoE(ViTConfig(d_model=D, n_layers=2, n_heads=2, moe=moe))
    x, y = torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    _, loss = m(x, y)
    (loss + moekit.aux_loss(m)).backward()
    m.eval()
    logits, _ = m(x)
    assert torch.isfinite(logits).all()
    counts = active_param_counts(m, measured=True)
    assert counts["active"] <= counts["total"]


def test_vit_hash_routing_is_by_token_position():
    torch.manual_seed(0)
    m = ViTMoE(ViTConfig(d_model=D, n_layers=2, n_heads=2, moe=MoEConfig(num_experts=E, router="hash"))).eval()
    m(torch.randn(2, 1, 28, 28))
    r = m.moe_blocks[0].mlp.last_routing.compact()
    S = 50
    pos_N = r.token_ids % S
    # every position goes to one expert, whatever the image
    assert torch.equal(r.expert_ids[:S], r.expert_ids[S:2 * S]) and pos_N.tolist() == list(range(S)) * 2


# -- the trainer ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    from moekit.train import build_corpus
    return build_corpus(tiny().data)


def _recount(trainer):
    """Each MoE layer's mean experts per token over the validation batches, counted here."""
    m = trainer.model.eval()
    sums = np.zeros(len(m.moe_blocks))
    with torch.no_grad():
        for x, _, _ in trainer.val_batches:
            m(x)
            for j, b in enumerate(m.moe_blocks):
                r = b.ffn.last_routing.compact()
                sums[j] += r.token_ids.numel() / x.numel()
    m.train()
    return (sums / len(trainer.val_batches)).tolist()


def test_trainer_counts_flops_and_active_parameters_from_the_routing_taken(tmp_path, data):
    run = tiny(model={"router": "top_p", "top_k": None}, train={"steps": 6, "eval_every": 3, "ckpt_every": 3})
    t = Trainer(run, "moe", tmp_path / "a", data=data, progress=False)
    res = t.fit()
    ept = res["experts_per_token"]
    assert ept["layers"] == [0, 1] and len(ept["train"]) == len(ept["eval"]) == 2
    assert ept["eval"] == pytest.approx(_recount(t), rel=1e-6)
    # top-p with p = 0.4 over 4 near-uniform experts keeps about 2: more than the nominal floor of 1
    assert all(1.0 < k <= E for k in ept["train"] + ept["eval"])
    assert res["params_active"] == param_counts(t.model, experts=ept["eval"])["active"] > res["params_active_nominal"]
    assert res["flops_per_token_forward"] == flops_per_token(t.model, 32, experts=ept["eval"])["forward"]
    assert res["flops_per_token_train"] == flops_per_token(t.model, 32, experts=ept["train"])["train"]
    assert res["flops_per_token_train"] > res["flops_per_token_train_nominal"]
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["experts_per_token"]) == 2 for r in recs if r["kind"] in ("routing", "eval"))
    # the training means survive a resume: stop at step 3, resume, same numbers as straight through
    Trainer(run, "moe", tmp_path / "b", data=data, progress=False).fit(stop_at_step=3)
    t2 = Trainer(run, "moe", tmp_path / "b", data=data, progress=False)
    assert t2.resume()
    assert t2.fit()["experts_per_token"] == ept
    # fixed K, dropless: the measured counts are the nominal ones; the dense twin has none
    sw = Trainer(tiny(train={"steps": 2, "eval_every": 2, "ckpt_every": 2}), "moe", tmp_path / "s", data=data,
                 progress=False).fit()
    assert sw["experts_per_token"]["eval"] == [1.0, 1.0] and sw["params_active"] == sw["params_active_nominal"]
    assert sw["flops_per_token_train"] == sw["flops_per_token_train_nominal"]
    dn = Trainer(tiny(train={"steps": 2, "eval_every": 2, "ckpt_every": 2}), "dense", tmp_path / "d", data=data,
                 progress=False).fit()
    assert dn["experts_per_token"] is None and dn["params_active"] == dn["params_total"]


# -- the report: experts per token -------------------------------------------------------------
def test_experts_per_token_histogram_counts_the_kept_pairs():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [(x, x, torch.zeros_like(x)) for x in (torch.randint(0, V, (2, 12), generator=g) for _ in range(3))]
    T = 3 * 2 * 12
    for router, kw, fixed in (("topk", {}, 2), ("dense", {}, E), ("top_p", {}, None), ("null_experts", {}, None)):
        m = TransformerLM(_lm(router, **kw))
        probe = probe_routing(m, batches, num_docs=1)
        hist = experts_per_token_histogram(probe)
        assert [h["layer"] for h in hist] == [0, 1]
        for j, h in enumerate(hist):
            assert sum(h["counts"]) == T and len(h["counts"]) == E + 1
            assert h["mean"] == pytest.approx(probe.by_token[j].sum() / T)
            if fixed is not None:
                assert h["counts"][fixed] == T and not h["dynamic"]
    # top-p at p=0.4 over near-uniform probabilities varies between 1 and 3 experts
    m = TransformerLM(_lm("top_p"))
    hist = experts_per_token_histogram(probe_routing(m, batches, num_docs=1))
    assert any(h["dynamic"] for h in hist)
    from moekit.analysis.routing import RoutingProbe
    old = RoutingProbe(layers=[0], num_experts=2, by_token=np.zeros((1, 2, 1)), by_doc=np.zeros((1, 2, 1)),
                       top1=np.zeros((1, 1)), tokens=np.zeros(1), docs=np.zeros(1), dropped=np.zeros(1))
    with pytest.raises(ValueError, match="no experts-per-token counts for its 1 layers"):
        experts_per_token_histogram(old)


@pytest.mark.parametrize("E_, L", [(2, 1), (8, 4), (16, 3)])
def test_experts_per_token_plot_has_integer_ticks_and_no_overlapping_labels(E_, L):
    from test_trust_checkpoints import _integer_expert_ticks, _texts

    plt = plots_mod._plt()
    if plt is None:
        pytest.skip("matplotlib")
    rng = np.random.default_rng(E_)
    hist = []
    for j in range(L):
        share = rng.dirichlet(np.ones(E_ + 1))
        hist.append({"layer": 2 * j, "share": share.tolist(), "mean": float((np.arange(E_ + 1) * share).sum())})
    fig = plots_mod._experts_per_token_figure(plt, hist)
    assert len(fig.axes) == L
    for ax in fig.axes:
        _integer_expert_ticks(ax, "x")
        assert len(ax.patches) == E_ + 1
    texts = _texts(fig)
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            (ta, a), (tb, b) = texts[i], texts[j]
            assert not a.shrunk(0.9, 0.9).overlaps(b.shrunk(0.9, 0.9)), f"labels {ta!r} and {tb!r} overlap"
    plt.close(fig)


def test_report_shows_experts_per_token_of_dynamic_routers(tmp_path):
    run = tiny(model={"router": "top_p", "top_k": None},
               train={"steps": 4, "eval_every": 2, "log_every": 2, "ckpt_every": 4},
               variants={"top_p": {}, "switch": {"router": "switch"}})
    run_experiment(run, tmp_path / "r", progress=False, stream=open("/dev/null", "w"))
    paths = write_report(tmp_path / "r", samples=False)
    summary = json.loads(Path(paths["summary"]).read_text())
    tp, sw = summary["routing"]["top_p"]["experts_per_token"], summary["routing"]["switch"]["experts_per_token"]
    assert [h["layer"] for h in tp] == [0, 1] and all(h["dynamic"] for h in tp)
    assert all(h["counts"][1] == sum(h["counts"]) and not h["dynamic"] for h in sw)
    html = Path(paths["html"]).read_text()
    assert html.count("<h3>Experts per token</h3>") == 1               # top-p only
    if plots_mod.have_matplotlib():
        assert "experts_top_p" in summary["plots"] and "experts_switch" not in summary["plots"]
    # the per-variant numbers in the summary are the measured ones
    res = json.loads((tmp_path / "r" / "top_p" / "result.json").read_text())
    assert summary["variants"]["top_p"]["params_active"] == res["params_active"] > res["params_active_nominal"]


def test_cli_trains_top_p_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--data", str(DATA), "--set", "model.router=top_p",
                     "--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.ckpt_every=4",
                     "--set", "data.seq_len=32", "--set", "data.batch_size=4", "--set", "data.tokenizer=char",
                     "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "experts/tok" in text and "report:" in text
    res = json.loads((out / "moe" / "result.json").read_text())
    assert res["model"]["moe"]["router"] == "top_p" and res["experts_per_token"]["eval"]
    row = next(line for line in text.splitlines() if line.startswith("moe "))
    assert f"{sum(res['experts_per_token']['eval']) / 2:.2f}" in row
    assert "Experts per token" in (out / "report.html").read_text()

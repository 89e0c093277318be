"""Routing analytics and the run report."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit import MoEConfig
from moekit.analysis import (
    coactivation,
    load_over_training,
    mutual_information,
    probe_routing,
    specialisation,
    write_report,
)
from moekit.analysis import plots as plots_mod
from moekit.analysis.routing import RoutingProbe
from moekit.models import TransformerConfig, TransformerLM
from moekit.train import run_experiment

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny  # noqa: E402


def test_mutual_information_bounds():
    indep = np.outer([1, 2, 3], [4, 5]) * 10
    mi, nmi = mutual_information(indep)
    assert mi == pytest.approx(0.0, abs=1e-12) and nmi == pytest.approx(0.0, abs=1e-12)
    ident = np.diag([5, 5, 10])
    mi, nmi = mutual_information(ident)
    p = np.array([0.25, 0.25, 0.5])
    assert mi == pytest.approx(-(p * np.log(p)).sum()) and nmi == pytest.approx(1.0)
    assert mutual_information(np.zeros((2, 2))) == (0.0, 0.0)


def _batches(V, n=3, B=2, S=12, docs=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, V, (B, S), generator=g)
        out.append((x, x, torch.randint(0, docs, (B, S), generator=g)))
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_probe_counts_are_consistent(top_k):
    V = 11
    m = TransformerLM(TransformerConfig(vocab_size=V, d_model=16, n_layers=3, n_heads=2, max_seq_len=16,
                                        moe=MoEConfig(num_experts=4, top_k=top_k)))
    batches = _batches(V)
    probe = probe_routing(m, batches, num_docs=3)
    T = 3 * 2 * 12
    assert probe.by_token.shape == (3, 4, V) and probe.by_doc.shape == (3, 4, 3)
    # dropless: every token keeps exactly top_k pairs in every layer
    assert (probe.by_token.sum((1, 2)) == T * top_k).all() and (probe.by_doc.sum((1, 2)) == T * top_k).all()
    tok_counts = np.bincount(np.concatenate([b[0].reshape(-1).numpy() for b in batches]), minlength=V)
    assert (probe.by_token[0].sum(0) == tok_counts * top_k).all()
    assert probe.top1.shape == (3, T) and (probe.top1 >= 0).all()
    # top-1 equals the router's argmax in eval mode
    m.eval()
    x = batches[0][0]
    m(x)
    logits = m.blocks[0].ffn.last_routing.logits
    assert (probe.top1[0][: x.numel()] == logits.argmax(-1).numpy()).all()
    co = coactivation(probe)
    assert len(co) == 2 and sum(map(sum, co[0]["joint"])) == T
    assert not m.training or True


def test_specialisation_finds_a_planted_preference():
    # expert 0 takes every 'a' (token 1) and all of document 1; tokens otherwise spread evenly.
    E, V, P = 3, 4, 2
    by_token = np.full((1, E, V), 30)
    by_token[0, :, 1] = [90, 0, 0]
    by_doc = np.full((1, E, P), 40)
    by_doc[0, :, 1] = [120, 0, 0]
    probe = RoutingProbe(layers=[0], num_experts=E, by_token=by_token, by_doc=by_doc,
                         top1=np.zeros((1, 5), dtype=np.int64), tokens=np.zeros(5), docs=np.zeros(5),
                         dropped=np.zeros(1, dtype=np.int64))
    s = specialisation(probe, token_names=["?", "a", "b", "c"], doc_names=["hamlet", "sonnets"])[0]
    assert s["top_tokens"][0][0]["item"] == "a" and s["top_tokens"][0][0]["share_of_item"] == 1.0
    assert s["top_docs"][0][0]["item"] == "sonnets"
    assert all(x["item"] != "a" for x in s["top_tokens"][1])
    assert 0 < s["nmi_token"] <= 1 and 0 < s["nmi_doc"] <= 1
    assert np.allclose(np.sum(s["doc_share"], 1), 1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    run = tiny(train={"steps": 10, "eval_every": 5, "log_every": 5, "ckpt_every": 10})
    res = run_experiment(run, out, progress=False, stream=open("/dev/null", "w"))
    assert res["status"] == "completed"
    return out


def test_load_over_training(tiny_run):
    load = load_over_training(tiny_run / "moe" / "metrics.jsonl")
    assert load["steps"] == [5, 10] and load["layers"] == [0, 1]
    frac = np.asarray(load["fraction"])
    assert frac.shape == (2, 2, 4) and np.allclose(frac.sum(-1), 1)
    assert all(x >= 1 for row in load["load_imbalance"] for x in row)


def test_report_writes_summary_html_and_plots(tiny_run):
    paths = write_report(tiny_run, samples=False)
    summary = json.loads(Path(paths["summary"]).read_text())
    for name in ("moe", "dense"):
        v = summary["variants"][name]
        for key in ("val_loss", "params_total", "params_active", "flops_per_token_train", "tokens_per_s",
                    "train_time_s"):
            assert v[key] is not None, (name, key)
    assert summary["variants"]["moe"]["params_total"] > summary["variants"]["dense"]["params_total"]
    assert summary["comparison"]["equal_steps"]["step"] == 10
    assert "moe" in summary["routing"] and "dense" not in summary["routing"]
    html = Path(paths["html"]).read_text()
    assert "data:image/png;base64," in html and "src=\"http" not in html
    assert (tiny_run / "plots" / "loss_curves.png").exists()


def test_report_without_matplotlib(tiny_run, monkeypatch):
    monkeypatch.setattr(plots_mod, "_plt", lambda: None)
    import moekit.analysis.report as rep
    monkeypatch.setattr(rep, "have_matplotlib", lambda: False)
    for p in (tiny_run / "plots").glob("*.png"):
        p.unlink()
    paths = write_report(tiny_run, samples=False)
    assert paths["plots"] == [] and "matplotlib is not installed" in Path(paths["html"]).read_text()
    assert json.loads(Path(paths["summary"]).read_text())["variants"]["moe"]["val_loss"] > 0


def _probe_from_doc_counts(by_doc):
    L, E, P = by_doc.shape
    return RoutingProbe(layers=list(range(L)), num_experts=E, by_token=np.zeros((L, E, 1), dtype=np.int64),
                        by_doc=by_doc, top1=np.zeros((L, 1), dtype=np.int64), tokens=np.zeros(1),
                        docs=np.zeros(1), dropped=np.zeros(L, dtype=np.int64))


def test_domain_specialisation_bounds_and_a_planted_split():
    from moekit.analysis import domain_specialisation

    # 4 documents in 2 domains (0, 0, 1, 1), 4 experts.
    doc_domains = [0, 0, 1, 1]
    uniform = np.full((1, 4, 4), 25)
    split = np.zeros((1, 4, 4), dtype=np.int64)
    split[0, :2, :2] = 50                      # experts 0-1 take domain 0's documents, 2-3 domain 1's
    split[0, 2:, 2:] = 50
    u, s = (domain_specialisation(_probe_from_doc_counts(b), doc_domains, ["prose", "code"])[0]
            for b in (uniform, split))
    assert u["nmi"] == pytest.approx(0.0, abs=1e-12) and u["purity"] == pytest.approx(0.5)
    assert u["chance_purity"] == pytest.approx(0.5)
    assert s["nmi"] == pytest.approx(1.0) and s["purity"] == pytest.approx(1.0)
    assert s["top_domain"] == ["prose", "prose", "code", "code"]
    assert np.allclose(np.sum(s["share"], 1), 1) and s["share"][0] == pytest.approx([0.5, 0.5, 0, 0])
    # the matrix aggregates documents: counts are the sum over each domain's documents
    assert s["counts"] == [[100, 100, 0, 0], [0, 0, 100, 100]]
    with pytest.raises(ValueError, match="one entry per document"):
        domain_specialisation(_probe_from_doc_counts(split), [0, 1], ["prose", "code"])
    with pytest.raises(ValueError, match="must index domain_names"):
        domain_specialisation(_probe_from_doc_counts(split), [0, 0, 1, 2], ["prose", "code"])


@pytest.mark.parametrize("E, L", [(2, 1), (8, 4), (17, 5)])
def test_domain_heatmap_is_annotated_and_its_labels_do_not_overlap(E, L):
    from test_trust_checkpoints import _integer_expert_ticks, _texts

    plt = plots_mod._plt()
    if plt is None:
        pytest.skip("matplotlib")
    rng = np.random.default_rng(E)
    names = ["shakespeare", "sotu", "python"]
    spec = [{"layer": j, "domains": names, "share": rng.dirichlet(np.ones(E), size=3).tolist(),
             "nmi": 0.123, "purity": 0.456} for j in range(L)]
    fig = plots_mod._domain_experts_figure(plt, spec)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"][:L]
    assert len(panels) == L
    for ax in panels:
        _integer_expert_ticks(ax, "x")
        assert len(ax.texts) == 3 * E                    # one percentage written in every cell
    r = fig.canvas.get_renderer()
    texts = _texts(fig) + [(t.get_text(), t.get_window_extent(r)) for ax in panels for t in ax.texts]
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            (ta, a), (tb, b) = texts[i], texts[j]
            assert not a.shrunk(0.9, 0.9).overlaps(b.shrunk(0.9, 0.9)), f"labels {ta!r} and {tb!r} overlap"
    plt.close(fig)


def test_report_of_a_multi_domain_run_shows_routing_by_domain(tmp_path):
    pytest.importorskip("tokenizers")
    from test_domains import tiny_domains

    run_dir = tmp_path / "r"
    run_experiment(tiny_domains(tmp_path / "cache"), run_dir, progress=False, stream=open("/dev/null", "w"))
    paths = write_report(run_dir, samples=False)
    summary = json.loads(Path(paths["summary"]).read_text())
    dom = summary["routing"]["moe"]["domains"]
    assert [d["layer"] for d in dom] == [0, 1]
    for d in dom:
        assert np.asarray(d["share"]).shape == (3, 4) and 0 <= d["nmi"] <= 1 and 0 < d["purity"] <= 1
    assert set(summary["variants"]["moe"]["val_loss_by_domain"]) == {"shakespeare", "sotu", "python"}
    assert summary["comparison"]["domains"]["names"] == ["shakespeare", "sotu", "python"]
    html = Path(paths["html"]).read_text()
    assert "Validation loss per domain" in html and "Routing by domain" in html
    if plots_mod.have_matplotlib():
        assert (run_dir / "plots" / "domains_moe.png").exists()

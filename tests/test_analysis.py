"""Routing analytics and the run report."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit import MoEConfig
from moekit.analysis import (coactivation, load_over_training, mutual_information, probe_routing, specialisation,
                             write_report)
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

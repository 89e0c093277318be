"""The run report: ``summary.json``, PNG plots and one self-contained ``report.html``.

`write_report(run_dir)` needs only the run folder: it reads each variant's ``result.json``
and ``metrics.jsonl``, reloads each MoE variant's final checkpoint, routes the validation
batches through it (`probe_routing`) and writes

- ``summary.json``: per variant validation loss (and per domain, for a multi-domain run),
  parameters (total, active), FLOPs per token, tokens/s, wall time and status; the equal-steps /
  equal-time comparison; routing analytics, with routing by domain (domain × expert shares,
  NMI, purity per layer) for a multi-domain run; each MoE layer's histogram of experts per
  token (how many tokens kept 0, 1, …, E experts) and its mean, plotted for routers whose
  count varies between tokens (top-p, ReLU, null experts … or capacity drops); each MoE
  layer's MaxVio on the validation batches, global and per batch (`max_vio`);
- ``plots/*.png`` (when matplotlib is installed) and ``report.html`` with the plots embedded
  as base64, so the page can be mailed or archived alone.
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Optional

import torch

from moekit.analysis.balance import max_vio
from moekit.analysis.plots import (
    have_matplotlib,
    plot_coactivation,
    plot_doc_specialisation,
    plot_domain_experts,
    plot_experts_per_token,
    plot_load_heatmap,
    plot_loss_curves,
    plot_max_vio,
    plot_token_specialisation,
)
from moekit.analysis.routing import (
    coactivation,
    domain_specialisation,
    experts_per_token_histogram,
    load_over_training,
    probe_routing,
    specialisation,
)
from moekit.train.compare import comparison_rows, comparison_table
from moekit.train.data import build_corpus, eval_batches
from moekit.train.experiment import load_results, load_run_config
from moekit.train.metrics import read_metrics

__all__ = ["write_report", "analyse_variant"]


def analyse_variant(checkpoint: os.PathLike, val_corpus, run, *, device: str = "cpu", sample_chars: int = 200):
    """Routing analytics (and a short text sample) of one trained variant; None without MoE layers."""
    from moekit.train.sample import load_model, suppressed_ids

    model, tok, _ = load_model(checkpoint, device)
    out = {}
    if any(getattr(b, "is_moe", False) for b in model.blocks):
        batches = eval_batches(val_corpus, seq_len=run.data.seq_len, batch_size=run.data.batch_size,
                               max_batches=run.train.eval_batches)
        probe = probe_routing(model, batches, num_docs=len(val_corpus.doc_names))
        names = [tok.token_str(i) for i in range(tok.vocab_size)]
        out["specialisation"] = specialisation(probe, token_names=names, doc_names=val_corpus.doc_names)
        out["coactivation"] = coactivation(probe)
        out["experts_per_token"] = experts_per_token_histogram(probe)
        out["max_vio"] = max_vio(probe.batch_counts)
        if val_corpus.num_domains > 1:
            out["domains"] = domain_specialisation(probe, val_corpus.doc_domains.tolist(), val_corpus.domain_names)
        out["_probe"] = probe
        out["_token_names"] = names
    if sample_chars:
        gen = torch.Generator().manual_seed(0)
        ids = tok.encode("\n")[None]
        with torch.no_grad():
            s = model.generate(ids, sample_chars, temperature=0.8, generator=gen, suppress_ids=suppressed_ids(tok))
        out["sample"] = tok.decode(s[0].tolist())
    return out


def _img(path: Optional[Path]) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def write_report(run_dir: os.PathLike, *, device: str = "cpu", samples: bool = True) -> dict:
    """Write summary.json, plots/ and report.html into `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    run = load_run_config(run_dir)
    results = load_results(run_dir)
    if not results:
        raise FileNotFoundError(f"{run_dir}: no finished variants (no */result.json)")
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    train_logs = {r["variant"]: read_metrics(run_dir / r["variant"] / "metrics.jsonl", kind="train") for r in results}

    analyses, loads = {}, {}
    val = None
    for r in results:
        if not r.get("checkpoint"):
            continue
        ckpt = run_dir / r["variant"] / "checkpoints"
        if val is None:
            from moekit.train.sample import load_model
            _, tok, _ = load_model(ckpt, device)
            _, _, val = build_corpus(run.data, tokenizer=tok)
        analyses[r["variant"]] = analyse_variant(ckpt, val, run, device=device, sample_chars=200 if samples else 0)
        loads[r["variant"]] = load_over_training(run_dir / r["variant"] / "metrics.jsonl")

    plots = {"loss": plot_loss_curves(results, train_logs, plots_dir / "loss_curves.png")}
    for name, a in analyses.items():
        if "specialisation" not in a:
            continue
        plots[f"load_{name}"] = plot_load_heatmap(loads[name], plots_dir / f"load_{name}.png",
                                                  title=f"{name}: expert load over training")
        spec = a["specialisation"]
        best = max(range(len(spec)), key=lambda j: spec[j]["nmi_doc"])
        plots[f"docs_{name}"] = plot_doc_specialisation(spec[best], val.doc_names, plots_dir / f"docs_{name}.png")
        probe = a["_probe"]
        tj = max(range(len(spec)), key=lambda j: spec[j]["nmi_token"])
        plots[f"tokens_{name}"] = plot_token_specialisation(probe.by_token[tj], a["_token_names"],
                                                            plots_dir / f"tokens_{name}.png", layer=probe.layers[tj])
        plots[f"coact_{name}"] = plot_coactivation(a["coactivation"], plots_dir / f"coact_{name}.png")
        if "domains" in a:
            plots[f"domains_{name}"] = plot_domain_experts(a["domains"], plots_dir / f"domains_{name}.png")
        if any(h["dynamic"] for h in a["experts_per_token"]):
            plots[f"experts_{name}"] = plot_experts_per_token(
                a["experts_per_token"], plots_dir / f"experts_{name}.png",
                title=f"{name}: experts per token (validation text); dashed: the mean")

    vio = {name: a["max_vio"] for name, a in analyses.items() if "max_vio" in a}
    if vio:
        plots["max_vio"] = plot_max_vio(vio, plots_dir / "max_vio.png",
                                        title="load imbalance on the validation batches (MaxVio)")
    comp = comparison_rows(results)
    summary = {
        "run": run.name, "config": run.to_dict(), "comparison": comp,
        "variants": {r["variant"]: {k: r.get(k) for k in (
            "status", "steps", "val_loss", "val_loss_by_domain", "params_total", "params_active",
            "flops_per_token_train",
            "flops_per_token_forward", "tokens_per_s", "train_time_s", "tokens_seen", "device")}
            for r in results},
        "routing": {name: {"layers": [{k: v for k, v in s.items() if k not in ("doc_share",)}
                                      for s in a["specialisation"]],
                           "coactivation": [{k: c[k] for k in ("from_layer", "to_layer", "mi", "nmi")}
                                            for c in a["coactivation"]],
                           "experts_per_token": a["experts_per_token"],
                           "max_vio": a["max_vio"],
                           **({"domains": a["domains"]} if "domains" in a else {})}
                    for name, a in analyses.items() if "specialisation" in a},
        "plots": {k: str(v.relative_to(run_dir)) for k, v in plots.items() if v is not None},
    }
    summary_path = run_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    html_path = run_dir / "report.html"
    html_path.write_text(_html(run, results, comparison_table(results), analyses, plots))
    return {"summary": summary_path, "html": html_path, "plots": [p for p in plots.values() if p is not None]}


def _domain_loss_html(domains: dict) -> list:
    """Per-domain validation loss, one row per variant, at equal steps and at equal time."""
    e = html.escape
    names = domains["names"]
    out = ["<h2>Validation loss per domain</h2>"]
    for key, what in (("equal_steps", "equal steps"), ("equal_time", "equal wall time")):
        out.append(f"<p>At {what} (nats per token):</p><table><tr><th>variant</th>"
                   + "".join(f"<th>{e(d)}</th>" for d in names) + "</tr>")
        for r in domains[key]:
            cells = "".join("<td>-</td>" if r["val_loss"][d] is None else f"<td>{r['val_loss'][d]:.4f}</td>"
                            for d in names)
            out.append(f"<tr><td>{e(r['variant'])}</td>{cells}</tr>")
        out.append("</table>")
    return out


def _domain_html(spec: list, plot) -> list:
    """Routing by domain: the heatmap and, per layer, NMI, purity and each expert's top domain."""
    e = html.escape
    out = ["<h3>Routing by domain</h3>",
           "<p>Each cell: the percentage of a domain's routed tokens (validation text) that go to an expert. "
           "NMI = I(domain; expert) / H(domain): 0 when the expert chosen says nothing about the domain, 1 when "
           f"every expert serves a single domain. Purity: the share of an expert's load from its top domain, "
           f"averaged over experts by load (chance: {spec[0]['chance_purity']:.2f}).</p>", _img(plot),
           "<table><tr><th>layer</th><th>I(domain; expert) nats</th><th>NMI</th><th>purity</th>"
           "<th>top domain of each expert (its share of the expert's load)</th></tr>"]
    for s in spec:
        tops = " ".join(f"{k}:{e(d)}({p:.2f})" for k, (d, p) in enumerate(zip(s["top_domain"], s["purity_expert"])))
        out.append(f"<tr><td>{s['layer']}</td><td>{s['mi']:.3f}</td><td>{s['nmi']:.3f}</td>"
                   f"<td>{s['purity']:.2f}</td><td><code>{tops}</code></td></tr>")
    out.append("</table>")
    return out


def _experts_html(hist: list, plot) -> list:
    """Experts per token: the per-layer histogram plot and its numbers."""
    E = len(hist[0]["counts"]) - 1
    out = ["<h3>Experts per token</h3>",
           "<p>How many experts each validation token kept in each MoE layer (this router picks its own "
           "count, or capacity dropped pairs). FLOPs and active parameters follow the mean.</p>", _img(plot),
           "<table><tr><th>layer</th><th>mean</th>" + "".join(f"<th>{n}</th>" for n in range(E + 1)) + "</tr>"]
    for h in hist:
        cells = "".join(f"<td>{100 * v:.1f}%</td>" for v in h["share"])
        out.append(f"<tr><td>{h['layer']}</td><td>{h['mean']:.3f}</td>{cells}</tr>")
    out.append("</table>")
    return out


def _html(run, results, table: str, analyses: dict, plots: dict) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>moekit run {e(run.name)}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "pre{background:#f5f5f5;padding:1em;overflow-x:auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
             "</style></head><body>",
             f"<h1>moekit run <code>{e(run.name)}</code></h1>",
             "<h2>Comparison</h2>", f"<pre>{e(table)}</pre>"]
    domains = comparison_rows(results).get("domains")
    if domains:
        parts += _domain_loss_html(domains)
    if not have_matplotlib():
        parts.append("<p><em>matplotlib is not installed: no plots (pip install 'moekit[plots]').</em></p>")
    parts += ["<h2>Loss curves</h2>", _img(plots.get("loss"))]
    if plots.get("max_vio"):
        parts += ["<h2>Load balance (MaxVio)</h2>", _img(plots.get("max_vio"))]
    for name, a in analyses.items():
        if "specialisation" not in a:
            continue
        parts.append(f"<h2>Routing of <code>{e(name)}</code></h2>")
        if "domains" in a:
            parts += _domain_html(a["domains"], plots.get(f"domains_{name}"))
        if any(h["dynamic"] for h in a["experts_per_token"]):
            parts += _experts_html(a["experts_per_token"], plots.get(f"experts_{name}"))
        parts += [_img(plots.get(f"load_{name}")), _img(plots.get(f"tokens_{name}")),
                  _img(plots.get(f"docs_{name}")), _img(plots.get(f"coact_{name}"))]
        parts.append("<table><tr><th>layer</th><th>NMI(expert; token)</th><th>NMI(expert; document)</th>"
                     "<th>dropped</th><th>MaxVio global</th><th>MaxVio per batch</th>"
                     "<th>load share per expert</th></tr>")
        vio = a.get("max_vio", {"global": [], "batch": []})
        for j, s in enumerate(a["specialisation"]):
            share = " ".join(f"{v:.2f}" for v in s["load_share"])
            g, b = (f"{vio[k][j]:.3f}" if j < len(vio[k]) else "" for k in ("global", "batch"))
            parts.append(f"<tr><td>{s['layer']}</td><td>{s['nmi_token']:.3f}</td><td>{s['nmi_doc']:.3f}</td>"
                         f"<td>{s['dropped']}</td><td>{g}</td><td>{b}</td><td><code>{share}</code></td></tr>")
        parts.append("</table>")
        s0 = a["specialisation"][0]
        parts.append(f"<h3>Layer {s0['layer']}: tokens and documents each expert prefers (lift)</h3><table>"
                     "<tr><th>expert</th><th>tokens</th><th>documents</th></tr>")
        for ex, (toks, docs) in enumerate(zip(s0["top_tokens"], s0["top_docs"])):
            t = " ".join(f"{e(repr(x['item']))}×{x['lift']:.1f}" for x in toks)
            d = ", ".join(f"{e(x['item'])}×{x['lift']:.2f}" for x in docs)
            parts.append(f"<tr><td>{ex}</td><td><code>{t}</code></td><td>{d}</td></tr>")
        parts.append("</table>")
    samples = [(n, a["sample"]) for n, a in analyses.items() if a.get("sample")]
    if samples:
        parts.append("<h2>Samples (temperature 0.8)</h2>")
        for n, s in samples:
            parts.append(f"<h3>{e(n)}</h3><pre>{e(s)}</pre>")
    parts.append(f"<h2>Configuration</h2><pre>{e(run.to_json())}</pre></body></html>")
    return "\n".join(parts)

"""Routing analytics: what the routers of a trained model did, over training and on held-out text.

Legend: L MoE layers, E experts, V vocabulary, P documents (plays), G domains.

- `load_over_training(metrics.jsonl)`: per layer and expert, the share of routed pairs in each
  logging interval, with load imbalance (max/mean), drop fraction and router entropy.
- `probe_routing(model, batches)`: runs the model in eval mode on ``(x, y, doc)`` batches and
  counts, per MoE layer, routed pairs by (expert, token id) and (expert, document), plus each
  token's top-1 expert (the pair with the largest weight) for co-activation across layers.
- `specialisation(probe, ...)`: which tokens and which documents each expert prefers, by lift
  ``P(x | e) / P(x)``, and the mutual information ``I(expert; token)``, ``I(expert; document)``
  normalised by ``H(expert)`` (0: routing ignores it; 1: routing is a function of it).
- `domain_specialisation(probe, doc_domains, domain_names)`: which experts each domain
  (a group of documents: plays, speeches, code) uses — the domain × expert share matrix, the
  mutual information ``I(domain; expert)`` normalised by ``H(domain)`` (1: each expert serves
  one domain) and each expert's purity (the share of its load from its top domain).
- `experts_per_token_histogram(probe)`: per layer, how many tokens kept 0, 1, …, E experts —
  the compute each token actually used under routers that pick their own count (top-p, ReLU,
  null experts, dense-to-sparse …) or drop pairs by capacity.
- `coactivation(probe)`: joint counts of top-1 experts in consecutive MoE layers and their
  normalised mutual information (do tokens follow fixed expert paths through depth?).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from moekit.train.metrics import read_metrics

__all__ = ["load_over_training", "RoutingProbe", "probe_routing", "mutual_information", "specialisation",
           "domain_specialisation", "coactivation", "experts_per_token_histogram"]


def load_over_training(metrics_path) -> dict:
    """``{"steps": [n], "layers": [L], "fraction": (n, L, E) list, "load_imbalance": (n, L),
    "drop_fraction": (n, L), "router_entropy": (n, L), "experts_per_token": (n, L)}`` from the
    ``routing`` records (``experts_per_token`` is empty for records written before it existed)."""
    recs = read_metrics(metrics_path, kind="routing")
    if not recs:
        return {"steps": [], "layers": [], "fraction": [], "load_imbalance": [], "drop_fraction": [],
                "router_entropy": [], "experts_per_token": []}
    layers = recs[0]["layers"]
    frac = []
    for r in recs:
        c = np.asarray(r["tokens_per_expert"], dtype=np.float64)          # (L, E)
        frac.append((c / np.maximum(c.sum(-1, keepdims=True), 1)).tolist())
    return {"steps": [r["step"] for r in recs], "layers": layers, "fraction": frac,
            "load_imbalance": [r["load_imbalance"] for r in recs],
            "drop_fraction": [r["drop_fraction"] for r in recs],
            "router_entropy": [r["router_entropy"] for r in recs],
            "experts_per_token": [r["experts_per_token"] for r in recs] if all("experts_per_token" in r for r in recs)
            else []}


@dataclass
class RoutingProbe:
    """Counts from `probe_routing`. Arrays are numpy int64.

    layers: block index of each MoE layer. by_token: (L, E, V). by_doc: (L, E, P).
    top1: (L, T) top-1 expert of every probed token (-1 if all its pairs were dropped).
    tokens: (T,) token ids; docs: (T,) document ids. dropped: (L,) pairs dropped.
    experts_hist: (L, E + 1) tokens that kept exactly n = 0 … E experts in each layer.
    batch_counts: (B, L, E) routed pairs per expert in each probed batch (for `max_vio`).
    coact: (L, E, E) tokens whose kept experts include both i and j (diagonal: tokens of i) —
    `moekit.analysis.expert_coactivation`'s counts over the probed tokens.
    """

    layers: list
    num_experts: int
    by_token: np.ndarray
    by_doc: np.ndarray
    top1: np.ndarray
    tokens: np.ndarray
    docs: np.ndarray
    dropped: np.ndarray
    entropy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    experts_hist: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    batch_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.int64))
    coact: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.int64))


@torch.no_grad()
def probe_routing(model, batches: Sequence, *, num_docs: int, device: Optional[torch.device] = None) -> RoutingProbe:
    """Route `batches` of ``(x_BS, y_BS, doc_BS)`` through `model` (eval mode) and count."""
    blocks = [(i, b.ffn) for i, b in enumerate(model.blocks) if getattr(b, "is_moe", False)]
    if not blocks:
        raise ValueError("the model has no MoE layers to analyse")
    E = blocks[0][1].num_experts
    V = model.config.vocab_size
    L = len(blocks)
    device = device or next(model.parameters()).device
    by_token = np.zeros((L, E, V), dtype=np.int64)
    by_doc = np.zeros((L, E, num_docs), dtype=np.int64)
    top1, toks, docs = [[] for _ in range(L)], [], []
    dropped = np.zeros(L, dtype=np.int64)
    entropy = np.zeros(L)
    experts_hist = np.zeros((L, E + 1), dtype=np.int64)
    batch_counts = np.zeros((len(batches), L, E), dtype=np.int64)
    coact = np.zeros((L, E, E), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        for b, (x, _, doc) in enumerate(batches):
            model(x.to(device))
            tok_T = x.reshape(-1).cpu()
            doc_T = doc.reshape(-1).cpu()
            T = tok_T.numel()
            toks.append(tok_T.numpy())
            docs.append(doc_T.numpy())
            for j, (_, moe) in enumerate(blocks):
                r = moe.last_routing.compact()
                t_N, e_N, w_N = r.token_ids.cpu(), r.expert_ids.cpu(), r.weights.detach().float().cpu()
                np.add.at(by_token[j], (e_N.numpy(), tok_T[t_N].numpy()), 1)
                np.add.at(by_doc[j], (e_N.numpy(), doc_T[t_N].numpy()), 1)
                # top-1 expert per token: the kept pair with the largest weight (ties: lowest expert).
                best_w = torch.full((T,), -float("inf"))
                best_w.scatter_reduce_(0, t_N, w_N, reduce="amax")
                is_best = w_N == best_w[t_N]
                best_e = torch.full((T,), E, dtype=torch.long)
                best_e.scatter_reduce_(0, t_N[is_best], e_N[is_best], reduce="amin")
                top1[j].append(torch.where(best_e == E, -1, best_e).numpy())
                dropped[j] += int(r.dropped)
                experts_hist[j] += torch.bincount(torch.bincount(t_N, minlength=T), minlength=E + 1).numpy()
                batch_counts[b, j] = torch.bincount(e_N, minlength=E).numpy()
                onehot_TE = torch.zeros(T, E, dtype=torch.long)
                onehot_TE[t_N, e_N] = 1
                coact[j] += (onehot_TE.t() @ onehot_TE).numpy()
                if moe.last_stats is not None and moe.last_stats.router_entropy is not None:
                    entropy[j] += float(moe.last_stats.router_entropy) / len(batches)
    finally:
        model.train(was_training)
    return RoutingProbe(layers=[i for i, _ in blocks], num_experts=E, by_token=by_token, by_doc=by_doc,
                        top1=np.stack([np.concatenate(t) for t in top1]), tokens=np.concatenate(toks),
                        docs=np.concatenate(docs), dropped=dropped, entropy=entropy, experts_hist=experts_hist,
                        batch_counts=batch_counts, coact=coact)


def mutual_information(joint: np.ndarray) -> tuple[float, float]:
    """``(I(A; B), I / H(A))`` in nats for a joint count matrix with A on rows.

    ``I = Σ p(a,b) log(p(a,b) / (p(a) p(b)))``; the ratio is 0 when H(A) = 0.
    """
    joint = np.asarray(joint, dtype=np.float64)
    n = joint.sum()
    if n <= 0:
        return 0.0, 0.0
    p = joint / n
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    return max(mi, 0.0), (max(mi, 0.0) / ha if ha > 0 else 0.0)


def _top_by_lift(counts_EX: np.ndarray, names, top: int, min_count: int) -> list[list[dict]]:
    """Per expert: the `top` items with the highest lift P(x|e)/P(x) among items seen ≥ min_count."""
    total_X = counts_EX.sum(0).astype(np.float64)
    p_X = total_X / max(total_X.sum(), 1)
    out = []
    for e in range(counts_EX.shape[0]):
        c = counts_EX[e].astype(np.float64)
        n_e = c.sum()
        if n_e == 0:
            out.append([])
            continue
        lift = np.where((total_X >= min_count) & (p_X > 0), (c / n_e) / np.maximum(p_X, 1e-12), 0.0)
        order = np.argsort(-lift, kind="stable")[:top]
        out.append([{"item": names[i], "lift": float(lift[i]), "share_of_item": float(c[i] / total_X[i])}
                    for i in order if lift[i] > 0])
    return out


def specialisation(probe: RoutingProbe, *, token_names: Sequence[str], doc_names: Sequence[str],
                   top: int = 8, min_count: int = 20) -> list[dict]:
    """Per MoE layer: load share per expert, the tokens and documents each expert prefers (by
    lift) and the normalised mutual information of expert choice with token and document."""
    out = []
    for j, layer in enumerate(probe.layers):
        bt, bd = probe.by_token[j], probe.by_doc[j]
        mi_t, nmi_t = mutual_information(bt)
        mi_d, nmi_d = mutual_information(bd)
        load = bt.sum(1)
        out.append({
            "layer": layer,
            "load_share": (load / max(load.sum(), 1)).tolist(),
            "mi_token": mi_t, "nmi_token": nmi_t, "mi_doc": mi_d, "nmi_doc": nmi_d,
            "top_tokens": _top_by_lift(bt, list(token_names), top, min_count),
            "top_docs": _top_by_lift(bd, list(doc_names), min(top, 3), min_count),
            "doc_share": (bd / np.maximum(bd.sum(0, keepdims=True), 1)).T.tolist(),   # (P, E)
            "dropped": int(probe.dropped[j]),
        })
    return out


def domain_specialisation(probe: RoutingProbe, doc_domains: Sequence[int], domain_names: Sequence[str]) -> list[dict]:
    """Per MoE layer, how routing depends on the domain of a token's document:

    - ``share`` (G, E): the share of each domain's routed pairs that go to each expert (rows
      sum to 1; uniform routing gives ``1/E`` everywhere);
    - ``mi`` and ``nmi``: ``I(domain; expert)`` in nats over routed pairs and ``I / H(domain)``
      (0: the expert says nothing about the domain; 1: every expert serves a single domain);
    - ``top_domain`` (E,) and ``purity_expert`` (E,): each expert's most frequent domain and the
      share of its load from it; ``purity``: the load-weighted mean of ``purity_expert``
      (chance level: the largest domain's share of the pairs, ``chance_purity``).
    """
    doc_domains = np.asarray(doc_domains, dtype=np.int64)
    G = len(domain_names)
    if doc_domains.shape != (probe.by_doc.shape[2],):
        raise ValueError(f"doc_domains must have one entry per document ({probe.by_doc.shape[2]}), "
                         f"got shape {doc_domains.shape}")
    if len(doc_domains) and (doc_domains.min() < 0 or doc_domains.max() >= G):
        raise ValueError(f"doc_domains must index domain_names (0..{G - 1}), got values "
                         f"{doc_domains.min()}..{doc_domains.max()}")
    onehot_PG = np.eye(G, dtype=np.int64)[doc_domains]
    out = []
    for j, layer in enumerate(probe.layers):
        counts_GE = (probe.by_doc[j] @ onehot_PG).T                        # (G, E) routed pairs
        mi, nmi = mutual_information(counts_GE)
        load_E = counts_GE.sum(0)
        top_E = counts_GE.argmax(0)
        purity_E = counts_GE.max(0) / np.maximum(load_E, 1)
        dom_G = counts_GE.sum(1)
        out.append({
            "layer": layer, "domains": list(domain_names), "counts": counts_GE.tolist(),
            "share": (counts_GE / np.maximum(dom_G[:, None], 1)).tolist(),
            "mi": mi, "nmi": nmi,
            "top_domain": [domain_names[g] for g in top_E.tolist()], "purity_expert": purity_E.tolist(),
            "purity": float((purity_E * load_E).sum() / max(load_E.sum(), 1)),
            "chance_purity": float(dom_G.max() / max(dom_G.sum(), 1)),
        })
    return out


def coactivation(probe: RoutingProbe) -> list[dict]:
    """For each pair of consecutive MoE layers: the (E, E) joint counts of top-1 experts
    (rows: earlier layer) over tokens routed in both, and its normalised mutual information."""
    out = []
    E = probe.num_experts
    for j in range(len(probe.layers) - 1):
        a, b = probe.top1[j], probe.top1[j + 1]
        ok = (a >= 0) & (b >= 0)
        joint = np.zeros((E, E), dtype=np.int64)
        np.add.at(joint, (a[ok], b[ok]), 1)
        mi, nmi = mutual_information(joint)
        out.append({"from_layer": probe.layers[j], "to_layer": probe.layers[j + 1], "joint": joint.tolist(),
                    "mi": mi, "nmi": nmi})
    return out


def experts_per_token_histogram(probe: RoutingProbe) -> list[dict]:
    """Per MoE layer, the distribution of kept experts per token over the probed tokens:

    - ``counts`` (E + 1,): tokens that kept exactly n = 0, 1, …, E experts; ``share``: the same
      as fractions of the tokens;
    - ``mean``: mean experts per token (what the layer's FLOPs and active parameters scale with);
    - ``dynamic``: whether the count varies between tokens (more than one non-empty bin) — true
      for routers that pick their own count, and for fixed-K routers that drop pairs by capacity.
    """
    if probe.experts_hist.shape[0] != len(probe.layers):
        raise ValueError(f"the probe holds no experts-per-token counts for its {len(probe.layers)} layers "
                         f"(experts_hist shape {probe.experts_hist.shape})")
    out = []
    for j, layer in enumerate(probe.layers):
        c = probe.experts_hist[j].astype(np.int64)
        n = max(int(c.sum()), 1)
        out.append({"layer": layer, "counts": c.tolist(), "share": (c / n).tolist(),
                    "mean": float((np.arange(len(c)) * c).sum() / n), "dynamic": int((c > 0).sum()) > 1})
    return out

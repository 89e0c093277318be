"""PNG plots of a run (matplotlib, an optional extra: without it every function returns None).

Each function writes one figure and returns its path. Expert axes carry integer ticks only,
and every figure is laid out (constrained layout, rotated token labels, sizes that grow with
the number of labels) so that no two labels overlap; tests draw each figure and check both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["have_matplotlib", "plot_loss_curves", "plot_load_heatmap", "plot_doc_specialisation",
           "plot_domain_experts", "plot_token_specialisation", "plot_coactivation", "plot_experts_per_token",
           "plot_max_vio", "plot_expert_coactivation"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _integer_ticks(axis, n: int) -> None:
    """Integer ticks on an expert (or other index) axis of `n` positions: each one when they fit,
    else a subset chosen by matplotlib, never a fraction."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=min(n, 16), integer=True, min_n_ticks=1))


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _smooth(y: np.ndarray, k: int = 5) -> np.ndarray:
    if len(y) < k:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_loss_curves(results: Sequence[dict], train_logs: dict, path) -> Optional[Path]:
    """Validation loss vs step and vs training time, and smoothed training loss, per variant."""
    plt = _plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        ev = r.get("evals", [])
        if ev:
            axes[0].plot([e["step"] for e in ev], [e["val_loss"] for e in ev], marker="o", ms=3, label=r["variant"])
            axes[1].plot([e["train_time"] for e in ev], [e["val_loss"] for e in ev], marker="o", ms=3,
                         label=r["variant"])
        tr = train_logs.get(r["variant"], [])
        if tr:
            steps = np.array([t["step"] for t in tr])
            loss = np.array([t["ce"] for t in tr], dtype=float)
            k = min(5, len(loss))
            axes[2].plot(steps[k - 1:], _smooth(loss, k), label=r["variant"])
    for ax, (xl, title) in zip(axes, [("step", "validation loss vs steps"), ("training time (s)",
                                                                              "validation loss vs wall time"),
                                      ("step", "training cross-entropy (smoothed)")]):
        ax.set_xlabel(xl)
        ax.set_ylabel("nats / token")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_load_heatmap(load: dict, path, title: str = "") -> Optional[Path]:
    """Share of routed pairs per expert (rows) over training (columns), one panel per MoE layer."""
    plt = _plt()
    if plt is None or not load.get("steps"):
        return None
    return _save(_load_heatmap_figure(plt, load, title), path)


def _load_heatmap_figure(plt, load: dict, title: str = ""):
    frac = np.asarray(load["fraction"])                                   # (n, L, E)
    L = frac.shape[1]
    E = frac.shape[2]
    fig, axes = plt.subplots(1, L, figsize=(3.2 * L + 1.5, max(3.2, 0.16 * min(E, 16) + 1.5)), squeeze=False,
                             layout="constrained")
    for j in range(L):
        ax = axes[0, j]
        im = ax.imshow(frac[:, j, :].T, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0 / E, frac.max()),
                       extent=[load["steps"][0], load["steps"][-1], E - 0.5, -0.5], interpolation="nearest")
        ax.set_title(f"layer {load['layers'][j]}")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        _integer_ticks(ax.yaxis, E)
        _integer_ticks(ax.xaxis, 4)           # steps: a few integer ticks
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of routed pairs")
    fig.suptitle(title or f"expert load over training (uniform = {1 / E:.3f})")
    return fig


def plot_doc_specialisation(spec: dict, doc_names: Sequence[str], path, title: str = "") -> Optional[Path]:
    """Share of each document's routed pairs going to each expert (rows: documents)."""
    plt = _plt()
    if plt is None:
        return None
    return _save(_doc_specialisation_figure(plt, spec, doc_names, title), path)


def _doc_specialisation_figure(plt, spec: dict, doc_names: Sequence[str], title: str = ""):
    share = np.asarray(spec["doc_share"])                                  # (P, E)
    keep = share.sum(1) > 0
    share = share[keep]
    names = [n for n, k in zip(doc_names, keep) if k]
    title = title or f"layer {spec['layer']}: documents → experts (NMI {spec['nmi_doc']:.3f})"
    # Wide enough for the title and the experts, tall enough for one 8-pt name per row.
    fig, ax = plt.subplots(figsize=(max(1 + 0.5 * min(share.shape[1], 32), 0.09 * len(title) + 1.5),
                                    1.5 + 0.18 * len(names)), layout="constrained")
    im = ax.imshow(share, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("expert")
    _integer_ticks(ax.xaxis, share.shape[1])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of the document's pairs")
    return fig


def plot_domain_experts(domain_spec: Sequence[dict], path, title: str = "") -> Optional[Path]:
    """Domain × expert heatmaps, one panel per MoE layer (`domain_specialisation` output): each
    cell is the percentage of the domain's routed tokens that go to the expert, written in it."""
    plt = _plt()
    if plt is None or not domain_spec:
        return None
    return _save(_domain_experts_figure(plt, domain_spec, title), path)


def _domain_experts_figure(plt, domain_spec: Sequence[dict], title: str = ""):
    L = len(domain_spec)
    names = domain_spec[0]["domains"]
    G, E = np.asarray(domain_spec[0]["share"]).shape
    cols = min(L, 4)
    rows = -(-L // cols)
    # One 0.42-in column per expert (room for a two-digit percentage), panels at least as wide as
    # their title, and one 0.42-in row per domain.
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (max(0.42 * E, 2.4) + 0.9) + 1.6 + 0.07 * max(map(len, names)),
                                                  rows * (0.42 * G + 1.2) + 0.8),
                             squeeze=False, layout="constrained")
    vmax = max(float(np.max(s["share"])) for s in domain_spec)
    for k, spec in enumerate(domain_spec):
        ax = axes[k // cols, k % cols]
        share = np.asarray(spec["share"])
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        for g in range(G):
            for e in range(E):
                v = share[g, e]
                ax.text(e, g, f"{100 * v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v > 0.6 * vmax else "black")
        ax.set_title(f"layer {spec['layer']}: NMI {spec['nmi']:.2f}, purity {spec['purity']:.2f}", fontsize=9)
        ax.set_yticks(range(G), names if k % cols == 0 else [""] * G, fontsize=9)
        ax.set_xlabel("expert")
        _integer_ticks(ax.xaxis, E)
    for k in range(L, rows * cols):
        axes[k // cols, k % cols].set_visible(False)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the domain's routed tokens")
    fig.suptitle(title or f"Which experts each domain uses (% of its routed tokens; uniform = {100 / E:.1f} %)")
    return fig


def plot_token_specialisation(by_token_EV: np.ndarray, token_names: Sequence[str], path, *, layer: int,
                              top: int = 40) -> Optional[Path]:
    """Share of each frequent token's pairs per expert (columns: the `top` most frequent tokens)."""
    plt = _plt()
    if plt is None:
        return None
    return _save(_token_specialisation_figure(plt, by_token_EV, token_names, layer=layer, top=top), path)


def _token_specialisation_figure(plt, by_token_EV, token_names: Sequence[str], *, layer: int, top: int = 40):
    c = np.asarray(by_token_EV, dtype=np.float64)
    freq = c.sum(0)
    order = np.argsort(-freq, kind="stable")[:top]
    order = order[freq[order] > 0]
    share = c[:, order] / np.maximum(freq[order], 1)
    labels = [repr(token_names[i])[1:-1] or "?" for i in order]
    E = c.shape[0]
    title = f"layer {layer}: which expert each frequent token goes to"
    # Token labels stand vertically, one 8-pt line (0.14 in) per 0.2 in column: escapes such as
    # \\x9f are wider than a column and would overlap lying flat.
    fig, ax = plt.subplots(figsize=(max(1.5 + 0.2 * len(order), 0.09 * len(title) + 1.5),
                                    1.5 + 0.16 * min(E, 32) + 0.07 * max(map(len, labels), default=1)),
                           layout="constrained")
    im = ax.imshow(share, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(order)), labels, fontsize=8, family="monospace", rotation=90)
    ax.set_ylabel("expert")
    _integer_ticks(ax.yaxis, E)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of the token's pairs")
    return fig


def plot_coactivation(coact: Sequence[dict], path) -> Optional[Path]:
    """P(top-1 expert in the next MoE layer | top-1 expert in this one), one panel per pair."""
    plt = _plt()
    if plt is None or not coact:
        return None
    return _save(_coactivation_figure(plt, coact), path)


def _coactivation_figure(plt, coact: Sequence[dict]):
    fig, axes = plt.subplots(1, len(coact), figsize=(3.4 * len(coact) + 1, 3.4), squeeze=False,
                             layout="constrained")
    for ax, c in zip(axes[0], coact):
        j = np.asarray(c["joint"], dtype=np.float64)
        cond = j / np.maximum(j.sum(1, keepdims=True), 1)
        im = ax.imshow(cond, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"L{c['from_layer']}→L{c['to_layer']} (NMI {c['nmi']:.2f})", fontsize=9)
        ax.set_xlabel(f"expert in layer {c['to_layer']}")
        ax.set_ylabel(f"expert in layer {c['from_layer']}")
        _integer_ticks(ax.xaxis, cond.shape[1])
        _integer_ticks(ax.yaxis, cond.shape[0])
    fig.colorbar(im, ax=axes.ravel().tolist(), label="P(next | this)")
    return fig


def plot_experts_per_token(hist: Sequence[dict], path, title: str = "") -> Optional[Path]:
    """Share of tokens that kept 0, 1, …, E experts, one panel per MoE layer (the entries of
    `moekit.analysis.experts_per_token_histogram`), with each layer's mean marked."""
    plt = _plt()
    if plt is None or not hist:
        return None
    return _save(_experts_per_token_figure(plt, hist, title), path)


def _experts_per_token_figure(plt, hist: Sequence[dict], title: str = ""):
    L = len(hist)
    fig, axes = plt.subplots(1, L, figsize=(3.0 * L + 1, 3.2), squeeze=False, sharey=True, layout="constrained")
    for ax, h in zip(axes[0], hist):
        share = np.asarray(h["share"], dtype=np.float64)
        ax.bar(np.arange(len(share)), share, color="tab:blue", width=0.8)
        ax.axvline(h["mean"], color="tab:red", ls="--", lw=1)
        ax.set_title(f"layer {h['layer']}: mean {h['mean']:.2f}", fontsize=9)
        ax.set_xlabel("experts per token")
        _integer_ticks(ax.xaxis, len(share))
        ax.set_xlim(-0.6, len(share) - 0.4)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("share of tokens")
    fig.suptitle(title or "experts per token (validation text); dashed: the mean")
    return fig


def plot_max_vio(by_variant: dict, path, title: str = "") -> Optional[Path]:
    """Per-layer MaxVio of several variants: ``{name: {"global": [L], "batch": [L]}}`` (the
    output of `moekit.analysis.max_vio`), grouped bars, one panel for each scope."""
    plt = _plt()
    if plt is None or not by_variant:
        return None
    return _save(_max_vio_figure(plt, by_variant, title), path)


def _max_vio_figure(plt, by_variant: dict, title: str = ""):
    names = list(by_variant)
    L = len(next(iter(by_variant.values()))["global"])
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(4.0 + 0.9 * L * len(names) / 2, 3.4), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, scope in zip(axes[0], ("global", "batch")):
        for i, n in enumerate(names):
            v = np.asarray(by_variant[n][scope], dtype=np.float64)
            ax.bar(np.arange(L) + (i - (len(names) - 1) / 2) * width, v, width=width, label=n)
        ax.set_title(f"MaxVio, {scope}" + (" (mean over batches)" if scope == "batch" else ""), fontsize=9)
        ax.set_xlabel("MoE layer")
        _integer_ticks(ax.xaxis, L)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("max load / mean load − 1")
    axes[0, 1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title or "load imbalance per layer (0 = perfect balance)")
    return fig


def plot_expert_coactivation(coact: dict, path, title: str = "") -> Optional[Path]:
    """Within-layer co-activation lift ``P(i, j) / (P(i) P(j))`` (`moekit.analysis.expert_coactivation`)."""
    plt = _plt()
    if plt is None or not coact:
        return None
    return _save(_expert_coactivation_figure(plt, coact, title), path)


def _expert_coactivation_figure(plt, coact: dict, title: str = ""):
    lift = np.asarray(coact["lift"], dtype=np.float64)
    E = lift.shape[0]
    fig, ax = plt.subplots(figsize=(3.2 + 0.12 * E, 2.8 + 0.12 * E), layout="constrained")
    im = ax.imshow(lift, cmap="magma", vmin=0, vmax=max(2.0, float(lift.max())), interpolation="nearest")
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
    _integer_ticks(ax.xaxis, E)
    _integer_ticks(ax.yaxis, E)
    fig.colorbar(im, ax=ax, label="lift over independence")
    ax.set_title(title or "experts chosen together", fontsize=9)
    return fig

"""Compare trained variants at equal steps and at equal wall-clock time (plain-text tables).

Equal steps: each variant's validation loss at the last step all of them reached (their eval
points are the same steps). Equal time: ``T* = min_v train_time_v``; each variant's validation
loss at ``T*`` is linearly interpolated between its two evaluations around ``T*`` (training
time only; evaluation and checkpoint time excluded). A variant with no point at ``T*`` (its
first evaluation came later, or it has none yet) gets a row that says so instead of a number.

Runs on several domains (``data.source = "domains"``) also get both comparisons per domain,
from each evaluation's ``val_loss_by_domain``.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["loss_at_step", "loss_at_time", "domain_names", "comparison_rows", "format_table", "comparison_table",
           "mean_experts_per_token"]


def _loss(e: dict, domain: Optional[str]) -> Optional[float]:
    return e["val_loss"] if domain is None else (e.get("val_loss_by_domain") or {}).get(domain)


def loss_at_step(result: dict, step: int, domain: Optional[str] = None) -> Optional[float]:
    """Validation loss at `step` (of one `domain` when given), None if not evaluated there."""
    for e in result.get("evals", []):
        if e["step"] == step:
            return _loss(e, domain)
    return None


def loss_at_time(result: dict, t: float, domain: Optional[str] = None) -> Optional[float]:
    """Validation loss (of one `domain` when given) at training time `t` (linear between
    evaluations; None before the first)."""
    evals = result.get("evals", [])
    prev = None
    for e in evals:
        if e["train_time"] >= t:
            if e["train_time"] == t or prev is None:
                return _loss(e, domain) if e["train_time"] == t else None
            a, b = _loss(prev, domain), _loss(e, domain)
            if a is None or b is None:
                return None
            w = (t - prev["train_time"]) / (e["train_time"] - prev["train_time"])
            return a + w * (b - a)
        prev = e
    return _loss(evals[-1], domain) if evals and abs(evals[-1]["train_time"] - t) < 1e-9 else None


def domain_names(results: Sequence[dict]) -> list:
    """The domains named in the evaluations of `results`, in first-seen order ([] for one domain)."""
    names: list = []
    for r in results:
        for e in r.get("evals", []):
            for d in e.get("val_loss_by_domain") or {}:
                if d not in names:
                    names.append(d)
    return names


def _reference(results: Sequence[dict]) -> dict:
    for r in results:
        if r["variant"] == "dense" or r.get("model", {}).get("moe_layers") == "none":
            return r
    return results[0]


def _no_point(r: dict, t_star: float) -> Optional[str]:
    """Why variant `r` has no validation loss at training time `t_star`, or None if it has one."""
    evals = r.get("evals") or []
    if not evals:
        return f"not evaluated yet (step {r.get('steps', 0)}, {r.get('status', 'unknown')})"
    first = evals[0]["train_time"]
    if first > t_star + 1e-9:
        return f"first evaluation at {first:.1f} s (step {evals[0]['step']}), after {t_star:.1f} s"
    return None


def comparison_rows(results: Sequence[dict]) -> dict:
    """``{"equal_steps": {...}, "equal_time": {...}}`` with one row per variant; each equal-time
    row has a ``note`` saying why it has no loss (None when it has one)."""
    pending = [r for r in results if not r.get("evals")]
    results = [r for r in results if r.get("evals")]
    if not results:
        return {"equal_steps": {"step": None, "rows": []}, "equal_time": {"time_s": None, "rows": []}}
    common = set.intersection(*({e["step"] for e in r["evals"]} for r in results))
    step = max(common) if common else None
    t_star = min(r["evals"][-1]["train_time"] for r in results)
    ref = _reference(results)
    ref_step = loss_at_step(ref, step) if step is not None else None
    ref_time = loss_at_time(ref, t_star)
    rows_s, rows_t = [], []
    for r in results:
        ls = loss_at_step(r, step) if step is not None else None
        lt = loss_at_time(r, t_star)
        steps_at_t = None
        for e in r["evals"]:
            if e["train_time"] <= t_star + 1e-9:
                steps_at_t = e["step"]
        # steps reached by t* (interpolated from the evaluation points' times)
        rows_s.append({"variant": r["variant"], "val_loss": ls,
                       "delta": None if ls is None or ref_step is None else ls - ref_step,
                       "params_total": r.get("params_total"), "params_active": r.get("params_active"),
                       "experts_per_token": mean_experts_per_token(r),
                       "flops_per_token": r.get("flops_per_token_train"), "tokens_per_s": r.get("tokens_per_s"),
                       "train_time_s": r.get("train_time_s")})
        rows_t.append({"variant": r["variant"], "val_loss": lt,
                       "delta": None if lt is None or ref_time is None else lt - ref_time,
                       "last_eval_step_before": steps_at_t, "note": None if lt is not None else _no_point(r, t_star)})
    for r in pending:
        rows_t.append({"variant": r["variant"], "val_loss": None, "delta": None, "last_eval_step_before": None,
                       "note": _no_point(r, t_star)})
    out = {"reference": ref["variant"], "equal_steps": {"step": step, "rows": rows_s},
           "equal_time": {"time_s": t_star, "rows": rows_t}}
    domains = domain_names(results)
    if domains:
        out["domains"] = {
            "names": domains,
            "equal_steps": [{"variant": r["variant"], "val_loss": {d: loss_at_step(r, step, d) if step is not None
                                                                   else None for d in domains}} for r in results],
            "equal_time": [{"variant": r["variant"], "val_loss": {d: loss_at_time(r, t_star, d) for d in domains}}
                           for r in results]}
    return out


def mean_experts_per_token(result: dict):
    """Mean over MoE layers of the experts per token measured in the last evaluation (None for a
    dense model or a result written before the trainer measured it)."""
    ept = (result.get("experts_per_token") or {}).get("eval")
    return sum(ept) / len(ept) if ept else None


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def comparison_table(results: Sequence[dict]) -> str:
    """Both tables as text, ready to print."""
    c = comparison_rows(results)
    if not c["equal_steps"]["rows"]:
        return "(no evaluated variants)"
    ref = c["reference"]
    a = format_table(
        ["variant", "val loss", f"vs {ref}", "params", "active", "experts/tok", "train FLOPs/tok", "tok/s", "train s"],
        [[r["variant"], _f(r["val_loss"], ".4f"), _f(r["delta"], "+.4f"), _f(r["params_total"], ","),
          _f(r["params_active"], ","), _f(r.get("experts_per_token"), ".2f"),
          _f(r["flops_per_token"], ".3g"), _f(r["tokens_per_s"], ",.0f"),
          _f(r["train_time_s"], ".0f")] for r in c["equal_steps"]["rows"]])
    b = format_table(
        ["variant", "val loss", f"vs {ref}", "last eval step", "note"],
        [[r["variant"], _f(r["val_loss"], ".4f"), _f(r["delta"], "+.4f"), _f(r["last_eval_step_before"], "d"),
          r.get("note") or ""] for r in c["equal_time"]["rows"]])
    text = (f"Equal steps (step {c['equal_steps']['step']}), validation loss in nats/token:\n{a}\n\n"
            f"Equal wall time ({c['equal_time']['time_s']:.0f} s of training, loss interpolated "
            f"between evaluations):\n{b}")
    if "domains" in c:
        names = c["domains"]["names"]
        for key, what in (("equal_steps", f"equal steps (step {c['equal_steps']['step']})"),
                          ("equal_time", f"equal wall time ({c['equal_time']['time_s']:.0f} s)")):
            t = format_table(["variant", *names], [[r["variant"], *(_f(r["val_loss"][d], ".4f") for d in names)]
                                                   for r in c["domains"][key]])
            text += f"\n\nValidation loss per domain, {what}:\n{t}"
    return text

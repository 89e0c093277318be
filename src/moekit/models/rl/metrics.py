"""Learning-curve summaries of the episodes the RL loops record as ``(env step, task, return)``."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from moekit.validate import check_int, check_number

__all__ = ["return_curve", "late_return", "summarize_runs", "plot_return_curves"]


def return_curve(episodes: Sequence, steps: int, bins: int = 10, task: Optional[int] = None) -> list[float]:
    """Mean return of the episodes that finished in each of `bins` equal spans of ``(0, steps]`` (NaN if none)."""
    check_int("steps", steps, min=1)
    check_int("bins", bins, min=1)
    out = []
    for i in range(bins):
        r = [ret for s, t, ret in episodes if i * steps / bins < s <= (i + 1) * steps / bins
             and (task is None or t == task)]
        out.append(float(np.mean(r)) if r else math.nan)
    return out


def late_return(episodes: Sequence, steps: int, frac: float = 0.1, task: Optional[int] = None) -> float:
    """Mean return of the episodes (of `task` only, unless None) that finished in the last `frac`
    of ``steps`` (NaN if none)."""
    check_number("frac", frac, min=0, max=1, min_open=True)
    r = [ret for s, t, ret in episodes if s > (1 - frac) * steps and (task is None or t == task)]
    return float(np.mean(r)) if r else math.nan


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0)


def summarize_runs(runs: dict, steps: int, late_frac: float = 0.1, bins: int = 10,
                   task: Optional[int] = None) -> dict:
    """Per method, the seeds' learning curves and their summary.

    runs: ``{method: [(episodes, wall seconds), ...]}``, one entry per seed. Returns
    ``{method: {"curves": (seeds, bins) array of `return_curve`, "curve": their NaN-mean over
    seeds, "final"/"final_std": mean ± std over seeds of `late_return` (last `late_frac`),
    "auc"/"auc_std": of the mean return over all episodes, "wall"/"wall_std": of the wall time}}``.
    task: summarise only that task's episodes (multi-task runs); the wall time stays the run's.
    """
    check_int("steps", steps, min=1)
    out = {}
    for method, seeds in runs.items():
        if not seeds:
            raise ValueError(f"runs[{method!r}] must hold at least one (episodes, wall) pair, got none")
        if task is not None:
            seeds = [([e for e in ep if e[1] == task], wall) for ep, wall in seeds]
        curves = np.array([return_curve(ep, steps, bins) for ep, _ in seeds])
        with np.errstate(invalid="ignore"):
            counts = np.sum(~np.isnan(curves), 0)
            curve = np.where(counts > 0, np.nansum(curves, 0) / np.maximum(counts, 1), math.nan)
        final = _mean_std([late_return(ep, steps, late_frac) for ep, _ in seeds])
        auc = _mean_std([float(np.mean([r for _, _, r in ep])) if ep else math.nan for ep, _ in seeds])
        wall = _mean_std([w for _, w in seeds])
        out[method] = dict(curves=curves, curve=curve.tolist(), final=final[0], final_std=final[1],
                           auc=auc[0], auc_std=auc[1], wall=wall[0], wall_std=wall[1])
    return out


def plot_return_curves(summary: dict, steps: int, path: str, title: str, *, dashed: Sequence[str] = ()) -> None:
    """The mean learning curve of each method of `summarize_runs`'s output to a PNG (matplotlib);
    methods whose name starts with one of `dashed` are drawn dashed (e.g. the dense baselines)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method, s in summary.items():
        bins = len(s["curve"])
        x = (np.arange(bins) + 0.5) * steps / bins
        ax.plot(x, s["curve"], label=method, ls="--" if any(method.startswith(d) for d in dashed) else "-")
    ax.set(xlabel="environment steps", ylabel="episode return (mean over seeds)", title=title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Learning-curve summaries of the episodes the RL loops record as ``(env step, task, return)``."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from moekit.validate import check_int, check_number

__all__ = ["return_curve", "late_return"]


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


def late_return(episodes: Sequence, steps: int, frac: float = 0.1) -> float:
    """Mean return of the episodes that finished in the last `frac` of ``steps`` (NaN if none)."""
    check_number("frac", frac, min=0, max=1, min_open=True)
    r = [ret for s, _, ret in episodes if s > (1 - frac) * steps]
    return float(np.mean(r)) if r else math.nan

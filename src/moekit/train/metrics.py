"""Training metrics: one JSON object per line (always) and TensorBoard scalars (when installed).

Each record has a ``kind`` (``"train"``, ``"eval"``, ``"routing"``, ``"event"``) and a ``step``.
On resume, records after the resumed step are dropped first, so a resumed run's log reads
exactly like a straight run's.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

__all__ = ["MetricsLogger", "read_metrics"]


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)             # JSON has no NaN/inf; keep them readable
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class MetricsLogger:
    """Append records to ``path`` (JSONL); mirror numeric top-level fields to TensorBoard."""

    def __init__(self, path: os.PathLike, *, resume_step: Optional[int] = None, tensorboard: bool = True,
                 enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))
            except Exception:      # tensorboard not installed: the JSONL log is the record
                self._tb = None
        self._f = open(self.path, "a")

    def log(self, kind: str, step: int, **fields) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": int(step), **fields}
        self._f.write(json.dumps(_clean(rec)) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in fields.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: os.PathLike, kind: Optional[str] = None) -> list[dict]:
    """Records of a metrics file (optionally of one kind); a torn last line is skipped."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    with open(p) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out

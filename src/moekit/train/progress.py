"""A progress bar for training: rich when installed and writing to a terminal, else plain lines."""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _fmt(fields: dict) -> str:
    parts = []
    for k, v in fields.items():
        if v is None:
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)


class Progress:
    """``update(step, **fields)`` every step; plain mode prints every `every` steps."""

    def __init__(self, total: int, *, start: int = 0, label: str = "", every: int = 10, enabled: bool = True,
                 stream=None):
        self.total, self.label, self.every, self.enabled = total, label, max(1, every), enabled
        self.stream = stream or sys.stderr
        self._rich = None
        self._t0 = time.perf_counter()
        self._start = start
        if not enabled:
            return
        if getattr(self.stream, "isatty", lambda: False)():
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
                from rich.progress import Progress as RichProgress

                self._rich = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(),
                                          MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                          TextColumn("{task.fields[info]}"), transient=False)
                self._rich.start()
                self._task = self._rich.add_task(label, total=total, completed=start, info="")
            except ImportError:
                self._rich = None

    def update(self, step: int, **fields) -> None:
        if not self.enabled:
            return
        info = _fmt(fields)
        if self._rich is not None:
            self._rich.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            el = time.perf_counter() - self._t0
            done = step - self._start
            eta = el / done * (self.total - step) if done > 0 else float("nan")
            print(f"[{self.label}] step {step}/{self.total}  {info}  ({el:.0f}s, eta {eta:.0f}s)",
                  file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

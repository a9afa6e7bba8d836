"""Progress lines for long work: count, rate and ETA, at most every few seconds."""

from __future__ import annotations

import sys
import time


class Progress:
    """Print ``<label>: done/total (pct) rate/s eta`` to stderr as work advances."""

    def __init__(self, label: str, total: int | None = None, unit: str = "items", every_s: float = 5.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, n: int = 1, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if force or now - self._last >= self.every_s or (self.total and self.done >= self.total):
            self._last = now
            print(self.line(), file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            return f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%) {rate:.1f}/s eta {eta:.0f}s"
        return f"{self.label}: {self.done} {self.unit} {rate:.1f}/s"

"""Progress of a whole suite: units done, running, failed and remaining, and an ETA."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class SuiteProgress:
    """Counts of a suite's units; updated by the runner, read by whoever shows it.

    ``cached`` units were done before this run; ``done`` counts them too. The ETA
    assumes the remaining units take as long as those finished in this run took on
    average, ``slots`` at a time.
    """

    total: int
    cached: int = 0
    done: int = 0
    running: int = 0
    failed: int = 0
    slots: int = 1
    started: float = field(default_factory=time.monotonic)
    _busy_s: float = 0.0
    _finished_here: int = 0

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.failed

    def finished(self, units: int, seconds: float) -> None:
        """``units`` finished in this run, taking ``seconds`` of one worker between them."""
        self.done += units
        self._finished_here += units
        self._busy_s += seconds

    def eta_s(self) -> float | None:
        if self._finished_here == 0:
            return None
        per_unit = self._busy_s / self._finished_here
        return per_unit * self.remaining / max(1, min(self.slots, max(self.remaining, 1)))

    def line(self) -> str:
        eta = self.eta_s()
        when = "" if eta is None or self.remaining == 0 else f", ETA {_duration(eta)}"
        cached = f" ({self.cached} from earlier runs)" if self.cached else ""
        return (f"{self.done}/{self.total} done{cached}, {self.running} running, {self.failed} failed, "
                f"{self.remaining} remaining{when}; {_duration(time.monotonic() - self.started)} elapsed")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"

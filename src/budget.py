"""Wall-clock budget (when training must stop so that generation, zip and MiFID still fit) and periodic events."""
from __future__ import annotations

import math
import time


class Deadline:
    """The run's end time and the reserve kept back for what comes after training."""

    def __init__(self, budget_s: float, start: float | None = None):
        self.start = time.time() if start is None else start
        self.end = self.start + float(budget_s)
        self.reserve_s = 0.0

    def elapsed(self) -> float:
        return time.time() - self.start

    def remaining(self) -> float:
        """Seconds until the whole run must be over."""
        return self.end - time.time()

    def reserve(self, seconds: float) -> None:
        """Keep `seconds` back from training for generation, zipping and scoring."""
        self.reserve_s = max(0.0, float(seconds))

    @property
    def train_end(self) -> float:
        return self.end - self.reserve_s

    def train_remaining(self) -> float:
        """Seconds training may still use."""
        return self.train_end - time.time()

    def train_fraction(self, train_start: float) -> float:
        """Fraction of the training window used so far (0..1): the clock the lr schedule anneals by."""
        span = max(1e-9, self.train_end - train_start)
        return min(1.0, max(0.0, (time.time() - train_start) / span))


class Every:
    """A periodic event on the wall clock: due once `seconds` have passed since the last reset.

    seconds <= 0 means never (only at the end of the run), or every time when `zero_means_always` (status ticks).
    """

    def __init__(self, seconds: float, now: float, zero_means_always: bool = False):
        self.seconds = seconds
        self.never = seconds <= 0 and not zero_means_always
        self.reset(now)

    def reset(self, now: float) -> None:
        self.next = math.inf if self.never else now + max(0.0, self.seconds)

    def due(self, now: float) -> bool:
        return now >= self.next

    def left(self, now: float) -> float | None:
        """Seconds until the next event, None when it never comes."""
        return None if self.never else max(0.0, self.next - now)

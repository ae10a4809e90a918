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
        self.revised = False
        # the expected length of the next training round: the loop starts none that would end past train_end
        self.round_s = 0.0

    @property
    def budget_s(self) -> float:
        return self.end - self.start

    def elapsed(self) -> float:
        return time.time() - self.start

    def remaining(self) -> float:
        """Seconds until the whole run must be over."""
        return self.end - time.time()

    def reserve(self, seconds: float) -> None:
        """Keep `seconds` back from training for generation, zipping and scoring."""
        self.reserve_s = max(0.0, float(seconds))

    def expect_round(self, seconds: float) -> None:
        """The next training round should take `seconds` (the start-up estimate, then each round as measured)."""
        self.round_s = max(0.0, float(seconds))

    def last_start(self, rounds: int = 1) -> float:
        """The latest time the next `rounds` training rounds may start and still all end inside the training window."""
        return self.train_end - rounds * self.round_s

    def recheck_due(self, now: float) -> bool:
        """True from the moment the training window has RECHECK_LEAD of the reserve left (at least
        RECHECK_LEAD_MIN_S) until the reserve is revised: the time to measure the output again."""
        lead = max(RECHECK_LEAD_MIN_S, RECHECK_LEAD * self.reserve_s)
        return not self.revised and self.train_end - now <= lead

    def revise_reserve(self, seconds: float) -> None:
        """The reserve measured again near the end of training: the training window ends earlier or later by the
        difference (once; recheck_due is False after)."""
        self.reserve(seconds)
        self.revised = True

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


# The reserve is what the output stages measured (warm, at the batch generation uses), times this. On 2 CPU cores the
# figure a run used came from 21 % below to 15 % above its real output (generation speed varies from run to run;
# BENCHMARKS.md, issue 20), and at 1.05 runs ended 1 s before and 1 s past their 2-minute budgets: 1.1, with the
# margin (reserve_margin) on top.
RESERVE_SAFETY = 1.1
# The output is measured again with the trained G_ema when the training window has this share of the reserve left
# (at least RECHECK_LEAD_MIN_S): an output found slower than reserved can still end training that much earlier.
RECHECK_LEAD = 0.3
RECHECK_LEAD_MIN_S = 5.0
# How far past the end of the budget an output stage may run before it is abandoned (a few seconds, as promised).
OVERRUN_GRACE_S = 3.0


class BudgetError(ValueError):
    """--time-budget cannot hold this run on this device; the message names the smallest budget that can."""


class OutOfTime(RuntimeError):
    """An output stage was abandoned because the run passed the end of its budget; its old files are kept."""


def reserve_margin(budget_s: float) -> float:
    """Head-room on top of the measured reserve: 3 s plus 1 % of the budget, at most 2 minutes."""
    return min(120.0, 3.0 + 0.01 * budget_s)


def budget_flag_text(seconds: float) -> str:
    """Whole seconds as a --time-budget value: '50s', '2m30s', '7m', '1h10m'."""
    seconds = int(math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"


def smallest_budget(needed_s: float) -> float:
    """The smallest budget b with b >= needed_s + reserve_margin(b), rounded up to a value easy to type
    (10 s steps up to 2 minutes, whole minutes up to an hour, then 10-minute steps)."""
    budget = (needed_s + 3.0) / 0.99
    if reserve_margin(budget) >= 120.0:
        budget = needed_s + 120.0
    step = 10.0 if budget <= 120 else 60.0 if budget <= 3600 else 600.0
    return math.ceil(budget / step - 1e-9) * step


def deadline_check(deadline: Deadline, what: str, grace_s: float = OVERRUN_GRACE_S):
    """A check for long output loops to call between batches: raises OutOfTime once the run is more than
    grace_s past the end of its budget, so the stage stops instead of overrunning by minutes."""
    def check() -> None:
        late = time.time() - deadline.end
        if late > grace_s:
            raise OutOfTime(f"{what} ran {late:.0f}s past the end of the {budget_flag_text(deadline.end - deadline.start)} "
                            f"budget and was stopped")
    return check

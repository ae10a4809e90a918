"""Learning-rate schedules on the training clock, or on the images seen when a run has a fixed length."""
from __future__ import annotations

import math


LR_SCHEDULES = ("const", "cosine", "linear", "restarts")


def _cosine_factor(t: float, min_ratio: float) -> float:
    # m + (1 - m) * (1 + cos(pi * t)) / 2: 1 at t = 0, m at t = 1.
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_factor(kind: str, progress: float, min_ratio: float = 0.1, cycles: int = 4) -> float:
    """Multiplier of the base lr at `progress` (0..1) of the training window.

    const: 1.  cosine: m + (1-m)(1+cos(pi p))/2.  linear: 1 - (1-m) p.  Both reach m exactly at p = 1.
    restarts (SGDR): `cycles` cosine cycles of lengths T, 2T, 4T, ... with T = 1 / (2^cycles - 1), so they
    fill the window; each restarts at 1 and anneals to m, the last one exactly at the deadline.
    """
    p = min(1.0, max(0.0, float(progress)))
    if kind == "const":
        return 1.0
    if kind == "cosine":
        return _cosine_factor(p, min_ratio)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    if kind == "restarts":
        n = max(1, int(cycles))
        first = 1.0 / (2 ** n - 1)
        # Cycle k starts at first * (2^k - 1): k = floor(log2(p / first + 1)), the last cycle owns p = 1.
        k = min(n - 1, int(math.floor(math.log2(p / first + 1.0) + 1e-12)))
        start = first * (2 ** k - 1)
        return _cosine_factor((p - start) / (first * 2 ** k), min_ratio)
    raise ValueError(f"unknown lr schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")


def schedule_progress(progress_before: float, window_fraction: float) -> float:
    """Schedule position when a resumed run continues from `progress_before` into a new training window.

    The rest of the schedule is stretched over the new window: p = p0 + (1 - p0) * f, so the lr still
    reaches its end value exactly at this session's deadline.
    """
    p0 = min(1.0, max(0.0, float(progress_before)))
    return p0 + (1.0 - p0) * min(1.0, max(0.0, float(window_fraction)))


def image_progress(images_seen: int, max_images: float) -> float:
    """Schedule position of a run of fixed length (--max-kimg): the fraction of its images seen, over all sessions,
    so the lr at a given image does not depend on how fast the machine was."""
    return min(1.0, max(0.0, images_seen / max_images))

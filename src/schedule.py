"""Learning-rate schedules on the training clock, and the EMA of G with its warm-up."""
from __future__ import annotations

import math

import torch

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


def ema_beta_at(step: int, beta: float, rampup: float) -> float:
    """EMA decay at `step` with ramp-up: the averaging horizon is at most `rampup` of the steps done so far.

    Full horizon H = 1 / (1 - beta) steps. h = clamp(rampup * step, 1, H) and beta_t = 1 - 1 / h, so G_ema copies
    G at first, averages over the last 5 % of a short run (rampup 0.05), and reaches beta once step >= H / rampup.
    rampup <= 0 turns the ramp off (beta from the start).
    """
    if beta <= 0.0:
        return 0.0
    if rampup <= 0:
        return float(beta)
    horizon = min(1.0 / (1.0 - beta), max(1.0, rampup * step))
    return 1.0 - 1.0 / horizon


@torch.no_grad()
def ema_update(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    """G_ema <- beta * G_ema + (1 - beta) * G for parameters (one fused lerp); buffers are copied from G."""
    ema_params = list(G_ema.parameters())
    params = list(G.parameters())
    if len(ema_params) != len(params):
        raise ValueError(f"G_ema has {len(ema_params)} parameters, G has {len(params)}: they must be the same model")
    if ema_params:
        # lerp(a, b, w) = a + w (b - a) = (1 - w) a + w b with w = 1 - beta.
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - float(beta))
    for ema_buffer, buffer in zip(G_ema.buffers(), G.buffers()):
        ema_buffer.copy_(buffer)

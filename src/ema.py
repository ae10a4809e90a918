"""G_ema: the exponential moving average of G's weights, with StyleGAN2-ADA's ramp-up of the horizon."""
from __future__ import annotations

import torch


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

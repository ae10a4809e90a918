"""G_ema: the exponential moving average of G's weights (StyleGAN2-ADA's ramp-up of the horizon), and the batch-norm
statistics that fit the averaged weights (BigGAN's standing statistics)."""
from __future__ import annotations

import torch

from src.generate import balanced_labels, sample_z


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


def ema_beta_for_images(batch_size: int, ema_kimg: float, images_seen: int, rampup: float) -> float:
    """EMA decay for one step of batch_size images when G_ema's half-life is ema_kimg thousand images
    (StyleGAN2-ADA: beta = 0.5 ** (batch / ema_nimg), ema_nimg = min(ema_kimg * 1000, images_seen * rampup)).

    Counting in images, a batch change (a flag, an out-of-memory halving) keeps how far G_ema averages: two steps
    of half the batch decay exactly as one full one. StyleGAN2-ADA's settings: ema_kimg = 10 per 32 images of batch
    (its "auto" config; 500 on CIFAR), rampup 0.05 (None for its paper configs); rampup <= 0 turns the ramp off.
    """
    ema_nimg = ema_kimg * 1000.0
    if rampup > 0:
        ema_nimg = min(ema_nimg, images_seen * rampup)
    if ema_nimg <= 0:
        return 0.0  # no history yet: G_ema copies G
    return 0.5 ** (batch_size / ema_nimg)


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


# 8 x 64 images: every class of 120 four or five times, each channel's mean/var over >= 8,192 values even at 4x4.
# Measured on a tiny ResNet G with a lagging EMA (eval output vs the batch statistics of 1,024 images, mean |pixel|):
# 1 batch 0.044, 4: 0.027, 8: 0.017, 16 (BigGAN-PyTorch's count): 0.017, 32: 0.014; G's copied statistics: 0.33.
STANDING_STATS_BATCHES = 8
STANDING_STATS_BATCH = 64


@torch.no_grad()
def standing_bn_stats_(G_ema: torch.nn.Module, batches: int = STANDING_STATS_BATCHES,
                       batch_size: int = STANDING_STATS_BATCH, seed: int = 0) -> torch.nn.Module:
    """BigGAN's "standing statistics": G_ema's batch-norm running mean/var recomputed from its own outputs.

    The EMA averages G's weights, but the BN buffers it carries describe G's current weights, not the averaged ones;
    sampled in eval mode with them, G_ema's activations drift off through every (conditional) BN. So: reset the
    statistics, run `batches` no-grad train-mode forwards over balanced breeds, accumulating the cumulative average
    (momentum None), and go back to eval mode. Its own seeded generator leaves the training RNG untouched.
    Call it before every use of G_ema's samples (grids, FID, truncation search, the submission).
    """
    norms = [m for m in G_ema.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    G_ema.eval()
    if not norms:
        return G_ema
    device = next(G_ema.parameters()).device
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    generator = torch.Generator().manual_seed(seed)
    labels = balanced_labels(batches * batch_size, G_ema.n_classes, "cpu", generator)
    G_ema.train()
    try:
        for batch_labels in labels.split(batch_size):
            G_ema(sample_z(len(batch_labels), G_ema.z_dim, device, generator=generator), batch_labels.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        G_ema.eval()
    return G_ema

"""The first-minute self-check: every stage of the run, briefly, on the real device with the real settings, before
the long training starts. A stage that fails is one line naming it now, not a traceback hours later.

The check leaves no trace: the nets, the optimisers and every random generator are put back as they were, so a run
with the check trains exactly as one without it; it writes no file (the disk was checked by preflight).
"""
from __future__ import annotations

import io
import math
import time

import torch
from PIL import Image

from src.checkpoint import capture_rng_state, restore_rng_state, restore_training_snapshot, training_snapshot
from src.config import Config
from src.console import log
from src.ema import standing_bn_stats_
from src.gan_step import GanStep
from src.generate import breed_counts, encode_png, generate_images
from src.monitor import grid_png_bytes
from src.nets import GanNets, LoopState
from src.precision import precision_autocast

# training rounds: the first compiles (when asked; a compile that fails there falls back to eager, see
# compile_fallback), the second runs the compiled graph
SELF_CHECK_ROUNDS = 2
# On a GPU the rounds use the run's batch (the graph compiled once, memory checked at the size that trains); on a CPU a
# round of the default model at batch 64 takes seconds, and a few images show the same faults.
SELF_CHECK_CPU_BATCH = 8
SELF_CHECK_IMAGES = 64      # images through generation, PNG and the MiFID backbone


class SelfCheckError(RuntimeError):
    """A stage cannot run on this device with these settings; the message names the stage and what to do."""


def _check_rounds(cfg: Config, nets: GanNets, data, n_classes: int) -> None:
    # a few real rounds (compiled and autocast as configured) on a few real images; every sum must be finite
    device = next(nets.G.parameters()).device
    batch = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, SELF_CHECK_CPU_BATCH)
    batch = max(1, min(batch, len(data.images)))
    real_u8, real_y = data.images[:batch].to(device), data.labels[:batch].to(device)
    step = GanStep(cfg, nets, breed_counts(data.labels, n_classes))
    for _ in range(SELF_CHECK_ROUNDS):
        step.begin_round(batch, cfg.n_dis)
        for _ in range(cfg.n_dis):
            step.d_phase(real_u8, real_y)
        for g_step in range(cfg.g_steps):
            step.g_phase(g_step)
        sums = step.end_round().tolist()
        if not all(math.isfinite(value) for value in sums):
            raise FloatingPointError(f"a training round gave non-finite losses {sums}")


def _check_png(img_chw) -> None:
    # one image encoded as the zip will hold it, and read back as Kaggle's evaluator will
    with Image.open(io.BytesIO(encode_png(img_chw))) as image:
        if image.size != (64, 64) or image.mode != "RGB":
            raise ValueError(f"a generated PNG is {image.size[0]}x{image.size[1]} {image.mode}, not 64x64 RGB")


def _check_outputs(cfg: Config, nets: GanNets, extractor) -> None:
    # standing statistics, a grid, images through PNG, and the MiFID backbone on them
    device = next(nets.G_ema.parameters()).device
    standing_bn_stats_(nets.G_ema, batches=1, batch_size=16, seed=cfg.seed)  # that it runs: one batch is enough
    grid_z = torch.randn(16, cfg.z_dim, device=device)
    grid_y = torch.arange(16, device=device) % nets.G_ema.n_classes
    with torch.no_grad(), precision_autocast(nets.precision):
        grid_png_bytes(nets.G_ema(grid_z, grid_y), nrow=8)
    images = generate_images(nets.G_ema, SELF_CHECK_IMAGES, device, seed=cfg.seed)
    for img_chw in images.numpy():
        _check_png(img_chw)
    if extractor is not None:
        features = extractor(images)
        if not torch.isfinite(features).all():
            raise FloatingPointError("the MiFID backbone gave non-finite features")


def run_self_check(cfg: Config, nets: GanNets, data, extractor, dist_info) -> float:
    """Run every stage briefly and put everything back; returns its seconds. Raises SelfCheckError naming the stage.

    Every rank runs the training rounds (DDP's collectives need them all); rank 0 alone checks the outputs.
    """
    start = time.time()
    n_classes = len(data.breeds)
    snapshot, rng = training_snapshot(nets, LoopState()), capture_rng_state()
    stage = "a training round"
    try:
        _check_rounds(cfg, nets, data, n_classes)
        if dist_info.is_main:
            stage = "standing statistics, the grid, generation, PNG or the MiFID backbone"
            _check_outputs(cfg, nets, extractor)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise SelfCheckError(f"self-check failed in {stage} on {nets.precision.device_type} "
                             f"({nets.precision.name}{', compiled' if cfg.compile else ''}): {type(error).__name__}: "
                             f"{reason}. Try --amp fp32, --no-compile or --device cpu to narrow it down") from None
    finally:
        restore_training_snapshot(nets, snapshot)
        restore_rng_state(rng)
    seconds = time.time() - start
    if dist_info.is_main:
        log("selfcheck", f"every stage ran on the device in {seconds:.1f}s")
    return seconds

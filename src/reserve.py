"""The reserve: what the end of training, generation, the zip and scoring will take, measured at start-up on this
device with the run's own models, and the refusal of a budget that cannot hold them."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from src.budget import (RESERVE_SAFETY, BudgetError, Deadline, budget_flag_text, reserve_margin, smallest_budget)
from src.config import Config, format_duration
from src.console import log
from src.distributed import any_rank_flags, current_dist_info, max_over_ranks
from src.generate import (ZIP_BYTES_PER_IMAGE_MAX, measure_generation_seconds, measure_zip_seconds,
                          pick_generation_batch)
from src.models import build_models
from src.preflight import check_free_space, measure_write_speed
from src.scoring import TRUNCATION_CANDIDATES, reserve_for_scoring

# Training must get at least this many rounds, or the run is refused: a zip from an untrained G is noise.
MIN_TRAIN_ROUNDS = 2
# Images G_ema draws after the training window: the last 8 x 8 sample grid and the 4 x 10 interpolation strip.
TAIL_IMAGES = 64 + 40


@dataclass
class OutputPlan:
    """Seconds measured at start-up (before the safety factor) for what comes after the training window."""
    output_s: float      # generate n_images, encode them and write images.zip
    generate_batch: int  # the faster batch size for generating on this device
    tail_s: float        # the end of training: its last round, the last grid and strip, the last checkpoint
    scoring_s: float     # MiFID and the truncation search (0 without a backbone)
    mifid_s: float       # the part of scoring_s that scores the finished zip
    round_s: float       # one training round


@torch.no_grad()
def measure_d_seconds(D: torch.nn.Module, images: torch.Tensor, device) -> float:
    """Seconds per image of one D forward on `images` (uint8, CPU), after a warm-up on a few of them."""
    real_img = images.to(device).float() / 127.5 - 1
    labels = torch.zeros(len(real_img), dtype=torch.long, device=device)
    D.eval()
    D(real_img[:4], labels[:4])
    start = time.time()
    logits, _ = D(real_img, labels)
    logits.float().sum().item()  # waits for the device
    return (time.time() - start) / len(real_img)


def training_round_seconds(cfg: Config, gen_s: float, d_s: float) -> float:
    """One training round from forward times per image: a forward and its backward cost ~3 forwards; D sees a real
    and a fake batch per D step and a fake one per G step; the first G step reuses the D step's fakes when n_dis=1.
    The loop checks its deadline between rounds, so the last round can run this far past the training window."""
    n_dis = max(cfg.n_dis, cfg.n_dis_max if cfg.dis_loss_limit > 0 else 0)
    g_forwards = n_dis + cfg.g_steps - (1 if n_dis == 1 else 0)
    d_forwards = 2 * n_dis + cfg.g_steps
    return 3 * cfg.batch_size * (g_forwards * gen_s + d_forwards * d_s)


def checkpoint_bytes(G: torch.nn.Module, D: torch.nn.Module) -> int:
    """Size of ckpt.pt: G, G_ema, the best G_ema and G's two Adam moments; D and its two moments; 1 MiB for the rest."""
    def size(module):
        return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    return 5 * size(G) + 3 * size(D) + 2**20


def mifid_share(cfg: Config) -> float:
    """The fraction of the scoring reserve that scores the zip itself (the rest: truncation search, final FID)."""
    searched = len(TRUNCATION_CANDIDATES) * cfg.fid_samples if cfg.truncation_search else 0
    return cfg.n_images / (cfg.n_images + searched + cfg.fid_samples)


def plan_reserve(cfg: Config, deadline: Deadline, n_classes: int, device: torch.device, extractor,
                 out_dir: str) -> OutputPlan:
    """Measure the output stages with the run's models (untrained: same shapes, same speed), check the disk has
    room for images.zip and ckpt.pt, and keep the reserve back from training. Raises BudgetError, naming the
    smallest budget that fits, when training would not get MIN_TRAIN_ROUNDS rounds."""
    probe_G, probe_D = build_models(cfg, n_classes)
    probe_G, probe_D = probe_G.to(device), probe_D.to(device)
    timed = measure_generation_seconds(probe_G, device)
    generate_batch = pick_generation_batch(timed)
    gen_s, probe_img = timed[generate_batch]
    # a training batch is nearer the smallest candidate, whose speed the round estimate takes
    round_gen_s = timed[min(timed)][0]
    zip_s = measure_zip_seconds(probe_img[:64])
    d_s = measure_d_seconds(probe_D, probe_img[:64], device)
    write_speed = measure_write_speed(out_dir)
    zip_bytes, ckpt_bytes = cfg.n_images * ZIP_BYTES_PER_IMAGE_MAX, checkpoint_bytes(probe_G, probe_D)
    del probe_G, probe_D, probe_img, timed
    check_free_space(out_dir, {"images.zip": zip_bytes, "ckpt.pt": ckpt_bytes})

    round_s = training_round_seconds(cfg, round_gen_s, d_s)
    scoring_s = reserve_for_scoring(cfg, extractor) if extractor is not None else 0.0
    plan = OutputPlan(output_s=cfg.n_images * (gen_s + zip_s) + zip_bytes / write_speed, generate_batch=generate_batch,
                      tail_s=round_s + TAIL_IMAGES * round_gen_s + ckpt_bytes / write_speed,
                      scoring_s=scoring_s, mifid_s=scoring_s * mifid_share(cfg), round_s=round_s)
    budget_s = deadline.end - deadline.start
    measured_s = RESERVE_SAFETY * (plan.output_s + plan.tail_s + plan.scoring_s)
    # under torchrun every rank measured its own: all keep the largest reserve and refuse together, or none waits
    # forever in a collective for a rank that stopped
    world = current_dist_info(device).world_size
    deadline.reserve(max_over_ranks(measured_s + reserve_margin(budget_s), device, world))
    min_train_s = MIN_TRAIN_ROUNDS * round_s
    log("main", f"budget {format_duration(budget_s)}: start-up took {format_duration(deadline.elapsed())}, reserving "
        f"{format_duration(deadline.reserve_s)} (images {format_duration(plan.output_s)}, end of training "
        f"{format_duration(plan.tail_s)}{f', MiFID {format_duration(plan.scoring_s)}' if extractor else ''}, "
        f"x{RESERVE_SAFETY} + margin), training gets {format_duration(max(0.0, deadline.train_remaining()))}")
    if any_rank_flags([deadline.train_remaining() < min_train_s], device, world)[0]:
        fitting = smallest_budget(deadline.elapsed() + measured_s + min_train_s)
        scoring = f", MiFID ~{format_duration(plan.scoring_s)}" if extractor is not None else ""
        lighter = "a lighter model, e.g. --recipe cgan, or " if cfg.arch == "resnet" else ""
        raise BudgetError(
            f"--time-budget {budget_flag_text(budget_s)} is too small for this model on {device}: start-up took "
            f"{format_duration(deadline.elapsed())}, {cfg.n_images} images take ~{format_duration(plan.output_s)} "
            f"to generate and zip here{scoring}, a training round ~{format_duration(round_s)}; give --time-budget "
            f"{budget_flag_text(fitting)} or more (or {lighter}fewer --n-images for a local test)")
    return plan

"""The reserve: what the end of training, generation, the zip and scoring will take, measured at start-up on this
device with the run's own models (and the output again near the end of training, with the trained G_ema), and the
refusal of a budget that cannot hold them."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from src.budget import (RESERVE_SAFETY, BudgetError, Deadline, budget_flag_text, reserve_margin, smallest_budget)
from src.config import Config, format_duration
from src.console import log
from src.distributed import DDP_SYNC_STEPS, any_rank_flags, current_dist_info, max_over_ranks
from src.ema import STANDING_STATS_BATCH, STANDING_STATS_BATCHES
from src.generate import (ZIP_BYTES_PER_IMAGE_MAX, eval_mode, generation_batch_candidates, generation_probe_seconds,
                          measure_generation, measure_zip_seconds, pick_generation_batch)
from src.preflight import check_free_space, measure_write_speed
from src.scoring import TRUNCATION_CANDIDATES, reserve_for_scoring

# The recheck near the end of training measures only when its generation calls (generation_probe_seconds) cost at
# most this share of the output's time: else the start-up figure stands (tiny outputs, whose whole generation is a
# batch or two).
RECHECK_COST_SHARE = 0.1
# Probes of the recheck; their median with the start-up figure is the new one, so one slow probe moves nothing (a busy
# 2-core CPU once measured 2m19s for an output that then took 62 s; BENCHMARKS.md, issue 20).
RECHECK_PROBES = 2
# Training must get at least this many rounds, or the run is refused: a zip from an untrained G is noise.
MIN_TRAIN_ROUNDS = 2
# The budget a refusal names holds the output measured this much slower, so the run it asks for, measuring again,
# is not refused in turn: two start-ups of the full-width default on the same busy 2-core CPU measured its 10,000
# images at 4m27s and 6m00s (1.35x; BENCHMARKS.md, issue 20).
NAMED_BUDGET_HEADROOM = 1.4
# Images G_ema draws after the training window: its standing statistics, the last 8 x 8 sample grid and the 4 x 10
# interpolation strip.
TAIL_IMAGES = STANDING_STATS_BATCHES * STANDING_STATS_BATCH + 64 + 40


@dataclass
class OutputPlan:
    """What comes after the training window, from figures measured on this device (before the safety factor).
    recheck_reserve() updates gen_s and zip_s with the trained G_ema's."""
    n_images: int
    generate_batch: int  # the faster batch size for generating on this device
    gen_s: float         # seconds per image generated at generate_batch
    zip_s: float         # seconds per image encoded and stored in the zip
    write_speed: float   # bytes per second written and fsynced in OUT
    tail_s: float        # the end of training: G_ema's statistics, the last grid, strip, checkpoint
    scoring_s: float     # MiFID and the truncation search (0 without a backbone)
    mifid_s: float       # the part of scoring_s that scores the finished zip
    round_s: float       # one training round at the run's starting n_dis (the loop stops before one it cannot end)

    @property
    def output_s(self) -> float:
        """Generate n_images, encode them and write images.zip."""
        return self.n_images * (self.gen_s + self.zip_s + ZIP_BYTES_PER_IMAGE_MAX / self.write_speed)

    @property
    def after_training_s(self) -> float:
        return self.tail_s + self.output_s + self.scoring_s


def reserve_seconds(plan: OutputPlan, budget_s: float) -> float:
    """The time kept back from training: the measured seconds after it, times RESERVE_SAFETY, plus the margin."""
    return RESERVE_SAFETY * plan.after_training_s + reserve_margin(budget_s)


@torch.no_grad()
def measure_d_seconds(D: torch.nn.Module, images: torch.Tensor, device) -> float:
    """Seconds per image of one D forward on `images` (uint8, CPU), after a warm-up call of the same shape; D is
    left in its own mode."""
    real_img = images.to(device).float() / 127.5 - 1
    labels = torch.zeros(len(real_img), dtype=torch.long, device=device)
    with eval_mode(D):
        D(real_img, labels)
        start = time.time()
        logits, _ = D(real_img, labels)
        logits.float().sum().item()  # waits for the device
    return (time.time() - start) / len(real_img)


def training_round_seconds(cfg: Config, gen_s: float, d_s: float, n_dis: int) -> float:
    """One training round of n_dis D steps from forward times per image: a forward and its backward cost ~3 forwards;
    D sees a real and a fake batch per D step and a fake one per G step; the first G step reuses the D step's fakes
    when n_dis=1."""
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


def plan_reserve(cfg: Config, deadline: Deadline, G: torch.nn.Module, D: torch.nn.Module, device: torch.device,
                 extractor, out_dir: str) -> OutputPlan:
    """Measure the output stages with the run's own G and D (on the device; left as they were: modes, weights,
    RNG), check the disk has room for images.zip and ckpt.pt, and keep the reserve back from training. Raises
    BudgetError, naming the smallest budget that fits, when training would not get MIN_TRAIN_ROUNDS rounds."""
    timed = measure_generation(G, device, generation_batch_candidates(cfg.n_images))
    generate_batch = pick_generation_batch(timed)
    # a training batch is nearer the smallest candidate, whose speed the round estimate takes
    round_gen_s = timed[min(timed)].seconds_per_image
    probe_img = timed[generate_batch].images
    zip_s = measure_zip_seconds(probe_img)
    d_s = measure_d_seconds(D, probe_img[:64], device)
    write_speed = measure_write_speed(out_dir)
    ckpt_bytes = checkpoint_bytes(G, D)
    gen_s = timed[generate_batch].seconds_per_image
    del timed, probe_img
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the probe's large batches are not kept from training
    check_free_space(out_dir, {"images.zip": cfg.n_images * ZIP_BYTES_PER_IMAGE_MAX, "ckpt.pt": ckpt_bytes})

    # the run starts at cfg.n_dis D steps a round; the loop measures its rounds from then on (adaptive ones included)
    round_s = training_round_seconds(cfg, round_gen_s, d_s, cfg.n_dis)
    scoring_s = reserve_for_scoring(cfg, extractor) if extractor is not None else 0.0
    plan = OutputPlan(n_images=cfg.n_images, generate_batch=generate_batch, gen_s=gen_s, zip_s=zip_s,
                      write_speed=write_speed, tail_s=TAIL_IMAGES * round_gen_s + ckpt_bytes / write_speed,
                      scoring_s=scoring_s, mifid_s=scoring_s * mifid_share(cfg), round_s=round_s)
    budget_s = deadline.budget_s
    # under torchrun every rank measured its own: all keep the largest reserve and refuse together, or none waits
    # forever in a collective for a rank that stopped
    world = current_dist_info(device).world_size
    deadline.reserve(max_over_ranks(reserve_seconds(plan, budget_s), device, world))
    deadline.expect_round(round_s)
    # under DDP the loop decides to go on for DDP_SYNC_STEPS rounds at a time, so the window must hold as many
    min_train_s = (MIN_TRAIN_ROUNDS if world == 1 else max(MIN_TRAIN_ROUNDS, DDP_SYNC_STEPS)) * round_s
    log("main", f"budget {format_duration(budget_s)}: start-up took {format_duration(deadline.elapsed())}, reserving "
        f"{format_duration(deadline.reserve_s)} (images {format_duration(plan.output_s)}, end of training "
        f"{format_duration(plan.tail_s)}{f', MiFID {format_duration(plan.scoring_s)}' if extractor else ''}, "
        f"x{RESERVE_SAFETY} + margin), training gets {format_duration(max(0.0, deadline.train_remaining()))}")
    if any_rank_flags([deadline.train_remaining() < min_train_s], device, world)[0]:
        fitting = smallest_budget(deadline.elapsed() + NAMED_BUDGET_HEADROOM * RESERVE_SAFETY * plan.after_training_s
                                  + min_train_s)
        scoring = f", MiFID ~{format_duration(plan.scoring_s)}" if extractor is not None else ""
        lighter = "a lighter model, e.g. --recipe cgan, or " if cfg.arch == "resnet" else ""
        raise BudgetError(
            f"--time-budget {budget_flag_text(budget_s)} is too small for this model on {device}: start-up took "
            f"{format_duration(deadline.elapsed())}, {cfg.n_images} images take ~{format_duration(plan.output_s)} "
            f"to generate and zip here{scoring}, a training round ~{format_duration(round_s)}; give --time-budget "
            f"{budget_flag_text(fitting)} or more (or {lighter}fewer --n-images for a local test)")
    return plan


def recheck_reserve(plan: OutputPlan, deadline: Deadline, G_ema: torch.nn.Module, device) -> None:
    """Measure generation again with the trained G_ema at plan.generate_batch, and the zip on its images, and revise
    the deadline's reserve: the training window ends earlier when the output got slower, later when faster.

    Call it from the training loop between rounds once deadline.recheck_due(now) is True. It probes RECHECK_PROBES
    times and takes the median of the probes and the start-up figure, so one probe slowed by something else on the
    machine moves nothing (none when the probes would cost more than RECHECK_COST_SHARE of the output: the reserve
    stays). It leaves G_ema as it was, and updates plan.gen_s and plan.zip_s. Each rank may call it on its own clock
    (no collective): the loop's stop decision is shared, so the earliest end wins on every rank. A device out of
    memory beside training's own (a generation batch is larger than a training batch) keeps the reserve, said in one
    line.
    """
    probe_s = RECHECK_PROBES * generation_probe_seconds(plan.generate_batch, plan.gen_s)
    if probe_s > RECHECK_COST_SHARE * plan.output_s:
        deadline.revise_reserve(deadline.reserve_s)  # the start-up reserve stands
        return
    gen_s, zip_s = [plan.gen_s], [plan.zip_s]
    try:
        for _ in range(RECHECK_PROBES):
            timing = measure_generation(G_ema, device, (plan.generate_batch,))[plan.generate_batch]
            gen_s.append(timing.seconds_per_image)
            zip_s.append(measure_zip_seconds(timing.images))
            del timing
    except torch.cuda.OutOfMemoryError:
        deadline.revise_reserve(deadline.reserve_s)
        log("main", f"output not measured again: out of memory beside training at batch {plan.generate_batch}; "
            f"the start-up reserve stands")
        return
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the probe's batches are not kept from training
    before_s, start_up_output_s = deadline.reserve_s, plan.output_s
    plan.gen_s, plan.zip_s = statistics.median(gen_s), statistics.median(zip_s)
    deadline.revise_reserve(reserve_seconds(plan, deadline.budget_s))
    change = before_s - deadline.reserve_s
    write_s = ZIP_BYTES_PER_IMAGE_MAX / plan.write_speed
    probes = ", ".join(format_duration(plan.n_images * (g + z + write_s)) for g, z in zip(gen_s[1:], zip_s[1:]))
    log("main", f"output measured again with the trained G_ema: images {format_duration(plan.output_s)} (generate "
        f"{plan.n_images * plan.gen_s:.1f}s + zip {plan.n_images * plan.zip_s:.1f}s: the median of the start-up "
        f"{format_duration(start_up_output_s)} and the probes {probes}); the training window "
        f"{'gains' if change >= 0 else 'loses'} {abs(change):.1f}s")

"""The training loop: D and G steps on device-resident data until the deadline, watched, checkpointed, resumable.

Speed rules: the uint8 dataset is copied to the device once and indexed there; flips and DiffAugment run there;
losses and D outputs accumulate in a device tensor that is read once per status tick, so a step never waits
for the host. The clock (time.time()) is checked every step; it costs nothing on the device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import math
import os
import random
import signal
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from src.augment import diff_augment, parse_diffaug_policy, random_flip, uint8_to_unit
from src.budget import Deadline, Every
from src.checkpoint import (CKPT_NAME, restore_rng_state, restore_training_snapshot, training_snapshot,
                            write_training_checkpoint)
from src.config import Config, format_duration, parse_duration
from src.console import log
from src.distributed import any_rank_flags, current_dist_info, sync_buffers
from src.ema import ema_beta_at, ema_update, standing_bn_stats_
from src.interrupt import handling_stop_signals
from src.layers import spectral_norm_power_iteration_
from src.losses import GAN_LOSSES, aux_class_loss
from src.models import MODEL_IMG_SIZE
from src.monitor import (STATS_NAME, StatusLog, TickMeter, make_grid_latents, print_banner, save_interpolation_strip,
                         save_sample_grid)
from src.nets import GanNets, LoopState, build_gan_nets
from src.precision import (Precision, autocast_disabled, choose_precision, configure_backends, precision_autocast,
                           to_memory_format)
from src.schedule import lr_factor, schedule_progress
from src.scoring import FidTracker

MAX_ROLLBACKS = 3            # NaN/Inf rollbacks before the run gives up
ROLLBACK_SNAPSHOT_S = 300.0  # refresh the in-memory rollback point at a healthy tick at most this often
DDP_SYNC_STEPS = 20          # under DDP the ranks agree on stop/tick decisions every this many steps
LR_PROGRESS_STEPS = 1000     # the lr moves in 1/1000 steps of the window (short step-limited runs reproduce)
OOM_ERRORS = (torch.cuda.OutOfMemoryError,) + ((torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ())


class StopReason(str, enum.Enum):
    """Why training stopped (compares equal to its value: result.stop_reason == "deadline")."""
    DEADLINE = "deadline"
    SIGNAL = "signal"        # SIGTERM / SIGINT: the step was finished and a checkpoint saved
    MAX_STEPS = "max_steps"  # the step limit of a test or benchmark
    ERROR = "error"          # TrainResult.error says what; the last good state was restored


@dataclass
class TrainResult:
    G_ema: torch.nn.Module       # eval mode, on the device; the best-FID state when training-time FID ran
    G: torch.nn.Module
    D: torch.nn.Module
    progress: LoopState          # counters at the end, over all sessions
    stop_reason: StopReason
    error: str                   # what went wrong when stop_reason is ERROR, else ""
    fid: FidTracker              # training-time FID history and best
    grid_z: torch.Tensor         # the fixed latents of the sample grids


class DeviceSampler:
    """Batches of the uint8 dataset held on the device, in a fresh device-side permutation every epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.order = torch.randperm(len(images), device=images.device)
        self.cursor = 0

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the last partial batch of an epoch is dropped: every batch has the same shape
        if self.cursor + batch_size > len(self.order):
            self.order = torch.randperm(len(self.images), device=self.images.device)
            self.cursor = 0
        index = self.order[self.cursor:self.cursor + batch_size]
        self.cursor += batch_size
        return self.images[index], self.labels[index]


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def current_lrs(cfg: Config, state: LoopState) -> tuple[float, float]:
    """(lr_g, lr_d) = base lr * (batch / lr_ref_batch when set) * rollback scale * schedule factor."""
    scale = state.lr_scale * (state.batch_size / cfg.lr_ref_batch if cfg.lr_ref_batch > 0 else 1.0)
    progress = math.floor(state.schedule_progress * LR_PROGRESS_STEPS) / LR_PROGRESS_STEPS
    factor = lr_factor(cfg.lr_schedule, progress, cfg.lr_min_ratio, cfg.restart_cycles)
    return cfg.lr_g * scale * factor, cfg.lr_d * scale * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _prepare_real(img_uint8: torch.Tensor, cfg: Config, precision: Precision) -> torch.Tensor:
    # uint8 -> [-1, 1] on the device, averaged down to what G draws (--draw-res), random mirror (real images only)
    real_img = uint8_to_unit(img_uint8)
    if cfg.draw_res != MODEL_IMG_SIZE:
        real_img = F.avg_pool2d(real_img, MODEL_IMG_SIZE // cfg.draw_res)
    if cfg.flip:
        real_img = random_flip(real_img)
    return to_memory_format(real_img, precision)


def _augment_for_d(img: torch.Tensor, cfg: Config, precision: Precision) -> torch.Tensor:
    # DiffAugment: the same policy on real and fake, differentiable so G learns through it
    if cfg.diffaug:
        img = to_memory_format(diff_augment(img, cfg.diffaug), precision)
    return img


def _optimizer_step(loss: torch.Tensor, optimizer, scaler) -> None:
    # scale (fp16 only) -> backward -> unscale + inf check + step -> update the scale
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def gan_round(nets: GanNets, sampler: DeviceSampler, cfg: Config, precision: Precision, batch_size: int,
              n_dis: int, n_classes: int) -> torch.Tensor:
    """n_dis D steps then cfg.g_steps G steps on one rank's batch; returns device sums
    [D loss, mean D(x), mean D(G(z)), G loss] over the steps (nothing is read back to the host)."""
    loss = GAN_LOSSES[cfg.loss]
    device = sampler.images.device
    sums = torch.zeros(4, device=device)
    real_logit = None
    # With one D step, its fakes (with G's graph kept) also serve the first G step: one G forward fewer per round.
    reuse_fakes = n_dis == 1 and cfg.g_steps >= 1
    kept_fakes = None
    # a G drawing below 64x64 hands D its drawing as it is (the reals are averaged down to match)
    drawn = {"full_res": False} if cfg.draw_res != MODEL_IMG_SIZE else {}
    spectral_norm_power_iteration_(nets.sn_G)  # G's one iteration for its first update (its forward may come first)
    for _ in range(n_dis):
        spectral_norm_power_iteration_(nets.sn_D)
        # D step: real and generated batches through D; D's loss sees the fakes detached from G
        real_u8, real_y = sampler.next(batch_size)
        z = torch.randn(batch_size, nets.G.z_dim, device=device)
        gen_y = torch.randint(0, n_classes, (batch_size,), device=device)
        real_target, fake_target = loss.d_targets(batch_size, cfg.real_label_min, cfg.fake_label_max, device)
        with precision_autocast(precision):
            if reuse_fakes:
                kept_fakes = (nets.G_train(z, gen_y, **drawn), gen_y)
                gen_img = kept_fakes[0].detach()
            else:
                with torch.no_grad():
                    gen_img = nets.G_fwd(z, gen_y, **drawn)
            real_img = _prepare_real(real_u8, cfg, precision)
            real_logit, real_class = nets.D_train(_augment_for_d(real_img, cfg, precision), real_y)
            fake_logit, _ = nets.D_train(_augment_for_d(gen_img, cfg, precision), gen_y)
            d_loss = loss.d_loss(real_logit, fake_logit, real_target, fake_target)
            if real_class is not None:
                d_loss = d_loss + cfg.aux_weight * aux_class_loss(real_class, real_y)
        if loss.penalty is not None:
            # the penalty's double backward runs in fp32 (fp16 would underflow the input gradients) and through the
            # plain D: a torch.compile'd graph cannot be differentiated twice
            with autocast_disabled(precision):
                d_loss = d_loss + loss.penalty(nets.D, real_img.float(), gen_img.float(), real_y, weight=cfg.gp_weight)
        _optimizer_step(d_loss, nets.opt_d, nets.scaler_d)
        sums[:3] += torch.stack([d_loss.detach().float(), real_logit.detach().float().mean(),
                                 fake_logit.detach().float().mean()])
    # RaLS's G loss compares with D(x): the last D step's real logits (detached) serve
    real_logit_for_g = real_logit.detach() if real_logit is not None else None
    nets.D.requires_grad_(False)
    try:
        for g_step in range(cfg.g_steps):
            # G step: gradients flow through the frozen (just updated) D into G
            if g_step > 0:
                spectral_norm_power_iteration_(nets.sn_G)
            with precision_autocast(precision):
                if g_step == 0 and kept_fakes is not None:
                    gen_img, gen_y = kept_fakes
                else:
                    z = torch.randn(batch_size, nets.G.z_dim, device=device)
                    gen_y = torch.randint(0, n_classes, (batch_size,), device=device)
                    gen_img = nets.G_train(z, gen_y, **drawn)
                fake_logit, fake_class = nets.D_fwd(_augment_for_d(gen_img, cfg, precision), gen_y)
                g_loss = loss.g_loss(real_logit_for_g, fake_logit)
                if fake_class is not None:
                    g_loss = g_loss + cfg.aux_weight * aux_class_loss(fake_class, gen_y)
            _optimizer_step(g_loss, nets.opt_g, nets.scaler_g)
            sums[3] += g_loss.detach().float()
    finally:
        nets.D.requires_grad_(True)
    return sums


@dataclass
class RunParts:
    """What set_up_training builds for the loop."""
    nets: GanNets
    precision: Precision
    state: LoopState
    fid: FidTracker
    sampler: DeviceSampler
    grid_z: torch.Tensor
    grid_y: torch.Tensor
    n_classes: int


def set_up_training(cfg: Config, data, device: torch.device, dist_info, fid_fn, resume: dict | None) -> RunParts:
    """Seeds, models and optimisers, the fixed grid latents and the device-resident data; a resumed run's state."""
    world = dist_info.world_size
    if cfg.batch_size < world:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the {world} processes: each needs an image")
    parse_diffaug_policy(cfg.diffaug)
    seed_all(cfg.seed)
    configure_backends(device)
    precision = choose_precision(cfg.amp, device, cfg.channels_last)
    n_classes = len(data.breeds)
    nets = build_gan_nets(cfg, n_classes, device, precision, dist_info)
    grid_z, grid_y = make_grid_latents(cfg.z_dim, n_classes, cfg.seed, device)
    state, fid = LoopState(batch_size=cfg.batch_size, n_dis=cfg.n_dis), FidTracker(fid_fn)
    if resume is not None:
        state = restore_training_snapshot(nets, resume)
        state.batch_size = min(state.batch_size, cfg.batch_size)  # main may have fitted the batch to smaller data
        grid_z, grid_y = resume["grid_z"].to(device), resume["grid_y"].to(device)
        fid.load_state_dict(resume.get("fid", {}))
        restore_rng_state(resume["rng"])
        if state.schedule_progress >= 0.999 and cfg.lr_schedule != "const":
            log("train", "the checkpoint's lr schedule had run to its end: this session trains at the final lr")
    if world > 1:
        # ranks draw different batches and noise; the models stay identical (DDP broadcasts rank 0's weights)
        torch.manual_seed(cfg.seed * 7919 + dist_info.rank * 104729 + state.step)
    if len(data.images) < state.batch_size // world:
        raise ValueError(f"the dataset has {len(data.images)} images, fewer than one batch of "
                         f"{state.batch_size // world}: lower --batch-size")
    sampler = DeviceSampler(data.images.to(device), data.labels.to(device))
    return RunParts(nets, precision, state, fid, sampler, grid_z, grid_y, n_classes)


@contextlib.contextmanager
def catch_stop_signals():
    """SIGTERM/SIGINT add their number to the yielded set instead of stopping the run: the loop finishes its step,
    saves and returns. Outside the main thread signals cannot be caught (the deadline still stops training)."""
    caught: set = set()

    def on_signal(signum, frame):
        if not caught:
            log("train", f"caught {signal.Signals(signum).name}: finishing this step, saving a checkpoint, stopping")
        caught.add(signum)

    with handling_stop_signals(on_signal) as handled:
        if not handled:
            log("train", "not in the main thread: SIGTERM/SIGINT are not caught (the deadline still stops training)")
        yield caught


class RollbackGuard:
    """The last good training state in host memory: a tick with NaN/Inf goes back to it with halved learning rates,
    and a run that keeps diverging gives up there."""

    def __init__(self, nets: GanNets, state: LoopState, now: float):
        self.refresh(nets, state, now)

    def refresh(self, nets: GanNets, state: LoopState, now: float) -> None:
        self.snapshot, self.time = training_snapshot(nets, state), now

    def restore(self, nets: GanNets, state: LoopState) -> None:
        """Weights and optimisers of the snapshot; the step counters go back too, the rest of `state` stays."""
        good = restore_training_snapshot(nets, self.snapshot)
        state.step, state.images_seen = good.step, good.images_seen

    def recover(self, failure: Exception, nets: GanNets, state: LoopState) -> str:
        """After an exception in the loop: print it, restore the last good state; returns the error for the result."""
        traceback.print_exc()
        error = f"{type(failure).__name__}: {failure}"
        log("train", f"training failed ({error}); restoring the last good state (step "
            f"{self.snapshot['progress']['step']})")
        self.restore(nets, state)
        return error

    def roll_back(self, nets: GanNets, state: LoopState, means: dict, status_log: StatusLog, now: float) -> str:
        """After NaN/Inf: restore and halve both lrs; returns why the run ends once the rollbacks run out, else ""."""
        state.rollbacks += 1
        self.restore(nets, state)
        if state.rollbacks > MAX_ROLLBACKS:
            gave_up = (f"losses or weights became NaN/Inf {state.rollbacks} times even with lower learning rates; "
                       f"restored the last good state (step {state.step})")
            log("train", f"giving up: {gave_up}. Try a lower --lr-g/--lr-d, --amp fp32 or another --loss")
            return gave_up
        state.lr_scale *= 0.5
        log("train", f"NaN/Inf in the losses or weights (D {means['d_loss']:.3g}, G {means['g_loss']:.3g}): rolled "
            f"back to step {state.step} and halved both learning rates (x{state.lr_scale:g} now, rollback "
            f"{state.rollbacks} of {MAX_ROLLBACKS})")
        status_log.event({"time": now, "event": "rollback", "step": state.step, "kimg": state.images_seen / 1000,
                          "lr_scale": state.lr_scale})
        return ""


def _decide(now: float, step: int, max_steps: int, train_end: float, caught_signals: set, status_due: Every,
            guard: RollbackGuard, device, world: int) -> tuple[StopReason | None, bool, bool]:
    """(why to stop or None, status tick due, rollback point due), the same on every rank: under DDP the ranks
    agree every DDP_SYNC_STEPS steps (one small all-reduce) and tick or stop only then."""
    stop = StopReason.MAX_STEPS if max_steps and step >= max_steps else None
    if world > 1 and step % DDP_SYNC_STEPS:
        return stop, False, False
    stop_now, tick_now, refresh_now = any_rank_flags([now >= train_end or bool(caught_signals), status_due.due(now),
                                                      now - guard.time >= ROLLBACK_SNAPSHOT_S], device, world)
    if stop_now and stop is None:
        stop = StopReason.SIGNAL if caught_signals else StopReason.DEADLINE
    return stop, tick_now, refresh_now


def _weight_sum(nets: GanNets) -> torch.Tensor:
    # one device scalar that is NaN/Inf as soon as any weight of G or D is
    return torch.stack([p.detach().float().sum() for m in (nets.G, nets.D) for p in m.parameters()]).sum()


def _adapt_n_dis(state: LoopState, cfg: Config, d_loss: float) -> None:
    # one more D step per round while D's loss stays above the limit, back towards n_dis once it is below
    if cfg.dis_loss_limit > 0:
        if d_loss > cfg.dis_loss_limit:
            state.n_dis = min(cfg.n_dis_max, state.n_dis + 1)
        elif state.n_dis > cfg.n_dis:
            state.n_dis -= 1


def _save_grid(nets: GanNets, grid_z, grid_y, out_dir: str, kimg: float, precision: Precision) -> None:
    # a full or read-only disk costs this grid, not the run
    try:
        save_sample_grid(nets.G_ema, grid_z, grid_y, out_dir, kimg, precision)
    except OSError as error:
        log("train", f"WARNING: could not write the sample grid ({error})")


def _save_interpolation_strip(nets: GanNets, out_dir: str, seed: int) -> None:
    # a full or read-only disk costs this strip, not the run
    try:
        save_interpolation_strip(nets.G_ema, os.path.join(out_dir, "samples", "interpolation.png"), 4, 10, seed)
    except OSError as error:
        log("train", f"WARNING: could not write the interpolation strip ({error})")


def _save_run(out_dir: str, cfg: Config, run: RunParts, train_seconds: float, reason: str) -> None:
    # everything a later session needs to continue, in OUT/ckpt.pt (rank 0 only)
    run.state.train_seconds = train_seconds
    write_training_checkpoint(os.path.join(out_dir, CKPT_NAME), run.nets, run.state, f"checkpoint ({reason})",
                              config=dataclasses.asdict(cfg), n_classes=run.n_classes, grid_z=run.grid_z.cpu(),
                              grid_y=run.grid_y.cpu(), fid=run.fid.state_dict())


def _halve_batch_after_oom(nets: GanNets, state: LoopState, device: torch.device, status_log: StatusLog) -> str:
    """Free what the failed round held and halve the batch; returns the error that ends the run at batch 1, else ""."""
    nets.opt_g.zero_grad(set_to_none=True)
    nets.opt_d.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if state.batch_size < 2:
        log("train", "CUDA out of memory even at batch size 1")
        return "CUDA out of memory even at batch size 1"
    state.batch_size //= 2
    log("train", f"CUDA out of memory at batch {state.batch_size * 2}: freed memory, batch size {state.batch_size} "
        f"from now on")
    status_log.event({"time": time.time(), "event": "oom", "step": state.step, "batch_size": state.batch_size})
    return ""


def train(cfg: Config, data, deadline: Deadline, out_dir: str, device, fid_fn=None, *, resume: dict | None = None,
          max_steps: int = 0, recheck=None) -> TrainResult:
    """Train G and D on `data` until the deadline's training window ends, a signal, or max_steps rounds (tests).

    `resume`: the checkpoint settled by checkpoint.open_resume (its config is already cfg). `recheck(G_ema)`, when
    given, runs between rounds once deadline.recheck_due() (reserve.recheck_reserve: it may move the window's end).
    Rank 0 prints and writes OUT/stats.jsonl, OUT/samples/, OUT/ckpt.pt (always before returning). Each rank trains
    on batch_size // world.
    """
    # Set-up: ranks, models, optimisers, data on the device; the banner says what this run is.
    device = torch.device(device)
    dist_info = current_dist_info(device)
    is_main, world = dist_info.is_main, dist_info.world_size
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
    run = set_up_training(cfg, data, device, dist_info, fid_fn, resume)
    nets, precision, state, fid = run.nets, run.precision, run.state, run.fid
    if is_main:
        print_banner(cfg, device, precision, data, deadline, nets.G, nets.D, world, resume and resume.get("path"))

    # Watching: status ticks, grids, checkpoints and FID on their own wall-clock periods; a rollback point.
    train_start = time.time()
    schedule_start, seconds_before, session_first_step = state.schedule_progress, state.train_seconds, state.step
    status_due = Every(parse_duration(cfg.status_every), train_start, zero_means_always=True)
    grid_due = Every(parse_duration(cfg.grid_every), train_start)
    ckpt_due = Every(parse_duration(cfg.ckpt_every), train_start)
    fid_due = Every(parse_duration(cfg.fid_every) if fid.enabled else 0.0, train_start)
    meter, guard = TickMeter(device, train_start), RollbackGuard(nets, state, train_start)
    status_log = StatusLog(os.path.join(out_dir, STATS_NAME), is_main, len(data.images), train_start,
                           deadline.train_end)
    lrs_set, stop, error = (None, None), None, ""

    def status_tick(now: float, record: dict) -> tuple[bool, str]:
        # one host read of the tick's sums -> (healthy, why the run gives up): NaN/Inf rolls back, else adapt + log
        means = meter.read(now, _weight_sum(nets), world)
        if not all(math.isfinite(value) for value in means.values()):
            return False, guard.roll_back(nets, state, means, status_log, now)
        _adapt_n_dis(state, cfg, means["d_loss"])
        del means["weight_sum"]
        status_log.status(now, state, means, current_lrs(cfg, state), {"next_ckpt_s": ckpt_due.left(now), **record})
        return True, ""

    with catch_stop_signals() as caught_signals:
        try:
            while True:
                # Decide, identically on every rank: stop (step limit / deadline / signal), tick, rollback refresh.
                now = time.time()
                if recheck is not None and deadline.recheck_due(now):
                    recheck(nets.G_ema)
                    now = time.time()
                stop, tick_now, refresh_now = _decide(now, state.step, max_steps, deadline.train_end, caught_signals,
                                                      status_due, guard, device, world)
                if stop is not None:
                    break

                # Status tick: FID when due, the tick's numbers (a rollback skips the rest), grid, checkpoint.
                if tick_now and meter.d_steps:
                    status_due.reset(now)
                    record = {}
                    if is_main and (grid_due.due(now) or fid_due.due(now) and fid.enabled):
                        standing_bn_stats_(nets.G_ema, seed=cfg.seed)  # once, for the FID and the grid below
                    if is_main and fid_due.due(now) and fid.enabled:
                        record = fid.measure(nets.G_ema, state.images_seen / 1000)
                        fid_due.reset(time.time())
                    healthy, error = status_tick(now, record)
                    if error:
                        stop = StopReason.ERROR
                        break
                    if not healthy:
                        continue
                    if refresh_now:
                        guard.refresh(nets, state, now)
                    if is_main and grid_due.due(now):
                        _save_grid(nets, run.grid_z, run.grid_y, out_dir, state.images_seen / 1000, precision)
                        grid_due.reset(time.time())
                    if is_main and ckpt_due.due(now):
                        _save_run(out_dir, cfg, run, seconds_before + (now - train_start), "periodic")
                        ckpt_due.reset(time.time())

                # Learning rates follow the training clock (and the batch size, and the rollback scale).
                state.schedule_progress = schedule_progress(schedule_start, deadline.train_fraction(train_start))
                lrs = current_lrs(cfg, state)
                if lrs != lrs_set:
                    set_lr(nets.opt_g, lrs[0])
                    set_lr(nets.opt_d, lrs[1])
                    lrs_set = lrs

                # One round: n_dis D steps + g_steps G steps; an out-of-memory error halves the batch and retries.
                rank_batch = state.batch_size // world
                round_start = time.time()
                try:
                    round_sums = gan_round(nets, run.sampler, cfg, precision, rank_batch, state.n_dis, run.n_classes)
                except OOM_ERRORS:
                    if world > 1:
                        raise
                    error = _halve_batch_after_oom(nets, state, device, status_log)
                    if error:
                        stop = StopReason.ERROR
                        break
                    continue
                if state.step == session_first_step:
                    log("train", f"first round took {time.time() - round_start:.1f}s"
                        f"{' (includes torch.compile)' if cfg.compile else ''}")
                state.step += 1
                state.images_seen += rank_batch * world * state.n_dis
                meter.add(round_sums, state.n_dis, cfg.g_steps, rank_batch * world * state.n_dis)

                # G_ema follows G, averaging over at most ema_rampup of the rounds so far.
                ema_update(nets.G_ema, nets.G, ema_beta_at(state.step, cfg.ema_beta, cfg.ema_rampup))
        except Exception as failure:
            # Before the first round it is a set-up problem, and under DDP the other ranks must not wait in a
            # collective: raise. Later, keep the last good state and return, so the caller can still write images.
            if world > 1 or state.step == session_first_step:
                raise
            stop, error = StopReason.ERROR, guard.recover(failure, nets, state)

    # Wrap-up: same buffers on every rank, G_ema's own BN statistics; the final G_ema competes for best FID (else up
    # to fid_every of training would be thrown away); last status, grid, checkpoint; the caller gets the best G_ema.
    for module in (nets.G, nets.D, nets.G_ema):
        sync_buffers(module, world)
    standing_bn_stats_(nets.G_ema, seed=cfg.seed)
    if stop is not StopReason.ERROR:
        record = {}
        if is_main and fid.enabled and fid_due.seconds > 0 and state.images_seen / 1000 > fid.last_kimg:
            record = fid.measure(nets.G_ema, state.images_seen / 1000)
        error = status_tick(time.time(), record)[1] if meter.d_steps else ""
        stop = StopReason.ERROR if error else stop
    if is_main and state.step > 0:  # an untrained state never replaces a checkpoint
        _save_grid(nets, run.grid_z, run.grid_y, out_dir, state.images_seen / 1000, precision)
        reason = f"error: {error}" if error else stop.value
        _save_run(out_dir, cfg, run, seconds_before + (time.time() - train_start), reason)
    if fid.best_G_ema is not None:
        nets.G_ema.load_state_dict(fid.best_G_ema)
        log("train", f"returning the best G_ema (FID {fid.best:.2f} at {fid.best_kimg:.1f} kimg), not the last one")
    if is_main:
        _save_interpolation_strip(nets, out_dir, cfg.seed)
        log("train", f"stopped ({stop.value}{': ' + error if error else ''}) at step {state.step}, "
            f"{state.images_seen / 1000:.1f} kimg, {format_duration(time.time() - train_start)} of training this session")
    return TrainResult(G_ema=nets.G_ema.eval(), G=nets.G, D=nets.D, progress=state, stop_reason=stop, error=error,
                       fid=fid, grid_z=run.grid_z)

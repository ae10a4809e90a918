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

from src.budget import Deadline, Every
from src.checkpoint import (CKPT_NAME, restore_rng_state, restore_training_snapshot, training_snapshot,
                            write_training_checkpoint)
from src.config import Config, format_duration
from src.console import log
from src.distributed import DDP_SYNC_STEPS, any_rank_flags, current_dist_info, sync_buffers
from src.ema import ema_beta_at, ema_beta_for_images, ema_update, standing_bn_stats_
from src.gan_step import GanStep
from src.generate import breed_counts
from src.interrupt import handling_stop_signals
from src.monitor import (STATS_NAME, StatusLog, TickMeter, make_grid_latents, print_banner, save_interpolation_strip,
                         save_sample_grid)
from src.nets import GanNets, LoopState, build_gan_nets
from src.precision import Precision, choose_precision, configure_backends
from src.schedule import image_progress, lr_factor, schedule_progress
from src.scoring import FidTracker

MAX_ROLLBACKS = 3            # NaN/Inf rollbacks before the run gives up
ROLLBACK_SNAPSHOT_S = 300.0  # refresh the in-memory rollback point at a healthy tick at most this often
LR_PROGRESS_STEPS = 1000     # the lr moves in 1/1000 steps of the window (short step-limited runs reproduce)
OOM_ERRORS = (torch.cuda.OutOfMemoryError,) + ((torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ())


class StopReason(str, enum.Enum):
    """Why training stopped (compares equal to its value: result.stop_reason == "deadline")."""
    DEADLINE = "deadline"
    SIGNAL = "signal"        # SIGTERM / SIGINT: the step was finished and a checkpoint saved
    MAX_STEPS = "max_steps"  # the step limit of a test or benchmark
    MAX_KIMG = "max_kimg"    # --max-kimg: the run's images, counted over all sessions, are done
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


class Diverged(ArithmeticError):
    """NaN/Inf in the losses or weights at a status tick: the loop rolls back to its last good state."""


class GaveUp(RuntimeError):
    """Training cannot go on (NaN/Inf after every rollback, out of memory at batch 1); the message says why."""


def gan_round(step: GanStep, sampler: DeviceSampler, batch_size: int, n_dis: int, g_steps: int) -> torch.Tensor:
    """One round on this rank's share of the batch: n_dis D phases, each on a fresh real batch, then g_steps G
    phases; returns the round's device sums (GanStep does the maths, nothing is read back to the host)."""
    step.begin_round(batch_size, n_dis)
    for _ in range(n_dis):
        step.d_phase(*sampler.next(batch_size))
    for g_step in range(g_steps):
        step.g_phase(g_step)
    return step.end_round()


@dataclass
class RunParts:
    """What set_up_training builds for the loop."""
    nets: GanNets
    step: GanStep
    state: LoopState
    fid: FidTracker
    sampler: DeviceSampler
    grid_z: torch.Tensor
    grid_y: torch.Tensor
    n_classes: int

    @property
    def precision(self) -> Precision:
        return self.nets.precision


def build_run_nets(cfg: Config, n_classes: int, device, dist_info, resume: dict | None = None) -> GanNets:
    """The run's models, optimisers and call paths, built once: seeded first, so the same seed gives the same
    starting weights whoever builds them (main before measuring the reserve, or train itself); a resumed run takes
    the models open_resume built and checked."""
    seed_all(cfg.seed)
    configure_backends(device)
    precision = choose_precision(cfg.amp, device, cfg.channels_last)
    return build_gan_nets(cfg, n_classes, device, precision, dist_info, resume.get("models") if resume else None)


def set_up_training(cfg: Config, data, device: torch.device, dist_info, fid_fn, resume: dict | None,
                    nets: GanNets | None) -> RunParts:
    """The nets (built here unless given), the GAN step, the fixed grid latents and the device-resident data; a
    resumed run's state. The config is settled already (batch fitted to the data and the ranks)."""
    world = dist_info.world_size
    n_classes = len(data.breeds)
    if nets is None:
        nets = build_run_nets(cfg, n_classes, device, dist_info, resume)
    grid_z, grid_y = make_grid_latents(cfg.z_dim, n_classes, cfg.seed, device)
    state, fid = LoopState(batch_size=cfg.batch_size, n_dis=cfg.n_dis), FidTracker(fid_fn)
    if resume is not None:
        state = restore_training_snapshot(nets, resume)
        state.batch_size = min(state.batch_size, cfg.batch_size)  # the data may hold fewer images than before
        grid_z, grid_y = resume["grid_z"].to(device), resume["grid_y"].to(device)
        fid.load_state_dict(resume.get("fid", {}))
        restore_rng_state(resume["rng"])
        if state.schedule_progress >= 0.999 and cfg.lr_schedule != "const":
            log("train", "the checkpoint's lr schedule had run to its end: this session trains at the final lr")
    if world > 1:
        # ranks draw different batches and noise; the models stay identical (DDP broadcasts rank 0's weights)
        torch.manual_seed(cfg.seed * 7919 + dist_info.rank * 104729 + state.step)
    step = GanStep(cfg, nets, breed_counts(data.labels, n_classes))
    if resume is not None:
        step.load_state_dict(resume.get("gan_step") or {})  # ADA's p, LeCam's anchors
    sampler = DeviceSampler(data.images.to(device), data.labels.to(device))
    return RunParts(nets, step, state, fid, sampler, grid_z, grid_y, n_classes)


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
        """Weights and optimisers of the snapshot; the step counters go back too, the rest of `state` stays.
        G_ema comes back with G's batch-norm buffers: the wrap-up recomputes its own before any use."""
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

    def roll_back(self, diverged: Diverged, nets: GanNets, state: LoopState, status_log: StatusLog) -> None:
        """After NaN/Inf: restore and halve both lrs; raises GaveUp once the rollbacks run out."""
        state.rollbacks += 1
        self.restore(nets, state)
        if state.rollbacks > MAX_ROLLBACKS:
            gave_up = (f"losses or weights became NaN/Inf {state.rollbacks} times even with lower learning rates; "
                       f"restored the last good state (step {state.step})")
            log("train", f"giving up: {gave_up}. Try a lower --lr-g/--lr-d, --amp fp32 or another --loss")
            raise GaveUp(gave_up)
        state.lr_scale *= 0.5
        log("train", f"NaN/Inf in the losses or weights ({diverged}): rolled back to step {state.step} and halved "
            f"both learning rates (x{state.lr_scale:g} now, rollback {state.rollbacks} of {MAX_ROLLBACKS})")
        status_log.event({"time": time.time(), "event": "rollback", "step": state.step,
                          "kimg": state.images_seen / 1000, "lr_scale": state.lr_scale})


def _decide(now: float, step: int, max_steps: int, last_start: float, caught_signals: set, status_due: Every,
            guard: RollbackGuard, device, world: int, images_seen: int = 0,
            max_images: float = 0.0) -> tuple[StopReason | None, bool, bool]:
    """(why to stop or None, status tick due, rollback point due), the same on every rank: under DDP the ranks
    agree every DDP_SYNC_STEPS steps (one small all-reduce) and tick or stop only then. The step and image limits
    need no agreement: every rank counts the same global steps and images. The deadline stops the run once no
    more rounds fit before the end of the training window (now >= last_start)."""
    stop = StopReason.MAX_STEPS if max_steps and step >= max_steps else None
    if stop is None and max_images > 0 and images_seen >= max_images:
        stop = StopReason.MAX_KIMG
    if world > 1 and step % DDP_SYNC_STEPS:
        return stop, False, False
    stop_now, tick_now, refresh_now = any_rank_flags([now >= last_start or bool(caught_signals), status_due.due(now),
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


def _save_grid(nets: GanNets, grid_z, grid_y, out_dir: str, kimg: float) -> None:
    # a full or read-only disk costs this grid, not the run
    try:
        save_sample_grid(nets.G_ema, grid_z, grid_y, out_dir, kimg, nets.precision)
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
                              grid_y=run.grid_y.cpu(), fid=run.fid.state_dict(), gan_step=run.step.state_dict())


def _halve_batch_after_oom(nets: GanNets, state: LoopState, device: torch.device, status_log: StatusLog) -> None:
    """Free what the failed round held and halve the batch; raises GaveUp at batch 1."""
    nets.opt_g.zero_grad(set_to_none=True)
    nets.opt_d.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if state.batch_size < 2:
        log("train", "CUDA out of memory even at batch size 1")
        raise GaveUp("CUDA out of memory even at batch size 1")
    state.batch_size //= 2
    log("train", f"CUDA out of memory at batch {state.batch_size * 2}: freed memory, batch size {state.batch_size} "
        f"from now on")
    status_log.event({"time": time.time(), "event": "oom", "step": state.step, "batch_size": state.batch_size})


def _finite_means(meter: TickMeter, nets: GanNets, now: float, world: int) -> dict:
    """One host read of the tick's sums; raises Diverged when a loss, D output or weight is NaN/Inf."""
    means = meter.read(now, _weight_sum(nets), world)
    broken = {name: value for name, value in means.items() if not math.isfinite(value)}
    if broken:
        raise Diverged(", ".join(f"{name} {value:.3g}" for name, value in broken.items()))
    del means["weight_sum"]
    return means


@dataclass
class Watch:
    """How a session is watched: status ticks, grids, checkpoints and FID on their own wall-clock periods, the tick's
    device sums, the rollback point and the records. Rank 0 alone writes."""
    out_dir: str
    is_main: bool
    world: int
    train_start: float
    seconds_before: float        # training seconds of earlier sessions (resume)
    status_due: Every
    grid_due: Every
    ckpt_due: Every
    fid_due: Every
    meter: TickMeter
    guard: RollbackGuard
    status_log: StatusLog

    def train_seconds(self, now: float) -> float:
        return self.seconds_before + (now - self.train_start)


def start_watch(cfg: Config, run: RunParts, deadline: Deadline, out_dir: str, dist_info, n_images: int) -> Watch:
    """The watchers of a session starting now."""
    now, device = time.time(), run.sampler.images.device
    return Watch(out_dir=out_dir, is_main=dist_info.is_main, world=dist_info.world_size, train_start=now,
                 seconds_before=run.state.train_seconds,
                 status_due=Every(cfg.status_every, now, zero_means_always=True), grid_due=Every(cfg.grid_every, now),
                 ckpt_due=Every(cfg.ckpt_every, now), fid_due=Every(cfg.fid_every if run.fid.enabled else 0.0, now),
                 meter=TickMeter(device, now), guard=RollbackGuard(run.nets, run.state, now),
                 status_log=StatusLog(os.path.join(out_dir, STATS_NAME), dist_info.is_main, n_images, now,
                                      deadline))


def _log_status(cfg: Config, run: RunParts, watch: Watch, now: float, means: dict, record: dict) -> None:
    # the adaptive D steps follow the tick's D loss; one status line and record
    _adapt_n_dis(run.state, cfg, means["d_loss"])
    levers = {"ada_p": run.step.ada_p()} if run.step.ada is not None else {}
    watch.status_log.status(now, run.state, means, current_lrs(cfg, run.state),
                            {"next_ckpt_s": watch.ckpt_due.left(now), **levers, **record})


def status_tick(cfg: Config, run: RunParts, watch: Watch, now: float, refresh_now: bool) -> None:
    """FID when due, the tick's numbers (Diverged on NaN/Inf), then the rollback point, grid and checkpoint."""
    nets, state, fid, is_main = run.nets, run.state, run.fid, watch.is_main
    watch.status_due.reset(now)
    record = {}
    fid_now = is_main and fid.enabled and watch.fid_due.due(now)
    if fid_now or is_main and watch.grid_due.due(now):
        standing_bn_stats_(nets.G_ema, seed=cfg.seed)  # once, for the FID and the grid below
    if fid_now:
        record = fid.measure(nets.G_ema, state.images_seen / 1000)
        watch.fid_due.reset(time.time())
    _log_status(cfg, run, watch, now, _finite_means(watch.meter, nets, now, watch.world), record)
    if refresh_now:
        watch.guard.refresh(nets, state, now)
    if is_main and watch.grid_due.due(now):
        _save_grid(nets, run.grid_z, run.grid_y, watch.out_dir, state.images_seen / 1000)
        watch.grid_due.reset(time.time())
    if is_main and watch.ckpt_due.due(now):
        _save_run(watch.out_dir, cfg, run, watch.train_seconds(now), "periodic")
        watch.ckpt_due.reset(time.time())


def wrap_up(cfg: Config, run: RunParts, watch: Watch, stop: StopReason, error: str) -> tuple[StopReason, str]:
    """The end of a session, on every path: same buffers on every rank; the last status tick (its rollback may
    restore G_ema with G's batch-norm buffers), then G_ema's own BN statistics; the final G_ema competes for best
    FID (else up to fid_every of training would be thrown away); the last grid and checkpoint; the best G_ema is
    put back. Returns (stop, error), changed when the last tick gave up."""
    nets, state, fid = run.nets, run.state, run.fid
    for module in (nets.G, nets.D, nets.G_ema):
        sync_buffers(module, watch.world)
    final_means, now = None, time.time()
    if stop is not StopReason.ERROR and watch.meter.d_steps:
        try:
            final_means = _finite_means(watch.meter, nets, now, watch.world)
        except Diverged as diverged:
            try:
                watch.guard.roll_back(diverged, nets, state, watch.status_log)
            except GaveUp as gave_up:
                stop, error = StopReason.ERROR, str(gave_up)
    standing_bn_stats_(nets.G_ema, seed=cfg.seed)
    record = {}
    if watch.is_main and fid.enabled and watch.fid_due.seconds > 0 and state.images_seen / 1000 > fid.last_kimg:
        record = fid.measure(nets.G_ema, state.images_seen / 1000)
    if final_means is not None:
        _log_status(cfg, run, watch, now, final_means, record)
    elif record:
        watch.status_log.event({"time": now, "step": state.step, "kimg": state.images_seen / 1000, **record})
    if watch.is_main and state.step > 0:  # an untrained state never replaces a checkpoint
        _save_grid(nets, run.grid_z, run.grid_y, watch.out_dir, state.images_seen / 1000)
        _save_run(watch.out_dir, cfg, run, watch.train_seconds(time.time()), f"error: {error}" if error else stop.value)
    if fid.best_G_ema is not None:
        nets.G_ema.load_state_dict(fid.best_G_ema)
        log("train", f"returning the best G_ema (FID {fid.best:.2f} at {fid.best_kimg:.1f} kimg), not the last one")
    if watch.is_main:
        _save_interpolation_strip(nets, watch.out_dir, cfg.seed)
        log("train", f"stopped ({stop.value}{': ' + error if error else ''}) at step {state.step}, "
            f"{state.images_seen / 1000:.1f} kimg, {format_duration(time.time() - watch.train_start)} of training "
            f"this session")
    return stop, error


def train(cfg: Config, data, deadline: Deadline, out_dir: str, device, fid_fn=None, *, resume: dict | None = None,
          max_steps: int = 0, nets: GanNets | None = None, recheck=None) -> TrainResult:
    """Train G and D on `data` until the deadline's training window ends, a signal, cfg.max_kimg thousand images
    over all sessions, or max_steps rounds (tests).

    `cfg` is the settled config (settle.settle_run); `resume` the checkpoint it settled; `nets` the run's nets when
    main built them already (build_run_nets), else they are built here. `recheck(G_ema)`, when given, runs between
    rounds once deadline.recheck_due() (reserve.recheck_reserve: it may move the window's end). Rank 0 prints and
    writes OUT/stats.jsonl, OUT/samples/, OUT/ckpt.pt (always before returning). Each rank trains on
    batch_size // world.
    """
    # Set-up: ranks, models, optimisers, data on the device; the banner says what this run is; the watchers.
    device = torch.device(device)
    dist_info = current_dist_info(device)
    world = dist_info.world_size
    if dist_info.is_main:
        os.makedirs(out_dir, exist_ok=True)
    run = set_up_training(cfg, data, device, dist_info, fid_fn, resume, nets)
    nets, state = run.nets, run.state
    if dist_info.is_main:
        print_banner(cfg, device, nets.precision, data, deadline, nets.G, nets.D, world, resume and resume.get("path"))
    watch = start_watch(cfg, run, deadline, out_dir, dist_info, len(data.images))
    schedule_start, session_first_step = state.schedule_progress, state.step
    # the loop stops before rounds that would end past the training window; under DDP it decides every DDP_SYNC_STEPS
    rounds_per_decision = DDP_SYNC_STEPS if world > 1 else 1
    lrs_set, stop, error = (None, None), None, ""

    with catch_stop_signals() as caught_signals:
        try:
            while True:
                # Decide, identically on every rank: stop (step limit / deadline / signal), tick, rollback refresh.
                now = time.time()
                if recheck is not None and deadline.recheck_due(now):
                    recheck(nets.G_ema)
                    now = time.time()
                stop, tick_now, refresh_now = _decide(now, state.step, max_steps, deadline.last_start(rounds_per_decision),
                                                      caught_signals, watch.status_due, watch.guard, device, world,
                                                      state.images_seen, cfg.max_kimg * 1000)
                if stop is not None:
                    break
                try:
                    if tick_now and watch.meter.d_steps:
                        status_tick(cfg, run, watch, now, refresh_now)

                    # Learning rates follow the training clock, or the images of a fixed-length run (and the batch
                    # size, and the rollback scale).
                    if cfg.max_kimg > 0:
                        state.schedule_progress = image_progress(state.images_seen, cfg.max_kimg * 1000)
                    else:
                        state.schedule_progress = schedule_progress(schedule_start,
                                                                    deadline.train_fraction(watch.train_start))
                    lrs = current_lrs(cfg, state)
                    if lrs != lrs_set:
                        set_lr(nets.opt_g, lrs[0])
                        set_lr(nets.opt_d, lrs[1])
                        lrs_set = lrs

                    # One round: n_dis D phases + g_steps G phases.
                    rank_batch = state.batch_size // world
                    round_start = time.time()
                    round_sums = gan_round(run.step, run.sampler, rank_batch, state.n_dis, cfg.g_steps)
                except Diverged as diverged:
                    # NaN/Inf: back to the last good state with halved lrs (GaveUp once the rollbacks run out)
                    watch.guard.roll_back(diverged, nets, state, watch.status_log)
                    continue
                except OOM_ERRORS:
                    # out of memory: half the batch from now on (GaveUp at batch 1; under DDP the ranks cannot agree)
                    if world > 1:
                        raise
                    _halve_batch_after_oom(nets, state, device, watch.status_log)
                    continue
                # the next round should take as long as this one, but a session's first round is warm-up (and compile)
                if state.step == session_first_step:
                    log("train", f"first round took {time.time() - round_start:.1f}s"
                        f"{' (includes torch.compile)' if cfg.compile else ''}")
                else:
                    deadline.expect_round(time.time() - round_start)
                round_images = rank_batch * world * state.n_dis
                state.step += 1
                state.images_seen += round_images
                watch.meter.add(round_sums, state.n_dis, cfg.g_steps, round_images)

                # G_ema follows G, averaging over at most ema_rampup of the rounds (or images) so far; with ema_kimg
                # its half-life is counted in images, so a batch change keeps the horizon.
                if cfg.ema_kimg > 0:
                    beta = ema_beta_for_images(round_images, cfg.ema_kimg, state.images_seen, cfg.ema_rampup)
                else:
                    beta = ema_beta_at(state.step, cfg.ema_beta, cfg.ema_rampup)
                ema_update(nets.G_ema, nets.G, beta)
        except GaveUp as gave_up:
            stop, error = StopReason.ERROR, str(gave_up)
        except Exception as failure:
            # Before the first round it is a set-up problem, and under DDP the other ranks must not wait in a
            # collective: raise. Later, keep the last good state and return, so the caller can still write images.
            if world > 1 or state.step == session_first_step:
                raise
            stop, error = StopReason.ERROR, watch.guard.recover(failure, nets, state)

    stop, error = wrap_up(cfg, run, watch, stop, error)
    return TrainResult(G_ema=nets.G_ema.eval(), G=nets.G, D=nets.D, progress=state, stop_reason=stop, error=error,
                       fid=run.fid, grid_z=run.grid_z)

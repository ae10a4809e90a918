"""The training loop: D and G steps on device-resident data until the deadline, watched, checkpointed, resumable.

Speed rules: the uint8 dataset is copied to the device once and indexed there; flips and DiffAugment run there;
losses and D outputs accumulate in a device tensor that is read once per status tick, so a step never waits
for the host. The clock (time.time()) is checked every step; it costs nothing on the device.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import random
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from src.augment import diff_augment, parse_diffaug_policy, random_flip, uint8_to_unit
from src.budget import Deadline
from src.checkpoint import (CKPT_FORMAT, CKPT_NAME, CheckpointError, capture_rng_state, ckpt_cpu_copy,
                            load_checkpoint, merge_resumed_config, resolve_resume_path, restore_rng_state,
                            save_checkpoint)
from src.config import Config, format_duration, parse_duration
from src.console import log
from src.distributed import DistInfo, any_rank_flags, current_dist_info, mean_over_ranks, sync_buffers, wrap_ddp
from src.ema import ema_beta_at, ema_update
from src.layers import spectral_norm_layers, spectral_norm_power_iteration_
from src.losses import GAN_LOSSES, aux_class_loss, gradient_penalty, noisy_labels
from src.models import build_models
from src.monitor import (STATS_NAME, append_stats, format_status, make_grid_latents, print_banner,
                         save_interpolation_strip, save_sample_grid)
from src.precision import (Precision, autocast_disabled, choose_precision, configure_backends, make_adam,
                           make_grad_scaler, place_module, precision_autocast, to_memory_format)
from src.schedule import lr_factor, schedule_progress

MAX_ROLLBACKS = 3            # NaN/Inf rollbacks before the run gives up
ROLLBACK_SNAPSHOT_S = 300.0  # refresh the in-memory rollback point at a healthy tick at most this often
DDP_SYNC_STEPS = 20          # under DDP the ranks agree on stop/tick decisions every this many steps
LR_PROGRESS_STEPS = 1000     # the lr moves in 1/1000 steps of the window (short step-limited runs reproduce)
OOM_ERRORS = (torch.cuda.OutOfMemoryError,) + ((torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ())


@dataclass
class TrainResult:
    G_ema: torch.nn.Module       # eval mode, on the device; the best-FID state when training-time FID ran
    steps: int                   # rounds done (each: n_dis D steps + g_steps G steps), over all sessions
    images_seen: int             # real images shown to D, over all sessions and ranks
    stop_reason: str             # "deadline" | "signal" | "max_steps" | "error: ..."
    best_fid: float | None
    cfg: Config                  # the config trained (the checkpoint's when resumed)
    G: torch.nn.Module
    D: torch.nn.Module
    n_classes: int
    batch_size: int              # final global batch (an OOM halves it)
    rollbacks: int
    fid_history: list            # [[kimg, fid], ...]
    grid_z: torch.Tensor
    grid_y: torch.Tensor
    checkpoint_path: str
    stats_path: str
    train_seconds: float         # training wall-clock over all sessions


@dataclass
class LoopState:
    """Counters and adaptive settings; saved in the checkpoint as plain numbers."""
    step: int = 0
    images_seen: int = 0
    batch_size: int = 64         # global batch (all ranks together)
    n_dis: int = 1               # current D steps per round (adaptive when dis_loss_limit > 0)
    lr_scale: float = 1.0        # halved by every NaN rollback
    rollbacks: int = 0
    schedule_progress: float = 0.0
    train_seconds: float = 0.0
    best_fid: float | None = None
    best_kimg: float | None = None
    fid_history: list = field(default_factory=list)


@dataclass
class GanNets:
    """The modules and optimisers of a run. G, D, G_ema are the plain modules (saved, EMA'd); G_train/D_train are
    the paths gradients flow through (DDP and/or compiled), G_fwd/D_fwd the same modules without DDP."""
    G: torch.nn.Module
    D: torch.nn.Module
    G_ema: torch.nn.Module
    G_train: torch.nn.Module
    D_train: torch.nn.Module
    G_fwd: torch.nn.Module
    D_fwd: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: object             # torch.amp.GradScaler (disabled unless fp16)
    scaler_d: object
    sn_G: list                   # spectral_norm_layers(G), (D): advanced once per optimiser step
    sn_D: list


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


def build_gan_nets(cfg: Config, n_classes: int, device, precision: Precision, dist_info: DistInfo) -> GanNets:
    """G, D (initialised by the models module), G_ema, the DDP / compiled call paths, Adam and grad scalers."""
    G, D = build_models(cfg, n_classes)
    G, D = place_module(G, device, precision).train(), place_module(D, device, precision).train()
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    # Without DDP one (compiled) module serves both paths; with DDP the no-grad / frozen-D paths skip the wrapper.
    G_fwd = torch.compile(G) if cfg.compile else G
    D_fwd = torch.compile(D) if cfg.compile else D
    if dist_info.world_size > 1:
        G_train, D_train = wrap_ddp(G, dist_info), wrap_ddp(D, dist_info)
        if cfg.compile:
            G_train, D_train = torch.compile(G_train), torch.compile(D_train)
    else:
        G_train, D_train = G_fwd, D_fwd
    opt_g = make_adam(G.parameters(), cfg.lr_g, (cfg.beta1, cfg.beta2), precision)
    opt_d = make_adam(D.parameters(), cfg.lr_d, (cfg.beta1, cfg.beta2), precision)
    return GanNets(G=G, D=D, G_ema=G_ema, G_train=G_train, D_train=D_train, G_fwd=G_fwd, D_fwd=D_fwd,
                   opt_g=opt_g, opt_d=opt_d, scaler_g=make_grad_scaler(precision), scaler_d=make_grad_scaler(precision),
                   sn_G=spectral_norm_layers(G), sn_D=spectral_norm_layers(D))


def training_snapshot(nets: GanNets, state: LoopState) -> dict:
    """A CPU copy of everything the optimisation changes: the rollback point and the core of a checkpoint."""
    return ckpt_cpu_copy({"G": nets.G.state_dict(), "D": nets.D.state_dict(), "G_ema": nets.G_ema.state_dict(),
                          "opt_g": nets.opt_g.state_dict(), "opt_d": nets.opt_d.state_dict(),
                          "scaler_g": nets.scaler_g.state_dict(), "scaler_d": nets.scaler_d.state_dict(),
                          "progress": dataclasses.asdict(state)})


def restore_training_snapshot(nets: GanNets, snapshot: dict) -> None:
    """Load models, optimisers and scalers from a snapshot or checkpoint (copies: the snapshot stays reusable)."""
    nets.G.load_state_dict(snapshot["G"])
    nets.D.load_state_dict(snapshot["D"])
    nets.G_ema.load_state_dict(snapshot["G_ema"])
    # optimiser tensors already on the right device would be taken over as they are: hand over copies
    nets.opt_g.load_state_dict(ckpt_cpu_copy(snapshot["opt_g"]))
    nets.opt_d.load_state_dict(ckpt_cpu_copy(snapshot["opt_d"]))
    if snapshot.get("scaler_g"):
        nets.scaler_g.load_state_dict(snapshot["scaler_g"])
    if snapshot.get("scaler_d"):
        nets.scaler_d.load_state_dict(snapshot["scaler_d"])


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
    # uint8 -> [-1, 1] on the device, random mirror (real images only)
    real_img = uint8_to_unit(img_uint8)
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
    d_loss_fn, g_loss_fn = GAN_LOSSES[cfg.loss]
    device = sampler.images.device
    sums = torch.zeros(4, device=device)
    real_logit = None
    # With one D step, its fakes (with G's graph kept) also serve the first G step: one G forward fewer per round.
    reuse_fakes = n_dis == 1 and cfg.g_steps >= 1
    kept_fakes = None
    spectral_norm_power_iteration_(nets.sn_G)  # G's one iteration for its first update (its forward may come first)
    for _ in range(n_dis):
        spectral_norm_power_iteration_(nets.sn_D)
        # D step: real and generated batches through D; D's loss sees the fakes detached from G
        real_u8, real_y = sampler.next(batch_size)
        z = torch.randn(batch_size, nets.G.z_dim, device=device)
        gen_y = torch.randint(0, n_classes, (batch_size,), device=device)
        real_target, fake_target = 1.0, 0.0
        if cfg.loss in ("bce", "ls"):
            real_target = noisy_labels(batch_size, cfg.real_label_min, 1.0, device)
            fake_target = noisy_labels(batch_size, 0.0, cfg.fake_label_max, device)
        with precision_autocast(precision):
            if reuse_fakes:
                kept_fakes = (nets.G_train(z, gen_y), gen_y)
                gen_img = kept_fakes[0].detach()
            else:
                with torch.no_grad():
                    gen_img = nets.G_fwd(z, gen_y)
            real_img = _prepare_real(real_u8, cfg, precision)
            real_logit, real_class = nets.D_train(_augment_for_d(real_img, cfg, precision), real_y)
            fake_logit, _ = nets.D_train(_augment_for_d(gen_img, cfg, precision), gen_y)
            d_loss = d_loss_fn(real_logit, fake_logit, real_target, fake_target)
            if real_class is not None:
                d_loss = d_loss + cfg.aux_weight * aux_class_loss(real_class, real_y)
        if cfg.loss == "wgan-gp":
            # the penalty's double backward runs in fp32 (fp16 would underflow the input gradients) and through the
            # plain D: a torch.compile'd graph cannot be differentiated twice
            with autocast_disabled(precision):
                d_loss = d_loss + gradient_penalty(nets.D, real_img.float(), gen_img.float(), real_y,
                                                   weight=cfg.gp_weight)
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
                    gen_img = nets.G_train(z, gen_y)
                fake_logit, fake_class = nets.D_fwd(_augment_for_d(gen_img, cfg, precision), gen_y)
                g_loss = g_loss_fn(real_logit_for_g, fake_logit)
                if fake_class is not None:
                    g_loss = g_loss + cfg.aux_weight * aux_class_loss(fake_class, gen_y)
            _optimizer_step(g_loss, nets.opt_g, nets.scaler_g)
            sums[3] += g_loss.detach().float()
    finally:
        nets.D.requires_grad_(True)
    return sums


def _install_stop_signals(caught: dict) -> dict:
    """SIGTERM/SIGINT set caught['signal'] (the loop finishes its step, saves and returns); returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        log("train", "not in the main thread: SIGTERM/SIGINT are not caught (the deadline still stops training)")
        return {}

    def on_signal(signum, frame):
        if "signal" not in caught:
            log("train", f"caught {signal.Signals(signum).name}: finishing this step, saving a checkpoint, stopping")
        caught["signal"] = signum

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, on_signal)
    return previous


def _restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _free_cuda_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _write_output(what: str, write, *args) -> None:
    # a full or read-only disk costs this file, not the run
    try:
        write(*args)
    except OSError as error:
        log("train", f"WARNING: could not write {what} ({error})")


def _due_time(now: float, every_s: float) -> float:
    # the next time an every_s event is due; 0 means never (only at the end)
    return now + every_s if every_s > 0 else math.inf


def train(cfg: Config, data, deadline: Deadline, out_dir: str, device, fid_fn=None, *,
          max_steps: int = 0) -> TrainResult:
    """Train G and D on `data` until the deadline's training window ends, a signal, or max_steps rounds (tests).

    Resumes from cfg.resume ('auto': OUT/ckpt.pt when present). Rank 0 prints the banner and status, and writes
    OUT/stats.jsonl, OUT/samples/ and OUT/ckpt.pt; a checkpoint is always saved before returning.
    Under torchrun (world_size > 1) each rank trains on cfg.batch_size // world_size images per step.
    """
    device = torch.device(device)
    dist_info = current_dist_info(device)
    is_main, world = dist_info.is_main, dist_info.world_size
    ckpt_path, stats_path = os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, STATS_NAME)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
    n_classes = len(data.breeds)

    # Resume: the checkpoint's config (except this session's paths/budget/watching flags) and state.
    resume_path = resolve_resume_path(cfg.resume, out_dir)
    saved = load_checkpoint(resume_path) if resume_path else None
    if saved is not None:
        if saved["n_classes"] != n_classes:
            raise CheckpointError(f"{resume_path} was trained on {saved['n_classes']} breeds, this data has {n_classes}: "
                                  f"use the same data, or pass --resume \"\" to start fresh")
        cfg = merge_resumed_config(cfg, saved["config"])
    if cfg.batch_size < world:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the {world} processes: each needs an image")

    parse_diffaug_policy(cfg.diffaug)
    seed_all(cfg.seed)
    configure_backends(device)
    precision = choose_precision(cfg.amp, device, cfg.channels_last)
    nets = build_gan_nets(cfg, n_classes, device, precision, dist_info)
    grid_z, grid_y = make_grid_latents(cfg.z_dim, n_classes, cfg.seed, device)
    state = LoopState(batch_size=cfg.batch_size, n_dis=cfg.n_dis)
    best_G_ema_state = None
    if saved is not None:
        restore_training_snapshot(nets, saved)
        state = LoopState(**saved["progress"])
        grid_z, grid_y = saved["grid_z"].to(device), saved["grid_y"].to(device)
        best_G_ema_state = saved.get("best_G_ema")
        restore_rng_state(saved["rng"])
        if state.schedule_progress >= 0.999 and cfg.lr_schedule != "const":
            log("train", "the checkpoint's lr schedule had run to its end: this session trains at the final lr")
        del saved
    if world > 1:
        # ranks draw different batches and noise; the models stay identical (DDP broadcasts rank 0's weights)
        torch.manual_seed(cfg.seed * 7919 + dist_info.rank * 104729 + state.step)
    if len(data.images) < state.batch_size // world:
        raise ValueError(f"the dataset has {len(data.images)} images, fewer than one batch of "
                         f"{state.batch_size // world}: lower --batch-size")
    sampler = DeviceSampler(data.images.to(device), data.labels.to(device))
    if is_main:
        print_banner(cfg, device, precision, data, deadline, nets.G, nets.D, world, resume_path)

    status_s, grid_s = parse_duration(cfg.status_every), parse_duration(cfg.grid_every)
    ckpt_s, fid_s = parse_duration(cfg.ckpt_every), parse_duration(cfg.fid_every) if fid_fn is not None else 0.0
    train_start = time.time()
    schedule_start, seconds_before = state.schedule_progress, state.train_seconds
    next_tick, next_grid = train_start + status_s, _due_time(train_start, grid_s)
    next_ckpt, next_fid = _due_time(train_start, ckpt_s), _due_time(train_start, fid_s)
    snapshot, snapshot_time = training_snapshot(nets, state), train_start
    tick_sums = torch.zeros(4, device=device)
    tick = {"d_steps": 0, "g_steps": 0, "images": 0, "start": train_start}
    lrs_set = (None, None)
    stop_reason, first_round, session_first_step = None, True, state.step
    caught: dict = {}
    previous_handlers = _install_stop_signals(caught)

    def read_tick(now: float, extra: dict) -> bool:
        """Read the tick's sums (one host sync), check for NaN/Inf, adapt n_dis, log; False: rolled back or gave up."""
        nonlocal tick_sums, snapshot, snapshot_time, stop_reason
        params = list(nets.G.parameters()) + list(nets.D.parameters())
        weight_sum = torch.stack([p.detach().float().sum() for p in params]).sum()
        values = mean_over_ranks(torch.cat([tick_sums, weight_sum.view(1)]), world).tolist()
        d_steps, g_steps = max(1, tick["d_steps"]), max(1, tick["g_steps"])
        d_loss, d_real, d_fake, g_loss = (values[0] / d_steps, values[1] / d_steps, values[2] / d_steps,
                                          values[3] / g_steps)
        tick_images, tick_seconds = tick["images"], max(1e-9, now - tick["start"])
        tick_sums = torch.zeros(4, device=device)
        tick.update(d_steps=0, g_steps=0, images=0, start=now)
        if not all(math.isfinite(v) for v in (d_loss, d_real, d_fake, g_loss, values[4])):
            state.rollbacks += 1
            restore_training_snapshot(nets, snapshot)
            state.step, state.images_seen = snapshot["progress"]["step"], snapshot["progress"]["images_seen"]
            if state.rollbacks > MAX_ROLLBACKS:
                stop_reason = (f"error: losses or weights became NaN/Inf {state.rollbacks} times even with lower "
                               f"learning rates; restored the last good state (step {state.step})")
                if is_main:
                    log("train", f"giving up: {stop_reason[7:]}. Try a lower --lr-g/--lr-d, --amp fp32 or another --loss")
                return False
            state.lr_scale *= 0.5
            if is_main:
                log("train", f"NaN/Inf in the losses or weights (D {d_loss:.3g}, G {g_loss:.3g}): rolled back to step "
                    f"{state.step} and halved both learning rates (x{state.lr_scale:g} now, rollback "
                    f"{state.rollbacks} of {MAX_ROLLBACKS})")
                event = {"time": now, "event": "rollback", "step": state.step, "kimg": state.images_seen / 1000,
                         "lr_scale": state.lr_scale}
                _write_output("stats", append_stats, stats_path, event)
            return False
        if cfg.dis_loss_limit > 0:
            # one more D step per round while D's loss stays above the limit, back towards n_dis once it is below
            if d_loss > cfg.dis_loss_limit:
                state.n_dis = min(cfg.n_dis_max, state.n_dis + 1)
            elif state.n_dis > cfg.n_dis:
                state.n_dis -= 1
        if extra.get("snapshot"):
            snapshot, snapshot_time = training_snapshot(nets, state), now
        if is_main:
            lr_g, lr_d = current_lrs(cfg, state)
            record = {"time": now, "step": state.step, "epoch": state.images_seen / len(data.images),
                      "kimg": state.images_seen / 1000, "images_per_s": tick_images / tick_seconds,
                      "g_loss": g_loss, "d_loss": d_loss, "d_real": d_real, "d_fake": d_fake, "lr_g": lr_g,
                      "lr_d": lr_d, "batch_size": state.batch_size, "n_dis": state.n_dis,
                      "elapsed_s": now - train_start, "train_left_s": max(0.0, deadline.train_end - now),
                      "next_ckpt_s": (next_ckpt - now) if math.isfinite(next_ckpt) else None,
                      "schedule_progress": state.schedule_progress}
            record.update(extra.get("record", {}))
            _write_output("stats", append_stats, stats_path, record)
            log("train", format_status(record))
        return True

    def write_checkpoint(reason: str) -> None:
        """Rank 0 saves OUT/ckpt.pt atomically; a failed write is logged and the previous checkpoint stays."""
        if not is_main:
            return
        state.train_seconds = seconds_before + (time.time() - train_start)
        ckpt = training_snapshot(nets, state)
        ckpt.update(format=CKPT_FORMAT, config=dataclasses.asdict(cfg), n_classes=n_classes, grid_z=grid_z.cpu(),
                    grid_y=grid_y.cpu(), best_G_ema=best_G_ema_state, rng=capture_rng_state())
        start = time.time()
        try:
            save_checkpoint(ckpt_path, ckpt)
            log("train", f"checkpoint ({reason}) -> {ckpt_path} in {time.time() - start:.1f}s")
        except OSError as error:
            log("train", f"WARNING: could not write {ckpt_path} ({error}); the previous checkpoint is kept")

    def measure_fid(now: float) -> dict:
        """FID of G_ema (rank 0); the best state is kept in memory and in the checkpoint."""
        nonlocal best_G_ema_state, fid_fn
        start = time.time()
        try:
            fid = float(fid_fn(nets.G_ema))
        except Exception as error:  # a failing metric must not end the training
            log("train", f"WARNING: training-time FID failed ({type(error).__name__}: {error}); FID is off from now")
            fid_fn = None
            return {}
        nets.G_ema.eval()
        kimg = state.images_seen / 1000
        if not math.isfinite(fid):
            log("train", f"FID is {fid} at {kimg:.1f} kimg: not kept")
            return {}
        state.fid_history.append([kimg, fid])
        if state.best_fid is None or fid < state.best_fid:
            state.best_fid, state.best_kimg = fid, kimg
            best_G_ema_state = ckpt_cpu_copy(nets.G_ema.state_dict())
        log("train", f"FID {fid:.2f} at {kimg:.1f} kimg ({time.time() - start:.0f}s); best {state.best_fid:.2f} "
            f"at {state.best_kimg:.1f} kimg")
        return {"fid": fid, "fid_s": time.time() - start}

    try:
        while True:
            # Decide: stop (deadline / signal / step limit), tick, refresh the rollback point; identical on all ranks.
            now = time.time()
            if max_steps and state.step >= max_steps:
                stop_reason = stop_reason or "max_steps"
            if world == 1 or state.step % DDP_SYNC_STEPS == 0:
                stop_now, tick_now, snapshot_now = any_rank_flags(
                    [now >= deadline.train_end or "signal" in caught, now >= next_tick,
                     now - snapshot_time >= ROLLBACK_SNAPSHOT_S], device, world)
                if stop_now and stop_reason is None:
                    stop_reason = "signal" if "signal" in caught else "deadline"
            else:
                tick_now = snapshot_now = False
            if stop_reason is not None:
                break
            if tick_now and tick["d_steps"]:
                next_tick = now + status_s
                extra = {"snapshot": snapshot_now, "record": {}}
                if is_main and now >= next_fid and fid_fn is not None:
                    extra["record"].update(measure_fid(now))
                    next_fid = _due_time(time.time(), fid_s)
                if not read_tick(now, extra):
                    if stop_reason is not None:
                        break
                    continue
                if is_main and now >= next_grid:
                    _write_output("the sample grid", save_sample_grid, nets.G_ema, grid_z, grid_y, out_dir,
                                  state.images_seen / 1000, precision)
                    next_grid = _due_time(time.time(), grid_s)
                if is_main and now >= next_ckpt:
                    write_checkpoint("periodic")
                    next_ckpt = _due_time(time.time(), ckpt_s)

            # Learning rates follow the training clock (and the batch size, and the rollback scale).
            state.schedule_progress = schedule_progress(schedule_start, deadline.train_fraction(train_start))
            lrs = current_lrs(cfg, state)
            if lrs != lrs_set:
                set_lr(nets.opt_g, lrs[0])
                set_lr(nets.opt_d, lrs[1])
                lrs_set = lrs

            # One round: n_dis D steps + g_steps G steps; an OOM halves the batch and retries.
            rank_batch = state.batch_size // world
            round_start = time.time()
            try:
                tick_sums += gan_round(nets, sampler, cfg, precision, rank_batch, state.n_dis, n_classes)
                oom = False
            except OOM_ERRORS:
                if world > 1:
                    raise
                oom = True
            if oom:
                nets.opt_g.zero_grad(set_to_none=True)
                nets.opt_d.zero_grad(set_to_none=True)
                _free_cuda_memory(device)
                if state.batch_size < 2:
                    stop_reason = "error: CUDA out of memory even at batch size 1"
                    log("train", stop_reason)
                    break
                state.batch_size //= 2
                log("train", f"CUDA out of memory at batch {state.batch_size * 2}: freed memory, batch size "
                    f"{state.batch_size} from now on")
                if is_main:
                    event = {"time": time.time(), "event": "oom", "step": state.step, "batch_size": state.batch_size}
                    _write_output("stats", append_stats, stats_path, event)
                continue
            if first_round and is_main:
                log("train", f"first round took {time.time() - round_start:.1f}s"
                    f"{' (includes torch.compile)' if cfg.compile else ''}")
                first_round = False
            state.step += 1
            state.images_seen += rank_batch * world * state.n_dis
            tick["d_steps"] += state.n_dis
            tick["g_steps"] += cfg.g_steps
            tick["images"] += rank_batch * world * state.n_dis
            # G_ema follows G, averaging over at most ema_rampup of the rounds so far
            ema_update(nets.G_ema, nets.G, ema_beta_at(state.step, cfg.ema_beta, cfg.ema_rampup))
    except Exception as error:
        # A failure before the first round is a set-up problem, and under DDP the other ranks must not wait
        # in a collective: raise. Later, keep the last good state and return, so the caller can still write images.
        if world > 1 or state.step == session_first_step:
            raise
        traceback.print_exc()
        stop_reason = f"error: {type(error).__name__}: {error}"
        log("train", f"training failed ({stop_reason[7:]}); restoring the last good state (step "
            f"{snapshot['progress']['step']})")
        restore_training_snapshot(nets, snapshot)
        state.step, state.images_seen = snapshot["progress"]["step"], snapshot["progress"]["images_seen"]
    finally:
        _restore_signals(previous_handlers)

    # Wrap up: same buffers on every rank, last status, grid and checkpoint; the best-FID G_ema is what the caller gets.
    for module in (nets.G, nets.D, nets.G_ema):
        sync_buffers(module, world)
    final_record = {}
    if is_main and fid_fn is not None and fid_s > 0 and not stop_reason.startswith("error"):
        # the final G_ema competes for "best" too: without this, up to fid_every of training would be thrown away
        last_kimg = state.fid_history[-1][0] if state.fid_history else -1.0
        if state.images_seen / 1000 > last_kimg:
            final_record = measure_fid(time.time())
    if tick["d_steps"] and not stop_reason.startswith("error"):
        read_tick(time.time(), {"record": final_record})
    if is_main:
        _write_output("the sample grid", save_sample_grid, nets.G_ema, grid_z, grid_y, out_dir,
                      state.images_seen / 1000, precision)
    write_checkpoint(stop_reason)
    if best_G_ema_state is not None:
        nets.G_ema.load_state_dict(best_G_ema_state)
        if is_main:
            log("train", f"returning the best G_ema (FID {state.best_fid:.2f} at {state.best_kimg:.1f} kimg), "
                f"not the last one")
    if is_main:
        _write_output("the interpolation strip", save_interpolation_strip, nets.G_ema,
                      os.path.join(out_dir, "samples", "interpolation.png"), 4, 10, cfg.seed)
        log("train", f"stopped ({stop_reason}) at step {state.step}, {state.images_seen / 1000:.1f} kimg, "
            f"{format_duration(time.time() - train_start)} of training this session")
    return TrainResult(G_ema=nets.G_ema.eval(), steps=state.step, images_seen=state.images_seen,
                       stop_reason=stop_reason, best_fid=state.best_fid, cfg=cfg, G=nets.G, D=nets.D,
                       n_classes=n_classes, batch_size=state.batch_size, rollbacks=state.rollbacks,
                       fid_history=list(state.fid_history), grid_z=grid_z, grid_y=grid_y,
                       checkpoint_path=ckpt_path, stats_path=stats_path,
                       train_seconds=seconds_before + (time.time() - train_start))

"""Watching a run: the start banner, status lines, stats.jsonl, sample grids and the interpolation strip."""
from __future__ import annotations

import contextlib
import io
import json
import os

import torch
from PIL import Image

from src.atomic import atomic_write_bytes
from src.budget import Deadline
from src.config import RECIPE_SUMMARIES, Config, format_duration, recipe_diff
from src.distributed import mean_over_ranks
from src.console import log
from src.generate import balanced_labels, sample_z
from src.models import describe_models
from src.precision import Precision, precision_autocast

GRID_SIZE = 64       # 8 x 8 sample grid
STATS_NAME = "stats.jsonl"




def device_name(device: torch.device) -> str:
    """'cuda:0 (Tesla T4, sm 7.5)' or 'cpu (N threads)'."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, sm {major}.{minor})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def print_banner(cfg: Config, device, precision: Precision, data, deadline, G, D, world_size: int = 1,
                 resumed_from: str | None = None) -> None:
    """What this run is: device and dtype, recipe and changed settings, the data, the models and the time plan."""
    layout = "channels_last" if precision.channels_last else "NCHW"
    log("train", f"device {device_name(device)} x{world_size}, {precision.name}, {layout}"
        f"{', torch.compile' if cfg.compile else ''}")
    log("train", f"recipe {cfg.recipe}: {RECIPE_SUMMARIES[cfg.recipe]}; changed from the recipe: "
        f"{recipe_diff(cfg) or 'nothing'}")
    log("train", f"data: {len(data.images)} images, {len(data.breeds)} breeds; {dict(data.counts)}")
    log("train", describe_models(G, D))
    log("train", f"budget {format_duration(deadline.end - deadline.start)}: {format_duration(deadline.elapsed())} used, "
        f"training window {format_duration(max(0.0, deadline.train_remaining()))}, "
        f"reserve {format_duration(deadline.reserve_s)} for generation and scoring")
    if resumed_from:
        log("train", f"resumed from {resumed_from}")


class TickMeter:
    """One status tick's device-side sums [D loss, D(x), D(G(z)), G loss] and counts; read with one host sync."""

    def __init__(self, device, now: float):
        self.device = torch.device(device)
        self.reset(now)

    def reset(self, now: float) -> None:
        self.sums = torch.zeros(4, device=self.device)
        self.d_steps = self.g_steps = self.images = 0
        self.start = now

    def add(self, round_sums: torch.Tensor, d_steps: int, g_steps: int, images: int) -> None:
        self.sums += round_sums
        self.d_steps += d_steps
        self.g_steps += g_steps
        self.images += images

    def read(self, now: float, weight_sum: torch.Tensor, world_size: int) -> dict:
        """Means over the tick's steps (and ranks), images/s and the weights' sum (a NaN/Inf check); then reset."""
        values = mean_over_ranks(torch.cat([self.sums, weight_sum.view(1)]), world_size).tolist()
        d_steps, g_steps = max(1, self.d_steps), max(1, self.g_steps)
        means = {"d_loss": values[0] / d_steps, "d_real": values[1] / d_steps, "d_fake": values[2] / d_steps,
                 "g_loss": values[3] / g_steps, "weight_sum": values[4],
                 "images_per_s": self.images / max(1e-9, now - self.start)}
        self.reset(now)
        return means


class StatusLog:
    """Rank 0's status lines and OUT/stats.jsonl records (events too) for one training session; other ranks write
    nothing. A full or read-only disk costs the record, not the run."""

    def __init__(self, path: str, is_main: bool, n_images: int, train_start: float, deadline: Deadline):
        self.path, self.is_main = path, is_main
        # the deadline itself, not its end: the recheck near the end of training moves the window's end
        self.n_images, self.train_start, self.deadline = n_images, train_start, deadline

    def event(self, record: dict) -> None:
        if self.is_main:
            try:
                append_stats(self.path, record)
            except OSError as error:
                log("train", f"WARNING: could not write {self.path} ({error})")

    def status(self, now: float, state, means: dict, lrs: tuple[float, float], extra: dict) -> None:
        """One status record from the loop's counters (state: nets.LoopState) and a tick's means; printed too."""
        record = {"time": now, "step": state.step, "epoch": state.images_seen / self.n_images,
                  "kimg": state.images_seen / 1000, **means, "lr_g": lrs[0], "lr_d": lrs[1],
                  "batch_size": state.batch_size, "n_dis": state.n_dis, "elapsed_s": now - self.train_start,
                  "train_left_s": max(0.0, self.deadline.train_end - now), "schedule_progress": state.schedule_progress,
                  **extra}
        self.event(record)
        if self.is_main:
            log("train", format_status(record))


def format_status(record: dict) -> str:
    """One status line from a stats record."""
    line = (f"step {record['step']} ep {record['epoch']:.2f} kimg {record['kimg']:.1f} | "
            f"{record['images_per_s']:.0f} img/s | G {record['g_loss']:.3f} D {record['d_loss']:.3f} | "
            f"D(x) {record['d_real']:+.3f} D(G(z)) {record['d_fake']:+.3f} | "
            f"lr {record['lr_g']:.2e}/{record['lr_d']:.2e} | bs {record['batch_size']} n_dis {record['n_dis']} | "
            f"{format_duration(record['elapsed_s'])} elapsed, {format_duration(record['train_left_s'])} left")
    if record.get("ada_p") is not None:
        line += f" | ADA p {record['ada_p']:.3f}"
    if record.get("next_ckpt_s") is not None:
        line += f" | ckpt in {format_duration(record['next_ckpt_s'])}"
    if record.get("fid") is not None:
        line += f" | FID {record['fid']:.2f}"
    return line


def append_stats(path: str, record: dict) -> None:
    """Append one JSON record as a line to stats.jsonl and flush it (readable while the run goes on)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def make_grid_latents(z_dim: int, n_classes: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed grid_z [64, z_dim] and labels balanced over the breeds, from their own generator (seed)."""
    generator = torch.Generator().manual_seed(seed)
    grid_z = sample_z(GRID_SIZE, z_dim, device, generator=generator)
    grid_y = balanced_labels(GRID_SIZE, n_classes, device, generator=generator)
    return grid_z, grid_y


def tile_images(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """[B, C, H, W] -> one [C, rows * (H + p) + p, nrow * (W + p) + p] image, row-major, like torchvision's make_grid."""
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    grid = images.new_full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for index in range(b):
        top, left = (index // ncol) * (h + padding) + padding, (index % ncol) * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = images[index]
    return grid


def grid_png_bytes(images: torch.Tensor, nrow: int) -> bytes:
    """Images in [-1, 1] -> one PNG of a grid (fast zlib level: grids are written often and read by eye)."""
    grid = tile_images(images.detach().float().cpu().clamp(-1, 1), nrow=nrow)
    array = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@torch.no_grad()
def save_sample_grid(G_ema: torch.nn.Module, grid_z: torch.Tensor, grid_y: torch.Tensor, out_dir: str, kimg: float,
                     precision: Precision | None = None) -> str:
    """8x8 grid from the fixed latents into OUT/samples/grid_<kimg>.png and OUT/samples/latest.png; returns the path."""
    with precision_autocast(precision) if precision is not None else contextlib.nullcontext():
        images = G_ema(grid_z, grid_y)
    folder = os.path.join(out_dir, "samples")
    path = os.path.join(folder, f"grid_{int(kimg):06d}.png")
    png = grid_png_bytes(images, nrow=8)
    # atomic: a reader (the notebook showing latest.png) sees the old or the new PNG, never half of one
    atomic_write_bytes(path, png)
    atomic_write_bytes(os.path.join(folder, "latest.png"), png)
    return path


def _slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # spherical interpolation: sin((1-t) w) / sin w * z0 + sin(t w) / sin w * z1, w the angle between z0 and z1
    cos_w = (torch.nn.functional.normalize(z0, dim=-1) * torch.nn.functional.normalize(z1, dim=-1)).sum(-1, keepdim=True)
    w = torch.acos(cos_w.clamp(-1 + 1e-7, 1 - 1e-7))
    return (torch.sin((1 - t) * w) * z0 + torch.sin(t * w) * z1) / torch.sin(w)


@torch.no_grad()
def save_interpolation_strip(G_ema: torch.nn.Module, path: str, n_rows: int = 4, steps: int = 10, seed: int = 0,
                             device=None) -> str:
    """n_rows rows of `steps` images: G_ema along a slerp between two latents, one breed per row."""
    device = device or next(G_ema.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    n_classes = max(1, getattr(G_ema, "n_classes", 1))
    z_dim = G_ema.z_dim
    z0 = sample_z(n_rows, z_dim, device, generator=generator)
    z1 = sample_z(n_rows, z_dim, device, generator=generator)
    rows_y = torch.randperm(max(n_classes, n_rows), generator=generator)[:n_rows] % n_classes
    t = torch.linspace(0, 1, steps, device=device).view(1, steps, 1)
    z = _slerp(z0[:, None, :], z1[:, None, :], t).reshape(n_rows * steps, z_dim)
    y = rows_y.to(device).repeat_interleave(steps)
    was_training = G_ema.training
    G_ema.eval()
    images = G_ema(z, y)
    G_ema.train(was_training)
    atomic_write_bytes(path, grid_png_bytes(images, nrow=steps))
    return path

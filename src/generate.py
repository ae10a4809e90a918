"""Generation: latents, breed labels (balanced, or in the data's proportions), 10,000 images from G_ema, and the
submission zip."""
from __future__ import annotations

import contextlib
import io
import math
import os
import statistics
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from src.atomic import atomic_path
from src.device_plan import GENERATE_BATCH


def sample_z(n: int, z_dim: int, device, truncation: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal latents; with truncation > 0 every |z_i| > truncation is redrawn (BigGAN's truncation trick)."""
    z = torch.randn(n, z_dim, generator=generator, device="cpu" if generator is not None else device)
    if truncation > 0:
        # Redraw the out-of-range entries until none is left; each round keeps ~P(|z|<t) of them.
        outside = z.abs() > truncation
        while outside.any():
            redraw = torch.randn(int(outside.sum()), generator=generator, device=z.device)
            z[outside] = redraw
            outside = z.abs() > truncation
    return z.to(device)


def balanced_labels(n: int, n_classes: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """n labels with every class appearing n // n_classes or one more times, in shuffled order."""
    labels = torch.arange(n) % max(1, n_classes)
    order = torch.randperm(n, generator=generator)
    return labels[order].to(device)


def breed_counts(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Images per breed (int64, n_classes, CPU) of a data set's labels."""
    return torch.bincount(labels.cpu(), minlength=n_classes)


def proportional_labels(n: int, counts: torch.Tensor, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """n labels in the proportions of `counts` (largest-remainder rounding: each class gets floor(n c / total), and
    the images left over go one each to the largest remainders, ties to the lower class), in shuffled order.
    Kaggle's reference is the photos as they are, so the submission's breeds follow the data, not a uniform draw."""
    counts = torch.as_tensor(counts, dtype=torch.int64).cpu()
    total = int(counts.sum())
    if total <= 0:
        raise ValueError("proportional_labels needs at least one image in counts")
    whole, remainder = torch.div(n * counts, total, rounding_mode="floor"), (n * counts) % total
    left = n - int(whole.sum())
    largest = torch.sort(remainder, descending=True, stable=True).indices[:left]
    whole[largest] += 1
    labels = torch.repeat_interleave(torch.arange(len(counts)), whole)
    return labels[torch.randperm(n, generator=generator)].to(device)


def uniform_breeds(n: int, counts: torch.Tensor) -> torch.Tensor:
    """n training labels for G, every breed equally likely (on counts' device)."""
    return torch.randint(0, len(counts), (n,), device=counts.device)


def breeds_like_the_data(n: int, counts: torch.Tensor) -> torch.Tensor:
    """n training labels for G drawn with the data's breed frequencies (on counts' device, no host sync)."""
    return torch.multinomial(counts.float(), n, replacement=True)


# How G draws its breeds in training, one batch at a time, by --labels; the submission follows the same choice
# (generate_images: balanced, or proportional_labels of the data's counts).
TRAINING_BREEDS = {"uniform": uniform_breeds, "data": breeds_like_the_data}


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 0..255 (round to nearest), on the CPU."""
    return ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# Batch sizes generation may use, smallest first. Which is faster depends on the model and the device: on a CPU the
# default model runs ~30 % faster per image at 64 than at 500 (cache), a tiny one ~6x slower at 64 (per-op overhead
# with 2 threads). measure_generation() times them and the run uses the faster.
GENERATE_BATCH_CANDIDATES = (64, 500)
# Timing one batch size as the real output runs, batch after batch in one generate_images call of 1 + k batches,
# timed batch by batch. Its first batch is left out (a batch size's first call allocates and picks kernels, and
# every call's first batch allocates again: on 2 CPU cores single calls took 10-20 % more CPU time per image than a
# loop's batches); the median of the k others is the speed (one batch slowed by another process does not move it).
# k is GENERATE_TIMED_BATCHES, fewer when they would take more than GENERATE_PROBE_S at the speed measured so far
# (a long batch is an average already), and at least one.
GENERATE_TIMED_BATCHES = 3
GENERATE_PROBE_S = 1.0
# A larger candidate is tried only when one batch of it takes at most GENERATE_TRY_S at the best speed so far: a tiny
# G is far faster per image in large batches on a CPU, so its 500 must be tried even when 64 looks slow.
GENERATE_TRY_S = 3.0
# A smaller batch is used only when it timed this much faster per image than the largest timed one: small batches
# times scatter most on a busy CPU (per-op overhead), and a large batch is never much slower elsewhere.
GENERATE_BATCH_MARGIN = 0.25
# PNGs encoded per round of the zip writer's thread pool; the deadline and stop checks run between rounds.
ZIP_CHUNK = 500
# Images the zip probe encodes: ~0.1 s on 2 CPU cores, long enough for the timer and the thread pool's start.
ZIP_PROBE_IMAGES = 256
# Bytes one 64 x 64 RGB PNG of pure noise takes in a stored zip (incompressible pixels, filter bytes, PNG and zip
# headers): an upper bound for the free-space check.
ZIP_BYTES_PER_IMAGE_MAX = 3 * 64 * 64 + 64 + 400


def generation_batch_size(device) -> int:
    """Images per forward when generating on this device (see device_plan.GENERATE_BATCH)."""
    return GENERATE_BATCH.get(torch.device(device).type, 500)


@torch.no_grad()
def generate_images(G_ema: torch.nn.Module, n: int, device, batch_size: int | None = None, truncation: float = 0.0,
                    seed: int = 0, stop_check=None, breed_counts: torch.Tensor | None = None) -> torch.Tensor:
    """n images (uint8 N x 3 x 64 x 64, CPU) from G_ema, fixed seed -> same images; breeds balanced, or in the
    proportions of breed_counts (--labels data: images per breed of the training data).

    stop_check (optional) is called before every batch; it raises to abandon the generation (e.g. OutOfTime).
    """
    batch_size = batch_size or generation_batch_size(device)
    generator = torch.Generator().manual_seed(seed)
    if breed_counts is None:
        labels = balanced_labels(n, G_ema.n_classes, "cpu", generator)
    else:
        labels = proportional_labels(n, breed_counts, "cpu", generator)
    # every latent drawn up front (10,000 x 128 floats: 5 MB): the images do not depend on the batch size
    latents = sample_z(n, G_ema.z_dim, "cpu", truncation, generator)
    G_ema.eval()
    chunks = []
    for start in range(0, n, batch_size):
        if stop_check is not None:
            stop_check()
        y = labels[start:start + batch_size].to(device)
        z = latents[start:start + batch_size].to(device)
        chunks.append(to_uint8(G_ema(z, y)))
    return torch.cat(chunks)


def encode_png(img_chw: np.ndarray) -> bytes:
    """One uint8 3 x H x W array -> PNG bytes (fast compression: the zip is stored, not deflated)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img_chw.transpose(1, 2, 0)), "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _zip_entry(index: int) -> zipfile.ZipInfo:
    # a fixed timestamp: the same images give a byte-identical zip
    return zipfile.ZipInfo(f"{index}.png", date_time=(2019, 6, 1, 0, 0, 0))


def _zip_workers(workers: int) -> int:
    return workers or min(8, os.cpu_count() or 1)


def write_images_zip(images: torch.Tensor, path: str, workers: int = 0, stop_check=None) -> float:
    """Write uint8 N x 3 x 64 x 64 images as 0.png .. N-1.png into `path` atomically; returns seconds taken.

    PNGs are already compressed, so entries are stored; encoding runs in threads (PIL releases the GIL in zlib),
    ZIP_CHUNK images at a time. stop_check (optional) is called between chunks and may raise to abandon the zip;
    whatever ends it early (that, an error, a stop signal), the temporary file goes and an old `path` stays whole.
    """
    start = time.time()
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"write_images_zip needs uint8 N x 3 x H x W images, got {images.dtype} {tuple(images.shape)}")
    array = images.numpy()
    pool = ThreadPoolExecutor(max_workers=_zip_workers(workers))
    try:
        with atomic_path(path) as tmp_path:
            with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_STORED) as archive:
                for chunk_start in range(0, len(array), ZIP_CHUNK):
                    if stop_check is not None:
                        stop_check()
                    chunk = array[chunk_start:chunk_start + ZIP_CHUNK]
                    for index, data in enumerate(pool.map(encode_png, chunk), chunk_start):
                        archive.writestr(_zip_entry(index), data)
    finally:
        # an abandoned chunk's queued encodings are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)
    return time.time() - start


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """The modules in eval mode inside the block, and every submodule back in its own mode after: a probe on the run's
    models must leave them as it found them."""
    modes = [(sub, sub.training) for module in modules for sub in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


@dataclass
class GenerationTiming:
    """generate_images timed at one batch size on this device (see GENERATE_TIMED_BATCHES)."""
    batch_size: int
    warmup_s: float           # seconds per image of the call's first batch (left out)
    per_image_s: list[float]  # seconds per image of each timed batch
    images: torch.Tensor      # what the probe drew (uint8, CPU), for the zip probe

    @property
    def seconds_per_image(self) -> float:
        """The median of the timed batches."""
        return statistics.median(self.per_image_s)


def _batch_seconds(G: torch.nn.Module, n_batches: int, batch_size: int, device, seed: int
                   ) -> tuple[list[float], torch.Tensor]:
    # seconds of each batch of one generate_images call (a time stamp before every batch; to_uint8's copy to the
    # CPU waits for the device), and the images
    stamps: list[float] = []
    images = generate_images(G, n_batches * batch_size, device, batch_size=batch_size, seed=seed,
                             stop_check=lambda: stamps.append(time.time()))
    stamps.append(time.time())
    return [end - start for start, end in zip(stamps, stamps[1:])], images


def _timed_batch_count(batch_s: float) -> int:
    return min(GENERATE_TIMED_BATCHES, max(1, math.ceil(GENERATE_PROBE_S / max(batch_s, 1e-9))))


def generation_batch_candidates(n_images: int) -> tuple[int, ...]:
    """GENERATE_BATCH_CANDIDATES for n images: none larger than n (n images are one batch of n)."""
    return tuple(sorted({min(batch_size, max(1, n_images)) for batch_size in GENERATE_BATCH_CANDIDATES}))


def generation_probe_seconds(batch_size: int, seconds_per_image: float) -> float:
    """About what measure_generation spends on one batch size at this speed: its 1 + k batches."""
    batch_s = batch_size * seconds_per_image
    return (1 + _timed_batch_count(batch_s)) * batch_s


def measure_generation(G: torch.nn.Module, device, batch_sizes: tuple[int, ...]) -> dict[int, GenerationTiming]:
    """{batch size: GenerationTiming} of generate_images on this device, warm (see GENERATE_TIMED_BATCHES), smallest
    batch first; a larger one only when one batch of it fits in GENERATE_TRY_S at the best speed so far.
    G is left in its own mode; its own seeded latents leave the global RNG untouched."""
    timed: dict[int, GenerationTiming] = {}
    with eval_mode(G):
        # the process's first forward (lazy initialisation) on a few images: a first speed, too high, to size calls
        first = min(8, batch_sizes[0])
        (first_s,), _ = _batch_seconds(G, 1, first, device, seed=0)
        speed = first_s / first
        for batch_size in batch_sizes:
            if timed:
                speed = min(timing.seconds_per_image for timing in timed.values())
                if batch_size * speed > GENERATE_TRY_S:
                    break
            seconds, images = _batch_seconds(G, 1 + _timed_batch_count(batch_size * speed), batch_size, device,
                                             seed=1)
            timed[batch_size] = GenerationTiming(batch_size, seconds[0] / batch_size,
                                                 [batch_s / batch_size for batch_s in seconds[1:]], images)
    return timed


def pick_generation_batch(timed: dict[int, GenerationTiming]) -> int:
    """The batch size to generate with, from measure_generation(): the largest timed one, unless a smaller one was
    faster per image by more than GENERATE_BATCH_MARGIN."""
    largest = max(timed)
    fastest = min(timed, key=lambda batch_size: timed[batch_size].seconds_per_image)
    if timed[fastest].seconds_per_image < (1 - GENERATE_BATCH_MARGIN) * timed[largest].seconds_per_image:
        return fastest
    return largest


def measure_zip_seconds(images: torch.Tensor, workers: int = 0) -> float:
    """Seconds per image write_images_zip spends encoding (in a thread pool as large as its own) and storing an
    entry, measured in memory on up to ZIP_PROBE_IMAGES of `images` after a warm-up (threads started, encoder
    loaded). The writing itself is the disk's: preflight.measure_write_speed."""
    array = images[:ZIP_PROBE_IMAGES].numpy()
    n_workers = _zip_workers(workers)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        list(pool.map(encode_png, array[:n_workers]))
        start = time.time()
        with zipfile.ZipFile(io.BytesIO(), "w", compression=zipfile.ZIP_STORED) as archive:
            for index, data in enumerate(pool.map(encode_png, array)):
                archive.writestr(_zip_entry(index), data)
        return (time.time() - start) / max(1, len(array))

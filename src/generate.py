"""Generation: latents, balanced breed labels, 10,000 images from G_ema, and the submission zip."""
from __future__ import annotations

import io
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from src.atomic import atomic_path


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


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 0..255 (round to nearest), on the CPU."""
    return ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


@torch.no_grad()
def generate_images(G_ema: torch.nn.Module, n: int, device, batch_size: int = 500, truncation: float = 0.0,
                    seed: int = 0) -> torch.Tensor:
    """n images (uint8 N x 3 x 64 x 64, CPU) from G_ema, breeds balanced, fixed seed -> same images."""
    generator = torch.Generator().manual_seed(seed)
    labels = balanced_labels(n, G_ema.n_classes, "cpu", generator)
    G_ema.eval()
    chunks = []
    for start in range(0, n, batch_size):
        y = labels[start:start + batch_size].to(device)
        z = sample_z(len(y), G_ema.z_dim, device, truncation, generator)
        chunks.append(to_uint8(G_ema(z, y)))
    return torch.cat(chunks)


def encode_png(img_chw: np.ndarray) -> bytes:
    """One uint8 3 x H x W array -> PNG bytes (fast compression: the zip is stored, not deflated)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img_chw.transpose(1, 2, 0)), "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_images_zip(images: torch.Tensor, path: str, workers: int = 0) -> float:
    """Write uint8 N x 3 x 64 x 64 images as 0.png .. N-1.png into `path` atomically; returns seconds taken.

    PNGs are already compressed, so entries are stored; encoding runs in threads (PIL releases the GIL in zlib).
    """
    start = time.time()
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"write_images_zip needs uint8 N x 3 x H x W images, got {images.dtype} {tuple(images.shape)}")
    array = images.numpy()
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        png_bytes = list(pool.map(encode_png, array, chunksize=64))
    with atomic_path(path) as tmp_path:
        with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_STORED) as archive:
            for index, data in enumerate(png_bytes):
                # a fixed timestamp: the same images give a byte-identical zip
                archive.writestr(zipfile.ZipInfo(f"{index}.png", date_time=(2019, 6, 1, 0, 0, 0)), data)
    return time.time() - start


def estimate_output_seconds(G: torch.nn.Module, n: int, device, batch_size: int = 500) -> float:
    """Time one generation batch and the PNG encoding of it, scaled to n images: the reserve kept after training."""
    probe = min(n, batch_size)
    start = time.time()
    images = generate_images(G, probe, device, batch_size=probe)
    generate_s = time.time() - start
    start = time.time()
    for img in images.numpy()[:100]:
        encode_png(img)
    encode_s = (time.time() - start) / min(100, probe) * n / min(8, os.cpu_count() or 1)
    return generate_s * n / probe + encode_s

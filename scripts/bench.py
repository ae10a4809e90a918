"""Benchmark of the training step and the pipeline around it (not bundled into the kernel).

    python scripts/bench.py                       # our step: images/s, step time, peak memory, FLOPs and MFU
    python scripts/bench.py --baseline            # + a plain loop on the same models, and the ratio from this run
    python scripts/bench.py --pipeline --data-dir DIR [--fid-weights FILE]   # + start-up, 10k generation, zip, MiFID

The plain loop is what a first notebook does: fp32, a torch DataLoader over PIL images with torchvision
transforms, `.item()` on the losses every step. Both loops run the same models, loss, DiffAugment and batch.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from src.augment import diff_augment  # noqa: E402
from src.config import make_config  # noqa: E402
from src.console import log  # noqa: E402
from src.data import load_dogs  # noqa: E402
from src.distributed import current_dist_info  # noqa: E402
from src.gan_step import GanStep  # noqa: E402
from src.generate import breed_counts, generate_images, write_images_zip  # noqa: E402
from src.layers import spectral_norm_layers, spectral_norm_power_iteration_  # noqa: E402
from src.losses import GAN_LOSSES  # noqa: E402
from src.mifid import cached_real_features, load_feature_extractor, mifid_score  # noqa: E402
from src.models import build_models  # noqa: E402
from src.precision import choose_precision, configure_backends  # noqa: E402
from src.synthetic import make_tiny_dataset  # noqa: E402
from src.nets import build_gan_nets  # noqa: E402
from src.train import DeviceSampler, gan_round  # noqa: E402

# Dense peak throughput of the training dtype, for the MFU estimate (vendor datasheets; bf16/fp16 tensor cores).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0, "P100": 18.7, "V100": 125.0}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def round_flops(run_round) -> float:
    """FLOPs of one training round (forward + backward of G and D), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        run_round()
    return float(counter.get_total_flops())


def time_ours(cfg, data, device, steps: int, warmup: int) -> dict:
    """Our step: device-resident uint8 data, autocast by device, fused/foreach Adam, one sync at the end."""
    configure_backends(device)
    precision = choose_precision(cfg.amp, device, cfg.channels_last)
    n_classes = len(data.breeds)
    nets = build_gan_nets(cfg, n_classes, device, precision, current_dist_info(device))
    sampler = DeviceSampler(data.images.to(device), data.labels.to(device))
    step = GanStep(cfg, nets, breed_counts(data.labels, n_classes))

    def run_round():
        return gan_round(step, sampler, cfg.batch_size, cfg.n_dis, cfg.g_steps)

    for _ in range(warmup):
        run_round()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    sums = torch.zeros(4, device=device)
    for _ in range(steps):
        sums += run_round()
    sums.tolist()  # the one host sync
    seconds = time.perf_counter() - start
    flops = round_flops(run_round)
    return {"precision": precision.name, "seconds": seconds, "step_ms": 1000 * seconds / steps,
            "images_per_s": steps * cfg.batch_size * cfg.n_dis / seconds, "peak_mib": peak_memory_mib(device),
            "flops_per_round": flops, "tflops": flops * steps / seconds / 1e12}


class PilDogs(torch.utils.data.Dataset):
    """The plain loop's dataset: PIL images, transformed on every access by torchvision."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        import torchvision.transforms as T
        self.pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
        self.labels = labels.tolist()
        self.transform = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

    def __len__(self) -> int:
        return len(self.pil)

    def __getitem__(self, index: int):
        return self.transform(self.pil[index]), self.labels[index]


def time_baseline(cfg, data, device, steps: int, warmup: int) -> dict:
    """The plain loop: fp32, DataLoader over PIL images, host copies and `.item()` every step, same models and loss."""
    G, D = build_models(cfg, len(data.breeds))
    G, D = G.to(device).train(), D.to(device).train()
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    d_loss_fn, g_loss_fn = GAN_LOSSES[cfg.loss].d_loss, GAN_LOSSES[cfg.loss].g_loss
    loader = torch.utils.data.DataLoader(PilDogs(data.images, data.labels), batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=True, num_workers=min(4, os.cpu_count() or 1))
    n_classes = len(data.breeds)
    sn_layers = spectral_norm_layers(G) + spectral_norm_layers(D)

    def batches():
        while True:
            yield from loader

    stream = batches()

    def run_round():
        real_img, real_y = next(stream)
        real_img, real_y = real_img.to(device), real_y.to(device)
        z = torch.randn(cfg.batch_size, G.z_dim, device=device)
        gen_y = torch.randint(0, n_classes, (cfg.batch_size,), device=device)
        spectral_norm_power_iteration_(sn_layers)
        gen_img = G(z, gen_y)
        real_logit, _ = D(diff_augment(real_img, cfg.diffaug), real_y)
        fake_logit, _ = D(diff_augment(gen_img.detach(), cfg.diffaug), gen_y)
        d_loss = d_loss_fn(real_logit, fake_logit, 1.0, 0.0)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        fake_logit, _ = D(diff_augment(gen_img, cfg.diffaug), gen_y)
        g_loss = g_loss_fn(real_logit.detach(), fake_logit)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        return d_loss.item(), g_loss.item()

    for _ in range(warmup):
        run_round()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run_round()
    seconds = time.perf_counter() - start
    return {"precision": "fp32", "seconds": seconds, "step_ms": 1000 * seconds / steps,
            "images_per_s": steps * cfg.batch_size / seconds}


def time_pipeline(cfg, data_dir: str, device, fid_weights: str) -> dict:
    """The overheads around training: decoding the data, 10,000 images, the zip, MiFID."""
    figures = {}
    start = time.perf_counter()
    data = load_dogs(data_dir, workers=cfg.decode_workers)
    figures["startup_decode_s"] = time.perf_counter() - start
    G, _ = build_models(cfg, len(data.breeds))
    G = G.to(device).eval()
    start = time.perf_counter()
    images = generate_images(G, cfg.n_images, device)
    synchronize(device)
    figures["generate_s"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        figures["zip_s"] = write_images_zip(images, os.path.join(folder, "images.zip"))
        if fid_weights:
            start = time.perf_counter()
            extractor = load_feature_extractor("auto", fid_weights, device)
            real_feats = cached_real_features(extractor, data.images, os.path.join(folder, "cache"))
            mifid_score(extractor(images), real_feats, extractor.default_eps)
            figures["mifid_s"] = time.perf_counter() - start
    figures["total_s"] = sum(figures.values())
    return figures


def bench_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time dogkernel's training step (and a plain loop) on this machine")
    parser.add_argument("--recipe", default="biggan")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the recipe's")
    parser.add_argument("--g-ch", type=int, default=0, help="default: the recipe's (use 16 on a CPU)")
    parser.add_argument("--d-ch", type=int, default=0, help="default: the recipe's")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default="", help="Kaggle layout; default: a generated tiny dataset")
    parser.add_argument("--baseline", action="store_true", help="also time the plain loop and print the ratio")
    parser.add_argument("--pipeline", action="store_true", help="also time decoding, generation, zip (and MiFID)")
    parser.add_argument("--fid-weights", default="", help="with --pipeline: time MiFID with these weights")
    parser.add_argument("--compile", action="store_true", help="torch.compile our G and D")
    args = parser.parse_args(argv)
    overrides = {"recipe": args.recipe, "compile": args.compile}
    overrides.update({k: v for k, v in (("batch_size", args.batch_size), ("g_ch", args.g_ch), ("d_ch", args.d_ch)) if v})
    cfg = make_config(overrides)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    data_dir = args.data_dir or make_tiny_dataset(tempfile.mkdtemp(prefix="dogbench-"), n_images=256, n_breeds=8)
    data = load_dogs(data_dir, workers=cfg.decode_workers)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    log("bench", f"{name}; recipe {cfg.recipe}, batch {cfg.batch_size}, g_ch {cfg.g_ch}, d_ch {cfg.d_ch}, "
              f"{args.steps} timed rounds after {args.warmup} warm-up")
    ours = time_ours(cfg, data, device, args.steps, args.warmup)
    peak = peak_tflops(device)
    mfu = f"{100 * ours['tflops'] / peak:.1f}% of {peak:g} TFLOP/s" if peak else "n/a (no peak figure for this device)"
    log("bench", f"ours ({ours['precision']}): {ours['images_per_s']:.1f} img/s, {ours['step_ms']:.1f} ms/round, "
              f"peak memory {ours['peak_mib']:.0f} MiB, {ours['flops_per_round'] / 1e9:.1f} GFLOP/round, "
              f"{ours['tflops']:.3f} TFLOP/s, MFU {mfu}")
    if args.baseline:
        plain = time_baseline(cfg, data, device, args.steps, args.warmup)
        log("bench", f"plain loop (fp32, DataLoader, .item()): {plain['images_per_s']:.1f} img/s, {plain['step_ms']:.1f} ms/round")
        log("bench", f"speed-up, measured in this run: {ours['images_per_s'] / plain['images_per_s']:.2f}x")
    if args.pipeline:
        figures = time_pipeline(cfg, data_dir, device, args.fid_weights)
        log("bench", "pipeline: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    bench_main()

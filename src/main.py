"""The pipeline: flags -> data -> training until the deadline -> 10,000 images in images.zip -> MiFID."""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch

from src.budget import Deadline
from src.checkpoint import CheckpointError, check_resume_fits_data, load_generator_from_checkpoint, open_resume
from src.config import (Config, ConfigError, config_diff, format_duration, on_kaggle, parse_config, parse_duration,
                        running_in_notebook)
from src.console import log
from src.data import DataError, load_dogs
from src.distributed import cleanup_distributed, setup_distributed
from src.generate import estimate_output_seconds, generate_images, write_images_zip
from src.mifid import find_fid_weights, load_feature_extractor
from src.models import build_models
from src.report import write_plots
from src.scoring import make_training_fid, pick_truncation, real_features, report_mifid, reserve_for_scoring
from src.synthetic import make_tiny_dataset
from src.train import StopReason, train

KAGGLE_OUT = "/kaggle/working"
KAGGLE_INPUT = "/kaggle/input"




def resolve_paths(cfg: Config) -> tuple[str, str]:
    """(data_dir, out_dir): explicit flags first, then Kaggle's folders, then ./out; --demo makes its own data."""
    out_dir = cfg.out or (KAGGLE_OUT if on_kaggle() else "out")
    os.makedirs(out_dir, exist_ok=True)
    if cfg.demo:
        data_dir = make_tiny_dataset(os.path.join(out_dir, "demo_data"))
        log("main", f"demo: generated a tiny dataset in {data_dir}")
        return data_dir, out_dir
    if cfg.data_dir:
        return cfg.data_dir, out_dir
    if os.path.isdir(KAGGLE_INPUT):
        return KAGGLE_INPUT, out_dir
    raise DataError("no --data-dir given and /kaggle/input does not exist: pass --data-dir DIR "
                    "(a folder with all-dogs/ and Annotation/), or --demo for the built-in tiny dataset")


def plan_reserve(cfg: Config, deadline: Deadline, n_classes: int, device: torch.device, extractor) -> None:
    """Keep back what generation, zipping and scoring will take (measured on an untrained G), with head-room."""
    probe_G, _ = build_models(cfg, n_classes)
    output_s = estimate_output_seconds(probe_G.to(device), cfg.n_images, device)
    del probe_G
    scoring_s = reserve_for_scoring(cfg, extractor) if extractor is not None else 0.0
    # 1.5x and a fixed margin: the estimates are short probes, and Kaggle kills a kernel at 9 h sharp.
    margin_s = min(120.0, 5.0 + 0.01 * (deadline.end - deadline.start))
    deadline.reserve(1.5 * (output_s + scoring_s) + margin_s)
    log("main", f"budget {format_duration(deadline.end - deadline.start)}: start-up took {format_duration(deadline.elapsed())}, "
        f"reserving {format_duration(deadline.reserve_s)} for generation/zip{'/MiFID' if extractor else ''}, "
        f"training gets {format_duration(max(0.0, deadline.train_remaining()))}")
    if deadline.train_remaining() <= 0:
        log("main", "WARNING: the budget is too small to train a single step; images.zip will come from the untrained "
            "generator. Give a larger --time-budget.")


def open_extractor(cfg: Config, device: torch.device):
    """The MiFID backbone if weights are given or found under /kaggle/input, else None (MiFID skipped, said once)."""
    weights, backbone = cfg.fid_weights, cfg.fid_backbone
    if not weights:
        found = find_fid_weights(KAGGLE_INPUT) if os.path.isdir(KAGGLE_INPUT) else None
        if found is None:
            log("main", "MiFID: no --fid-weights given and none found under /kaggle/input; scoring is skipped "
                "(attach pt_inception-2015-12-05-6726825d.pth as a dataset to get Kaggle's metric)")
            return None
        backbone, weights = found
    return load_feature_extractor(backbone, weights, device)


def write_submission(G_ema, cfg: Config, out_dir: str, device: torch.device, truncation: float) -> str:
    """10,000 balanced images from G_ema into OUT/images.zip (atomic: the old zip stays until the new one is whole)."""
    start = time.time()
    images = generate_images(G_ema, cfg.n_images, device, truncation=truncation, seed=cfg.seed)
    generate_s = time.time() - start
    zip_path = os.path.join(out_dir, "images.zip")
    zip_s = write_images_zip(images, zip_path)
    log("main", f"wrote {zip_path}: {len(images)} PNG 64x64 (generate {generate_s:.1f}s, zip {zip_s:.1f}s, "
        f"{os.path.getsize(zip_path) / 2**20:.1f} MiB)")
    return zip_path


def fallback_generator(cfg: Config, n_classes: int, out_dir: str, device: torch.device):
    """When training failed: G_ema from OUT/ckpt.pt if it holds a trained one, else None (nothing to submit)."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        return None
    try:
        log("main", f"using G_ema from {ckpt_path}")
        return load_generator_from_checkpoint(ckpt_path, cfg, n_classes, device)
    except Exception as error:  # a broken checkpoint must not cost the run its ending
        log("main", f"could not read {ckpt_path} ({error})")
        return None


def untrained_generator(cfg: Config, n_classes: int, out_dir: str, device: torch.device):
    """An untrained G, only when OUT has no images.zip yet: an existing zip is only ever replaced by a trained G's."""
    if os.path.exists(os.path.join(out_dir, "images.zip")):
        log("main", f"no trained generator: {os.path.join(out_dir, 'images.zip')} is kept as it is")
        return None
    log("main", "WARNING: no trained generator; images.zip comes from an UNTRAINED one (noise), so that a file exists")
    G, _ = build_models(cfg, n_classes)
    return G.to(device).eval()


def show_inline(out_dir: str) -> None:
    """In a notebook, show the latest sample grid and the plots under the cell."""
    if not running_in_notebook():
        return
    try:
        from IPython.display import Image as ShowImage, display
    except ImportError:
        return
    for name in ("samples/latest.png", "samples/interpolation.png", "plots.png"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            display(ShowImage(filename=path))


def run(cfg: Config, start: float) -> int:
    """The whole job; returns the process exit code (0: images.zip written after a clean run)."""
    deadline = Deadline(parse_duration(cfg.time_budget), start)
    dist = setup_distributed(cfg.device)
    device = dist.device
    data_dir, out_dir = resolve_paths(cfg)
    if dist.is_main:
        log("main", f"dogkernel: recipe {cfg.recipe}, device {device}, out {out_dir}, budget {cfg.time_budget}")
        log("main", f"config (differs from defaults): {config_diff(cfg)}")
    cfg, resume = open_resume(cfg, out_dir)  # settled once, before anything below uses the config
    extractor = open_extractor(cfg, device) if dist.is_main else None
    # the whole photos are decoded only where they are scored: rank 0, with a backbone, against --fid-reference photos
    data = load_dogs(data_dir, crop_margin=cfg.crop_margin, max_images=cfg.max_images, workers=cfg.decode_workers,
                     min_box=cfg.min_box, whole_photos=extractor is not None and cfg.fid_reference == "photos")
    n_classes = len(data.breeds)
    check_resume_fits_data(resume, n_classes)
    real_feats = real_features(extractor, data, out_dir, cfg.fid_reference) if extractor is not None else None
    data.photos = None  # their features are computed: the ~250 MB of whole-photo pixels are not needed again
    plan_reserve(cfg, deadline, n_classes, device, extractor)
    fid_fn = make_training_fid(cfg, extractor, real_feats, device) if extractor is not None else None

    exit_code, G_ema = 0, None
    try:
        result = train(cfg, data, deadline, out_dir, device, fid_fn=fid_fn, resume=resume)
        if result.progress.step > 0:
            G_ema = result.G_ema
        log("main", f"training stopped ({result.stop_reason.value}) after {result.progress.step} steps, "
            f"{result.progress.images_seen / 1000:.1f} kimg")
        exit_code = 1 if result.stop_reason is StopReason.ERROR else 0
    except Exception:
        log("main", "training failed:\n" + traceback.format_exc(), error=True)
        exit_code = 1
    if not dist.is_main:
        cleanup_distributed()
        return exit_code
    if G_ema is None:
        G_ema = fallback_generator(cfg, n_classes, out_dir, device) or untrained_generator(cfg, n_classes, out_dir,
                                                                                            device)
    if G_ema is None:
        cleanup_distributed()
        return exit_code or 1

    truncation = pick_truncation(cfg, G_ema, extractor, real_feats, device) if extractor is not None else cfg.truncation
    zip_path = write_submission(G_ema, cfg, out_dir, device, truncation)
    if extractor is not None:
        report_mifid(cfg, extractor, zip_path, real_feats, out_dir)
    write_plots(out_dir)
    show_inline(out_dir)
    log("main", f"done in {format_duration(deadline.elapsed())} of {format_duration(deadline.end - deadline.start)}")
    cleanup_distributed()
    return exit_code


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run; bad input ends with one clear line instead of a traceback."""
    start = time.time()  # the budget's clock (Python's start-up and imports happen before and are not counted)
    try:
        cfg, extras = parse_config(argv)
        if extras.report:
            written = write_plots(extras.report)
            log("main", f"report: wrote {', '.join(written) or 'nothing'}")
            return 0
        return run(cfg, start)
    except (DataError, ConfigError, CheckpointError, FileNotFoundError) as error:
        log("dogkernel", f"error: {error}", error=True)
        return 2


def entry_point() -> None:
    """`python kernel.py` exits with main's code; in a notebook the code is only printed (SystemExit is noisy there)."""
    code = main()
    if running_in_notebook():
        if code:
            log("dogkernel", f"finished with exit code {code}")
    else:
        sys.exit(code)


if __name__ == "__main__":
    entry_point()

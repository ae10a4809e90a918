"""The run settled once: flags + recipe (already a Config) + checkpoint + data + device -> the settings every later
stage uses as they are. Each problem found here is one line naming the flag or file; nothing reshapes the run after.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from src.checkpoint import check_resume_fits_data, open_resume
from src.config import Config, ConfigError, format_duration
from src.console import log
from src.data import DataError, DogData, load_dogs, training_images
from src.device_plan import device_plan_line, plan_for_device, read_device_facts
from src.distributed import DistInfo, setup_distributed
from src.host import on_kaggle
from src.mifid import find_fid_weights, load_feature_extractor
from src.preflight import prepare_out_dir
from src.synthetic import make_tiny_dataset

KAGGLE_OUT = "/kaggle/working"
KAGGLE_INPUT = "/kaggle/input"
# Below this many dog crops a GAN has nothing to learn from (and a batch of one breaks batch statistics).
MIN_TRAIN_IMAGES = 2


@dataclass(frozen=True)
class SettledRun:
    """What the run is, decided at start-up."""
    cfg: Config              # the final settings: recipe, flags, the checkpoint's training recipe, batch fitted
    dist: DistInfo           # this process's rank and device
    data_dir: str
    out_dir: str
    resume: dict | None      # the checkpoint this run continues (its config is already cfg), or None
    data: DogData            # the training images (--train-on) and labels; the whole photos while they are needed
    extractor: object | None  # the MiFID backbone (rank 0, with weights), or None: scoring skipped


def resolve_paths(cfg: Config) -> tuple[str, str]:
    """(data_dir, out_dir): explicit flags first, then Kaggle's folders, then ./out; --demo makes its own data."""
    out_dir = cfg.out or (KAGGLE_OUT if on_kaggle() else "out")
    prepare_out_dir(out_dir)
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


def open_extractor(cfg: Config, device):
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


def fit_batch_to_data(cfg: Config, n_images: int, world_size: int) -> Config:
    """cfg with a batch no larger than the data (each rank draws its share from the whole set), said in one line;
    DataError when there are too few images to train on at all, ConfigError when the ranks outnumber the batch."""
    if n_images < MIN_TRAIN_IMAGES:
        raise DataError(f"only {n_images} dog image(s) could be loaded; training needs at least {MIN_TRAIN_IMAGES}")
    if cfg.batch_size < world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the {world_size} processes: each needs "
                          f"an image; give --batch-size {world_size} or more")
    largest = n_images * world_size
    if cfg.batch_size <= largest:
        return cfg
    log("main", f"only {n_images} dog images, fewer than one batch of {cfg.batch_size}: this run uses batches of "
        f"{largest}")
    return dataclasses.replace(cfg, batch_size=largest)


def fit_to_device(cfg: Config, dist: DistInfo) -> Config:
    """cfg with the device's choices (device_plan): the precision and torch.compile it can run, and on a GPU a batch
    that fits its memory; the plan is said once, in one line."""
    facts = read_device_facts(dist.device, count=dist.world_size)
    plan = plan_for_device(facts, amp=cfg.amp, compile_wanted=cfg.compile)
    if dist.is_main:
        log("device", device_plan_line(facts, plan))
    settled = dataclasses.replace(cfg, amp=plan.precision, compile=plan.compile)
    if facts.type == "cuda" and cfg.batch_size > plan.batch_size:
        if dist.is_main:
            log("device", f"--batch-size {cfg.batch_size} would not fit {facts.count} x {facts.name}'s memory: "
                f"batches of {plan.batch_size}")
        settled = dataclasses.replace(settled, batch_size=plan.batch_size)
    return settled


def settle_run(cfg: Config) -> SettledRun:
    """Device and ranks, paths, the checkpoint (before anything else reads the config), the MiFID backbone, the
    data, and the batch fitted to the data and the ranks: the run as every later stage sees it."""
    dist = setup_distributed(cfg.device)
    data_dir, out_dir = resolve_paths(cfg)
    if dist.is_main:
        log("main", f"dogkernel: recipe {cfg.recipe}, device {dist.device}, out {out_dir}, "
            f"budget {format_duration(cfg.time_budget)}")
    cfg, resume = open_resume(cfg, out_dir)
    cfg = fit_to_device(cfg, dist)
    extractor = open_extractor(cfg, dist.device) if dist.is_main else None
    # the whole photos are decoded where they are scored (rank 0, with a backbone, against --fid-reference photos)
    # and, on every rank, where they are trained on
    scored = extractor is not None and cfg.fid_reference == "photos"
    data = load_dogs(data_dir, crop_margin=cfg.crop_margin, max_images=cfg.max_images, workers=cfg.decode_workers,
                     min_box=cfg.min_box, whole_photos=scored or cfg.train_on != "crops")
    if cfg.train_on != "crops":
        images, labels = training_images(data, cfg.train_on)
        data = dataclasses.replace(data, images=images, labels=labels)
    cfg = fit_batch_to_data(cfg, len(data.images), dist.world_size)
    check_resume_fits_data(resume, len(data.breeds))
    return SettledRun(cfg=cfg, dist=dist, data_dir=data_dir, out_dir=out_dir, resume=resume, data=data,
                      extractor=extractor)

"""The pipeline: flags -> data -> training until the deadline -> 10,000 images in images.zip -> MiFID."""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch

from src.budget import BudgetError, Deadline, OutOfTime, deadline_check
from src.checkpoint import CheckpointError, load_generator_from_checkpoint
from src.config import Config, ConfigError, format_duration, parse_config
from src.console import log, quiet_other_ranks
from src.data import DataError
from src.distributed import cleanup_distributed
from src.generate import breed_counts, generate_images, write_images_zip
from src.host import running_in_notebook
from src.interrupt import RunInterrupted, signals_interrupt_run
from src.launch import launch_workers, wants_workers
from src.models import build_models
from src.preflight import OutputError
from src.report import write_plots
from src.reserve import OutputPlan, plan_reserve, recheck_reserve
from src.selfcheck import SelfCheckError, run_self_check
from src.scoring import make_training_fid, pick_truncation, real_features, report_mifid
from src.settle import settle_run
from src.train import StopReason, build_run_nets, train

def fits_in_time(deadline: Deadline, seconds: float, what: str) -> bool:
    """True when `seconds` of work still fit before the deadline, else one line saying `what` is skipped."""
    if deadline.remaining() >= seconds:
        return True
    log("main", f"skipping {what}: it needs ~{format_duration(seconds)}, {format_duration(max(0.0, deadline.remaining()))} "
        f"of the budget are left")
    return False


def write_submission(G_ema, cfg: Config, out_dir: str, device: torch.device, truncation: float,
                     deadline: Deadline, batch_size: int | None = None,
                     submission_breeds: torch.Tensor | None = None) -> str | None:
    """10,000 images from G_ema into OUT/images.zip (atomic: the old zip stays until the new one is whole), breeds
    balanced or in the proportions of submission_breeds (--labels data).

    Generation and zipping stop a few seconds past the deadline rather than overrun it; a full disk or a lost
    deadline is one line and None, and the previous images.zip (if any) is kept.
    """
    zip_path = os.path.join(out_dir, "images.zip")
    stop_check = deadline_check(deadline, "writing images.zip")
    log("main", f"generating {cfg.n_images} images into {zip_path} ({format_duration(max(0.0, deadline.remaining()))} "
        f"of the budget left)")
    start = time.time()
    try:
        images = generate_images(G_ema, cfg.n_images, device, batch_size=batch_size, truncation=truncation,
                                 seed=cfg.seed, stop_check=stop_check, breed_counts=submission_breeds)
        generate_s = time.time() - start
        zip_s = write_images_zip(images, zip_path, stop_check=stop_check)
    except (OutOfTime, OSError) as error:
        kept = "the previous images.zip is kept" if os.path.exists(zip_path) else "no images.zip was written"
        log("main", f"could not write {zip_path}: {error}; {kept}", error=True)
        return None
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
    deadline = Deadline(cfg.time_budget, start)
    settled = settle_run(cfg)  # from here on the run's settings are fixed
    cfg, dist, device, out_dir, data, extractor = (settled.cfg, settled.dist, settled.dist.device, settled.out_dir,
                                                   settled.data, settled.extractor)
    n_classes = len(data.breeds)
    # --labels data: every image G_ema makes for a score or the submission has the data's breed proportions
    submission_breeds = breed_counts(data.labels, n_classes) if cfg.labels == "data" else None
    real_feats = real_features(extractor, data, out_dir, cfg.fid_reference) if extractor is not None else None
    data.photos = None  # their features are computed: the ~250 MB of whole-photo pixels are not needed again
    # the models are built once: checked, the reserve measured with them (leaving the training RNG as it was), then
    # they train
    nets = build_run_nets(cfg, n_classes, device, dist, settled.resume)
    if cfg.self_check:
        run_self_check(cfg, nets, data, extractor, dist)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        plan = plan_reserve(cfg, deadline, nets.G, nets.D, device, extractor, out_dir)
    fid_fn = (make_training_fid(cfg, extractor, real_feats, device, submission_breeds) if extractor is not None
              else None)

    exit_code, G_ema = 0, None
    try:
        result = train(cfg, data, deadline, out_dir, device, fid_fn=fid_fn, resume=settled.resume, nets=nets,
                       recheck=lambda G_ema: recheck_reserve(plan, deadline, G_ema, device))
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

    truncation = (pick_truncation(cfg, G_ema, extractor, real_feats, device, submission_breeds)
                  if extractor is not None and search_fits(cfg, deadline, plan) else cfg.truncation)
    zip_path = write_submission(G_ema, cfg, out_dir, device, truncation, deadline, plan.generate_batch,
                                submission_breeds)
    exit_code = exit_code if zip_path else 1
    if zip_path and extractor is not None and fits_in_time(deadline, plan.mifid_s, "MiFID of images.zip"):
        report_mifid(cfg, extractor, zip_path, real_feats, out_dir)
    write_plots(out_dir)
    show_inline(out_dir)
    log("main", f"done in {format_duration(deadline.elapsed())} of {format_duration(deadline.end - deadline.start)}")
    cleanup_distributed()
    return exit_code


def search_fits(cfg: Config, deadline: Deadline, plan: OutputPlan) -> bool:
    """The truncation search runs only when it, the zip and the MiFID after it all still fit."""
    return not cfg.truncation_search or fits_in_time(deadline, plan.scoring_s + plan.output_s, "the truncation search")


def exit_code_of(request: SystemExit) -> int:
    """The return code argparse meant by SystemExit (0 after --help, 2 after a bad flag)."""
    return request.code if isinstance(request.code, int) else (0 if request.code is None else 2)


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run; bad input ends with one clear line instead of a traceback, and so does a stop signal."""
    start = time.time()  # the budget's clock (Python's start-up and imports happen before and are not counted)
    quiet_other_ranks()
    try:
        try:
            cfg, extras = parse_config(argv)
        except SystemExit as request:  # argparse already printed the help or the error
            return exit_code_of(request)
        if extras.report:
            written = write_plots(extras.report)
            log("main", f"report: wrote {', '.join(written) or 'nothing'}")
            return 0
        if wants_workers(cfg):  # several GPUs and no torchrun: one forked process per GPU, each running main again
            return launch_workers(cfg, lambda: main(argv))
        with signals_interrupt_run():
            return run(cfg, start)
    except (DataError, ConfigError, CheckpointError, FileNotFoundError, OutputError, BudgetError,
            SelfCheckError) as error:
        log("dogkernel", f"error: {error}", error=True)
        return 2
    except RunInterrupted as stop:
        log("dogkernel", str(stop), error=True)
        return 128 + stop.signum


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

"""Scoring inside a run: FID of G_ema while training, truncation chosen by measured MiFID, and the final MiFID."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from src.atomic import atomic_write_text
from src.checkpoint import ckpt_cpu_copy
from src.config import Config
from src.console import log
from src.generate import generate_images
from src.mifid import cached_real_features, feature_stats, frechet_distance, mifid_score, read_images_zip

TRUNCATION_CANDIDATES = (0.0, 2.0, 1.5, 1.0)
# What each --fid-reference compares generated images with (named in every log line with a figure).
FID_REFERENCE_NAMES = {"photos": "whole photos", "crops": "training crops"}




def seconds_per_image(extractor) -> float:
    """Feature-extraction time per image, from one timed probe batch after a warm-up."""
    probe = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8)
    extractor(probe[:8])
    start = time.time()
    extractor(probe)
    return (time.time() - start) / len(probe)


def reserve_for_scoring(cfg: Config, extractor) -> float:
    """Seconds the end of the run needs for MiFID (and the truncation search): features of the generated images.

    The real images' features are computed before training (real_features), so they need no reserve.
    """
    training_fid = cfg.fid_every > 0
    n_generated = (cfg.n_images + (len(TRUNCATION_CANDIDATES) * cfg.fid_samples if cfg.truncation_search else 0)
                   + (cfg.fid_samples if training_fid else 0))
    # training-time FID measures the final G_ema once after the training window (its sqrtm alone is ~15 s at 2048-d)
    return seconds_per_image(extractor) * n_generated + (20.0 if training_fid else 0.0)


def fid_reference_label(reference: str, n: int) -> str:
    """'whole photos (20,579)': the reference a figure was measured against, for the log."""
    return f"{FID_REFERENCE_NAMES[reference]} ({n:,})"


def real_features(extractor, data, out_dir: str, reference: str) -> torch.Tensor:
    """Features of the MiFID reference, computed once per run (or read from the cache of an earlier run):
    "photos", every whole photo squashed to 64x64 (DogData.photos: Kaggle's reference for FID and memorization),
    or "crops", the training crops (DogData.images)."""
    if reference not in FID_REFERENCE_NAMES:
        raise ValueError(f"unknown FID reference {reference!r}; choose one of {', '.join(FID_REFERENCE_NAMES)}")
    if reference == "photos" and data.photos is None:
        raise ValueError("the whole-photo reference needs the photos: load_dogs(..., whole_photos=True)")
    real_img = data.photos if reference == "photos" else data.images
    log("score", f"MiFID reference: {fid_reference_label(reference, len(real_img))} "
        f"(in-run FID, truncation search and the final MiFID)")
    return cached_real_features(extractor, real_img, os.path.join(out_dir, "cache"), kind=reference)


def make_training_fid(cfg: Config, extractor, real_feats: torch.Tensor, device,
                      breed_counts: torch.Tensor | None = None):
    """fid_fn(G_ema) -> FID of cfg.fid_samples generated images (breeds as the submission's: balanced, or in the
    proportions of breed_counts) against the reference features (cfg.fid_reference), or None when off."""
    if cfg.fid_every <= 0:
        return None
    real_mu, real_sigma = feature_stats(real_feats)
    reference = fid_reference_label(cfg.fid_reference, len(real_feats))
    log("score", f"in-run FID: {cfg.fid_samples} images of G_ema vs {reference}")

    def fid_fn(G_ema) -> float:
        # G_ema's standing BN statistics are the caller's (train recomputes them once per sampling moment)
        gen_img = generate_images(G_ema, cfg.fid_samples, device, truncation=cfg.truncation, seed=cfg.seed + 1,
                                  breed_counts=breed_counts)
        gen_mu, gen_sigma = feature_stats(extractor(gen_img))
        return frechet_distance(gen_mu, gen_sigma, real_mu, real_sigma)

    fid_fn.reference = reference  # FidTracker names it in every FID line
    return fid_fn


class FidTracker:
    """Training-time FID of G_ema: the history, the best value and the best G_ema's weights (on the host).

    A failing metric must not end the training: the first exception turns the tracker off, said once.
    """

    def __init__(self, fid_fn=None):
        self.fid_fn = fid_fn
        self.history: list = []          # [[kimg, fid], ...]
        self.best: float | None = None
        self.best_kimg: float | None = None
        self.best_G_ema: dict | None = None

    @property
    def enabled(self) -> bool:
        return self.fid_fn is not None

    @property
    def last_kimg(self) -> float:
        return self.history[-1][0] if self.history else -1.0

    def measure(self, G_ema, kimg: float) -> dict:
        """FID of G_ema now; a new best keeps a copy of its weights. Returns {'fid', 'fid_s'} for the status record."""
        start = time.time()
        try:
            fid = float(self.fid_fn(G_ema))
        except Exception as error:
            log("train", f"WARNING: training-time FID failed ({type(error).__name__}: {error}); FID is off from now")
            self.fid_fn = None
            return {}
        G_ema.eval()
        if not math.isfinite(fid):
            log("train", f"FID is {fid} at {kimg:.1f} kimg: not kept")
            return {}
        self.history.append([kimg, fid])
        if self.best is None or fid < self.best:
            self.best, self.best_kimg = fid, kimg
            self.best_G_ema = ckpt_cpu_copy(G_ema.state_dict())
        reference = getattr(self.fid_fn, "reference", "")
        log("train", f"FID {fid:.2f} at {kimg:.1f} kimg ({time.time() - start:.0f}s); best {self.best:.2f} "
            f"at {self.best_kimg:.1f} kimg{' (vs ' + reference + ')' if reference else ''}")
        return {"fid": fid, "fid_s": time.time() - start}

    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best, "best_kimg": self.best_kimg, "best_G_ema": self.best_G_ema}

    def load_state_dict(self, saved: dict) -> None:
        self.history = list(saved.get("history", []))
        self.best, self.best_kimg = saved.get("best"), saved.get("best_kimg")
        self.best_G_ema = saved.get("best_G_ema")


def pick_truncation(cfg: Config, G_ema, extractor, real_feats: torch.Tensor, device,
                    breed_counts: torch.Tensor | None = None) -> float:
    """cfg.truncation, or with --truncation-search the candidate with the lowest MiFID on cfg.fid_samples images
    (breeds as the submission's: balanced, or in the proportions of breed_counts)."""
    if not cfg.truncation_search:
        return cfg.truncation
    eps = cfg.mifid_eps or extractor.default_eps
    scores = {}
    for truncation in sorted(set(TRUNCATION_CANDIDATES) | {cfg.truncation}):
        gen_img = generate_images(G_ema, cfg.fid_samples, device, truncation=truncation, seed=cfg.seed + 2,
                                  breed_counts=breed_counts)
        scores[truncation] = mifid_score(extractor(gen_img), real_feats, eps, device=extractor.device)
        result = scores[truncation]
        log("score", f"truncation {truncation or 'off'}: FID {result['fid']:.2f}  d {result['d']:.3f}  "
            f"MiFID {result['mifid']:.2f} vs {fid_reference_label(cfg.fid_reference, len(real_feats))}")
    best = min(scores, key=lambda t: scores[t]["mifid"])
    log("score", f"truncation search picked {best or 'off'} ({extractor.name}, {cfg.fid_samples} images each, "
        f"vs {FID_REFERENCE_NAMES[cfg.fid_reference]})")
    return best


def report_mifid(cfg: Config, extractor, zip_path: str, real_feats: torch.Tensor, out_dir: str) -> dict:
    """MiFID of the submitted zip itself (read back and validated) against the reference (cfg.fid_reference);
    OUT/mifid.json."""
    start = time.time()
    gen_img = read_images_zip(zip_path, expect_n=cfg.n_images)
    result = mifid_score(extractor(gen_img), real_feats, cfg.mifid_eps or extractor.default_eps,
                         device=extractor.device)
    result.update(backbone=extractor.name, reference=cfg.fid_reference, n_reference=len(real_feats))
    atomic_write_text(os.path.join(out_dir, "mifid.json"), json.dumps(result, indent=2))
    log("score", f"{extractor.name}: FID {result['fid']:.2f}  d {result['d']:.4f}  d_thr {result['d_thr']:.4f}  "
        f"MiFID {result['mifid']:.2f} vs {fid_reference_label(cfg.fid_reference, len(real_feats))}  "
        f"({time.time() - start:.0f}s)")
    return result

"""Calibrate the memorization threshold eps of a MiFID backbone on the dev data pack (not bundled).

Held-out real photos must score d above eps (new images, not memorised); near-copies of training images
(flipped, shifted, JPEG-recompressed) must score below it. Prints feature throughput, the held-out FID and d,
the near-copies' d, and a suggested eps (geometric mean of the largest near-copy d and the held-out d).

    python scripts/calibrate_eps.py --data ../shared/data/dogs_dev.tar.gz \
        --weights ../shared/weights/efficientnet-lite0.pth --holdout 1500 --seed 0 --device cpu
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from src.mifid import (cached_real_features, feature_stats, frechet_distance, load_feature_extractor,  # noqa: E402
                       load_image_folder, memorization_distance)


def unpacked_images_dir(data: str, work_dir: str) -> str:
    """all-dogs/ of the pack: data is the .tar.gz (unpacked into work_dir) or an unpacked Kaggle-layout folder."""
    if os.path.isdir(data):
        return os.path.join(data, "all-dogs") if os.path.isdir(os.path.join(data, "all-dogs")) else data
    target = os.path.join(work_dir, "pack")
    if not os.path.isdir(os.path.join(target, "all-dogs")):
        with tarfile.open(data) as tar:
            tar.extractall(target, filter="data")
    return os.path.join(target, "all-dogs")


def shifted(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """Translate right and down by `pixels`, repeating the edge rows/columns (no black border)."""
    padded = torch.nn.functional.pad(images.float(), (pixels, 0, pixels, 0), mode="replicate")
    return padded[..., :images.shape[-2], :images.shape[-1]].to(torch.uint8)


def jpeg_recompressed(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).transpose(2, 0, 1).copy()))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dogs_dev.tar.gz or an unpacked Kaggle-layout folder")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--backbone", default="auto")
    parser.add_argument("--holdout", type=int, default=1500, help="real images held out of the reference set")
    parser.add_argument("--copies", type=int, default=1500, help="training images turned into near-copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "calibrate_eps"))
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    extractor = load_feature_extractor(args.backbone, args.weights, args.device)
    images = load_image_folder(unpacked_images_dir(args.data, args.work_dir))
    perm = torch.from_numpy(np.random.default_rng(args.seed).permutation(len(images)))
    held_idx, train_idx = perm[:args.holdout], perm[args.holdout:]

    # Throughput: a timed pass over the whole pack (cached afterwards, so a rerun skips it).
    start = time.time()
    feats = cached_real_features(extractor, images, os.path.join(args.work_dir, "cache"))
    extract_s = time.time() - start
    held_feats, train_feats = feats[held_idx], feats[train_idx]

    held_mu, held_sigma = feature_stats(held_feats)
    train_mu, train_sigma = feature_stats(train_feats)
    fid_holdout = frechet_distance(held_mu, held_sigma, train_mu, train_sigma)
    d_holdout = memorization_distance(held_feats, train_feats)

    # Near-copies of training images, scored against the training part (which contains their originals).
    copy_src = images[train_idx[:args.copies]]
    variants = {
        "exact copy": copy_src,
        "horizontal flip": copy_src.flip(-1),
        "shift 2 px": shifted(copy_src, 2),
        "shift 4 px": shifted(copy_src, 4),
        "JPEG q75": jpeg_recompressed(copy_src, 75),
        "flip + shift 2 px + JPEG q75": jpeg_recompressed(shifted(copy_src.flip(-1), 2), 75),
    }
    start = time.time()
    d_copies = {name: memorization_distance(extractor(variant), train_feats) for name, variant in variants.items()}
    variants_s = time.time() - start

    largest_copy_d = max(d_copies.values())
    eps = math.sqrt(largest_copy_d * d_holdout) if largest_copy_d > 0 else d_holdout / 2
    n_extracted = len(images) + sum(len(v) for v in variants.values())
    figures = dict(
        backbone=extractor.name, device=str(extractor.device), threads=torch.get_num_threads(),
        n_images=len(images), n_holdout=len(held_idx), n_train=len(train_idx), n_copies=len(copy_src),
        extract_seconds=round(extract_s, 1), images_per_second=round(len(images) / extract_s, 1) if extract_s > 1 else None,
        variants_images_per_second=round((n_extracted - len(images)) / variants_s, 1),
        fid_holdout=fid_holdout, d_holdout=d_holdout, d_copies=d_copies, suggested_eps=eps)
    print(f"backbone {extractor.name} on {extractor.device} ({torch.get_num_threads()} threads)")
    if figures["images_per_second"]:
        print(f"feature extraction: {len(images)} images in {extract_s:.1f}s = {figures['images_per_second']} images/s")
    else:
        print("feature extraction: pack features came from the cache (throughput not measured this run)")
    print(f"near-copy extraction (incl. memorization): {figures['variants_images_per_second']:.1f} images/s")
    print(f"held-out {len(held_idx)} vs remaining {len(train_idx)}: FID {fid_holdout:.3f}  d {d_holdout:.4f}")
    for name, d in d_copies.items():
        print(f"near-copies '{name}' ({len(copy_src)}) vs remaining: d {d:.4f}")
    print(f"suggested eps = sqrt(max near-copy d * held-out d) = {eps:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()

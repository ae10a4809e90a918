"""Calibrate the memorization threshold eps of a MiFID backbone on the dev data pack (not bundled).

Held-out real photos must score d above eps (new images, not memorised); near-copies of training images
(flipped, shifted, JPEG-recompressed) must score below it. Prints feature throughput, the held-out FID and d,
the near-copies' d, and a suggested eps (geometric mean of the largest near-copy d and the held-out d).

    python scripts/calibrate_eps.py --data ../shared/data/dogs_dev.tar.gz \
        --weights ../shared/weights/efficientnet-lite0.pth --holdout 1500 --seed 0 --device cpu

--reference photos re-checks eps against Kaggle's reference, whole photos squashed to 64x64, with the full-size
photos of --photos DIR (a Kaggle-layout folder, e.g. the unpacked full_res_sample.tar): the photos are split in two
halves; the reference is the whole photos of half A; near-copies of those photos and A's own dog crops are what a
memorising generator would give; the crops of half B are new dogs. Dev-pack crops measure how much a reference of
that size inflates d (a nearest neighbour among 40 is farther than among 20,579).

    python scripts/calibrate_eps.py --reference photos --photos /tmp/full_res --data ../shared/data/dogs_dev.tar.gz \
        --weights ../shared/weights/efficientnet-lite0.pth --seed 0 --device cpu
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

import shutil

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from src.data import load_dogs  # noqa: E402
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


def near_copies(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The variants a memorising generator could produce of its training images."""
    return {
        "exact copy": images,
        "horizontal flip": images.flip(-1),
        "shift 2 px": shifted(images, 2),
        "shift 4 px": shifted(images, 4),
        "JPEG q75": jpeg_recompressed(images, 75),
        "flip + shift 2 px + JPEG q75": jpeg_recompressed(shifted(images.flip(-1), 2), 75),
    }


def split_photo_folder(photos_dir: str, work_dir: str) -> tuple[str, str]:
    """Two Kaggle-layout copies of photos_dir holding alternate photos (sorted by id) and their annotation files."""
    names = sorted(n for n in os.listdir(os.path.join(photos_dir, "all-dogs")) if not n.startswith("."))
    halves = []
    for half, picked in (("A", names[0::2]), ("B", names[1::2])):
        root = os.path.join(work_dir, f"photos_{half}")
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(os.path.join(root, "all-dogs"))
        ids = {os.path.splitext(n)[0] for n in picked}
        for name in picked:
            shutil.copy(os.path.join(photos_dir, "all-dogs", name), os.path.join(root, "all-dogs", name))
        for folder in os.listdir(os.path.join(photos_dir, "Annotation")):
            for file in os.listdir(os.path.join(photos_dir, "Annotation", folder)):
                if file in ids:
                    os.makedirs(os.path.join(root, "Annotation", folder), exist_ok=True)
                    shutil.copy(os.path.join(photos_dir, "Annotation", folder, file),
                                os.path.join(root, "Annotation", folder, file))
        halves.append(root)
    return halves[0], halves[1]


def photo_reference_figures(args, extractor) -> dict:
    """d against Kaggle's reference (whole photos at 64x64) of near-copies, of training crops and of new dogs."""
    half_a, half_b = split_photo_folder(args.photos, args.work_dir)
    data_a = load_dogs(half_a, workers=1, min_box=16, whole_photos=True)
    data_b = load_dogs(half_b, workers=1, min_box=16)
    reference = extractor(data_a.photos)
    d_copies = {name: memorization_distance(extractor(images), reference)
                for name, images in near_copies(data_a.photos).items()}
    d_own_crops = memorization_distance(extractor(data_a.images), reference)
    d_new_crops = memorization_distance(extractor(data_b.images), reference)
    # The same reference size with dev-pack crops, and a 10x larger one: how much the small reference inflates d.
    pack = load_image_folder(unpacked_images_dir(args.data, args.work_dir))
    perm = torch.from_numpy(np.random.default_rng(args.seed).permutation(len(pack)))
    n_ref = len(data_a.photos)
    new_feats = extractor(pack[perm[:args.new]])
    ref_feats = extractor(pack[perm[args.new:args.new + 10 * n_ref]])
    d_pack = {n: memorization_distance(new_feats, ref_feats[:n]) for n in (n_ref, 10 * n_ref)}
    largest_copy_d = max(d_copies.values())
    print(f"backbone {extractor.name} on {extractor.device}; reference: {n_ref} whole photos of {args.photos} "
          f"(every other one by id), 64x64 Lanczos")
    for name, d in d_copies.items():
        print(f"near-copies '{name}' of the {n_ref} reference photos: d {d:.4f}")
    print(f"the {len(data_a.images)} dog crops of the reference photos (a generator that memorised its training "
          f"crops): d {d_own_crops:.4f}")
    print(f"the {len(data_b.images)} dog crops of the other {data_b.counts['photos']} photos (new dogs): "
          f"d {d_new_crops:.4f}")
    for n, d in d_pack.items():
        print(f"{args.new} dev-pack crops vs {n} other dev-pack crops: d {d:.4f}")
    print(f"eps {args.eps}: near-copies {'below' if largest_copy_d < args.eps else 'NOT below'} it "
          f"(largest d {largest_copy_d:.4f}); new dogs {'above' if d_new_crops > args.eps else 'NOT above'} it")
    return dict(backbone=extractor.name, n_reference_photos=n_ref, d_copies=d_copies,
                n_own_crops=len(data_a.images), d_own_crops=d_own_crops, n_new_crops=len(data_b.images),
                d_new_crops=d_new_crops, n_pack_new=args.new,
                d_pack_by_reference_size={str(n): d for n, d in d_pack.items()})


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
    parser.add_argument("--reference", default="crops", choices=("crops", "photos"),
                        help="crops: calibrate on the dev pack; photos: re-check against whole photos (--photos)")
    parser.add_argument("--photos", metavar="DIR", help="Kaggle-layout folder of full-size photos (--reference photos)")
    parser.add_argument("--new", type=int, default=300, help="dev-pack crops scored as new dogs (--reference photos)")
    parser.add_argument("--eps", type=float, default=None, help="eps to check (default: the backbone's)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    extractor = load_feature_extractor(args.backbone, args.weights, args.device)
    if args.reference == "photos":
        if not args.photos:
            parser.error("--reference photos needs --photos DIR")
        args.eps = extractor.default_eps if args.eps is None else args.eps
        figures = photo_reference_figures(args, extractor)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)
        return
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
    variants = near_copies(copy_src)
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

"""Kaggle's MiFID (memorization-informed FID) with a choice of backbone, the submission validator and a CLI.

Follows the competition's released scoring code (its MiFIDEvaluator): every image, generated or real, opened with
PIL and squashed to 64x64 with Lanczos (Image.ANTIALIAS), features of those, FID with scipy's sqrtm and its 1e-6
fallback, memorization distance = mean over generated images of the minimum of 1 - |cos| to the reference set,
thresholded at eps; MiFID = FID / (d_thr + 1e-14). Kaggle's reference set was the whole photos of all-dogs/.

    python -m src.mifid --gen images.zip --real DIR --backbone inception --weights pt_inception-2015-12-05-6726825d.pth
    python -m src.mifid --validate images.zip
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import os
import sys
import time
import warnings
import zipfile

import numpy as np
import torch
from PIL import Image
from scipy import linalg

from src.atomic import atomic_path
from src.console import log
from src.data import lanczos_square
from src.efficientnet import EFFNET_LITE0_DIM, EfficientNetLite0
from src.inception import FID_INCEPTION_DIM, FIDInceptionV3

MIFID_IMAGE_SIZE = 64          # every image is squashed to 64x64 (PIL Lanczos) before the backbone, as on Kaggle
MIFID_SUBMISSION_COUNT = 10000
MIFID_SQRTM_OFFSET = 1e-6      # added to both covariances when sqrtm(s1 s2) is not finite
MIFID_IMAG_ATOL = 1e-3         # largest imaginary part tolerated on the diagonal of sqrtm(s1 s2)
MIFID_DENOM_EPS = 1e-14        # MiFID = FID / (d_thr + this): the evaluator's fid_epsilon
MIFID_MEM_BLOCK = 4096         # rows per block of the memorization distance: 4096^2 float64 = 128 MiB
MIFID_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Per backbone: model class, feature size, memorization threshold, weight-file pattern and a key that identifies it.
# inception's eps is Kaggle's public-LB value. efficientnet-lite0's is calibrated on the dev pack (BENCHMARKS.md, ## MiFID):
# near-copies of training images (flip, shift, JPEG) score d <= 0.08, held-out real photos d = 0.23; eps = their geometric mean.
MIFID_BACKBONES = {
    "inception": dict(model=FIDInceptionV3, dim=FID_INCEPTION_DIM, default_eps=0.1,
                      pattern="pt_inception-2015-12-05*.pth", key="Mixed_7c.branch_pool.conv.weight"),
    "efficientnet-lite0": dict(model=EfficientNetLite0, dim=EFFNET_LITE0_DIM, default_eps=0.14,
                               pattern="efficientnet-lite0*.pth", key="_conv_stem.weight"),
}


class SubmissionError(ValueError):
    """images.zip breaks Kaggle's rules (count, format, size, mode); the message names the entry."""




def resize_images_uint8(images: torch.Tensor, size: int = MIFID_IMAGE_SIZE) -> torch.Tensor:
    """uint8 N x 3 x H x W -> uint8 N x 3 x size x size with PIL's Lanczos (lanczos_square); no-op at size."""
    if images.shape[-2:] == (size, size):
        return images
    arrays = [lanczos_square(Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB"), size) for image in images.cpu()]
    return torch.from_numpy(np.stack(arrays))


@contextlib.contextmanager
def _mifid_fp32(device: torch.device):
    """Full fp32 inside: no autocast from a caller, no TF32 convolutions or matmuls on CUDA."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        if device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class FeatureExtractor:
    """Callable: uint8 N x 3 x H x W images (RGB 0..255) -> float32 CPU N x dim features of one backbone."""

    def __init__(self, name: str, model: torch.nn.Module, device, weights_id: str, batch_size: int = 0):
        if name not in MIFID_BACKBONES:
            raise ValueError(f"unknown MiFID backbone {name!r}; choose one of {', '.join(MIFID_BACKBONES)}")
        spec = MIFID_BACKBONES[name]
        self.name, self.dim, self.default_eps = name, spec["dim"], spec["default_eps"]
        self.device = torch.device(device)
        self.weights_id = weights_id
        # Small CPU batches stay in cache (measured faster); the GPU wants large ones.
        self.batch_size = batch_size or (200 if self.device.type == "cuda" else 16)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        for param in self.model.parameters():
            param.requires_grad_(False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or images.shape[1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"feature extractor wants a uint8 N x 3 x H x W tensor (RGB 0..255), got {got}")
        feats = torch.empty(len(images), self.dim, dtype=torch.float32)
        with _mifid_fp32(self.device):
            for start in range(0, len(images), self.batch_size):
                batch = resize_images_uint8(images[start:start + self.batch_size]).to(self.device)
                x01 = (batch.float() / 255.0).contiguous(memory_format=torch.channels_last)
                feats[start:start + len(batch)] = self.model.features(x01).float().cpu()
        return feats


def _mifid_resolve_device(device) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _mifid_file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_feature_extractor(backbone: str, weights_path: str, device="auto") -> FeatureExtractor:
    """Backbone ("inception" | "efficientnet-lite0" | "auto": from the state-dict keys) with weights loaded strictly."""
    if not weights_path or not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"MiFID weights not found: {weights_path!r}. Give pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            "(Kaggle's metric) or efficientnet-lite0.pth (offline stand-in); on Kaggle attach it as a dataset.")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read MiFID weights {weights_path}: {error}") from error
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{weights_path} holds a {type(state).__name__}, not a state dict")
    if backbone == "auto":
        matches = [name for name, spec in MIFID_BACKBONES.items() if spec["key"] in state]
        if not matches:
            raise ValueError(f"{weights_path}: cannot tell the backbone from its keys (first: {next(iter(state))!r}); "
                             f"pass --backbone {' or '.join(MIFID_BACKBONES)}")
        backbone = matches[0]
    if backbone not in MIFID_BACKBONES:
        raise ValueError(f"unknown MiFID backbone {backbone!r}; choose one of auto, {', '.join(MIFID_BACKBONES)}")
    model = MIFID_BACKBONES[backbone]["model"]()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{weights_path} is not a {backbone} state dict: {len(missing)} keys missing {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}")
    model.load_state_dict(state, strict=True)
    resolved = _mifid_resolve_device(device)
    weights_id = _mifid_file_sha256(weights_path)[:16]
    log("mifid", f"{backbone} from {weights_path} (sha256 {weights_id}...) on {resolved}")
    return FeatureExtractor(backbone, model, resolved, weights_id)


def find_fid_weights(search_root: str = "/kaggle/input") -> tuple[str, str] | None:
    """(backbone, path) of the first weight file found under search_root, inception preferred; None if none."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(search_root):
        dirs.sort()
        for name in sorted(files):
            for backbone, spec in MIFID_BACKBONES.items():
                if backbone not in found and fnmatch.fnmatch(name, spec["pattern"]):
                    found[backbone] = os.path.join(folder, name)
    for backbone in MIFID_BACKBONES:
        if backbone in found:
            return backbone, found[backbone]
    return None


def _mifid_float64(feats) -> np.ndarray:
    array = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    if array.ndim != 2:
        raise ValueError(f"features must be a 2-D N x D array, got shape {array.shape}")
    return array.astype(np.float64)


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64: mean and np.cov(rowvar=False) of N x D features."""
    array = _mifid_float64(feats)
    if len(array) < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got {len(array)}")
    return np.mean(array, axis=0), np.cov(array, rowvar=False)


def _mifid_sqrtm(matrix: np.ndarray) -> np.ndarray:
    # scipy >= 1.16 deprecates disp=False; the plain call returns the same matrix on old and new scipy.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return linalg.sqrtm(matrix)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)), with Kaggle's singular and complex handling."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in size: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _mifid_sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # product (nearly) singular: retry with a small offset on both covariances
        log("mifid", f"FID: singular product; adding {MIFID_SQRTM_OFFSET} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * MIFID_SQRTM_OFFSET
        covmean = _mifid_sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=MIFID_IMAG_ATOL):
            raise ValueError(f"FID: sqrtm(s1 s2) has an imaginary component of {np.max(np.abs(covmean.imag)):.4g} "
                             "(too few samples for the feature size?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _mifid_unit_rows(feats, device) -> torch.Tensor:
    # Kaggle: drop rows whose sum is 0, then L2-normalise (nan -> 0) in float64
    rows = torch.as_tensor(_mifid_float64(feats), device=device)
    rows = rows[rows.sum(dim=1) != 0]
    return torch.nan_to_num(rows / rows.norm(dim=1, keepdim=True))


def memorization_distance(gen_feats, real_feats, block_size: int = MIFID_MEM_BLOCK, device=None) -> float:
    """mean_i min_j (1 - |cos(gen_i, real_j)|), blocked so at most block_size^2 distances exist at once.

    Runs on `device` (default: the gen_feats tensor's device, CPU for numpy) in float64.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if device is None:
        device = gen_feats.device if isinstance(gen_feats, torch.Tensor) else "cpu"
    gen = _mifid_unit_rows(gen_feats, device)
    real = _mifid_unit_rows(real_feats, device)
    if len(gen) == 0 or len(real) == 0:
        raise ValueError(f"memorization distance: no non-zero feature rows left (generated {len(gen)}, real {len(real)})")
    nearest = torch.empty(len(gen), dtype=torch.float64, device=device)
    for g0 in range(0, len(gen), block_size):
        gen_block = gen[g0:g0 + block_size]
        best = torch.full((len(gen_block),), float("inf"), dtype=torch.float64, device=device)
        for r0 in range(0, len(real), block_size):
            # 1 - |cos|, clamped at 0: rounding can push |cos| of an exact copy a hair above 1
            dist = (1.0 - (gen_block @ real[r0:r0 + block_size].T).abs()).clamp_(min=0.0)
            best = torch.minimum(best, dist.min(dim=1).values)
        nearest[g0:g0 + len(gen_block)] = best
    return float(nearest.mean())


def mifid_score(gen_feats, real_feats, eps: float, real_stats=None, mem_feats=None, device=None) -> dict:
    """dict(fid, d, d_thr, mifid, eps): FID against real_feats (or precomputed real_stats = (mu, sigma)),
    memorization against mem_feats (default real_feats); d_thr = d if d < eps else 1; MiFID = FID / (d_thr + 1e-15)."""
    if eps <= 0:
        raise ValueError(f"memorization threshold eps must be positive, got {eps}")
    gen_mu, gen_sigma = feature_stats(gen_feats)
    real_mu, real_sigma = real_stats if real_stats is not None else feature_stats(real_feats)
    fid = frechet_distance(gen_mu, gen_sigma, real_mu, real_sigma)
    d = memorization_distance(gen_feats, real_feats if mem_feats is None else mem_feats, device=device)
    d_thr = d if d < eps else 1.0
    return dict(fid=fid, d=d, d_thr=d_thr, mifid=fid / (d_thr + MIFID_DENOM_EPS), eps=float(eps))


def _mifid_content_key(images: torch.Tensor, extractor: FeatureExtractor, kind: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"{kind}|{extractor.name}|{extractor.weights_id}|{tuple(images.shape)}|{images.dtype}|".encode())
    digest.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    return digest.hexdigest()[:24]


def cached_real_features(extractor: FeatureExtractor, real_uint8: torch.Tensor, cache_dir: str,
                         kind: str = "images") -> torch.Tensor:
    """extractor(real_uint8), kept in cache_dir under the reference kind ("photos", "crops", ...) and a hash of the
    kind, the images, the backbone and its weights."""
    key = _mifid_content_key(real_uint8, extractor, kind)
    path = os.path.join(cache_dir, f"real_features_{extractor.name}_{kind}_{key}.pt")
    if os.path.exists(path):
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(feats, torch.Tensor) and tuple(feats.shape) == (len(real_uint8), extractor.dim):
                log("mifid", f"real features from cache {path}")
                return feats
            log("mifid", f"cache {path} has the wrong shape; recomputing")
        except Exception as error:  # a damaged cache file only costs the recomputation
            log("mifid", f"cache {path} unreadable ({error}); recomputing")
    start = time.time()
    feats = extractor(real_uint8)
    os.makedirs(cache_dir, exist_ok=True)
    with atomic_path(path) as tmp_path:
        torch.save(feats, tmp_path)
    log("mifid", f"real features of {len(real_uint8)} {kind} ({extractor.name}) in {time.time() - start:.1f}s "
        f"-> {path}")
    return feats


def read_images_zip(path: str, expect_n: int | None = MIFID_SUBMISSION_COUNT,
                    size: int = MIFID_IMAGE_SIZE) -> torch.Tensor:
    """uint8 N x 3 x size x size from a submission zip; SubmissionError unless every entry is a size x size
    RGB PNG and (expect_n given) there are exactly expect_n of them. Folders inside the zip are ignored."""
    if not os.path.isfile(path):
        raise SubmissionError(f"{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise SubmissionError(f"{path}: not a zip file ({error})") from error
    with archive:
        entries = [info for info in archive.infolist() if not info.is_dir()]
        if expect_n is not None and len(entries) != expect_n:
            raise SubmissionError(f"{path}: {len(entries)} files, expected exactly {expect_n} PNG images")
        if not entries:
            raise SubmissionError(f"{path}: no images in the zip")
        images = np.empty((len(entries), 3, size, size), dtype=np.uint8)
        for i, info in enumerate(entries):
            name = info.filename
            if not name.lower().endswith(".png"):
                raise SubmissionError(f"{path}: entry {name!r} is not a .png file (only PNG images are accepted)")
            try:
                image = Image.open(io.BytesIO(archive.read(info)))
                image.load()
            except Exception as error:
                raise SubmissionError(f"{path}: entry {name!r} cannot be decoded as an image ({error})") from error
            if image.format != "PNG":
                raise SubmissionError(f"{path}: entry {name!r} is a {image.format} image, not a PNG")
            if image.size != (size, size):
                raise SubmissionError(f"{path}: entry {name!r} is {image.size[0]}x{image.size[1]}, "
                                      f"expected {size}x{size}")
            if image.mode != "RGB":
                raise SubmissionError(f"{path}: entry {name!r} has mode {image.mode}, expected RGB")
            images[i] = np.asarray(image).transpose(2, 0, 1)
    return torch.from_numpy(images)


def validate_submission(path: str) -> None:
    """Raise SubmissionError unless path is a zip of exactly 10,000 PNG 64x64 RGB images."""
    read_images_zip(path, expect_n=MIFID_SUBMISSION_COUNT, size=MIFID_IMAGE_SIZE)


def load_image_folder(path: str, size: int = MIFID_IMAGE_SIZE) -> torch.Tensor:
    """Every image file under path (recursive, sorted) as uint8 N x 3 x size x size RGB, squashed with Lanczos as
    Kaggle's evaluator read all-dogs/; undecodable files (and links or pipes that are no plain file) are skipped
    and counted."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder not found: {path}")
    files = []
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(MIFID_IMAGE_SUFFIXES)]
    images, skipped = [], []
    for file in files:
        try:
            if not os.path.isfile(file):  # a broken link or a pipe named .jpg: opening a pipe would block
                raise OSError("not a regular file")
            with Image.open(file) as image:
                array = lanczos_square(image.convert("RGB"), size)
        except Exception:  # corrupt or truncated file: counted and reported below
            skipped.append(file)
            continue
        images.append(torch.from_numpy(array.copy()))
    if skipped:
        log("mifid", f"{path}: skipped {len(skipped)} undecodable files (e.g. {skipped[0]})")
    if not images:
        raise ValueError(f"no decodable images under {path} ({len(files)} image files found)")
    return torch.stack(images)


def mifid_cli(argv: list[str] | None = None) -> int:
    """`python -m src.mifid`: score a zip against a folder, or validate a submission; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m src.mifid",
                                     description="Kaggle's MiFID of a zip of generated images, or a submission check.")
    parser.add_argument("--validate", metavar="ZIP", help="only check a submission: 10,000 PNG 64x64 RGB")
    parser.add_argument("--gen", metavar="ZIP", help="generated images (zip of 64x64 RGB PNGs)")
    parser.add_argument("--real", metavar="DIR", help="real images for FID (folder, searched recursively)")
    parser.add_argument("--mem-ref", metavar="DIR", help="training images for memorization (default: --real)")
    parser.add_argument("--backbone", default="auto", choices=("auto", *MIFID_BACKBONES))
    parser.add_argument("--weights", metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth or efficientnet-lite0.pth")
    parser.add_argument("--eps", type=float, default=None, help="memorization threshold (default: the backbone's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--cache-dir", default="", help="keep real-image features here between runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.validate:
        try:
            validate_submission(args.validate)
        except SubmissionError as error:
            print(f"invalid: {error}")
            return 1
        print(f"ok: {MIFID_SUBMISSION_COUNT} PNG {MIFID_IMAGE_SIZE}x{MIFID_IMAGE_SIZE} RGB")
        return 0
    if not (args.gen and args.real):
        parser.error("give --gen ZIP and --real DIR to score, or --validate ZIP")
    if not args.weights:
        parser.error("give --weights FILE (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or efficientnet-lite0.pth)")
    try:
        extractor = load_feature_extractor(args.backbone, args.weights, args.device)
        gen_img = read_images_zip(args.gen, expect_n=None)
        if len(gen_img) != MIFID_SUBMISSION_COUNT:
            log("mifid", f"note: {len(gen_img)} generated images; Kaggle scores exactly {MIFID_SUBMISSION_COUNT}")
        real_img = load_image_folder(args.real)
        if args.cache_dir:
            real_feats = cached_real_features(extractor, real_img, args.cache_dir)
        else:
            real_feats = extractor(real_img)
        mem_feats = None
        if args.mem_ref and os.path.abspath(args.mem_ref) != os.path.abspath(args.real):
            mem_feats = extractor(load_image_folder(args.mem_ref))
        eps = extractor.default_eps if args.eps is None else args.eps
        result = mifid_score(extractor(gen_img), real_feats, eps, mem_feats=mem_feats, device=extractor.device)
    except (SubmissionError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    result.update(backbone=extractor.name, n_gen=len(gen_img), n_real=len(real_feats),
                  n_mem=len(real_feats if mem_feats is None else mem_feats))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"backbone {result['backbone']}  generated {result['n_gen']}  real {result['n_real']}  "
              f"memorization reference {result['n_mem']}")
        print(f"FID    {result['fid']:.4f}")
        print(f"d      {result['d']:.6f}")
        print(f"d_thr  {result['d_thr']:.6f}  (eps {result['eps']})")
        print(f"MiFID  {result['mifid']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(mifid_cli())

"""MiFID as Kaggle computes it: FID, the sqrtm fallbacks, memorization distance, caching, the zip validator, the CLI."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

import src.efficientnet as efficientnet_module
from src.efficientnet import EfficientNetLite0
from src.mifid import (FeatureExtractor, SubmissionError, cached_real_features, feature_stats, find_fid_weights,
                       frechet_distance, load_feature_extractor, load_image_folder, memorization_distance,
                       mifid_cli, mifid_score, read_images_zip, resize_images_uint8, validate_submission)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def kaggle_memorization_reference(gen: np.ndarray, real: np.ndarray) -> float:
    """The released scoring code's cosine_distance, dense, in numpy."""
    gen, real = gen[np.sum(gen, axis=1) != 0], real[np.sum(real, axis=1) != 0]
    gen = np.nan_to_num(gen / np.linalg.norm(gen, axis=1, keepdims=True))
    real = np.nan_to_num(real / np.linalg.norm(real, axis=1, keepdims=True))
    return float(np.mean(np.min(1.0 - np.abs(gen @ real.T), axis=1)))


def png_bytes(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode and image.mode != mode:
        raise AssertionError(f"test image has mode {image.mode}, wanted {mode}")
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_zip(path: Path, entries: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return str(path)


def rgb(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---- FID ----------------------------------------------------------------------------------------------------

def test_feature_stats_are_numpy_mean_and_cov():
    feats = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = feature_stats(torch.from_numpy(feats))
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False))


def test_fid_of_a_set_against_itself_is_zero():
    feats = np.random.default_rng(1).normal(size=(400, 16))
    mu, sigma = feature_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # scaled full covariance: sqrtm(S c^2 S) = c S, so FID = |dmu|^2 + (1 - c)^2 tr(S)
    a = rng.normal(size=(8, 8))
    s = a @ a.T + np.eye(8)
    assert frechet_distance(mu1, s, mu2, 4 * s) == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.trace(s), rel=1e-8)


def test_fid_retries_a_singular_product_with_the_1e6_offset():
    s1, s2, mu = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), np.zeros(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not np.isfinite(linalg.sqrtm(s1 @ s2)).all()  # the plain square root fails here
    # (s1 + eI)(s2 + eI) = (1 + e) [[e, 1], [0, e]], whose square root has e(1 + e) under the diagonal's roots
    e = 1e-6
    expected = 0 + 0 + 2 - 2 * 2 * np.sqrt(e * (1 + e))
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_raises_on_a_large_imaginary_part():
    with pytest.raises(ValueError, match="imaginary component of 1"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


def test_fid_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="differ in size"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---- memorization -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_gen,n_real,block", [(37, 53, 1), (37, 53, 5), (37, 53, 7), (101, 29, 64), (3, 250, 16)])
def test_blocked_memorization_equals_the_dense_reference(n_gen, n_real, block):
    rng = np.random.default_rng(n_gen * 1000 + n_real + block)
    real = rng.normal(size=(n_real, 12))
    gen = rng.normal(size=(n_gen, 12))
    gen[0] = -real[3]  # anti-parallel counts as a copy: |cos| = 1
    expected = kaggle_memorization_reference(gen, real)
    assert memorization_distance(gen, real, block_size=block) == pytest.approx(expected, abs=1e-12)
    assert memorization_distance(torch.from_numpy(gen).float(), torch.from_numpy(real).float(),
                                 block_size=block) == pytest.approx(expected, abs=1e-6)


def test_memorization_drops_rows_whose_sum_is_zero():
    rng = np.random.default_rng(3)
    real, gen = rng.uniform(0.1, 1.0, (40, 8)), rng.uniform(0.1, 1.0, (20, 8))
    base = memorization_distance(gen, real)
    zero_sum = np.zeros((1, 8))
    zero_sum[0, :2] = [1.0, -1.0]  # not all zero, but Kaggle's sum test drops it too
    padded_gen = np.concatenate([gen, np.zeros((5, 8)), zero_sum])
    padded_real = np.concatenate([np.zeros((3, 8)), real, zero_sum])
    assert memorization_distance(padded_gen, padded_real, block_size=7) == pytest.approx(base, abs=1e-12)
    with pytest.raises(ValueError, match="no non-zero feature rows"):
        memorization_distance(np.zeros((4, 8)), real)


def test_copies_of_training_images_are_penalised():
    rng = np.random.default_rng(4)
    real = rng.uniform(0.0, 1.0, (300, 16))
    gen = real[:100].copy()  # memorised: every generated image is a training image
    result = mifid_score(gen, real, eps=0.1)
    assert 0.0 <= result["d"] < 1e-12 and result["d_thr"] == result["d"]
    assert result["fid"] > 0.01
    assert result["mifid"] == result["fid"] / (result["d"] + 1e-14)  # the evaluator's fid_epsilon
    assert result["mifid"] > 1e10 * result["fid"]


def test_far_features_are_not_penalised():
    rng = np.random.default_rng(5)
    real = np.concatenate([rng.uniform(0.1, 1, (200, 8)), np.zeros((200, 8))], axis=1)
    gen = np.concatenate([np.zeros((100, 8)), rng.uniform(0.1, 1, (100, 8))], axis=1)  # orthogonal: d = 1
    result = mifid_score(gen, real, eps=0.1)
    assert result["d"] == pytest.approx(1.0) and result["d_thr"] == 1.0
    assert result["mifid"] == pytest.approx(result["fid"])


@pytest.mark.parametrize("d_target,expected_thr", [(0.05, 0.05), (0.2, 1.0)])
def test_threshold_keeps_d_below_eps_and_replaces_it_by_1_above(d_target, expected_thr):
    rng = np.random.default_rng(6)
    # real: 60 rows in dims 2.. (orthogonal to gen) and 5 multiples of e0; gen: at angle acos(1 - d) to e0
    real = np.zeros((65, 16))
    real[:60, 2:] = rng.uniform(0.1, 1, (60, 14))
    real[60:, 0] = rng.uniform(0.5, 2, 5)
    scale, cos = rng.uniform(0.5, 2, 30), 1 - d_target
    gen = np.zeros((30, 16))
    gen[:, 0], gen[:, 1] = cos * scale, np.sqrt(1 - cos ** 2) * scale
    gen[:, 2:] = 1e-7 * rng.uniform(size=(30, 14))  # keeps the covariance full rank, moves cos by ~1e-13
    result = mifid_score(gen, real, eps=0.1)
    assert result["d"] == pytest.approx(d_target, abs=1e-9)
    assert result["d_thr"] == pytest.approx(expected_thr, abs=1e-9)
    assert result["mifid"] == pytest.approx(result["fid"] / expected_thr, rel=1e-6)


def test_mifid_score_uses_precomputed_stats_and_a_separate_memorization_set():
    rng = np.random.default_rng(6)
    gen, real, mem = rng.normal(size=(60, 6)), rng.normal(size=(80, 6)) + 0.5, rng.normal(size=(40, 6))
    plain = mifid_score(gen, real, eps=0.5)
    with_stats = mifid_score(gen, real, eps=0.5, real_stats=feature_stats(real))
    assert with_stats["fid"] == pytest.approx(plain["fid"], rel=1e-12)
    separate = mifid_score(gen, real, eps=0.5, mem_feats=mem)
    assert separate["d"] == pytest.approx(kaggle_memorization_reference(gen, mem), abs=1e-12)
    assert separate["fid"] == pytest.approx(plain["fid"], rel=1e-12)
    assert set(plain) == {"fid", "d", "d_thr", "mifid", "eps"}
    with pytest.raises(ValueError, match="eps must be positive"):
        mifid_score(gen, real, eps=0.0)


# ---- extractor plumbing -------------------------------------------------------------------------------------

def test_resize_is_pils_lanczos_to_64_and_a_no_op_at_64():
    # Kaggle's evaluator: Image.open(path).resize((64, 64), Image.ANTIALIAS); ANTIALIAS is Lanczos
    images = torch.from_numpy(np.stack([rgb(i, 96).transpose(2, 0, 1) for i in range(2)]))
    expected = [np.asarray(Image.fromarray(rgb(i, 96)).resize((64, 64), Image.LANCZOS)) for i in range(2)]
    assert torch.equal(resize_images_uint8(images), torch.from_numpy(np.stack(expected).transpose(0, 3, 1, 2)))
    bilinear = F.interpolate(images.float(), size=(64, 64), mode="bilinear", align_corners=False).round()
    assert (resize_images_uint8(images).float() - bilinear).abs().mean() > 5  # the old path was far from it
    small = images[:, :, :64, :64]
    assert resize_images_uint8(small) is small


def test_extractor_rejects_float_images_and_runs_fp32_under_autocast():
    extractor = FeatureExtractor("efficientnet-lite0", EfficientNetLite0(), "cpu", weights_id="random")
    with pytest.raises(ValueError, match="uint8 N x 3 x H x W"):
        extractor(torch.rand(2, 3, 64, 64))
    images = torch.from_numpy(np.stack([rgb(i).transpose(2, 0, 1) for i in range(3)]))
    plain = extractor(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = extractor(images)
    assert plain.dtype == torch.float32 and plain.shape == (3, 1280)
    assert torch.equal(plain, under_autocast)


def test_load_feature_extractor_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="MiFID weights not found"):
        load_feature_extractor("auto", str(tmp_path / "nope.pth"), "cpu")
    odd = tmp_path / "odd.pth"
    torch.save({"layer.weight": torch.zeros(2)}, odd)
    with pytest.raises(ValueError, match="cannot tell the backbone"):
        load_feature_extractor("auto", str(odd), "cpu")
    lite = tmp_path / "efficientnet-lite0-random.pth"
    torch.save(EfficientNetLite0().state_dict(), lite)
    with pytest.raises(ValueError, match="is not a inception state dict: 566 keys missing"):
        load_feature_extractor("inception", str(lite), "cpu")
    extractor = load_feature_extractor("auto", str(lite), "cpu")
    assert (extractor.name, extractor.dim, extractor.device.type) == ("efficientnet-lite0", 1280, "cpu")
    assert 0 < extractor.default_eps < 1 and len(extractor.weights_id) == 16


def test_find_fid_weights_prefers_inception(tmp_path):
    assert find_fid_weights(str(tmp_path)) is None
    (tmp_path / "b" / "lite").mkdir(parents=True)
    (tmp_path / "b" / "lite" / "efficientnet-lite0.pth").write_bytes(b"x")
    assert find_fid_weights(str(tmp_path)) == ("efficientnet-lite0", str(tmp_path / "b" / "lite" / "efficientnet-lite0.pth"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    assert find_fid_weights(str(tmp_path)) == ("inception", str(tmp_path / "c" / "pt_inception-2015-12-05-6726825d.pth"))


class CountingExtractor:
    """Stands in for FeatureExtractor in the cache test: mean colour as a 3-d feature, calls counted."""
    name, dim, default_eps = "efficientnet-lite0", 3, 0.1

    def __init__(self, weights_id: str = "w1"):
        self.weights_id, self.calls = weights_id, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.float().mean(dim=(2, 3))


def test_real_features_are_cached_by_content_and_weights(tmp_path):
    images = torch.from_numpy(np.stack([rgb(i).transpose(2, 0, 1) for i in range(6)]))
    extractor = CountingExtractor()
    first = cached_real_features(extractor, images, str(tmp_path))
    again = cached_real_features(extractor, images.clone(), str(tmp_path))
    assert extractor.calls == 1 and torch.equal(first, again)
    assert len(list(tmp_path.glob("real_features_efficientnet-lite0_*.pt"))) == 1
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    cached_real_features(extractor, changed, str(tmp_path))
    other_weights = CountingExtractor("w2")
    cached_real_features(other_weights, images, str(tmp_path))
    assert extractor.calls == 2 and other_weights.calls == 1
    cache_file = sorted(tmp_path.glob("*.pt"), key=os.path.getmtime)[0]
    cache_file.write_bytes(b"damaged")
    assert torch.equal(cached_real_features(extractor, images, str(tmp_path)), first)
    assert extractor.calls == 3
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files
    # the reference kind is part of the key: the same pixels as "crops" and as "photos" are two cache entries
    as_crops = cached_real_features(extractor, images, str(tmp_path), kind="crops")
    as_photos = cached_real_features(extractor, images, str(tmp_path), kind="photos")
    assert extractor.calls == 5 and torch.equal(as_crops, as_photos)
    assert len(list(tmp_path.glob("real_features_efficientnet-lite0_photos_*.pt"))) == 1


def test_load_image_folder_recurses_converts_resizes_and_skips_corrupt_files(tmp_path, capsys):
    (tmp_path / "all-dogs").mkdir()
    (tmp_path / "all-dogs" / "a.jpg").write_bytes(png_bytes(rgb(1), fmt="JPEG"))
    (tmp_path / "all-dogs" / "b.jpg").write_bytes(png_bytes(np.full((64, 64, 4), 200, np.uint8), mode="RGBA"))
    (tmp_path / "all-dogs" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "Annotation" / "n0-Breed").mkdir(parents=True)
    (tmp_path / "Annotation" / "n0-Breed" / "a").write_text("<annotation/>")
    (tmp_path / "z_big.png").write_bytes(png_bytes(rgb(2, 128)))
    images = load_image_folder(str(tmp_path))
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8
    # os.walk order, sorted: the root's own files, then Annotation/ (no images), then all-dogs/
    big = np.asarray(Image.fromarray(rgb(2, 128)).resize((64, 64), Image.LANCZOS)).transpose(2, 0, 1)
    assert torch.equal(images[0], torch.from_numpy(big.copy()))
    assert (images[2] == 200).all()  # the RGBA PNG named .jpg, alpha dropped
    assert "skipped 1 undecodable files" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no decodable images"):
        load_image_folder(str(tmp_path / "Annotation"))


# ---- the submission validator -------------------------------------------------------------------------------

def test_read_images_zip_accepts_a_good_zip_and_returns_its_pixels(tmp_path):
    entries = {f"{i}.png": png_bytes(rgb(i)) for i in range(5)}
    path = write_zip(tmp_path / "good.zip", entries)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("folder/", b"")  # directory entries are not images and are ignored
    images = read_images_zip(path, expect_n=5)
    assert images.shape == (5, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(images[3], torch.from_numpy(rgb(3).transpose(2, 0, 1).copy()))


@pytest.mark.parametrize("entries,expect_n,message", [
    ({f"{i}.png": b"" for i in range(4)}, 5, "4 files, expected exactly 5 PNG images"),
    ({"a.png": png_bytes(rgb(0)), "b.jpg": png_bytes(rgb(1), fmt="JPEG")}, 2, "entry 'b.jpg' is not a .png file"),
    ({"a.png": png_bytes(rgb(0)), "b.png": png_bytes(rgb(1), fmt="JPEG")}, 2, "entry 'b.png' is a JPEG image, not a PNG"),
    ({"a.png": png_bytes(rgb(0)), "small.png": png_bytes(rgb(1, 32))}, 2, "entry 'small.png' is 32x32, expected 64x64"),
    ({"a.png": png_bytes(np.zeros((64, 64, 4), np.uint8), mode="RGBA")}, 1, "entry 'a.png' has mode RGBA, expected RGB"),
    ({"g.png": png_bytes(np.zeros((64, 64), np.uint8), mode="L")}, 1, "entry 'g.png' has mode L, expected RGB"),
    ({"a.png": b"garbage"}, 1, "entry 'a.png' cannot be decoded"),
])
def test_read_images_zip_rejects_with_a_clear_message(tmp_path, entries, expect_n, message):
    path = write_zip(tmp_path / "bad.zip", entries)
    with pytest.raises(SubmissionError, match=message):
        read_images_zip(path, expect_n=expect_n)


def test_read_images_zip_rejects_missing_and_non_zip_files(tmp_path):
    with pytest.raises(SubmissionError, match="no such file"):
        read_images_zip(str(tmp_path / "missing.zip"))
    (tmp_path / "fake.zip").write_bytes(b"plain text")
    with pytest.raises(SubmissionError, match="not a zip file"):
        read_images_zip(str(tmp_path / "fake.zip"))


@pytest.fixture(scope="module")
def full_submission(tmp_path_factory) -> str:
    """A real-size submission: 10,000 PNG 64x64 RGB (16 distinct images repeated under distinct names)."""
    pngs = [png_bytes(rgb(i)) for i in range(16)]
    path = tmp_path_factory.mktemp("submission") / "images.zip"
    return write_zip(path, {f"{i:05d}.png": pngs[i % 16] for i in range(10000)})


def test_a_full_10000_image_submission_validates(full_submission, capsys):
    validate_submission(full_submission)
    assert mifid_cli(["--validate", full_submission]) == 0
    assert capsys.readouterr().out.strip() == "ok: 10000 PNG 64x64 RGB"


def test_cli_validate_reports_the_reason_and_exits_1(tmp_path):
    path = write_zip(tmp_path / "short.zip", {f"{i}.png": png_bytes(rgb(i)) for i in range(3)})
    done = subprocess.run([sys.executable, "-m", "src.mifid", "--validate", path], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "invalid:" in done.stdout and "3 files, expected exactly 10000 PNG images" in done.stdout


# ---- the scoring CLI with the real offline backbone ---------------------------------------------------------

def dev_pack_images(n: int) -> list[np.ndarray]:
    """The first n crops of the shared dev pack (HWC uint8), or skip without /work/shared."""
    pack = SHARED / "data" / "dogs_dev.tar.gz"
    if not pack.exists():
        pytest.skip(f"shared material not found: {pack}")
    out = []
    with tarfile.open(pack) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                out.append(np.asarray(Image.open(tar.extractfile(member)).convert("RGB")))
                if len(out) == n:
                    break
    return out


def test_cli_missing_weights_is_a_clear_error(tmp_path, capsys):
    gen_zip = write_zip(tmp_path / "gen.zip", {"0.png": png_bytes(rgb(0))})
    assert mifid_cli(["--gen", gen_zip, "--real", str(tmp_path), "--weights", str(tmp_path / "none.pth")]) == 1
    assert "MiFID weights not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mifid_cli(["--gen", gen_zip, "--real", str(tmp_path)])
    assert "give --weights FILE" in capsys.readouterr().err


def independent_fid(gen: np.ndarray, real: np.ndarray) -> float:
    """FID by another road than src.mifid's: tr sqrtm(S1 S2) of two sample covariances is the nuclear norm of
    A1 A2^T / sqrt((n1 - 1)(n2 - 1)) (A: the centred samples), an SVD of an n1 x n2 matrix instead of a D x D sqrtm."""
    centred_gen, centred_real = gen - gen.mean(0), real - real.mean(0)
    diff = gen.mean(0) - real.mean(0)
    trace_gen = (centred_gen ** 2).sum() / (len(gen) - 1)
    trace_real = (centred_real ** 2).sum() / (len(real) - 1)
    cross = centred_gen @ centred_real.T / np.sqrt((len(gen) - 1) * (len(real) - 1))
    return float(diff @ diff + trace_gen + trace_real - 2 * np.linalg.svd(cross, compute_uv=False).sum())


def test_independent_fid_is_the_closed_form():
    rng = np.random.default_rng(7)
    gen, real = rng.normal(size=(30, 12)), rng.normal(size=(40, 12)) * 2 + 1
    mu1, s1 = feature_stats(gen)
    mu2, s2 = feature_stats(real)
    assert independent_fid(gen, real) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-10)


def test_cli_on_full_size_photos_matches_an_independent_lanczos_reference(tmp_path, capsys, monkeypatch):
    """`python -m src.mifid --real DIR` on Kaggle-size photos agrees with a reference built here from Kaggle's own
    recipe (Image.open(path).resize((64, 64), Image.ANTIALIAS)), the network called directly and FID computed by
    another road; the torch-bilinear reference the project used before does not. --mem-ref and --eps are honoured.

    What is checked is the image path and the arithmetic, not the network: both sides run the same
    efficientnet-lite0 at a 64 px input (no upsampling to 224, 12x fewer operations) to keep the test fast.
    """
    weights, sample = SHARED / "weights" / "efficientnet-lite0.pth", SHARED / "data" / "full_res_sample.tar"
    if not (weights.exists() and sample.exists()):
        pytest.skip("shared material not found: efficientnet-lite0.pth and full_res_sample.tar")
    monkeypatch.setattr(efficientnet_module, "EFFNET_LITE0_INPUT_SIZE", 64)
    with tarfile.open(sample) as tar:
        tar.extractall(tmp_path / "full", filter="data")
    real_dir = tmp_path / "full" / "all-dogs"
    crops = dev_pack_images(148)
    gen, mem = crops[:100], crops[100:]  # --mem-ref: 48 crops the zip's images were not copied from
    gen_zip = write_zip(tmp_path / "gen.zip", {f"{i}.png": png_bytes(image) for i, image in enumerate(gen)})
    (tmp_path / "mem").mkdir()
    for i, image in enumerate(mem):
        Image.fromarray(image).save(tmp_path / "mem" / f"{i:03d}.png")
    argv = ["--gen", gen_zip, "--real", str(real_dir), "--mem-ref", str(tmp_path / "mem"), "--weights", str(weights),
            "--backbone", "efficientnet-lite0", "--device", "cpu", "--eps", "0.01", "--json"]
    assert mifid_cli(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["backbone"], result["n_gen"], result["n_real"], result["n_mem"]) == ("efficientnet-lite0", 100, 80, 48)
    assert result["eps"] == 0.01 and result["d"] > 0.01 and result["d_thr"] == 1.0
    assert result["mifid"] == pytest.approx(result["fid"] / (1.0 + 1e-14))

    model = EfficientNetLite0().eval()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    photos = [Image.open(path).convert("RGB") for path in sorted(real_dir.iterdir())]
    kaggle = torch.from_numpy(np.stack([np.asarray(photo.resize((64, 64), Image.LANCZOS)) for photo in photos]))
    bilinear = torch.cat([F.interpolate(torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float(),
                                        size=(64, 64), mode="bilinear", align_corners=False).round()
                          for photo in photos])
    with torch.no_grad():
        gen_feats, mem_feats, kaggle_feats, bilinear_feats = (
            model.features(images.float() / 255).double().numpy()
            for images in (torch.from_numpy(np.stack(gen)).permute(0, 3, 1, 2),
                           torch.from_numpy(np.stack(mem)).permute(0, 3, 1, 2), kaggle.permute(0, 3, 1, 2), bilinear))
    reference = independent_fid(gen_feats, kaggle_feats)
    assert abs(result["fid"] - reference) <= 1e-4 * reference, (result["fid"], reference)  # the issue asks 0.5 %
    assert abs(independent_fid(gen_feats, bilinear_feats) - reference) > 1e-3 * reference
    assert result["d"] == pytest.approx(kaggle_memorization_reference(gen_feats, mem_feats), abs=1e-6)
    # the same images through the extractor in other batches and by another reader: copies are at distance ~0
    extractor = load_feature_extractor("efficientnet-lite0", str(weights), "cpu")
    copies = extractor(read_images_zip(gen_zip, expect_n=100)[:4])
    assert memorization_distance(copies, extractor(load_image_folder(str(tmp_path / "mem")))) > 0.01
    assert memorization_distance(copies, torch.from_numpy(gen_feats[:6]).float()) < 1e-5

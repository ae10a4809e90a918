"""Scoring inside a run: training-time FID and the truncation search, with a stand-in backbone."""
import time

import torch

import json

import pytest

from src.config import ConfigError, make_config
from src.data import DogData
from src.generate import generate_images, write_images_zip
from src.scoring import make_training_fid, pick_truncation, real_features, report_mifid, reserve_for_scoring


class SpreadG(torch.nn.Module):
    """Image = z's first three entries as a flat colour: truncation directly narrows the colour spread."""
    z_dim, n_classes = 3, 2

    def forward(self, z, y):
        return torch.tanh(z[:, :3] / 2)[:, :, None, None].expand(-1, -1, 64, 64)


class MeanColourBackbone:
    """Features = the mean colour plus a little fixed noise (so covariances are full rank)."""
    name, dim, default_eps, weights_id, device = "stand-in", 3, 0.05, "none", "cpu"

    def __call__(self, images):
        feats = images.float().mean(dim=(2, 3)) / 255
        return feats + 1e-3 * torch.randn(len(images), 3, generator=torch.Generator().manual_seed(len(images)))


def real_feats_with_truncation(truncation):
    return MeanColourBackbone()(generate_images(SpreadG(), 2000, "cpu", truncation=truncation, seed=123))


def test_truncation_search_finds_the_truncation_of_the_real_set():
    cfg = make_config({"truncation_search": True, "fid_samples": 2000})
    picked = pick_truncation(cfg, SpreadG(), MeanColourBackbone(), real_feats_with_truncation(1.0), "cpu")
    assert picked == 1.0
    picked = pick_truncation(cfg, SpreadG(), MeanColourBackbone(), real_feats_with_truncation(0.0), "cpu")
    assert picked == 0.0


def test_without_search_the_configured_truncation_is_kept():
    cfg = make_config({"truncation": 1.5})
    assert pick_truncation(cfg, SpreadG(), MeanColourBackbone(), None, "cpu") == 1.5


def test_training_fid_is_off_by_default_and_low_for_the_same_distribution():
    assert make_training_fid(make_config(), MeanColourBackbone(), real_feats_with_truncation(0.0), "cpu") is None
    cfg = make_config({"fid_every": "5m", "fid_samples": 2000})
    fid_fn = make_training_fid(cfg, MeanColourBackbone(), real_feats_with_truncation(0.0), "cpu")
    same, narrower = fid_fn(SpreadG()), None
    cfg_narrow = make_config({"fid_every": "5m", "fid_samples": 2000, "truncation": 0.5})
    narrower = make_training_fid(cfg_narrow, MeanColourBackbone(), real_feats_with_truncation(0.0), "cpu")(SpreadG())
    assert same < 0.01 < narrower


def test_report_mifid_reads_the_zip_back_and_writes_json(tmp_path):
    cfg = make_config({"n_images": 300})
    images = generate_images(SpreadG(), 300, "cpu", seed=5)
    write_images_zip(images, str(tmp_path / "images.zip"))
    result = report_mifid(cfg, MeanColourBackbone(), str(tmp_path / "images.zip"), real_feats_with_truncation(0.0),
                          str(tmp_path))
    assert set(result) >= {"fid", "d", "d_thr", "mifid", "backbone"}
    assert json.loads((tmp_path / "mifid.json").read_text()) == result
    assert result["mifid"] == result["fid"] / (result["d_thr"] + 1e-14)  # the evaluator's fid_epsilon
    assert (result["reference"], result["n_reference"]) == ("photos", 2000)


class SleepyBackbone(MeanColourBackbone):
    """Takes 1 ms per image, so the reserve can be checked against a hand computation."""

    def __call__(self, images):
        time.sleep(0.001 * len(images))
        return super().__call__(images)


def test_reserve_counts_the_generated_images_only():
    plain = reserve_for_scoring(make_config({"n_images": 1000}), SleepyBackbone())
    # 1000 images x 1 ms (sleep only oversleeps); counting 20,000 real images too would give > 20 s
    assert 1.0 <= plain < 3.0
    searched = reserve_for_scoring(make_config({"n_images": 1000, "truncation_search": True, "fid_samples": 500}),
                                   SleepyBackbone())
    assert 3.0 <= searched < 9.0  # + 4 truncation candidates x 500 images


class FlatColourBackbone:
    """Features = mean colour of each image; counts calls (the cache must spare the second one)."""
    name, dim, default_eps, weights_id, device = "stand-in", 3, 0.05, "none", "cpu"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return images.float().mean(dim=(2, 3))


def test_real_features_use_the_chosen_reference_and_name_it(tmp_path, capsys):
    crops = torch.zeros(5, 3, 64, 64, dtype=torch.uint8)
    photos = torch.full((3, 3, 64, 64), 200, dtype=torch.uint8)
    data = DogData(images=crops, labels=torch.zeros(5, dtype=torch.int64), breeds=["a"], photos=photos)
    backbone = FlatColourBackbone()
    assert torch.equal(real_features(backbone, data, str(tmp_path), "photos"), torch.full((3, 3), 200.0))
    assert "MiFID reference: whole photos (3)" in capsys.readouterr().out
    assert torch.equal(real_features(backbone, data, str(tmp_path), "crops"), torch.zeros(5, 3))
    assert "MiFID reference: training crops (5)" in capsys.readouterr().out
    real_features(backbone, data, str(tmp_path), "photos")  # from the cache, kept apart from the crops' entry
    assert backbone.calls == 2 and len(list((tmp_path / "cache").glob("real_features_stand-in_photos_*.pt"))) == 1
    with pytest.raises(ValueError, match=r"needs the photos: load_dogs\(\.\.\., whole_photos=True\)"):
        real_features(backbone, DogData(images=crops, labels=data.labels, breeds=["a"]), str(tmp_path), "photos")


def test_every_logged_figure_names_its_reference(tmp_path, capsys):
    cfg = make_config({"truncation_search": True, "fid_samples": 500, "fid_every": "5m", "fid_reference": "crops",
                       "n_images": 300})
    real = real_feats_with_truncation(0.0)
    make_training_fid(cfg, MeanColourBackbone(), real, "cpu")
    pick_truncation(cfg, SpreadG(), MeanColourBackbone(), real, "cpu")
    write_images_zip(generate_images(SpreadG(), 300, "cpu", seed=5), str(tmp_path / "images.zip"))
    report_mifid(cfg, MeanColourBackbone(), str(tmp_path / "images.zip"), real, str(tmp_path))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[score]")]
    assert len(lines) == 7 and all("vs training crops" in line for line in lines), lines
    with pytest.raises(ConfigError, match="--fid-reference 'tiles': choose one of photos, crops"):
        make_config({"fid_reference": "tiles"})

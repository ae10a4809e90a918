"""The small-data levers in the loop (issue 18): each flag does what it claims, is logged, checkpointed and resumed."""
from __future__ import annotations

import json
import os

import pytest
import torch

import src.gan_step
import src.train
from src.budget import Deadline
from src.checkpoint import open_resume
from src.config import make_config
from src.generate import TRAINING_BREEDS, breed_counts
from src.main import write_submission
from src.mifid import read_images_zip
from src.models import DCGANDiscriminator
from src.train import train

FAST = dict(recipe="dcgan", g_ch=8, d_ch=8, batch_size=8, z_dim=16, status_every="0", ema_rampup=0.5)


def fast_cfg(**overrides):
    return make_config({**FAST, **overrides})


def read_records(out_dir):
    with open(os.path.join(out_dir, "stats.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r and "d_loss" in r]


def ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


@pytest.fixture
def confident_d(monkeypatch):
    """D's logits replaced by +5 (keeping the graph): every sign on real images is +1, so ADA's r is 1."""
    d_forward = DCGANDiscriminator.forward

    def confident(self, img, y=None):
        logit, cls = d_forward(self, img, y)
        return logit * 0 + 5.0, cls

    monkeypatch.setattr(DCGANDiscriminator, "forward", confident)


def test_ada_moves_p_by_its_rule_logs_it_and_keeps_it_on_resume(dogs, tmp_path, confident_d):
    out = str(tmp_path)
    # r = 1 > 0.6: every 4 D steps of 8 images p rises by 32 / (0.128 * 1000) = 0.25
    cfg = fast_cfg(ada_target=0.6, ada_kimg=0.128, diffaug="translation,cutout")
    train(cfg, dogs, Deadline(3600), out, "cpu", max_steps=6)
    assert [r["ada_p"] for r in read_records(out)] == pytest.approx([0, 0, 0, 0.25, 0.25, 0.25])
    saved = ckpt(out)["gan_step"]["ada"]
    assert saved["p"] == pytest.approx(0.25) and saved["steps"] == 2  # half an interval under way
    # resumed: p and the half interval go on (2 more steps complete it: 0.5), not a fresh p of 0
    cfg, resume = open_resume(fast_cfg(ada_target=0.6, ada_kimg=0.128, diffaug="translation,cutout", resume="auto"),
                              out)
    train(cfg, dogs, Deadline(3600), out, "cpu", resume=resume, max_steps=8)
    assert [r["ada_p"] for r in read_records(out)][6:] == pytest.approx([0.25, 0.5])
    assert ckpt(out)["gan_step"]["ada"]["p"] == pytest.approx(0.5)


def test_adas_p_is_what_diffaugment_applies(dogs, tmp_path, monkeypatch):
    seen = []
    augment = src.gan_step.diff_augment
    monkeypatch.setattr(src.gan_step, "diff_augment", lambda img, policy, p=1.0: seen.append(p) or augment(img, policy, p))
    train(fast_cfg(ada_target=0.6, diffaug="cutout"), dogs, Deadline(3600), str(tmp_path / "ada"), "cpu", max_steps=2)
    # every D and G input got ADA's p, a device tensor, 0 at the start
    assert len(seen) == 2 * 3 and all(isinstance(p, torch.Tensor) and float(p) == 0.0 for p in seen)
    seen.clear()
    train(fast_cfg(diffaug="cutout"), dogs, Deadline(3600), str(tmp_path / "plain"), "cpu", max_steps=2)
    assert seen == [1.0] * 6  # without ADA: DiffAugment on every image, as before
    assert "ada_p" not in read_records(str(tmp_path / "plain"))[0]


def test_lecam_adds_its_weighted_penalty_to_ds_loss_and_resumes_its_anchors(dogs, tmp_path, monkeypatch):
    # the anchors' warm-up (1,000 D steps) is longer than a test: a penalty of 2 from the first step shows the wiring
    monkeypatch.setattr(src.gan_step.LeCamAnchors, "penalty", lambda self, real, fake: torch.tensor(2.0))
    train(fast_cfg(), dogs, Deadline(3600), str(tmp_path / "plain"), "cpu", max_steps=1)
    train(fast_cfg(lecam_weight=0.3), dogs, Deadline(3600), str(tmp_path / "lecam"), "cpu", max_steps=1)
    d_plain, d_lecam = (read_records(str(tmp_path / name))[0]["d_loss"] for name in ("plain", "lecam"))
    assert d_lecam == pytest.approx(d_plain + 0.3 * 2.0, abs=1e-5)


def test_lecam_anchors_are_checkpointed_and_resumed(dogs, tmp_path):
    out = str(tmp_path)
    train(fast_cfg(lecam_weight=0.3), dogs, Deadline(3600), out, "cpu", max_steps=3)
    first = ckpt(out)["gan_step"]["lecam"]
    assert first["steps"] == 3 and all(abs(first[k]) < 100 for k in ("real", "fake"))
    cfg, resume = open_resume(fast_cfg(lecam_weight=0.3, resume="auto"), out)
    train(cfg, dogs, Deadline(3600), out, "cpu", resume=resume, max_steps=5)
    assert ckpt(out)["gan_step"]["lecam"]["steps"] == 5  # counted on from the checkpoint's 3
    assert ckpt(out)["gan_step"]["ada"] is None


def test_labels_data_draws_gs_breeds_with_the_datas_frequencies(dogs, tmp_path, monkeypatch):
    drawn = []
    draw = TRAINING_BREEDS["data"]
    monkeypatch.setitem(TRAINING_BREEDS, "data", lambda n, counts: drawn.append(counts) or draw(n, counts))
    train(fast_cfg(labels="data"), dogs, Deadline(3600), str(tmp_path), "cpu", max_steps=2)
    # one draw per generated batch (a D phase's fakes serve the G phase too), from the data's images per breed
    assert len(drawn) == 2 and torch.equal(drawn[0], breed_counts(dogs.labels, len(dogs.breeds)))


class LabelColourG(torch.nn.Module):
    """A stand-in G_ema: the red channel encodes the breed (0 -> -1, 1 -> 0, 2 -> +1)."""
    z_dim, n_classes = 4, 3

    def forward(self, z, y):
        img = torch.zeros(len(z), 3, 64, 64)
        img[:, 0] = (y.float() - 1)[:, None, None]
        return img


def test_the_submission_follows_the_datas_breeds_with_labels_data(tmp_path):
    cfg = fast_cfg(labels="data", n_images=60)
    path = write_submission(LabelColourG(), cfg, str(tmp_path), torch.device("cpu"), 0.0, Deadline(3600),
                            submission_breeds=torch.tensor([10, 30, 20]))
    red = read_images_zip(path, expect_n=None)[:, 0, 0, 0].tolist()
    assert [red.count(v) for v in (0, 128, 255)] == [10, 30, 20]


def test_ema_kimg_sets_g_emas_decay_from_images(dogs, tmp_path, monkeypatch):
    betas = []
    update = src.train.ema_update
    monkeypatch.setattr(src.train, "ema_update", lambda G_ema, G, beta: betas.append(beta) or update(G_ema, G, beta))
    # no ramp: each round of 8 images decays by 0.5 ** (8 / 100)
    train(fast_cfg(ema_kimg=0.1, ema_rampup=0.0), dogs, Deadline(3600), str(tmp_path / "a"), "cpu", max_steps=3)
    assert betas == pytest.approx([0.5 ** (8 / 100)] * 3)
    betas.clear()
    # the ramp counts images: after k rounds the half-life is 0.5 * 8k images, so beta = 0.5 ** (1 / (0.5 k))
    train(fast_cfg(ema_kimg=0.1, ema_rampup=0.5), dogs, Deadline(3600), str(tmp_path / "b"), "cpu", max_steps=3)
    assert betas == pytest.approx([0.5 ** (1 / (0.5 * k)) for k in (1, 2, 3)])

"""The training loop on the tiny dataset: a few steps, resume, reproducibility, every recipe, training-time FID."""
from __future__ import annotations

import json
import os

import pytest
import torch

from src.budget import Deadline
from src.checkpoint import open_resume
from src.config import RECIPES, make_config
from src.models import DCGANDiscriminator, build_models
from src.precision import choose_precision
from src.train import seed_all, train

TINY = dict(g_ch=8, d_ch=8, batch_size=8, z_dim=16, shared_dim=16, status_every="0", ema_rampup=0.5)


def tiny_cfg(**overrides):
    return make_config({**TINY, **overrides})


def fast_cfg(**overrides):
    # the loop's logic does not depend on the architecture: the DCGAN pair is the quickest on a CPU
    return tiny_cfg(**{"recipe": "dcgan", **overrides})


def read_records(out_dir):
    with open(os.path.join(out_dir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def initial_models(cfg, n_classes):
    # train() seeds everything from cfg.seed and then builds the models: the same call gives its starting point
    seed_all(cfg.seed)
    return build_models(cfg, n_classes)


def test_a_few_steps_train_log_and_save(dogs, tmp_path):
    cfg = tiny_cfg()
    out = str(tmp_path)
    result = train(cfg, dogs, Deadline(3600), out, "cpu", max_steps=3)
    assert result.stop_reason == "max_steps" and result.progress.step == 3
    assert result.progress.images_seen == 3 * 8
    G0, D0 = initial_models(cfg, len(dogs.breeds))
    for before, after in ((G0, result.G), (D0, result.D)):
        moved = [not torch.equal(p0, p1) for p0, p1 in zip(before.parameters(), after.parameters())]
        assert all(moved), "every parameter of G and D should have been updated"
    assert not result.G_ema.training
    assert all(torch.isfinite(p).all() for p in result.G_ema.parameters())
    records = read_records(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("g_loss", "d_loss", "d_real", "d_fake"))
        assert r["batch_size"] == 8 and r["lr_g"] > 0 and r["images_per_s"] > 0
    assert os.path.isfile(os.path.join(out, "samples", "latest.png"))
    assert os.path.isfile(os.path.join(out, "samples", "grid_000000.png"))
    assert os.path.isfile(os.path.join(out, "samples", "interpolation.png"))
    # the checkpoint loads with torch's safe loader (no pickled numpy objects)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["progress"]["step"] == 3 and ckpt["n_classes"] == len(dogs.breeds)
    assert torch.equal(ckpt["grid_z"], result.grid_z)
    assert ckpt["config"]["g_ch"] == 8


def test_resume_continues_step_optimizer_and_grid(dogs, tmp_path, capsys):
    out = str(tmp_path)
    first = train(fast_cfg(), dogs, Deadline(3600), out, "cpu", max_steps=2)
    capsys.readouterr()
    # a model-shape flag that disagrees with the checkpoint is reported and the checkpoint's value wins
    cfg, saved = open_resume(fast_cfg(resume="auto", g_ch=16), out)
    log = capsys.readouterr().out
    assert "WARNING: model settings differ" in log and "g_ch=16 (checkpoint 8)" in log
    assert cfg.g_ch == 8
    resumed = train(cfg, dogs, Deadline(3600), out, "cpu", resume=saved, max_steps=4)
    # the models open_resume built to check the checkpoint are the ones trained: built once
    assert (resumed.G, resumed.D, resumed.G_ema) == saved["models"]
    assert resumed.progress.step == 4 and resumed.progress.images_seen == 4 * 8
    assert torch.equal(resumed.grid_z, first.grid_z)
    assert [r["step"] for r in read_records(out)] == [1, 2, 3, 4]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    # Adam's per-parameter step counter went on from 2: the optimiser state was restored, not rebuilt
    adam_steps = {float(s["step"]) for s in ckpt["opt_g"]["state"].values()}
    assert adam_steps == {4.0}


def test_same_seed_same_parameters(dogs, tmp_path):
    cfg = fast_cfg(lr_schedule="cosine", diffaug="color,translation,cutout")
    a = train(cfg, dogs, Deadline(3600), str(tmp_path / "a"), "cpu", max_steps=2)
    b = train(cfg, dogs, Deadline(3600), str(tmp_path / "b"), "cpu", max_steps=2)
    for module_a, module_b in ((a.G, b.G), (a.D, b.D), (a.G_ema, b.G_ema)):
        for (name, ta), tb in zip(module_a.state_dict().items(), module_b.state_dict().values()):
            assert torch.equal(ta, tb), name


@pytest.mark.parametrize("overrides", [{"recipe": name} for name in RECIPES] + [
    {"recipe": "dcgan", "loss": "ls", "real_label_min": 0.9, "fake_label_max": 0.1},
    {"recipe": "cgan", "loss": "wgan-gp", "g_steps": 2},
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_recipe_trains(dogs, tmp_path, overrides):
    cfg = tiny_cfg(**overrides)
    result = train(cfg, dogs, Deadline(3600), str(tmp_path), "cpu", max_steps=1)
    assert result.stop_reason == "max_steps"
    G0, _ = initial_models(cfg, len(dogs.breeds))
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(G0.parameters(), result.G.parameters()))
    for r in read_records(str(tmp_path)):
        assert all(map(lambda k: abs(r[k]) < 1e6, ("g_loss", "d_loss", "d_real", "d_fake")))


@pytest.mark.parametrize("overrides", [{}, {"n_dis": 2, "loss": "wgan-gp"}], ids=["reused-fakes", "n_dis2-gp"])
def test_draw_res_32_trains_d_on_the_drawings_and_still_outputs_64(dogs, tmp_path, monkeypatch, overrides):
    """G hands D its 32x32 drawings and the reals are averaged down to match: D never sees a 64x64 image in
    training (every D forward, the gradient penalty's included), while G_ema's images stay 64x64."""
    seen = []
    d_forward = DCGANDiscriminator.forward
    monkeypatch.setattr(DCGANDiscriminator, "forward",
                        lambda self, img, y=None: seen.append(tuple(img.shape[1:])) or d_forward(self, img, y))
    cfg = tiny_cfg(recipe="cgan", draw_res=32, diffaug="translation,cutout", **overrides)
    result = train(cfg, dogs, Deadline(3600), str(tmp_path), "cpu", max_steps=2)
    # per round: a real and a fake forward per D step (+ the penalty's), one fake forward for G
    assert len(seen) >= 2 * (2 * cfg.n_dis + 1) and set(seen) == {(3, 32, 32)}
    with torch.no_grad():
        assert result.G_ema(torch.randn(2, cfg.z_dim), torch.tensor([0, 1])).shape == (2, 3, 64, 64)


def test_adaptive_d_steps_rise_while_d_loss_is_high(dogs, tmp_path):
    # a limit no loss can stay under: one more D step after every tick, up to n_dis_max
    cfg = fast_cfg(dis_loss_limit=1e-6, n_dis=1, n_dis_max=3)
    result = train(cfg, dogs, Deadline(3600), str(tmp_path), "cpu", max_steps=4)
    assert [r["n_dis"] for r in read_records(str(tmp_path))] == [2, 3, 3, 3]
    assert result.progress.images_seen == 8 * (1 + 2 + 3 + 3)


def test_training_fid_keeps_the_best_g_ema(dogs, tmp_path):
    scores, states = iter([5.0, 3.0, 4.0, 6.0, 7.0]), []

    def fid_fn(G_ema):
        states.append({k: v.clone() for k, v in G_ema.state_dict().items()})
        return next(scores)

    out = str(tmp_path)
    result = train(fast_cfg(fid_every="0.001"), dogs, Deadline(3600), out, "cpu", fid_fn=fid_fn, max_steps=4)
    assert result.fid.best == 3.0
    # three ticks measure, then the final G_ema is measured too (6.0) before the best is chosen
    assert [f for _, f in result.fid.history] == [5.0, 3.0, 4.0, 6.0]
    best = states[1]
    assert all(torch.equal(v, best[k]) for k, v in result.G_ema.state_dict().items())
    assert [r.get("fid") for r in read_records(out)] == [5.0, 3.0, 4.0, 6.0]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["fid"]["best"] == 3.0
    assert all(torch.equal(v, best[k]) for k, v in ckpt["fid"]["best_G_ema"].items())
    # the checkpoint's G_ema is the last one (to resume from), not the best
    assert any(not torch.equal(v, best[k]) for k, v in ckpt["G_ema"].items())


def test_the_final_g_ema_is_measured_and_wins_when_best(dogs, tmp_path):
    scores, states = iter([5.0, 3.0, 4.0, 1.0]), []

    def fid_fn(G_ema):
        states.append({k: v.clone() for k, v in G_ema.state_dict().items()})
        return next(scores)

    result = train(fast_cfg(fid_every="0.001"), dogs, Deadline(3600), str(tmp_path), "cpu", fid_fn=fid_fn, max_steps=4)
    assert result.fid.best == 1.0 and len(states) == 4
    assert all(torch.equal(v, states[-1][k]) for k, v in result.G_ema.state_dict().items())


@pytest.mark.parametrize("amp, capability, expected", [
    ("auto", (8, 0), ("bf16", False)), ("auto", (7, 5), ("fp16", True)), ("auto", (6, 0), ("fp16", True)),
    ("bf16", (7, 5), ("fp16", True)), ("fp32", (9, 0), ("fp32", False)),
])
def test_precision_follows_the_gpu_generation(monkeypatch, amp, capability, expected):
    # no GPU here: the capability query is stubbed, the decision is what is tested
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    precision = choose_precision(amp, "cuda", channels_last=True)
    assert (precision.name, precision.use_scaler) == expected
    assert precision.channels_last and precision.device_type == "cuda"


def test_precision_on_cpu_is_fp32(capsys):
    assert choose_precision("auto", "cpu").name == "fp32"
    cpu_bf16 = choose_precision("bf16", "cpu")
    assert (cpu_bf16.name, cpu_bf16.use_scaler, cpu_bf16.channels_last) == ("fp32", False, False)
    assert "training in fp32 on cpu" in capsys.readouterr().out


def test_max_kimg_stops_at_a_number_of_images_counted_over_sessions(dogs, tmp_path):
    out = str(tmp_path)
    # 8 images a round: 24 images are 3 rounds
    first = train(fast_cfg(max_kimg=0.024), dogs, Deadline(3600), out, "cpu")
    assert first.stop_reason == "max_kimg" and first.progress.images_seen == 24 and first.progress.step == 3
    # resumed with a larger limit, the first session's 24 images count: 40 images are 2 more rounds, not 5
    cfg, saved = open_resume(fast_cfg(resume="auto", max_kimg=0.04), out)
    second = train(cfg, dogs, Deadline(3600), out, "cpu", resume=saved)
    assert second.stop_reason == "max_kimg" and second.progress.images_seen == 40 and second.progress.step == 5
    # a limit already reached trains no round
    cfg, saved = open_resume(fast_cfg(resume="auto", max_kimg=0.04), out)
    third = train(cfg, dogs, Deadline(3600), out, "cpu", resume=saved)
    assert third.stop_reason == "max_kimg" and third.progress.step == 5


def test_max_kimg_anneals_the_lr_by_images_not_by_the_clock(dogs, tmp_path):
    # An hour's budget: by the clock the lr would not have moved. By images, the round before step k's record ran
    # at progress (k - 1) * 8 / 80, and linear gives lr * (1 - 0.9 p).
    cfg = fast_cfg(max_kimg=0.08, lr_schedule="linear", lr_min_ratio=0.1)
    result = train(cfg, dogs, Deadline(3600), str(tmp_path), "cpu")
    assert result.stop_reason == "max_kimg" and result.progress.step == 10
    records = [r for r in read_records(str(tmp_path)) if "lr_g" in r]
    assert [r["step"] for r in records] == list(range(1, 11))
    for r in records:
        assert r["lr_g"] == pytest.approx(cfg.lr_g * (1 - 0.9 * (r["step"] - 1) / 10))
    assert result.progress.schedule_progress == pytest.approx(0.9)

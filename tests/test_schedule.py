"""lr schedules on the training clock, schedule progress across resumes, EMA warm-up and update."""
from __future__ import annotations

import math

import pytest
import torch

from src.config import make_config
from src.ema import ema_beta_at, ema_beta_for_images, ema_update
from src.schedule import image_progress, lr_factor, schedule_progress
from src.train import LoopState, current_lrs


def test_const_cosine_linear_against_hand_values():
    m = 0.1
    assert lr_factor("const", 0.7, m) == 1.0
    # cosine: m + (1 - m) (1 + cos(pi p)) / 2
    assert lr_factor("cosine", 0.0, m) == pytest.approx(1.0)
    assert lr_factor("cosine", 0.5, m) == pytest.approx(0.55)
    assert lr_factor("cosine", 0.25, m) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2)
    assert lr_factor("cosine", 1.0, m) == pytest.approx(0.1)
    # linear: 1 - (1 - m) p
    assert lr_factor("linear", 0.5, m) == pytest.approx(0.55)
    assert lr_factor("linear", 1.0, m) == pytest.approx(0.1)
    # progress outside [0, 1] is clamped: after the deadline the lr stays at its end value
    assert lr_factor("linear", 1.7, m) == pytest.approx(0.1)


def test_restarts_fill_the_window_with_doubling_cycles():
    # 3 cycles of lengths T, 2T, 4T with T = 1/7: restarts at 1/7 and 3/7, the last ends at p = 1
    m = 0.2
    assert lr_factor("restarts", 0.0, m, cycles=3) == pytest.approx(1.0)
    assert lr_factor("restarts", 1 / 7 - 1e-9, m, cycles=3) == pytest.approx(m, abs=1e-6)
    assert lr_factor("restarts", 1 / 7, m, cycles=3) == pytest.approx(1.0)
    assert lr_factor("restarts", 2 / 7, m, cycles=3) == pytest.approx(m + (1 - m) * 0.5)  # middle of cycle 2
    assert lr_factor("restarts", 3 / 7, m, cycles=3) == pytest.approx(1.0)
    assert lr_factor("restarts", 5 / 7, m, cycles=3) == pytest.approx(m + (1 - m) * 0.5)  # middle of cycle 3
    assert lr_factor("restarts", 1.0, m, cycles=3) == pytest.approx(m)
    # one cycle is plain cosine
    assert lr_factor("restarts", 0.3, m, cycles=1) == pytest.approx(lr_factor("cosine", 0.3, m))


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_factor("step", 0.5)


def test_resumed_progress_stretches_the_rest_over_the_new_window():
    assert schedule_progress(0.0, 0.3) == pytest.approx(0.3)
    assert schedule_progress(0.5, 0.5) == pytest.approx(0.75)
    assert schedule_progress(0.5, 1.0) == pytest.approx(1.0)


def test_current_lrs_combines_batch_scaling_rollback_scale_and_schedule():
    cfg = make_config(dict(lr_g=1e-4, lr_d=4e-4, lr_ref_batch=32, lr_schedule="linear", lr_min_ratio=0.1))
    state = LoopState(batch_size=64, lr_scale=0.5, schedule_progress=0.5)
    lr_g, lr_d = current_lrs(cfg, state)
    # base * (64 / 32) * 0.5 * (1 - 0.9 * 0.5)
    assert lr_g == pytest.approx(1e-4 * 2 * 0.5 * 0.55)
    assert lr_d == pytest.approx(4e-4 * 2 * 0.5 * 0.55)
    # the schedule moves in 1/1000 steps of the window
    state = LoopState(batch_size=64, schedule_progress=0.5004)
    no_ref = make_config(dict(lr_g=1e-4, lr_schedule="linear", lr_min_ratio=0.1))
    assert current_lrs(no_ref, state)[0] == pytest.approx(1e-4 * 0.55)


def test_ema_beta_rampup_formula():
    beta, rampup = 0.999, 0.05
    assert ema_beta_at(0, beta, rampup) == 0.0       # horizon 1: G_ema copies G
    assert ema_beta_at(20, beta, rampup) == 0.0      # 0.05 * 20 = 1 step
    # horizon h = rampup * step, beta_t = 1 - 1/h: 284 steps (the demo) average over ~14
    assert ema_beta_at(284, beta, rampup) == pytest.approx(1 - 1 / 14.2)
    assert ema_beta_at(20000, beta, rampup) == pytest.approx(beta)   # h = 1000 = 1 / (1 - beta)
    assert ema_beta_at(10 ** 6, beta, rampup) == pytest.approx(beta)
    assert ema_beta_at(10, beta, 0) == beta
    values = [ema_beta_at(s, beta, rampup) for s in range(0, 30001, 500)]
    assert values == sorted(values)


def test_ema_update_lerps_parameters_and_copies_buffers():
    torch.manual_seed(0)
    G = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    G_ema = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    G(torch.randn(4, 3))  # moves G's running stats away from G_ema's
    old_weight = G_ema[0].weight.detach().clone()
    ema_update(G_ema, G, 0.9)
    assert torch.allclose(G_ema[0].weight, 0.9 * old_weight + 0.1 * G[0].weight)
    assert torch.equal(G_ema[1].running_mean, G[1].running_mean)
    assert torch.equal(G_ema[1].num_batches_tracked, G[1].num_batches_tracked)
    ema_update(G_ema, G, 0.0)
    assert torch.equal(G_ema[0].weight, G[0].weight)


def test_image_progress_is_the_fraction_of_the_runs_images():
    assert image_progress(0, 4000.0) == 0.0
    assert image_progress(1000, 4000.0) == 0.25
    # the round that crosses the limit ends the schedule exactly
    assert image_progress(4016, 4000.0) == 1.0


def test_ema_half_life_in_images_by_hand():
    # no ramp: 0.5 ** (32 / 10,000)
    assert ema_beta_for_images(32, 10.0, 10**6, 0.0) == pytest.approx(0.5 ** (32 / 10_000))
    # ramp-up: after 40,000 images the half-life is 5 % of them, 2,000 images, under the 10 kimg ceiling
    assert ema_beta_for_images(32, 10.0, 40_000, 0.05) == pytest.approx(0.5 ** (32 / 2_000))
    # and the ceiling once images_seen * rampup passes it
    assert ema_beta_for_images(32, 10.0, 10**6, 0.05) == pytest.approx(0.5 ** (32 / 10_000))
    # no images yet: G_ema copies G
    assert ema_beta_for_images(32, 10.0, 0, 0.05) == 0.0


@pytest.mark.parametrize("images_seen", [5_000, 10**6])
def test_halving_the_batch_keeps_the_half_life_in_images(images_seen):
    full = ema_beta_for_images(64, 10.0, images_seen, 0.05)
    half = ema_beta_for_images(32, 10.0, images_seen, 0.05)
    # two steps of 32 images weigh the old average exactly as one step of 64
    assert half ** 2 == pytest.approx(full, rel=1e-12)
    # and the weight of an update n images back halves every ema_nimg images, whatever the batch
    ema_nimg = min(10_000, images_seen * 0.05)
    assert full ** (ema_nimg / 64) == pytest.approx(0.5) and half ** (ema_nimg / 32) == pytest.approx(0.5)

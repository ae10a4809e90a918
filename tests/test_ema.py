"""G_ema samples with batch-norm statistics of its own averaged weights (BigGAN's standing statistics)."""
from __future__ import annotations

import copy

import pytest
import torch

from src.budget import Deadline
from src.config import make_config
from src.ema import ema_update, standing_bn_stats_
from src.generate import balanced_labels, sample_z
from src.models import build_models
from src.train import train


def eval_vs_batch_stats_gap(G_ema: torch.nn.Module, n: int = 256) -> float:
    """Mean |pixel| gap between G_ema in eval mode (what grids, FID and the zip see) and the same G_ema normalising
    by the statistics of a large batch of its own activations (train mode, on a copy)."""
    generator = torch.Generator().manual_seed(123)
    z, y = sample_z(n, G_ema.z_dim, "cpu", generator=generator), balanced_labels(n, G_ema.n_classes, "cpu", generator)
    with torch.no_grad():
        eval_img = G_ema.eval()(z, y)
        batch_img = copy.deepcopy(G_ema).train()(z, y)
    return (eval_img - batch_img).abs().mean().item()


@pytest.fixture(scope="module")
def lagging_ema_run(dogs, tmp_path_factory):
    """The default ResNet G (conditional BN) trained 10 rounds with a G_ema lagging ~100 rounds behind."""
    cfg = make_config(dict(g_ch=8, d_ch=8, batch_size=16, z_dim=16, shared_dim=16, status_every="0", ema_beta=0.99,
                           ema_rampup=0, lr_g=1e-3, lr_d=1e-3))
    return train(cfg, dogs, Deadline(3600), str(tmp_path_factory.mktemp("ema")), "cpu", max_steps=10)


def test_g_ema_is_sampled_with_its_own_statistics(lagging_ema_run):
    G_ema = lagging_ema_run.G_ema
    own_gap = eval_vs_batch_stats_gap(G_ema)
    # what G_ema carried before the fix: G's running statistics, copied by every EMA step
    with_g_stats = copy.deepcopy(G_ema)
    ema_update(with_g_stats, lagging_ema_run.G, 1.0)  # beta 1: weights stay, buffers are copied from G
    copied_gap = eval_vs_batch_stats_gap(with_g_stats)
    assert own_gap < 0.05, own_gap
    assert copied_gap > 3 * own_gap, (copied_gap, own_gap)


def test_standing_stats_are_deterministic_and_leave_the_training_rng_alone():
    cfg = make_config(dict(g_ch=8, z_dim=16, shared_dim=16))
    G, _ = build_models(cfg, 4)
    G_copy = copy.deepcopy(G)
    torch.manual_seed(7)
    standing_bn_stats_(G, seed=3)
    after = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(1), after)  # the global generator was not used
    standing_bn_stats_(G_copy, seed=3)
    assert not G.training and not G_copy.training
    for (name, a), (_, b) in zip(G.named_buffers(), G_copy.named_buffers()):
        assert torch.equal(a, b), name
    momenta = {m.momentum for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}  # the modules' own momentum is back after the cumulative average

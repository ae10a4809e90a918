"""torch.compile'd G and D train: SN's buffers are not changed between a forward and its backward.

Inductor (torch.compile's default) saved SN's u/v buffers for backward and the second D forward of a step (real,
then fake) changed them: "modified by an inplace operation". The default ResNet at the smallest width (its first 1x1 shortcut conv has the 3-long v that failed).
"""
import math

import torch

from src.config import make_config
from src.distributed import current_dist_info
from src.models import ResNetDiscriminator
from src.precision import choose_precision
from src.gan_step import GanStep
from src.generate import breed_counts
from src.train import DeviceSampler, build_gan_nets, gan_round


def test_compiled_rounds_run_and_train(dogs, monkeypatch):
    torch._dynamo.reset()
    # the failure was in D; compiling only D halves the test's (CPU) compile time
    compile_module = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: compile_module(m) if isinstance(m, ResNetDiscriminator) else m)
    cfg = make_config({"g_ch": 4, "d_ch": 4, "z_dim": 20, "shared_dim": 8, "batch_size": 8, "compile": True})
    device = torch.device("cpu")
    precision = choose_precision("fp32", device)
    nets = build_gan_nets(cfg, len(dogs.breeds), device, precision, current_dist_info(device))
    sampler = DeviceSampler(dogs.images, dogs.labels)
    D_before = [p.detach().clone() for p in nets.D.parameters()]
    sums = gan_round(GanStep(cfg, nets, breed_counts(dogs.labels, len(dogs.breeds))), sampler, 8, cfg.n_dis, cfg.g_steps)
    assert all(math.isfinite(v) for v in sums.tolist())
    assert any(not torch.equal(a, b) for a, b in zip(D_before, nets.D.parameters()))

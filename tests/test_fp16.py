"""The fp16 + GradScaler path (Kaggle's P100/T4) runs for real on the CPU: CPU autocast supports float16."""
import math

import pytest
import torch

from src.config import make_config
from src.data import load_dogs
from src.distributed import current_dist_info
from src.precision import Precision
from src.gan_step import GanStep
from src.generate import breed_counts
from src.train import DeviceSampler, build_gan_nets, gan_round


@pytest.mark.parametrize("loss", ["hinge", "rals", "wgan-gp"])
def test_fp16_rounds_with_grad_scalers_stay_finite_and_train(tiny_data_dir, loss):
    torch.manual_seed(0)
    data = load_dogs(tiny_data_dir, workers=1)
    recipe = "acgan" if loss == "rals" else "biggan"  # rals + the auxiliary classifier, as the acgan recipe
    cfg = make_config({"recipe": recipe, "g_ch": 8, "d_ch": 8, "batch_size": 8, "loss": loss})
    fp16 = Precision(device_type="cpu", dtype=torch.float16, use_scaler=True, channels_last=False)
    device = torch.device("cpu")
    nets = build_gan_nets(cfg, len(data.breeds), device, fp16, current_dist_info(device))
    assert nets.scaler_g.is_enabled() and nets.scaler_d.is_enabled()
    sampler = DeviceSampler(data.images, data.labels)
    G_before = [p.detach().clone() for p in nets.G.parameters()]
    D_before = [p.detach().clone() for p in nets.D.parameters()]
    step = GanStep(cfg, nets, breed_counts(data.labels, len(data.breeds)))
    for _ in range(6):
        sums = gan_round(step, sampler, 8, 1, cfg.g_steps)
        assert all(math.isfinite(v) for v in sums.tolist())
    # overflowing steps are skipped and the scale backs off; the others update the weights, which stay fp32 and finite
    assert nets.scaler_d.get_scale() <= 65536.0
    for before, params in ((G_before, nets.G.parameters()), (D_before, nets.D.parameters())):
        params = list(params)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
        assert any(not torch.equal(a, b) for a, b in zip(before, params))

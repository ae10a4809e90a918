"""The same-parameters check of a refactor: sha256 (first 12 hex digits) of G, D and G_ema after 6 fixed-seed rounds on
the tiny data set, for configs that cover every path of the GAN step (reused fakes, noisy targets, the gradient
penalty, adaptive D steps, n_dis/g_steps 2 with the auxiliary loss, the 32x32 drawing). Run it before and after a
change that must not change the maths and compare the lines:

    python scripts/same_params.py > before.txt; (change); python scripts/same_params.py | diff before.txt -
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.budget import Deadline  # noqa: E402
from src.config import make_config  # noqa: E402
from src.data import load_dogs  # noqa: E402
from src.synthetic import make_tiny_dataset  # noqa: E402
from src.train import train  # noqa: E402

ROUNDS = 6
# The lr follows the training clock in 1/1000 steps of the window: a window this long keeps it at its start however
# slowly the rounds run (a busy machine must not change the figures).
WINDOW_S = 1e7
TINY = dict(g_ch=8, d_ch=8, batch_size=8, z_dim=16, shared_dim=16, status_every="0")
CONFIGS = {
    "biggan": dict(),
    "dcgan_noisy": dict(recipe="dcgan", shared_dim=0, real_label_min=0.9, fake_label_max=0.1,
                        diffaug="translation,cutout"),
    "wgan_gp": dict(recipe="dcgan", shared_dim=0, loss="wgan-gp"),
    "sngan_adaptive": dict(recipe="sngan", shared_dim=0, dis_loss_limit=0.01),
    "acgan_2_2": dict(recipe="acgan", shared_dim=0, n_dis=2, g_steps=2),
    "cgan_draw32": dict(recipe="cgan", shared_dim=0, draw_res=32, mbstd=True, loss="hinge"),
}


def state_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def main() -> None:
    torch.set_num_threads(1)  # bit-reproducible on any core count
    root = tempfile.mkdtemp()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the runs' logs would bury the lines
        data = load_dogs(make_tiny_dataset(os.path.join(root, "data")), workers=1)
    for name, overrides in CONFIGS.items():
        cfg = make_config({**TINY, **overrides})
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            result = train(cfg, data, Deadline(WINDOW_S), tempfile.mkdtemp(dir=root), "cpu", max_steps=ROUNDS)
        print(name, state_digest(result.G), state_digest(result.D), state_digest(result.G_ema), flush=True)


if __name__ == "__main__":
    main()

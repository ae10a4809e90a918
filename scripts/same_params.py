"""Fixed-seed hashes of G, D and G_ema after 6 rounds for several configs (refactor check)."""
import hashlib, io, sys, os, tempfile
sys.path.insert(0, os.getcwd())
import torch
torch.set_num_threads(1)
from src.budget import Deadline
from src.config import make_config
from src.data import load_dogs
from src.synthetic import make_tiny_dataset
from src.train import train

TINY = dict(g_ch=8, d_ch=8, batch_size=8, z_dim=16, shared_dim=16, status_every="0")
CONFIGS = {
    "biggan": dict(),
    "dcgan_noisy": dict(recipe="dcgan", real_label_min=0.9, fake_label_max=0.1, diffaug="translation,cutout"),
    "wgan_gp": dict(recipe="dcgan", loss="wgan-gp"),
    "sngan_adaptive": dict(recipe="sngan", dis_loss_limit=0.01),
    "acgan_2_2": dict(recipe="acgan", n_dis=2, g_steps=2),
    "cgan_draw32": dict(recipe="cgan", draw_res=32, mbstd=True, loss="hinge"),
}

def digest(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]

root = tempfile.mkdtemp()
data = load_dogs(make_tiny_dataset(os.path.join(root, "d")), workers=1)
for name, over in CONFIGS.items():
    cfg = make_config({**TINY, **({"shared_dim": 0} if over.get("recipe") else {}), **over})
    out = tempfile.mkdtemp()
    r = train(cfg, data, Deadline(3600), out, "cpu", max_steps=6)
    print(name, digest(r.G), digest(r.D), digest(r.G_ema), flush=True)

"""Fixed-step learning benchmark: train N rounds on a data set, print the FID of G_ema (efficientnet-lite0).

Comparing a change to the training code before/after on the CPU: the same seed, data, width and rounds give the
same starting point, so the FID difference is the change's (run-to-run spread: rerun with --seed).

    python scripts/learning_bench.py --weights ../shared/weights/efficientnet-lite0.pth \\
        --data ../shared/data/dogs_dev.tar.gz --max-images 2000 --rounds 300 -- --g-ch 16 --d-ch 16 --batch-size 32
    python scripts/learning_bench.py --weights W --data demo --rounds 150 -- --demo   # the demo's data and settings

--data: a Kaggle-layout folder, a .tar.gz pack (unpacked once into --cache), or `demo` (the demo's tiny data set).
Flags after `--` are kernel flags (Config fields). FID: --n-fid images of G_ema against the training crops.
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from src.budget import Deadline  # noqa: E402
from src.config import parse_config  # noqa: E402
from src.data import load_dogs  # noqa: E402
from src.ema import ema_update  # noqa: E402
from src.generate import generate_images  # noqa: E402
from src.mifid import cached_real_features, feature_stats, frechet_distance, load_feature_extractor  # noqa: E402
from src.synthetic import make_tiny_dataset  # noqa: E402
from src.train import train  # noqa: E402


def data_folder(data: str, cache: str) -> str:
    """A Kaggle-layout folder for --data (a pack is unpacked once under cache)."""
    if data == "demo":
        return make_tiny_dataset(os.path.join(cache, "demo_data"))
    if data.endswith((".tar.gz", ".tgz", ".tar")):
        target = os.path.join(cache, os.path.basename(data).split(".")[0])
        if not os.path.isdir(target):
            with tarfile.open(data) as archive:
                archive.extractall(target + ".partial", filter="data")
            os.replace(target + ".partial", target)
        return target
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="efficientnet-lite0.pth")
    parser.add_argument("--data", required=True, help="Kaggle-layout folder, .tar.gz pack, or 'demo'")
    parser.add_argument("--rounds", type=int, default=300, help="training rounds (n_dis D steps + G steps each)")
    parser.add_argument("--max-images", type=int, default=0, help="read only N photos (0: all)")
    parser.add_argument("--n-fid", type=int, default=1000, help="generated images for the FID")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "dogkernel_bench"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--also-g-stats", action="store_true",
                        help="also the FID of G_ema sampled with G's batch-norm statistics (before standing stats)")
    args, kernel_flags = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, _ = parse_config([f for f in kernel_flags if f != "--"] + ["--device", "cpu", "--status-every", "30s",
                                                                   "--grid-every", "0", "--ckpt-every", "0"])
    os.makedirs(args.cache, exist_ok=True)
    data = load_dogs(data_folder(args.data, args.cache), max_images=args.max_images, workers=1)
    extractor = load_feature_extractor("efficientnet-lite0", args.weights, "cpu")
    real_stats = feature_stats(cached_real_features(extractor, data.images, os.path.join(args.cache, "features")))
    out_dir = tempfile.mkdtemp(prefix="learning_bench_")
    start = time.time()
    result = train(cfg, data, Deadline(10 ** 7), out_dir, "cpu", max_steps=args.rounds)
    train_s = time.time() - start
    def fid_of(G_ema) -> float:
        gen_img = generate_images(G_ema, args.n_fid, "cpu", seed=cfg.seed + 1)
        return frechet_distance(*feature_stats(extractor(gen_img)), *real_stats)

    fid = fid_of(result.G_ema)
    if args.also_g_stats and result.fid.best_G_ema is None:
        # what G_ema carried before standing statistics: every buffer copied from G by the EMA step
        ema_update(result.G_ema, result.G, 1.0)
        print(f"RESULT with G's batch-norm statistics (the code before standing stats): FID {fid_of(result.G_ema):.1f}")
    print(f"RESULT rounds {result.progress.step}  kimg {result.progress.images_seen / 1000:.1f}  "
          f"train {train_s:.1f}s ({result.progress.step / train_s:.2f} rounds/s)  FID {fid:.1f}  "
          f"({args.n_fid} G_ema images vs {len(data.images)} training crops); grid {out_dir}/samples/latest.png",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

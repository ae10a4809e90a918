"""The demo as a learning check: run `kernel.py --demo` as a new user would, then print the FID of its images.

    python scripts/demo_fid.py --weights ../shared/weights/efficientnet-lite0.pth [--out demo_fid_out] [-- FLAGS]

FID (efficientnet-lite0 features) of the first 1,000 images of the demo's images.zip against the crops of the demo's
own data set, and for scale the same FID of 1,000 crops of fresh synthetic photos (another seed of the same
generator: what a perfect G would score) and of those photos blurred (Gaussian radius 1.5 and 3: soft images).
Flags after `--` go to kernel.py (e.g. `-- --time-budget 90s`). Not a test: it prints figures for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from src.data import load_dogs  # noqa: E402
from src.mifid import feature_stats, frechet_distance, load_feature_extractor, read_images_zip  # noqa: E402
from src.synthetic import make_tiny_dataset  # noqa: E402

N_GENERATED = 1000
FRESH_SEED = 12345


def blurred(images: torch.Tensor, radius: float) -> torch.Tensor:
    """uint8 N x 3 x H x W images through PIL's Gaussian blur."""
    soft = [np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(radius)))
            for img in images]
    return torch.from_numpy(np.stack(soft)).permute(0, 3, 1, 2).contiguous()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="efficientnet-lite0.pth")
    parser.add_argument("--out", default="", help="the demo's output folder (default: a temporary one)")
    parser.add_argument("--skip-run", action="store_true", help="score an existing OUT instead of running the demo")
    parser.add_argument("--no-scale", action="store_true", help="skip the fresh/blurred reference figures (slow)")
    args, kernel_flags = parser.parse_known_args()
    kernel_flags = [f for f in kernel_flags if f != "--"]
    out = args.out or tempfile.mkdtemp(prefix="demo_fid_")
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    if not args.skip_run:
        start = time.time()
        subprocess.run([sys.executable, os.path.join(repo, "kernel.py"), "--demo", "--out", out, *kernel_flags],
                       check=True)
        print(f"demo run: {time.time() - start:.1f}s wall (python start-up included)")
    extractor = load_feature_extractor("efficientnet-lite0", args.weights, "cpu")
    demo_data = load_dogs(os.path.join(out, "demo_data"), workers=1)
    real_stats = feature_stats(extractor(demo_data.images))
    gen_img = read_images_zip(os.path.join(out, "images.zip"), expect_n=None)[:N_GENERATED]

    def fid(images: torch.Tensor) -> float:
        return frechet_distance(*feature_stats(extractor(images)), *real_stats)

    print(f"reference: {len(demo_data.images)} crops of the demo's {demo_data.counts['photos']} photos")
    print(f"FID demo images ({len(gen_img)})        {fid(gen_img):8.1f}")
    if not args.no_scale:
        fresh = load_dogs(make_tiny_dataset(tempfile.mkdtemp(prefix="fresh_dogs_"), n_images=900, seed=FRESH_SEED),
                          workers=1).images[:N_GENERATED]
        print(f"FID fresh synthetic crops ({len(fresh)}) {fid(fresh):8.1f}")
        print(f"FID fresh, blur radius 1.5        {fid(blurred(fresh, 1.5)):8.1f}")
        print(f"FID fresh, blur radius 3          {fid(blurred(fresh, 3.0)):8.1f}")
    print(f"grid: {os.path.join(out, 'samples', 'latest.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

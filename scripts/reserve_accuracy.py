"""How well the start-up measurement predicts the output stage: measured seconds for n images (as plan_reserve
measures them) against the real generation + zip of n images from the same untrained G, repeated.

    python scripts/reserve_accuracy.py --n-images 10000 --repeats 3 -- --demo
    python scripts/reserve_accuracy.py --n-images 2000 -- --recipe biggan --g-ch 32 --d-ch 32

Flags after `--` are the kernel's (they pick the model). Prints one line per repeat and the ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.config import parse_config  # noqa: E402
from src.generate import (ZIP_BYTES_PER_IMAGE_MAX, generate_images, measure_generation_seconds,  # noqa: E402
                          measure_zip_seconds, pick_generation_batch, write_images_zip)
from src.models import build_models  # noqa: E402
from src.preflight import measure_write_speed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=120)
    parser.add_argument("kernel_flags", nargs="*")
    args = parser.parse_args()
    cfg, _ = parse_config(args.kernel_flags)
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    G, _ = build_models(cfg, args.classes)
    G = G.to(device)
    print(f"recipe {cfg.recipe}, {args.n_images} images, device {device}, {torch.get_num_threads()} threads")
    ratios = []
    with tempfile.TemporaryDirectory() as out_dir:
        for repeat in range(args.repeats):
            start = time.time()
            timed = measure_generation_seconds(G, device)
            batch_size = pick_generation_batch(timed)
            gen_s, probe = timed[batch_size]
            zip_s = measure_zip_seconds(probe[:64])
            speed = measure_write_speed(out_dir)
            measured = args.n_images * (gen_s + zip_s) + args.n_images * ZIP_BYTES_PER_IMAGE_MAX / speed
            probe_s = time.time() - start
            start = time.time()
            images = generate_images(G, args.n_images, device, batch_size=batch_size)
            real_gen = time.time() - start
            real_zip = write_images_zip(images, os.path.join(out_dir, "images.zip"))
            real = real_gen + real_zip
            ratios.append(measured / real)
            print(f"repeat {repeat}: batch {batch_size}, measured {measured:.1f}s (probe took {probe_s:.1f}s), "
                  f"real {real:.1f}s (generate {real_gen:.1f}s, zip {real_zip:.1f}s), measured/real "
                  f"{measured / real:.2f}")
    print(f"measured/real: min {min(ratios):.2f}, max {max(ratios):.2f}")


if __name__ == "__main__":
    main()

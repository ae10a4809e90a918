"""How well the start-up measurement predicts the output stage, and where it errs: for each model, the reserve's
own measurement (plan_reserve's steps on the run's G) against the real generation + zip of n images from the same
G, repeated, with the parts side by side:

    generation   cold: the first call at the batch size (what the reserve timed before issue 20; only repeat 0's
                 is the process's first call at that shape), warm: the median of the timed calls after it (what
                 it times now), and their minimum
    zip          the probe (encode + store in memory, the zip's own thread pool) plus the disk's write speed
    real         generate_images of n images at the chosen batch, write_images_zip into a folder beside --out

    python scripts/reserve_accuracy.py --recipes dcgan,cgan,acgan,sngan,sagan,biggan,demo -- --g-ch 16 --d-ch 16
    python scripts/reserve_accuracy.py --n-images 2000 --repeats 3 -- --recipe biggan --g-ch 32 --d-ch 32

Flags after `--` are the kernel's (they pick the model); `demo` in --recipes means `--demo` as it runs, without them.
On a busy machine add --cpu-clock: one torch thread and CPU time as the clock on both sides (the write speed stays
wall-clock), so the estimate's bias shows rather than the other jobs' load. Prints one line per repeat, then one summary line per model: estimate / real (min-max). The load
average is printed too: on a shared machine compare ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import src.generate  # noqa: E402
from src.config import parse_config  # noqa: E402
from src.generate import (ZIP_BYTES_PER_IMAGE_MAX, generate_images, generation_batch_candidates,  # noqa: E402
                          measure_generation, measure_zip_seconds, pick_generation_batch, write_images_zip)
from src.models import build_models  # noqa: E402
from src.preflight import measure_write_speed  # noqa: E402
from src.reserve import OutputPlan  # noqa: E402


CLOCK = time.time


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load() -> str:
    return "load %.1f" % os.getloadavg()[0]


def model_flags(recipe: str, flags: list[str]) -> list[str]:
    # the demo is measured as it runs (its own widths); the flags after -- are for the recipes
    return ["--demo"] if recipe == "demo" else ["--recipe", recipe, *flags]


def measure_model(name: str, flags: list[str], args, out_dir: str) -> list[float]:
    """Repeats of (estimate, real) for one model; prints each; returns estimate / real ratios. The measurement is
    plan_reserve's, step by step, so its parts can be printed; the estimate is OutputPlan.output_s of them."""
    cfg, _ = parse_config([*flags, "--n-images", str(args.n_images)])
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    G, _ = build_models(cfg, args.classes)
    G = G.to(device).train()  # as the run's G is when plan_reserve sees it
    G_ema = copy.deepcopy(G).eval()
    ratios = []
    for repeat in range(args.repeats):
        before = load()
        start = CLOCK()
        timed = measure_generation(G, device, generation_batch_candidates(args.n_images))
        batch = pick_generation_batch(timed)
        timing = timed[batch]
        plan = OutputPlan(n_images=args.n_images, generate_batch=batch, gen_s=timing.seconds_per_image,
                          zip_s=measure_zip_seconds(timing.images), write_speed=measure_write_speed(out_dir),
                          tail_s=0.0, scoring_s=0.0, mifid_s=0.0, round_s=0.0)
        probe_s = CLOCK() - start
        write_s = args.n_images * ZIP_BYTES_PER_IMAGE_MAX / plan.write_speed

        start = CLOCK()
        images = generate_images(G_ema, args.n_images, device, batch_size=batch, seed=repeat)
        real_gen = CLOCK() - start
        start = CLOCK()
        write_images_zip(images, os.path.join(out_dir, "images.zip"))
        real_zip = CLOCK() - start
        real = real_gen + real_zip
        del images
        ratios.append(plan.output_s / real)
        ms = 1000 / args.n_images
        # repeat 0's first call at a batch size is the process's first at that shape: cold
        print(f"{name} #{repeat} ({before} -> {load()}): batch {batch}, probe {probe_s:.1f}s | estimate "
              f"{plan.output_s:.1f}s = generate {plan.gen_s * args.n_images:.1f} + zip {plan.zip_s * args.n_images:.1f}"
              f" + write {write_s:.1f} | real {real:.1f}s = generate {real_gen:.1f} + zip {real_zip:.1f} | per image "
              f"ms: generate {'cold' if repeat == 0 else 'first'} {timing.warmup_s * 1000:.2f} warm median "
              f"{timing.seconds_per_image * 1000:.2f} min {min(timing.per_image_s) * 1000:.2f} real "
              f"{real_gen * ms:.2f}; zip + write probe {(plan.zip_s * args.n_images + write_s) * ms:.3f} real "
              f"{real_zip * ms:.3f} | estimate/real {plan.output_s / real:.2f}", flush=True)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--classes", type=int, default=120)
    parser.add_argument("--recipes", default="", help="comma-separated recipes to loop over (`demo`: --demo)")
    parser.add_argument("--out", default=None, help="a folder on the disk the run writes to (default: a temporary one)")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="one torch thread, and the process's CPU time as the clock of the probe and the real "
                             "output alike: on a busy machine the probe's bias shows, not the other jobs")
    parser.add_argument("kernel_flags", nargs="*")
    args = parser.parse_args()
    if args.cpu_clock:
        global CLOCK
        CLOCK = process_cpu_seconds
        torch.set_num_threads(1)
        src.generate.time = types.SimpleNamespace(time=process_cpu_seconds)  # the probe's own clock
    models = ([(recipe, model_flags(recipe, args.kernel_flags)) for recipe in args.recipes.split(",")]
              if args.recipes else [(" ".join(args.kernel_flags) or "defaults", args.kernel_flags)])
    print(f"{args.n_images} images, {torch.get_num_threads()} threads, {load()}", flush=True)
    summary = {}
    with tempfile.TemporaryDirectory(dir=args.out) as out_dir:
        for name, flags in models:
            summary[name] = measure_model(name, flags, args, out_dir)
    print("estimate / real (the reserve keeps RESERVE_SAFETY x the estimate + a margin):")
    for name, ratios in summary.items():
        print(f"  {name:10s} median {statistics.median(ratios):.2f}  min {min(ratios):.2f}  max {max(ratios):.2f}")


if __name__ == "__main__":
    main()

"""The real-dog proxy (issue 18): the kernel trained on real dog crops on two CPU cores, each variant for a fixed
number of images, scored on held-out dogs. Not bundled into kernel.py.

    python scripts/proxy.py --variants scripts/variants_proxy.txt --seeds 2 --out OUT
    python scripts/proxy.py --variants FILE --seeds 2 --out OUT --train-size 4000    # the regime where D overfits
    python scripts/proxy.py --smoke --out OUT                                          # tiny generated data, seconds

Data: ../shared/data/dogs_dev.tar.gz (19,080 real 64x64 crops in the Kaggle layout), unpacked once under --cache
(default /tmp/dogkernel_proxy). The 2,000 held-out photos are listed in scripts/proxy_holdout.txt, drawn once with
seed 18 and committed: never re-drawn, never trained on. The other 17,080 form the training folder (symlinks in the
Kaggle layout; --train-size N keeps N of them, drawn with the same seed).

Runs: every variant (a line of --variants: a name and the kernel flags it changes, as in
scripts/variants_quality.txt) with every seed, one after another, each `python kernel.py` with PROXY_FLAGS, the
variant's flags, `--max-kimg K --seed S --out OUT/NAME_sS`. A run is --d-checks sessions of K/--d-checks kimg each
(--resume between them: the lr follows the images, so the sessions make one run); after each, D from ckpt.pt
judges 512 training crops and 512 held-out crops: D's mean output on both, and ADA's r = E[sign D(train)] (the
overfitting signal: the gap between the two opens when D memorizes its training set). Each run keeps its
images.zip (5,000 images), samples/latest.png and ckpt.pt; a run already complete in OUT is not run again, so the
table may be made in parts (same OUT, other --variants).

Score: FID (efficientnet-lite0, ../shared/weights/efficientnet-lite0.pth) of the 5,000 generated images against
the held-out crops, and the memorization distance d against the training crops (features cached under --cache).
Without the weights the FID is skipped, and the table says so. Output: the table printed and in OUT/table.md,
OUT/results.json, OUT/contact_sheet.png (every variant's seed-0 grid, labelled).

The base configuration is the demo's conditional DCGAN drawing at 32x32 (the "demo" recipe of src/config.py:
16 channels, z 64, hinge, lr 1e-3 annealed to half, Adam beta1 0, minibatch stddev, no DiffAugment), at batch 32
instead of the demo's 16, for speed. Why, measured 2026-12-06 on the development machine
(2 cores shared with other jobs, load average 5: wall clock meant nothing, so the speed is in images per CPU-second
of one thread, 20-40 s of training on the 17,080 training photos after a warm-up):

    batch 16: 621 images per CPU-second   batch 32: 738   batch 64: 875

The issue measured ~800 images/s for batch 16 on 2 idle cores, i.e. two threads give ~1.3x one; so batch 32 runs
~950 images/s there. The 17,080 training photos give 17,435 crops (the kernel's crops, min_box 16), and 30 epochs
are 523 kimg: PROXY_KIMG = 525 is ~9.2 minutes of training at batch 32 on 2 idle cores (~11 at batch 16, over the
10-minute bar; ~7.7 at batch 64, but half the rounds of batch 32). With the three sessions of a run (D checked
after each, 15-20 s of start-up and decoding each) a run is ~10 minutes; baseline + 4 levers x 2 seeds, ~1h45.
--train-size 4000 (~4,100 crops) at the same kimg is ~128 epochs: the regime where a 16-channel D overfits.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS_DIR)

# gpu_protocol puts the repository root on sys.path; its variants files, unpacking and contact sheet serve here too
from gpu_protocol import (KERNEL, REPO_ROOT, ProtocolError, contact_sheet_png, fmt, git_commit, kernel_env,  # noqa: E402
                          kernel_overrides, parse_variants, prepare_data)

from src.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from src.augment import uint8_to_unit  # noqa: E402
from src.checkpoint import load_checkpoint  # noqa: E402
from src.config import format_duration, make_config  # noqa: E402
from src.console import log  # noqa: E402
from src.data import load_dogs  # noqa: E402
from src.mifid import (cached_real_features, feature_stats, frechet_distance, load_feature_extractor,  # noqa: E402
                       memorization_distance, read_images_zip)
from src.models import MODEL_IMG_SIZE, build_models  # noqa: E402
from src.synthetic import make_tiny_dataset  # noqa: E402

SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
DEFAULT_PACK = os.path.join(SHARED, "data", "dogs_dev.tar.gz")
DEFAULT_WEIGHTS = os.path.join(SHARED, "weights", "efficientnet-lite0.pth")
DEFAULT_CACHE = "/tmp/dogkernel_proxy"
HOLDOUT_FILE = os.path.join(SCRIPTS_DIR, "proxy_holdout.txt")
HOLDOUT_PHOTOS = 2000
SPLIT_SEED = 18            # the issue's number; the split it drew is in HOLDOUT_FILE and is read, not re-drawn
# The kernel flags every proxy run starts from: the demo's recipe at batch 32 on the real crops, on the CPU, with no
# in-run FID and a budget far above any run (the run ends at --max-kimg).
PROXY_FLAGS = ("--recipe", "demo", "--batch-size", "32", "--device", "cpu", "--fid-every", "0", "--time-budget", "3h",
               "--status-every", "30s", "--grid-every", "1h", "--ckpt-every", "1h")
# Set by the proxy for every run alike (parse_variants refuses gpu_protocol's PROTOCOL_KEYS and COMMON_ONLY_KEYS).
PROXY_KEYS = ("seed", "max_kimg", "max_images")
PROXY_KIMG = 525.0         # 30 epochs of the 17,435 training crops, ~9 minutes on 2 idle cores (the docstring says why)
N_GENERATED = 5000         # images per run's zip: what the FID uses
N_BETWEEN_CHECKS = 64      # images an intermediate session writes (its zip is replaced by the last session's)
D_CHECKS = 3               # sessions per run, D judged after each
D_PROBE_IMAGES = 512       # training and held-out crops D judges at every check
RUN_RECORD = "proxy_run.json"
TABLE_MD, RESULTS_JSON, CONTACT_SHEET = "table.md", "results.json", "contact_sheet.png"

# --smoke: the whole path in seconds on the tiny generated data set, one thread per kernel.
SMOKE_PHOTOS, SMOKE_HOLDOUT = 96, 16
SMOKE_FLAGS = ("--recipe", "demo", "--g-ch", "8", "--d-ch", "8", "--z-dim", "16", "--batch-size", "8",
               "--device", "cpu", "--fid-every", "0", "--time-budget", "10m", "--status-every", "5s",
               "--grid-every", "1h", "--ckpt-every", "1h", "--decode-workers", "1")
SMOKE_VARIANTS = "baseline\nlr2x --lr-g 4e-4 --lr-d 4e-4\n"
SMOKE_KIMG, SMOKE_N_GENERATED, SMOKE_D_PROBE = 0.16, 64, 16


class ProxyError(ValueError):
    """Input the proxy refuses (split file, variants); the message is the one line printed."""


# ---- the split -------------------------------------------------------------------------------------------------

def photo_ids(images_dir: str) -> list[str]:
    """The photo ids (file names without extension) of a Kaggle all-dogs/ folder, sorted."""
    return sorted(os.path.splitext(name)[0] for name in os.listdir(images_dir) if name.lower().endswith(".jpg"))


def draw_holdout(ids: list[str], n: int, seed: int) -> list[str]:
    """n ids drawn without replacement by a seeded permutation of the sorted ids; returned sorted."""
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:n])


def settle_holdout(ids: list[str], path: str, n: int, seed: int) -> list[str]:
    """The held-out ids written in `path`; drawn and written there only when the file does not exist yet."""
    if not os.path.exists(path):
        held = draw_holdout(ids, n, seed)
        atomic_write_text(path, "".join(f"{photo_id}\n" for photo_id in held))
        log("proxy", f"drew the held-out split ({n} of {len(ids)} photos, seed {seed}) into {path}")
        return held
    with open(path, encoding="utf-8") as f:
        held = [line.strip() for line in f if line.strip()]
    missing = sorted(set(held) - set(ids))
    if missing or len(set(held)) != len(held):
        raise ProxyError(f"{path}: {len(missing)} held-out ids are not in the data (e.g. {missing[:1]}) or some are "
                         f"listed twice: this split belongs to another data set")
    return held


def training_ids(ids: list[str], held: list[str], size: int, seed: int) -> list[str]:
    """Every id not held out, or `size` of them (a seeded draw) when 0 < size < that many."""
    held_set = set(held)
    train = [photo_id for photo_id in ids if photo_id not in held_set]
    return train if size <= 0 or size >= len(train) else draw_holdout(train, size, seed)


def link_layout(pack_dir: str, ids: list[str], folder: str) -> str:
    """A Kaggle-layout folder of `ids`: all-dogs/ of symlinks into the pack, Annotation linked whole (the kernel
    reads only the annotations of the photos it has). Rebuilt when the ids differ from the folder's."""
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    marker = os.path.join(folder, ".ids")
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read() == digest:
                return folder
    shutil.rmtree(folder, ignore_errors=True)
    images = os.path.join(folder, "all-dogs")
    os.makedirs(images)
    for photo_id in ids:
        os.symlink(os.path.join(pack_dir, "all-dogs", f"{photo_id}.jpg"), os.path.join(images, f"{photo_id}.jpg"))
    os.symlink(os.path.join(pack_dir, "Annotation"), os.path.join(folder, "Annotation"))
    with open(marker, "w") as f:
        f.write(digest)
    return folder


# ---- the runs --------------------------------------------------------------------------------------------------

def read_proxy_variants(text: str, source: str) -> list:
    """gpu_protocol's variants, none of them setting what the proxy sets for every run."""
    variants = parse_variants(text, source)
    for variant in variants:
        for key in kernel_overrides(variant.flags, f"{source}: {variant.name}", ()):
            if key in PROXY_KEYS:
                raise ProxyError(f"{source}: {variant.name}: --{key.replace('_', '-')} is set by the proxy "
                                 f"(--seeds, --kimg, --train-size), the same for every variant")
    return variants


def session_kimgs(kimg: float, checks: int) -> list[float]:
    """The --max-kimg of each session: the run's images in `checks` equal parts, the last exactly kimg."""
    return [kimg * (k + 1) / checks for k in range(checks - 1)] + [kimg]


def kernel_argv(base: tuple, flags: tuple, data_dir: str, out_dir: str, seed: int, max_kimg: float,
                n_images: int, resume: bool) -> list:
    """One session's command line: the base, the variant, then what the proxy sets (later flags win)."""
    return ([sys.executable, KERNEL, *base, *flags, "--data-dir", data_dir, "--out", out_dir, "--seed", str(seed),
             "--max-kimg", f"{max_kimg:g}", "--n-images", str(n_images)]
            + (["--resume", "auto"] if resume else []))


def d_outputs(D: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, draw_res: int, batch: int) -> torch.Tensor:
    """D's logits on uint8 crops prepared as the loop prepares reals (no flip, no augmentation), in train mode
    (its batch norm and minibatch stddev see batches, as in training)."""
    logits = []
    with torch.no_grad():
        for start in range(0, len(images) - batch + 1, batch):
            x = uint8_to_unit(images[start:start + batch])
            if draw_res != MODEL_IMG_SIZE:
                x = torch.nn.functional.avg_pool2d(x, MODEL_IMG_SIZE // draw_res)
            logits.append(D.train()(x, labels[start:start + batch])[0].float().flatten())
    return torch.cat(logits)


def d_check(ckpt_path: str, probe: dict) -> dict:
    """D of a checkpoint on the probe's training and held-out crops: mean outputs, their gap, ADA's r."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = make_config({k: v for k, v in ckpt["config"].items()})
    _, D = build_models(cfg, ckpt["n_classes"])
    D.load_state_dict(ckpt["D"])
    train = d_outputs(D, probe["train_images"], probe["train_labels"], cfg.draw_res, cfg.batch_size)
    held = d_outputs(D, probe["held_images"], probe["held_labels"], cfg.draw_res, cfg.batch_size)
    return {"kimg": ckpt["progress"]["images_seen"] / 1000, "d_train": float(train.mean()),
            "d_held": float(held.mean()), "gap": float(train.mean() - held.mean()),
            "r_train": float(train.sign().mean()), "r_held": float(held.sign().mean())}


def run_variant_seed(variant, seed: int, args, data: dict, env: dict) -> dict:
    """Train one run (its sessions, D checked after each) unless OUT already holds it complete; its record."""
    out_dir = os.path.join(args.out, f"{variant.name}_s{seed}")
    record_path = os.path.join(out_dir, RUN_RECORD)
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        same = (record.get("kimg_asked"), record.get("train_photos"), record.get("flags"), record.get("base"))
        if same == (args.kimg, data["train_photos"], list(variant.flags), list(args.base)) \
                and record.get("returncode") == 0:
            log("proxy", f"{variant.name} seed {seed}: complete in {out_dir}, not run again")
            return record
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    checks, wall = [], 0.0
    kimgs = session_kimgs(args.kimg, args.d_checks)
    returncode = 0
    for index, max_kimg in enumerate(kimgs):
        last = index == len(kimgs) - 1
        argv = kernel_argv(args.base, variant.flags, data["train_dir"], out_dir, seed, max_kimg,
                           args.n_generated if last else N_BETWEEN_CHECKS, resume=index > 0)
        log("proxy", f"{variant.name} seed {seed}: session {index + 1}/{len(kimgs)} to {max_kimg:g} kimg")
        start = time.time()
        with open(os.path.join(out_dir, "kernel.log"), "ab") as log_file:
            log_file.write(("$ " + " ".join(argv) + "\n").encode())
            log_file.flush()
            returncode = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, cwd=REPO_ROOT).returncode
        wall += time.time() - start
        if returncode != 0:
            log("proxy", f"{variant.name} seed {seed}: kernel.py exited {returncode}; see {out_dir}/kernel.log",
                error=True)
            break
        checks.append(d_check(os.path.join(out_dir, "ckpt.pt"), data["probe"]))
        log("proxy", f"{variant.name} seed {seed}: {checks[-1]['kimg']:.1f} kimg, D(train) "
            f"{checks[-1]['d_train']:+.3f} D(held-out) {checks[-1]['d_held']:+.3f} r {checks[-1]['r_train']:+.2f}")
    train_seconds = None
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        train_seconds = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["progress"]["train_seconds"]
    record = {"variant": variant.name, "flags": list(variant.flags), "base": list(args.base), "seed": seed,
              "kimg_asked": args.kimg,
              "train_photos": data["train_photos"], "returncode": returncode, "wall_s": wall,
              "train_s": train_seconds, "d_checks": checks}
    atomic_write_text(record_path, json.dumps(record, indent=1))
    return record


# ---- scoring ---------------------------------------------------------------------------------------------------

class ProxyScorer:
    """FID of a run's zip against the held-out crops and d against the training crops (efficientnet-lite0), the
    real features cached; None when there are no weights."""

    def __init__(self, weights: str, data: dict, cache_dir: str):
        self.extractor = load_feature_extractor("efficientnet-lite0", weights, device="cpu")
        held = cached_real_features(self.extractor, data["held_images"], cache_dir, kind="proxy_holdout")
        self.held_stats = feature_stats(held)
        self.train_feats = cached_real_features(self.extractor, data["train_images"], cache_dir, kind="proxy_train")

    def score(self, out_dir: str) -> dict:
        zip_path = os.path.join(out_dir, "images.zip")
        cache = os.path.join(out_dir, "gen_features.pt")
        if os.path.exists(cache) and os.path.getmtime(cache) >= os.path.getmtime(zip_path):
            feats = torch.load(cache, weights_only=True)
        else:
            feats = self.extractor(read_images_zip(zip_path, expect_n=None))
            torch.save(feats, cache)
        mu, sigma = feature_stats(feats)
        return {"fid": frechet_distance(mu, sigma, *self.held_stats),
                "d": memorization_distance(feats, self.train_feats), "n_generated": len(feats)}


# ---- the table -------------------------------------------------------------------------------------------------

def summarize(records: list, scores: dict, seeds: list) -> list:
    """One row per variant, in the variants' order: FID per seed, mean, spread (max - min), d, minutes, D's gap."""
    rows = {}
    for record in records:
        row = rows.setdefault(record["variant"], {"variant": record["variant"], "flags": record["flags"], "runs": []})
        score = scores.get((record["variant"], record["seed"]))
        row["runs"].append({**record, **(score or {})})
    table = []
    for row in rows.values():
        fids = [run.get("fid") for run in row["runs"]]
        known = [f for f in fids if f is not None]
        last_checks = [run["d_checks"][-1] for run in row["runs"] if run["d_checks"]]
        minutes = [run["train_s"] / 60 for run in row["runs"] if run.get("train_s") is not None]
        table.append({**row, "fid_per_seed": fids,
                      "fid_mean": statistics.fmean(known) if known else None,
                      "fid_spread": max(known) - min(known) if len(known) > 1 else None,
                      "d": statistics.fmean(run["d"] for run in row["runs"] if "d" in run)
                      if any("d" in run for run in row["runs"]) else None,
                      "kimg": statistics.fmean(c["kimg"] for c in last_checks) if last_checks else None,
                      "minutes": statistics.fmean(minutes) if minutes else None,
                      "gap": statistics.fmean(c["gap"] for c in last_checks) if last_checks else None,
                      "r_train": statistics.fmean(c["r_train"] for c in last_checks) if last_checks else None})
    return table


def format_proxy_table(table: list, meta: dict) -> str:
    """Markdown: the setting, then one line per variant, then D's gap over each variant's seed-0 sessions."""
    seeds = meta["seeds"]
    lines = [f"Proxy: {meta['train_photos']} training photos ({meta['train_crops']} crops), FID of "
             f"{meta['n_generated']} images vs {meta['held_crops']} held-out crops, d vs the training crops; "
             f"{meta['kimg']:g} kimg a run; {meta['scoring']}. {meta['date']}, commit {meta['commit']}, "
             f"{meta['device']}, load average at start {meta['load']}.", "",
             "| variant | kimg | minutes | " + " | ".join(f"FID s{s}" for s in seeds)
             + " | mean | spread | d | D(train) - D(held-out) | r |",
             "|---" * (8 + len(seeds)) + "|"]
    for row in table:
        lines.append(f"| {row['variant']} | {fmt(row['kimg'])} | {fmt(row['minutes'])} | "
                     + " | ".join(fmt(f) for f in row["fid_per_seed"])
                     + f" | {fmt(row['fid_mean'])} | {fmt(row['fid_spread'])} | {fmt(row['d'], '.3f')} | "
                     f"{fmt(row['gap'], '+.3f')} | {fmt(row['r_train'], '+.2f')} |")
    lines += ["", "D's mean output on training minus held-out crops at each session's end (seed 0), as kimg: gap:"]
    for row in table:
        checks = row["runs"][0]["d_checks"] if row["runs"] else []
        lines.append(f"- {row['variant']}: " + ", ".join(f"{c['kimg']:.3g}: {c['gap']:+.3f}" for c in checks))
    return "\n".join(lines) + "\n"


# ---- the whole call --------------------------------------------------------------------------------------------

def load_average() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def prepare_proxy_data(args) -> dict:
    """Split, training and held-out folders, their crops (decoded as the kernel decodes them) and D's probe sets."""
    if args.smoke:
        pack_dir = make_tiny_dataset(os.path.join(args.cache, "smoke_pack"), n_images=SMOKE_PHOTOS)
    else:
        if not os.path.exists(args.data):
            raise ProxyError(f"--data {args.data}: no such file (the dev pack is ../shared/data/dogs_dev.tar.gz)")
        pack_dir = prepare_data(args.data, args.cache)
    ids = photo_ids(os.path.join(pack_dir, "all-dogs"))
    held = settle_holdout(ids, args.split, args.holdout, SPLIT_SEED)
    train = training_ids(ids, held, args.train_size, SPLIT_SEED)
    train_dir = link_layout(pack_dir, train, os.path.join(args.cache, f"train_{len(train)}"))
    held_dir = link_layout(pack_dir, held, os.path.join(args.cache, "holdout"))
    min_box = make_config({}).min_box
    train_data = load_dogs(train_dir, min_box=min_box)
    held_data = load_dogs(held_dir, min_box=min_box)
    # held-out labels in the training set's breed numbering (a breed the subset lacks is left out of D's probe)
    index = {breed: i for i, breed in enumerate(train_data.breeds)}
    held_labels = torch.tensor([index.get(held_data.breeds[label], -1) for label in held_data.labels.tolist()])
    known = held_labels >= 0
    # both probes drawn at random: the crops are sorted by photo id, i.e. by breed, and D's output differs by breed
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    pick = torch.randperm(len(train_data.images), generator=generator)[:args.d_probe]
    held_pick = torch.nonzero(known).flatten()[torch.randperm(int(known.sum()), generator=generator)[:args.d_probe]]
    probe = {"train_images": train_data.images[pick], "train_labels": train_data.labels[pick],
             "held_images": held_data.images[held_pick], "held_labels": held_labels[held_pick]}
    return {"train_dir": train_dir, "train_photos": len(train), "train_images": train_data.images,
            "held_images": held_data.images, "probe": probe}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python scripts/proxy.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", help="variants file: one a line, a name and the kernel flags it changes")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per variant (default 2)")
    parser.add_argument("--out", required=True, help="one folder per run, the table, results and the contact sheet")
    parser.add_argument("--kimg", type=float, default=None, help=f"thousands of images a run (default {PROXY_KIMG:g})")
    parser.add_argument("--train-size", type=int, default=0, help="train on this many of the 17,080 photos (0: all)")
    parser.add_argument("--d-checks", type=int, default=D_CHECKS, help="sessions a run, D judged after each")
    parser.add_argument("--data", default=DEFAULT_PACK, help="the dev pack (.tar.gz) or its unpacked folder")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="efficientnet-lite0 weights for the FID")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="unpacked pack, training folders, real features")
    parser.add_argument("--split", default=HOLDOUT_FILE, help="the held-out photo ids (read; written only if absent)")
    parser.add_argument("--smoke", action="store_true", help="tiny generated data, tiny models, seconds")
    return parser


def settle_args(args) -> None:
    """Fill what --smoke or the defaults decide; ProxyError for what cannot work."""
    if args.smoke:
        args.cache = os.path.join(args.out, "cache")
        args.split = os.path.join(args.out, "smoke_holdout.txt")
        args.base, args.holdout, args.n_generated, args.d_probe = SMOKE_FLAGS, SMOKE_HOLDOUT, SMOKE_N_GENERATED, SMOKE_D_PROBE
        args.kimg = args.kimg or SMOKE_KIMG
        args.seeds = min(args.seeds, 1)
        args.d_checks = min(args.d_checks, 2)
    else:
        args.base, args.holdout, args.n_generated, args.d_probe = PROXY_FLAGS, HOLDOUT_PHOTOS, N_GENERATED, D_PROBE_IMAGES
        args.kimg = args.kimg or PROXY_KIMG
        if not args.variants:
            raise ProxyError("--variants FILE is needed (e.g. scripts/variants_proxy.txt), or --smoke")
    if args.seeds < 1 or args.d_checks < 1 or args.kimg <= 0:
        raise ProxyError("--seeds and --d-checks must be at least 1 and --kimg more than 0")


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        settle_args(args)
        if args.smoke:
            variants = read_proxy_variants(SMOKE_VARIANTS, "smoke variants")
        else:
            with open(args.variants, encoding="utf-8") as f:
                variants = read_proxy_variants(f.read(), args.variants)
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(args.cache, exist_ok=True)
        load = load_average()
        data = prepare_proxy_data(args)
    except (ProxyError, ProtocolError, OSError) as error:
        log("proxy", f"error: {error}", error=True)
        return 2
    seeds = list(range(args.seeds))
    log("proxy", f"{len(variants)} variants x {len(seeds)} seeds, {args.kimg:g} kimg each on "
        f"{data['train_photos']} photos; load average {load}")
    env = kernel_env(1, args.smoke)
    records = [run_variant_seed(variant, seed, args, data, env) for variant in variants for seed in seeds]

    scores, scoring = {}, f"FID skipped: no efficientnet-lite0 weights at {args.weights}"
    if os.path.isfile(args.weights):
        scorer = ProxyScorer(args.weights, data, os.path.join(args.cache, "features"))
        scoring = "efficientnet-lite0"
        for record in records:
            out_dir = os.path.join(args.out, f"{record['variant']}_s{record['seed']}")
            if record["returncode"] == 0:
                scores[(record["variant"], record["seed"])] = scorer.score(out_dir)
    table = summarize(records, scores, seeds)
    meta = {"seeds": seeds, "train_photos": data["train_photos"], "train_crops": len(data["train_images"]),
            "held_crops": len(data["held_images"]), "n_generated": args.n_generated, "kimg": args.kimg,
            "scoring": scoring, "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "device": f"CPU, {os.cpu_count()} cores, torch {torch.__version__}", "load": load}
    text = format_proxy_table(table, meta)
    print(text, end="")
    atomic_write_text(os.path.join(args.out, TABLE_MD), text)
    atomic_write_text(os.path.join(args.out, RESULTS_JSON), json.dumps({"meta": meta, "table": table}, indent=1))
    tiles = [(row["variant"], os.path.join(args.out, f"{row['variant']}_s0", "samples", "latest.png"))
             for row in table]
    atomic_write_bytes(os.path.join(args.out, CONTACT_SHEET), contact_sheet_png(tiles))
    log("proxy", f"wrote {args.out}/{TABLE_MD}, {RESULTS_JSON}, {CONTACT_SHEET} in "
        f"{format_duration(time.time() - started)}")
    return 0 if all(record["returncode"] == 0 for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())

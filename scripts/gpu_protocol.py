"""One GPU call that answers a whole question (issue 11): kernel.py variants trained side by side on one GPU, scored
against the pack, one table back. Not bundled into kernel.py.

    python scripts/gpu_protocol.py --data PACK --weights EFFNET --minutes 6 --variants FILE --out OUT
    python scripts/gpu_protocol.py --throughput --data PACK --out OUT    # images/s, ms/round at batch 64/128/256, +-compile
    python scripts/gpu_protocol.py --smoke --out OUT                     # CPU, tiny generated data, seconds
    python scripts/gpu_protocol.py ... --plan-only                       # print the time plan and stop

PACK: a Kaggle-layout folder or the shared dogs_dev.tar.gz (unpacked once into the work folder). FILE: one variant a
line, a name and the kernel flags it changes (`default`, `bs256 --batch-size 256 --lr-ref-batch 64`); `#` starts a
comment. Every variant is one `kernel.py` process with the same --time-budget, FID of G_ema every --fid-every with
the efficientnet-lite0 backbone (its learning curve), and its own folder under the work folder (--work, default a
temporary one). Then every images.zip is scored here: FID and memorization distance d, all generated images vs all
pack images. OUT gets results.json, table.md, contact_sheet.png and variants.log (--throughput: throughput.json,
throughput.md, throughput.log): flat files, each far under the GPU tool's 16 MiB, at most 7 even in one OUT.

The plan (unpack, training waves, scoring) is printed at start; a plan over --limit (default 9m: the GPU tool runs a
command for at most 10) is refused with one line, before anything runs.

The next session with a GPU (pack and weights carried in the git-ignored .carry/; about 8.5 minutes):

    mkdir -p .carry && cp ../shared/data/dogs_dev.tar.gz ../shared/weights/efficientnet-lite0.pth .carry/
    run(carry=[".carry"], timeout_s=600, command="python scripts/gpu_protocol.py --data .carry/dogs_dev.tar.gz
        --weights .carry/efficientnet-lite0.pth --minutes 6 --variants scripts/variants_quality.txt --out $OUT")

and, with at least 4 minutes of device time left, the throughput probes without compile (about 2.5 minutes; with
--compile-modes off,on about 7.5 minutes, a call of its own):

    run(carry=[".carry"], timeout_s=300, command="python scripts/gpu_protocol.py --throughput --compile-modes off
        --data .carry/dogs_dev.tar.gz --out $OUT")
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO_ROOT)

from src.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from src.config import ConfigError, build_arg_parser, format_duration, make_config, parse_duration  # noqa: E402
from src.console import log  # noqa: E402
from src.efficientnet import EfficientNetLite0  # noqa: E402
from src.mifid import (cached_real_features, feature_stats, load_feature_extractor, load_image_folder,  # noqa: E402
                       mifid_score, read_images_zip)
from src.synthetic import make_tiny_dataset  # noqa: E402

KERNEL = os.path.join(REPO_ROOT, "kernel.py")
RESULTS_JSON, TABLE_MD, CONTACT_SHEET, VARIANTS_LOG = "results.json", "table.md", "contact_sheet.png", "variants.log"
THROUGHPUT_JSON, THROUGHPUT_MD, THROUGHPUT_LOG = "throughput.json", "throughput.md", "throughput.log"
OUT_FILE_LIMIT = 16 * 2**20       # the GPU tool returns files under 16 MiB
LOG_TAIL_BYTES = 256 * 1024       # per kernel in the combined log: the banner and status lines fit many times over
RUN_TO_RUN_SPREAD_FID = 4.0       # efficientnet-lite0 FID spread of one config run twice (issue 11)
POLL_S = 0.5                      # how often the protocol looks at its kernels and at Ctrl-C/SIGTERM
STOP_GRACE_S = 10.0               # after Ctrl-C/SIGTERM, SIGTERM'd kernels get this long before SIGKILL
CONTACT_COLUMNS = 4

# Set by the protocol for every variant alike: where a kernel reads and writes, its budget, its FID curve.
PROTOCOL_KEYS = ("data_dir", "out", "time_budget", "resume", "demo", "report", "fid_weights", "fid_every")
# Must be the same for every variant for the scores to compare; --common sets them for all.
COMMON_ONLY_KEYS = ("device", "n_images", "fid_samples", "fid_backbone", "mifid_eps")
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# --smoke: the GPU path on the CPU in seconds. Tiny widths and few images; the kernels get no --fid-weights because a
# CPU kernel keeps >= 30 s back for training-time FID (src/scoring.reserve_for_scoring), which a smoke run cannot pay.
SMOKE_COMMON = ("--device", "cpu", "--g-ch", "8", "--d-ch", "8", "--shared-dim", "16", "--z-dim", "32",
                "--batch-size", "16", "--decode-workers", "1", "--status-every", "2s", "--n-images", "16")
SMOKE_VARIANTS = "default\nbs8 --batch-size 8\n"
SMOKE_PHOTOS = 32                 # generated photos (~38 dogs): enough for batches of 16
SMOKE_CALIBRATION_IMAGES = 16     # images that set the random smoke backbone's BatchNorm statistics
SMOKE_LIVE_FEATURES = 8           # non-zero features of the random smoke backbone (random_lite0_state says why)
SMOKE_MINUTES = 0.35
SMOKE_BATCHES = (8, 16)
# Throughput probes: few images to generate and no grids or periodic checkpoints, so the probe's budget is training;
# 4,096 photos decode in a second and the data size does not change the speed (it lives on the device).
PROBE_FLAGS = ("--n-images", "500", "--status-every", "5s", "--grid-every", "1h", "--ckpt-every", "1h",
               "--max-images", "4096")


class ProtocolError(ValueError):
    """A variants file, flag or plan the protocol refuses; the message is the one line printed."""


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple


@dataclasses.dataclass(frozen=True)
class PlanCosts:
    """Seconds spent around the kernels' own budgets. Estimates: results.json records the measured phases
    (timings), so the next GPU session can correct them."""
    unpack_s_per_mib: float     # tarfile unpack of the .tar.gz (CPU here: 5.3 s for the 21 MiB pack)
    kernel_outside_s: float     # per kernel: python start, torch import, CUDA context, exit; outside its --time-budget
    probe_outside_s: float      # the same for a throughput probe, alone on the machine (no other kernel starting)
    score_setup_s: float        # backbone, decode of the pack (CPU here: 5.4 s for 19,080), the pack's features
    score_per_variant_s: float  # read 10,000 PNGs (1.5 s here), features, memorization d, FID stats and sqrtm (~12 s here)


GPU_COSTS = PlanCosts(unpack_s_per_mib=0.4, kernel_outside_s=30.0, probe_outside_s=15.0, score_setup_s=40.0,
                      score_per_variant_s=20.0)
SMOKE_COSTS = PlanCosts(unpack_s_per_mib=0.4, kernel_outside_s=10.0, probe_outside_s=10.0, score_setup_s=15.0,
                        score_per_variant_s=10.0)
QUALITY_ADVICE = "use fewer variants or --minutes, more --parallel, or a larger --limit"
THROUGHPUT_ADVICE = "use fewer --batches or --compile-modes, shorter --probe-seconds or --compile-extra, or a larger --limit"


@dataclasses.dataclass
class KernelRun:
    """One kernel.py process: what it runs, where it writes, and how it ended."""
    name: str
    argv: list
    out_dir: str
    log_path: str
    budget_s: float
    process: subprocess.Popen | None = None
    start: float = 0.0
    end: float = 0.0
    returncode: int | None = None
    note: str = ""


# ---- variants and flags ------------------------------------------------------------------------------------------

def flag_of(key: str) -> str:
    return "--" + key.replace("_", "-")


def kernel_overrides(flags, where: str, reserved: tuple) -> dict:
    """The Config overrides the kernel flags set, checked as kernel.py would (names, values, choices, recipes),
    and none of `reserved`; ProtocolError names `where` otherwise."""
    parser = build_arg_parser()
    parser.exit_on_error = False  # a bad value raises with a message instead of printing usage and exiting
    try:
        parsed, unknown = parser.parse_known_args(list(flags))
    except argparse.ArgumentError as error:
        raise ProtocolError(f"{where}: {error}") from None
    if unknown:
        if not unknown[0].startswith("-"):
            raise ProtocolError(f"{where}: {unknown[0]!r} is not a flag (flags start with --, values follow them)")
        raise ProtocolError(f"{where}: kernel.py has no flag {unknown[0]!r} (see python kernel.py --help)")
    overrides = vars(parsed)
    for key in overrides:
        if key in PROTOCOL_KEYS:
            raise ProtocolError(f"{where}: {flag_of(key)} is set by the protocol, the same for every variant")
        if key in reserved:
            raise ProtocolError(f"{where}: {flag_of(key)} must be the same for every variant: give it in --common")
    try:
        make_config(overrides)
    except ConfigError as error:
        raise ProtocolError(f"{where}: {error}") from None
    return overrides


def parse_variants(text: str, source: str) -> list:
    """Variants from the text of a variants file: one a line, a name then kernel flags; '#' comments, blank lines."""
    variants, seen = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        try:
            words = shlex.split(line, comments=True)
        except ValueError as error:
            raise ProtocolError(f"{where}: cannot read {line.strip()!r} ({error})") from None
        if not words:
            continue
        name, flags = words[0], tuple(words[1:])
        if name.startswith("-"):
            raise ProtocolError(f"{where}: a line starts with the variant's name, then its flags; got {name!r} first")
        if not VARIANT_NAME.fullmatch(name):
            raise ProtocolError(f"{where}: variant name {name!r}: use letters, digits, '_', '.' and '-' "
                                "(it names a folder)")
        if name in seen:
            raise ProtocolError(f"{where}: variant {name!r} is already defined on line {seen[name]}")
        kernel_overrides(flags, where, COMMON_ONLY_KEYS)
        seen[name] = number
        variants.append(Variant(name, flags))
    if not variants:
        raise ProtocolError(f"{source}: no variants (one a line: a name, then the kernel flags it changes)")
    return variants


def read_variants(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise ProtocolError(f"--variants {path}: {error.strerror or error}") from None
    return parse_variants(text, path)


# ---- the time plan -----------------------------------------------------------------------------------------------

def quality_plan(n_variants: int, parallel: int, budget_s: float, pack_bytes: int, costs: PlanCosts) -> list:
    """[(what, seconds)] of a variants call: unpack, training waves of `parallel` kernels, scoring."""
    waves = math.ceil(n_variants / parallel)
    return [
        ("unpack", pack_bytes / 2**20 * costs.unpack_s_per_mib),
        (f"training: {waves} wave{'s' if waves > 1 else ''} of up to {parallel} kernels x "
         f"{format_duration(budget_s)} (+{costs.kernel_outside_s:.0f}s start/exit)",
         waves * (budget_s + costs.kernel_outside_s)),
        (f"scoring {n_variants} zips", costs.score_setup_s + n_variants * costs.score_per_variant_s),
    ]


def throughput_plan(probe_budgets: list, pack_bytes: int, costs: PlanCosts) -> list:
    """[(what, seconds)] of a throughput call: unpack, then the probes one after another."""
    return [
        ("unpack", pack_bytes / 2**20 * costs.unpack_s_per_mib),
        (f"{len(probe_budgets)} probes one at a time (+{costs.probe_outside_s:.0f}s start/exit each)",
         sum(budget + costs.probe_outside_s for budget in probe_budgets)),
    ]


def check_plan(plan: list, limit_s: float, advice: str) -> str:
    """The plan as one line; ProtocolError (ending in `advice`) when its total exceeds limit_s."""
    total = sum(seconds for _, seconds in plan)
    parts = " + ".join(f"{what} ~{format_duration(seconds)}" for what, seconds in plan)
    if total > limit_s:
        raise ProtocolError(f"the plan needs ~{format_duration(total)}, more than the {format_duration(limit_s)} "
                            f"limit ({parts}): {advice}")
    return f"plan: {parts} = ~{format_duration(total)} of the {format_duration(limit_s)} limit"


def pack_size(data: str | None) -> int:
    """Bytes to unpack: the .tar.gz's size, 0 for a folder (used in place) or generated data."""
    return os.path.getsize(data) if data and os.path.isfile(data) else 0


# ---- inputs ------------------------------------------------------------------------------------------------------

def prepare_data(data: str, work_dir: str) -> str:
    """The Kaggle-layout folder of PACK: the folder itself, or the .tar.gz unpacked once under WORK/pack."""
    if os.path.isdir(data):
        return data
    if not os.path.isfile(data):
        raise ProtocolError(f"--data {data}: no such file or folder")
    target = os.path.join(work_dir, "pack")
    done_marker = os.path.join(target, ".unpacked")
    if not os.path.exists(done_marker):
        shutil.rmtree(target, ignore_errors=True)  # a half-unpacked folder from an interrupted call
        try:
            with tarfile.open(data) as tar:
                tar.extractall(target, filter="data")
        except (tarfile.TarError, OSError) as error:
            raise ProtocolError(f"--data {data}: cannot unpack it ({error})") from None
        open(done_marker, "w").close()
    return target


def real_images_dir(data_dir: str) -> str:
    """The pack's photos: DATA/all-dogs in the Kaggle layout, else the folder itself."""
    all_dogs = os.path.join(data_dir, "all-dogs")
    return all_dogs if os.path.isdir(all_dogs) else data_dir


def random_lite0_state(calibration_img: torch.Tensor, live_features: int) -> dict:
    """A randomly initialised efficientnet-lite0 whose BatchNorm statistics are those of calibration_img (uint8) and
    whose features are exactly 0 except the `live_features` that vary most over calibration_img.

    Calibrated, because untrained BatchNorm passes activations through unscaled and after 16 blocks every feature is
    ~1e-9 (every FID 0). Few live features, because FID's scipy sqrtm of a 1280-d covariance from a handful of images
    takes 17-25 s on the development CPU, and 2 s when all but 8 dimensions are 0 (measured)."""
    torch.manual_seed(0)
    model = EfficientNetLite0()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = the plain average over the calibration batch
    x01 = calibration_img.float() / 255.0
    with torch.no_grad():
        model.train()
        model.features(x01)
        spread = model.eval().features(x01).var(dim=0)
        dead = torch.ones_like(spread, dtype=torch.bool)
        dead[spread.topk(live_features).indices] = False
        # a dead head channel: zero convolution, and BatchNorm maps its 0 to 0 (ReLU6 keeps it 0)
        model._conv_head.weight[dead] = 0.0
        model._bn1.running_mean[dead] = 0.0
        model._bn1.bias[dead] = 0.0
    return model.state_dict()


def make_smoke_inputs(work_dir: str) -> tuple:
    """(data_dir, weights) for --smoke: the tiny generated data set and a random efficientnet-lite0 calibrated on it
    (its FIDs tell images apart but mean nothing; the code path is the GPU run's, only the weights differ)."""
    data_dir = make_tiny_dataset(os.path.join(work_dir, "smoke_dogs"), n_images=SMOKE_PHOTOS)
    weights = os.path.join(work_dir, "smoke_lite0_random.pth")
    if not os.path.exists(weights):
        calibration_img = load_image_folder(real_images_dir(data_dir))[:SMOKE_CALIBRATION_IMAGES]
        buffer = io.BytesIO()
        torch.save(random_lite0_state(calibration_img, SMOKE_LIVE_FEATURES), buffer)
        atomic_write_bytes(weights, buffer.getvalue())
    return data_dir, weights


# ---- running kernels ---------------------------------------------------------------------------------------------

def kernel_argv(data_dir: str, out_dir: str, budget_s: float, fid_weights: str | None, fid_every: str,
                decode_workers: int, common, flags, kernel: str = KERNEL) -> list:
    """kernel.py's command line: the protocol's settings, then --common, then the variant's flags (later ones win)."""
    argv = [sys.executable, kernel, "--data-dir", data_dir, "--out", out_dir, "--time-budget", f"{budget_s:g}s",
            "--decode-workers", str(decode_workers)]
    if fid_weights:
        argv += ["--fid-weights", fid_weights, "--fid-every", fid_every]
    return argv + list(common) + list(flags)


def kernel_env(parallel: int, smoke: bool) -> dict:
    """The kernels' environment: unbuffered output (logs stream), CPU threads shared out instead of oversubscribed.
    A smoke run's kernels get one thread: on a small shared CPU two OpenMP threads spin-wait (measured on the 2-core
    development machine under load: start-up 0.2 s with one thread, 4-12 s and no training step with two)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1" if smoke else str(max(1, (os.cpu_count() or 1) // parallel)))
    env.pop("PYTHONPATH", None)  # kernel.py is self-contained; src/ on the path must not shadow it
    return env


def _load_libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# Loaded here, in the parent: a child between fork and exec must not dlopen (another thread may hold the loader lock).
_LIBC = _load_libc()


def _die_with_parent() -> None:
    # In the child before exec: the kernel gets SIGKILL if the protocol itself is killed, so none outlives the call.
    if _LIBC is not None and hasattr(_LIBC, "prctl"):
        _LIBC.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG (Linux); elsewhere Ctrl-C/SIGTERM still reach stop_runs


def start_run(run: KernelRun, env: dict, cwd: str) -> None:
    """Start one kernel in its own process group (the protocol alone decides when it stops), output to its log."""
    os.makedirs(run.out_dir, exist_ok=True)
    os.makedirs(os.path.dirname(run.log_path), exist_ok=True)
    with open(run.log_path, "wb") as log_file:
        run.process = subprocess.Popen(run.argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent)
    run.start = time.time()


def signal_run(run: KernelRun, signum: int) -> None:
    """Send signum to the kernel's whole process group (its decode workers too), if it still runs."""
    if run.process is not None and run.returncode is None:
        try:
            os.killpg(run.process.pid, signum)
        except ProcessLookupError:
            pass


def reap(run: KernelRun) -> bool:
    """True once the kernel has exited (its code and end time recorded)."""
    if run.returncode is None and run.process is not None:
        code = run.process.poll()
        if code is not None:
            run.returncode, run.end = code, time.time()
    return run.returncode is not None


def stop_runs(runs: list, stop: dict) -> None:
    """SIGTERM every running kernel, SIGKILL what still runs after STOP_GRACE_S (or at once on a second signal)."""
    running = [run for run in runs if run.process is not None and not reap(run)]
    for run in running:
        run.note = run.note or f"stopped by {stop.get('signal', 'the protocol')}"
        signal_run(run, signal.SIGTERM)
    give_up = time.time() + STOP_GRACE_S
    while any(not reap(run) for run in running) and time.time() < give_up and not stop.get("force"):
        time.sleep(POLL_S)
    for run in running:
        if not reap(run):
            signal_run(run, signal.SIGKILL)
            run.process.wait()
            reap(run)


def run_pool(runs: list, parallel: int, env: dict, cwd: str, overrun_s: float, stop: dict) -> None:
    """Run the kernels, `parallel` at a time; one still running overrun_s past its budget is killed.
    Returns when all have ended, or at once (stopping them) on Ctrl-C/SIGTERM."""
    pending, running = list(runs), []
    try:
        while pending or running:
            if stop:
                break
            while pending and len(running) < parallel:
                run = pending.pop(0)
                start_run(run, env, cwd)
                running.append(run)
                log("protocol", f"started {run.name} (pid {run.process.pid}): {shlex.join(run.argv[2:])}")
            for run in list(running):
                if reap(run):
                    running.remove(run)
                    log("protocol", f"{run.name} ended with exit code {run.returncode} after "
                        f"{format_duration(run.end - run.start)}")
                elif time.time() > run.start + run.budget_s + overrun_s and not run.note:
                    run.note = f"killed: still running {format_duration(overrun_s)} after its budget"
                    log("protocol", f"{run.name}: {run.note}", error=True)
                    signal_run(run, signal.SIGKILL)
            time.sleep(POLL_S)
    finally:
        if running or stop:
            stop_runs(running, stop)
            for run in pending:
                run.note = "not started: the protocol was stopped"


def install_stop_handlers(stop: dict) -> dict:
    """Ctrl-C/SIGTERM: stop the kernels and write what there is; a second one kills them without grace.
    Returns the previous handlers."""
    def on_signal(signum, frame):
        if "signal" in stop:
            stop["force"] = True
        stop["signal"] = signal.Signals(signum).name
        log("protocol", f"caught {stop['signal']}: stopping the kernels, then writing what there is", error=True)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, on_signal)
    return previous


# ---- reading a kernel's outputs ----------------------------------------------------------------------------------

def read_stats(path: str) -> dict:
    """Steps, speed and the FID curve from a kernel's stats.jsonl (a half-written last line is skipped).

    images_per_s: the median over the status ticks after the first (which holds the warm-up and torch.compile);
    ms_per_round: the median time per round between consecutive ticks; fid_curve: [[elapsed_s, kimg, fid], ...].
    """
    records, events = [], {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if "event" in record:
                    events[record["event"]] = events.get(record["event"], 0) + 1
                elif "step" in record:
                    records.append(record)
    steady = records[1:] if len(records) > 1 else records
    rounds_ms = [1000.0 * (b["time"] - a["time"]) / (b["step"] - a["step"])
                 for a, b in zip(records, records[1:]) if b["step"] > a["step"]]
    last = records[-1] if records else {}
    return dict(steps=last.get("step", 0), kimg=last.get("kimg", 0.0), batch_size=last.get("batch_size"),
                training_s=last.get("elapsed_s"), status_ticks=len(records),
                images_per_s=statistics.median(r["images_per_s"] for r in steady) if steady else None,
                ms_per_round=statistics.median(rounds_ms) if rounds_ms else None,
                fid_curve=[[round(r["elapsed_s"], 1), round(r["kimg"], 3), r["fid"]]
                           for r in records if r.get("fid") is not None],
                rollbacks=events.get("rollback", 0), ooms=events.get("oom", 0))


def read_log_facts(path: str) -> dict:
    """From a kernel's log: why training stopped, the first round's seconds, the device line, the last line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    stopped = re.findall(r"training stopped \((.*?)\) after", text)
    first_round = re.findall(r"first round took ([0-9.]+)s", text)
    device = re.findall(r"\[train\] device (.+?) x\d+, (\w+)", text)
    lines = [line for line in text.splitlines() if line.strip()]
    return dict(stop_reason=stopped[-1] if stopped else None,
                first_round_s=float(first_round[0]) if first_round else None,
                device=device[0][0] if device else None, precision=device[0][1] if device else None,
                last_line=lines[-1][-300:] if lines else "")


def read_kernel_mifid(out_dir: str) -> dict | None:
    """The kernel's own end-of-run score (its zip vs its training crops), when it wrote one."""
    try:
        with open(os.path.join(out_dir, "mifid.json"), encoding="utf-8") as f:
            return {k: v for k, v in json.load(f).items() if k in ("fid", "d", "mifid")}
    except (OSError, ValueError):
        return None


# ---- scoring -----------------------------------------------------------------------------------------------------

def score_zips(runs: list, real_dir: str, weights: str, device: str, cache_dir: str, stop: dict) -> tuple:
    """({name: dict(fid, d, d_thr, mifid, eps, n_gen, score_s) or dict(error)}, meta): every images.zip, all its
    images vs all real images of the pack, with one backbone loaded once."""
    extractor = load_feature_extractor("auto", weights, device)
    real_feats = cached_real_features(extractor, load_image_folder(real_dir), cache_dir)
    real_stats = feature_stats(real_feats)
    meta = dict(backbone=extractor.name, weights_sha256=extractor.weights_id, n_real=len(real_feats),
                eps=extractor.default_eps, score_device=str(extractor.device))
    scores = {}
    for run in runs:
        if stop:
            break
        zip_path = os.path.join(run.out_dir, "images.zip")
        if not os.path.exists(zip_path):
            scores[run.name] = dict(error="no images.zip")
            continue
        start = time.time()
        try:
            gen_img = read_images_zip(zip_path, expect_n=None)
            result = mifid_score(extractor(gen_img), real_feats, extractor.default_eps, real_stats=real_stats,
                                 device=extractor.device)
        except (ValueError, OSError, RuntimeError) as error:  # one bad zip must not cost the others' scores
            scores[run.name] = dict(error=f"{type(error).__name__}: {error}")
            log("protocol", f"{run.name}: cannot score {zip_path}: {error}", error=True)
            continue
        result.update(n_gen=len(gen_img), score_s=round(time.time() - start, 1))
        scores[run.name] = result
        log("protocol", f"{run.name}: FID {result['fid']:.2f}  d {result['d']:.4f}  ({len(gen_img)} generated vs "
            f"{len(real_feats)} pack images, {result['score_s']:.0f}s)")
    return scores, meta


# ---- results -----------------------------------------------------------------------------------------------------

def variant_result(run: KernelRun, flags, score: dict | None) -> dict:
    """One variant's row of results.json."""
    stats = read_stats(os.path.join(run.out_dir, "stats.jsonl"))
    facts = read_log_facts(run.log_path)
    curve = stats.pop("fid_curve")
    result = dict(name=run.name, flags=list(flags), returncode=run.returncode, note=run.note,
                  stop_reason=facts.get("stop_reason"),
                  wall_s=round(run.end - run.start, 1) if run.end else None, **stats,
                  fid_curve=curve, best_training_fid=min((fid for _, _, fid in curve), default=None),
                  kernel_mifid=read_kernel_mifid(run.out_dir), device=facts.get("device"),
                  precision=facts.get("precision"))
    if score:
        result.update({k: score[k] for k in ("fid", "d", "d_thr", "mifid", "n_gen", "error") if k in score})
    if run.returncode not in (0, None) and "error" not in result:
        result["error"] = f"exit code {run.returncode}: {facts.get('last_line', '')}"
    return result


def fmt(value, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def format_curve(curve: list) -> str:
    return " → ".join(f"{fid:.0f}" for _, _, fid in curve) or "–"


def format_table(results: list, meta: dict) -> str:
    """table.md: one row per variant, with what the numbers are and how far apart they must be to mean something."""
    lines = [f"# gpu_protocol: {len(results)} variants, {format_duration(meta['budget_s'])} each, "
             f"{meta['parallel']} at once",
             "",
             f"{meta['date']} · {meta.get('device') or 'device unknown'} · torch {meta['torch']} · "
             f"commit {meta.get('commit') or 'unknown'}",
             ""]
    if meta.get("n_real"):
        lines.append(f"FID and d: all generated images vs all {meta['n_real']:,} pack images, {meta['backbone']} "
                     f"(weights {meta['weights_sha256']}…, memorization eps {meta['eps']}). Run-to-run spread of one "
                     f"config: about {RUN_TO_RUN_SPREAD_FID:g} FID; smaller differences are noise.")
    else:
        lines.append("Not scored (interrupted, or scoring failed): see results.json and variants.log.")
    lines += [f"Training-time FID curve: G_ema every {meta['fid_every']}, the kernel's --fid-samples vs its training "
              f"crops. img/s and ms/round: median status tick while sharing the GPU with the other variants.",
              "",
              "| variant | flags | steps | kimg | img/s | ms/round | FID curve (training) | FID | d | wall | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        note = "; ".join(x for x in (r.get("error"), r.get("note"), f"{r['rollbacks']} rollbacks" if r["rollbacks"]
                                     else "", f"{r['ooms']} OOMs" if r["ooms"] else "") if x)
        lines.append(f"| {r['name']} | `{shlex.join(r['flags'])}` | {r['steps']} | {r['kimg']:.1f} | "
                     f"{fmt(r['images_per_s'], '.0f')} | {fmt(r['ms_per_round'], '.1f')} | {format_curve(r['fid_curve'])} | "
                     f"**{fmt(r.get('fid'), '.1f')}** | {fmt(r.get('d'), '.3f')} | {fmt(r['wall_s'], '.0f')}s | "
                     f"{note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def contact_sheet_png(tiles: list, columns: int = CONTACT_COLUMNS) -> bytes:
    """One PNG: each (label, grid PNG path or None) as a labelled tile, `columns` a row; a missing grid is a grey
    tile. Halved until it is under the GPU tool's file limit."""
    grids = []
    for label, path in tiles:
        grid = None
        if path and os.path.exists(path):  # a run that failed early has no grid
            try:
                with Image.open(path) as image:
                    grid = image.convert("RGB")
            except OSError:  # a damaged grid only costs its tile
                pass
        grids.append((label, grid))
    tile_w = max((g.width for _, g in grids if g is not None), default=530)
    tile_h = max((g.height for _, g in grids if g is not None), default=530)
    label_h = 28
    columns = max(1, min(columns, len(grids)))
    rows = math.ceil(len(grids) / columns)
    sheet = Image.new("RGB", (columns * tile_w, rows * (tile_h + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=18)
    for index, (label, grid) in enumerate(grids):
        x, y = (index % columns) * tile_w, (index // columns) * (tile_h + label_h)
        draw.text((x + 6, y + 4), label, fill="black", font=font)
        if grid is None:
            draw.rectangle((x, y + label_h, x + tile_w - 1, y + label_h + tile_h - 1), fill=(160, 160, 160))
            draw.text((x + 6, y + label_h + 6), "no grid", fill="black", font=font)
        else:
            sheet.paste(grid, (x, y + label_h))
    while True:
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        if buffer.tell() < OUT_FILE_LIMIT:
            return buffer.getvalue()
        sheet = sheet.resize((sheet.width // 2, sheet.height // 2))


def combined_log(runs: list) -> str:
    """Every kernel's log (its last LOG_TAIL_BYTES) under a header with its command line."""
    parts = []
    for run in runs:
        parts.append(f"===== {run.name}: {shlex.join(run.argv[1:])}\n")
        try:
            with open(run.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(run.log_path) - LOG_TAIL_BYTES))
                parts.append(f.read().decode("utf-8", errors="replace"))
        except OSError:
            parts.append("(no log: not started)\n")
    return "".join(parts)


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def base_meta(args, plan: list) -> dict:
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, commit=git_commit(), command=shlex.join(sys.argv),
                smoke=bool(args.smoke), limit_s=parse_duration(args.limit),
                plan={what: round(seconds, 1) for what, seconds in plan})


def write_quality_outputs(out: str, runs: list, variants: list, scores: dict, meta: dict) -> tuple:
    """results.json, table.md, contact_sheet.png and variants.log into OUT (atomically); returns (results, meta)."""
    results = [variant_result(run, variant.flags, scores.get(run.name)) for run, variant in zip(runs, variants)]
    meta = dict(meta, device=next((r["device"] for r in results if r["device"]), None))
    atomic_write_text(os.path.join(out, RESULTS_JSON), json.dumps(dict(meta=meta, variants=results), indent=2))
    atomic_write_text(os.path.join(out, TABLE_MD), format_table(results, meta))
    tiles = [(f"{r['name']}   FID {fmt(r.get('fid'))}", os.path.join(run.out_dir, "samples", "latest.png"))
             for r, run in zip(results, runs)]
    atomic_write_bytes(os.path.join(out, CONTACT_SHEET), contact_sheet_png(tiles))
    atomic_write_text(os.path.join(out, VARIANTS_LOG), combined_log(runs))
    return results, meta


def probe_result(run: KernelRun, batch: int, compiled: bool) -> dict:
    stats, facts = read_stats(os.path.join(run.out_dir, "stats.jsonl")), read_log_facts(run.log_path)
    note = run.note
    if stats["status_ticks"] < 2:
        note = note or "too short to measure past the first tick: raise --probe-seconds (or --compile-extra)"
    return dict(name=run.name, batch_size=batch, compile=compiled, returncode=run.returncode,
                images_per_s=stats["images_per_s"] if stats["status_ticks"] >= 2 else None,
                ms_per_round=stats["ms_per_round"], first_round_s=facts.get("first_round_s"), steps=stats["steps"],
                status_ticks=stats["status_ticks"], final_batch_size=stats["batch_size"], ooms=stats["ooms"],
                wall_s=round(run.end - run.start, 1) if run.end else None, device=facts.get("device"),
                precision=facts.get("precision"), note=note)


def format_throughput_table(results: list, meta: dict) -> str:
    lines = [f"# gpu_protocol --throughput: default model, {format_duration(meta['probe_s'])} probes",
             "",
             f"{meta['date']} · {meta.get('device') or 'device unknown'} · {meta.get('precision') or ''} · "
             f"torch {meta['torch']} · commit {meta.get('commit') or 'unknown'}",
             "",
             "img/s: median status tick after the first (which holds the warm-up and compile); ms/round: one D step "
             "and one G step; first round: includes torch.compile when on. One probe at a time, the GPU to itself.",
             "",
             "| batch | compile | img/s | ms/round | first round s | steps | note |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['batch_size']} | {'on' if r['compile'] else 'off'} | {fmt(r['images_per_s'], '.0f')} | "
                     f"{fmt(r['ms_per_round'], '.1f')} | {fmt(r['first_round_s'], '.1f')} | {r['steps']} | "
                     f"{r['note'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# ---- the two calls -----------------------------------------------------------------------------------------------

def common_flags(text: str) -> tuple:
    """--common's kernel flags, split as a shell would."""
    try:
        return tuple(shlex.split(text))
    except ValueError as error:
        raise ProtocolError(f"--common {text!r}: {error}") from None


def run_quality(args, work_dir: str, stop: dict, start: float) -> int:
    """The variants call: plan, unpack, train side by side, score, write OUT."""
    common = common_flags(args.common)
    if args.smoke:
        common = SMOKE_COMMON + common
        variants = read_variants(args.variants) if args.variants else parse_variants(SMOKE_VARIANTS, "smoke")
    else:
        variants = read_variants(args.variants)
    for variant in variants:
        kernel_overrides(common + variant.flags, f"variant {variant.name} with --common", ())
    parallel = min(args.parallel or len(variants), len(variants))
    budget_s = 60.0 * args.minutes
    plan = quality_plan(len(variants), parallel, budget_s, pack_size(args.data), SMOKE_COSTS if args.smoke else GPU_COSTS)
    log("protocol", check_plan(plan, parse_duration(args.limit), QUALITY_ADVICE))
    if args.plan_only:
        return 0
    timings, phase_start = {}, time.time()
    if args.smoke:
        data_dir, weights = make_smoke_inputs(work_dir)
        weights = args.weights or weights
    else:
        data_dir, weights = prepare_data(args.data, work_dir), args.weights
    timings["unpack_s"] = round(time.time() - phase_start, 1)

    runs = [KernelRun(name=v.name, out_dir=os.path.join(work_dir, "variants", v.name),
                      log_path=os.path.join(work_dir, "logs", f"{v.name}.log"), budget_s=budget_s,
                      argv=kernel_argv(data_dir, os.path.join(work_dir, "variants", v.name), budget_s,
                                       None if args.smoke else weights, args.fid_every,
                                       max(1, (os.cpu_count() or 1) // parallel), common, v.flags, args.kernel))
            for v in variants]
    phase_start = time.time()
    run_pool(runs, parallel, kernel_env(parallel, args.smoke), work_dir, args.overrun, stop)
    timings["training_s"] = round(time.time() - phase_start, 1)
    meta = dict(base_meta(args, plan), budget_s=budget_s, parallel=parallel, fid_every=args.fid_every,
                data=args.data or "smoke", timings=timings)
    os.makedirs(args.out, exist_ok=True)
    write_quality_outputs(args.out, runs, variants, {}, meta)  # what there is, before scoring can take its time

    scores = {}
    if not stop:
        phase_start = time.time()
        try:
            scores, score_meta = score_zips(runs, real_images_dir(data_dir), weights, args.device,
                                            os.path.join(work_dir, "cache"), stop)
            meta.update(score_meta)
        except (ValueError, OSError, RuntimeError) as error:
            log("protocol", f"scoring failed: {error}", error=True)
        timings["scoring_s"] = round(time.time() - phase_start, 1)
    timings["total_s"] = round(time.time() - start, 1)
    results, meta = write_quality_outputs(args.out, runs, variants, scores, meta)
    log("protocol", f"wrote {', '.join((RESULTS_JSON, TABLE_MD, CONTACT_SHEET, VARIANTS_LOG))} to {args.out} "
        f"({format_duration(timings['total_s'])} in all)")
    print(format_table(results, meta), flush=True)
    if stop:
        return 130
    return 0 if all(r.get("fid") is not None for r in results) else 1


def run_throughput(args, work_dir: str, stop: dict, start: float) -> int:
    """The throughput call: the default model alone on the device, one short probe per batch size and compile mode."""
    common = common_flags(args.common)
    try:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else \
            list(SMOKE_BATCHES if args.smoke else (64, 128, 256))
    except ValueError:
        raise ProtocolError(f"--batches {args.batches!r}: a comma list of batch sizes, e.g. 64,128,256") from None
    modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    if not modes or any(m not in ("off", "on") for m in modes):
        raise ProtocolError(f"--compile-modes {args.compile_modes!r}: a comma list of off and on")
    probes = [(batch, mode == "on") for mode in modes for batch in batches]
    probe_flags = PROBE_FLAGS + (SMOKE_COMMON if args.smoke else ()) + common
    for batch, compiled in probes:
        kernel_overrides(probe_flags + ("--batch-size", str(batch), "--compile" if compiled else "--no-compile"),
                         f"probe batch {batch}", ())
    budgets = [args.probe_seconds + (args.compile_extra if compiled else 0.0) for _, compiled in probes]
    plan = throughput_plan(budgets, pack_size(args.data), SMOKE_COSTS if args.smoke else GPU_COSTS)
    log("protocol", check_plan(plan, parse_duration(args.limit), THROUGHPUT_ADVICE))
    if args.plan_only:
        return 0
    data_dir = make_smoke_inputs(work_dir)[0] if args.smoke else prepare_data(args.data, work_dir)
    runs = []
    for (batch, compiled), budget in zip(probes, budgets):
        name = f"bs{batch}{'_compile' if compiled else ''}"
        out_dir = os.path.join(work_dir, "probes", name)
        flags = ("--batch-size", str(batch), "--compile" if compiled else "--no-compile")
        runs.append(KernelRun(name=name, out_dir=out_dir, log_path=os.path.join(work_dir, "logs", f"{name}.log"),
                              budget_s=budget, argv=kernel_argv(data_dir, out_dir, budget, None, "0",
                                                                os.cpu_count() or 1, probe_flags, flags, args.kernel)))
    run_pool(runs, 1, kernel_env(1, args.smoke), work_dir, args.overrun, stop)
    results = [probe_result(run, batch, compiled) for run, (batch, compiled) in zip(runs, probes)]
    meta = dict(base_meta(args, plan), probe_s=args.probe_seconds, compile_extra_s=args.compile_extra,
                device=next((r["device"] for r in results if r["device"]), None),
                precision=next((r["precision"] for r in results if r["precision"]), None),
                total_s=round(time.time() - start, 1))
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, THROUGHPUT_JSON), json.dumps(dict(meta=meta, probes=results), indent=2))
    table = format_throughput_table(results, meta)
    atomic_write_text(os.path.join(args.out, THROUGHPUT_MD), table)
    atomic_write_text(os.path.join(args.out, THROUGHPUT_LOG), combined_log(runs))
    print(table, flush=True)
    if stop:
        return 130
    return 0 if all(r["images_per_s"] is not None for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", help="the pack: dogs_dev.tar.gz or a Kaggle-layout folder (all-dogs/, Annotation/)")
    parser.add_argument("--weights", help="efficientnet-lite0.pth: training-time FID and the final scores")
    parser.add_argument("--minutes", type=float, default=None, help="each kernel's --time-budget in minutes (default 6)")
    parser.add_argument("--variants", help="variants file: one a line, a name then the kernel flags it changes")
    parser.add_argument("--out", required=True, help="results.json, table.md, contact_sheet.png, variants.log go here")
    parser.add_argument("--parallel", type=int, default=0, help="kernels at once on the GPU (default: all variants)")
    parser.add_argument("--fid-every", default="60s", help="training-time FID interval of every kernel")
    parser.add_argument("--common", default="", help="kernel flags for every variant, e.g. \"--fid-samples 1000\"")
    parser.add_argument("--limit", default="9m", help="refuse a plan longer than this (the GPU tool allows 10m)")
    parser.add_argument("--device", default="auto", help="device of the final scoring: auto | cpu | cuda")
    parser.add_argument("--work", help="keep the unpacked pack, kernel folders and logs here (default: a temp folder, "
                                       "removed at the end)")
    parser.add_argument("--kernel", default=KERNEL, help="the kernel to run (default: the repository's kernel.py)")
    parser.add_argument("--overrun", type=float, default=120.0,
                        help="seconds past its budget after which a kernel is killed")
    parser.add_argument("--plan-only", action="store_true", help="print the plan (or refuse it) and stop")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of the whole path: tiny generated data, tiny models, random backbone, seconds")
    parser.add_argument("--throughput", action="store_true", help="short probes of the default model's speed instead")
    parser.add_argument("--batches", help="--throughput batch sizes, comma-separated (default 64,128,256)")
    parser.add_argument("--compile-modes", default="off,on", help="--throughput: off, on or off,on")
    parser.add_argument("--probe-seconds", type=float, default=30.0, help="--throughput: each probe's budget")
    parser.add_argument("--compile-extra", type=float, default=60.0,
                        help="--throughput: extra budget of a compiled probe (compiling comes out of the budget)")
    return parser


def check_args(args) -> None:
    """The inputs each mode needs, as one line each."""
    if args.minutes is None:
        args.minutes = SMOKE_MINUTES if args.smoke else 6.0
    if args.minutes <= 0:
        raise ProtocolError(f"--minutes must be positive, got {args.minutes:g}")
    if args.parallel < 0:
        raise ProtocolError(f"--parallel must be 0 (all) or positive, got {args.parallel}")
    try:
        parse_duration(args.limit)
        parse_duration(args.fid_every)
    except ValueError as error:
        raise ProtocolError(str(error)) from None
    if not args.smoke:
        if not args.data:
            raise ProtocolError("give --data PACK (dogs_dev.tar.gz or a Kaggle-layout folder), or --smoke")
        if not os.path.exists(args.data):
            raise ProtocolError(f"--data {args.data}: no such file or folder")
        if not args.throughput:
            for flag, value in (("--weights", args.weights), ("--variants", args.variants)):
                if not value:
                    raise ProtocolError(f"give {flag} (see --help), or --smoke")
            if not os.path.isfile(args.weights):
                raise ProtocolError(f"--weights {args.weights}: no such file")
    if args.smoke:
        args.device = "cpu"
    elif not torch.cuda.is_available():
        log("protocol", "WARNING: no CUDA device here: the kernels train on the CPU and the plan's estimates "
            "(made for a GPU) do not hold")


def main(argv: list | None = None) -> int:
    start = time.time()
    args = build_parser().parse_args(argv)
    stop: dict = {}
    try:
        check_args(args)
        work_dir = args.work or tempfile.mkdtemp(prefix="gpu_protocol_")
        os.makedirs(work_dir, exist_ok=True)
        previous_handlers = install_stop_handlers(stop)
        try:
            return (run_throughput if args.throughput else run_quality)(args, work_dir, stop, start)
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if not args.work:
                shutil.rmtree(work_dir, ignore_errors=True)
    except ProtocolError as error:
        log("protocol", f"error: {error}", error=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

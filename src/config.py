"""One Config dataclass holds every hyperparameter; CLI flags and named recipes are derived from it."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field

from src.augment import parse_diffaug_policy
from src.host import running_in_notebook


class ConfigError(ValueError):
    """A flag or recipe that cannot work; the message names the flag."""


# What a resumed run does with each field (declared next to the field, below):
#   this_run    - this session's value: where and how long it runs, how it is watched and scored
#   from_ckpt   - the checkpoint's value: the training recipe continues as it was trained (differences are noted)
#   model_shape - the checkpoint's value: it decides the shapes of G and D (differences are warned about)
RESUME_ROLES = ("this_run", "from_ckpt", "model_shape")


def _config_field(role: str, default, choices: tuple = (), duration: bool = False):
    # one dataclass field with its resume role; for a setting picked from a registry, its allowed names; for a
    # duration, the mark that its flag reads '90s' / '20m' / '8h30m' (the field itself holds seconds)
    return field(default=default, metadata={"resume": role, "choices": tuple(choices), "duration": duration})


def this_run(default, choices: tuple = (), duration: bool = False):
    return _config_field("this_run", default, choices, duration)


def from_ckpt(default, choices: tuple = ()):
    return _config_field("from_ckpt", default, choices)


def model_shape(default, choices: tuple = ()):
    return _config_field("model_shape", default, choices)


@dataclass
class Config:
    # ---- where things are -------------------------------------------------------------------------
    data_dir: str = this_run("")        # Kaggle layout root (all-dogs/ + Annotation/); empty: search /kaggle/input
    out: str = this_run("")             # output folder; empty: /kaggle/working on Kaggle, else ./out
    resume: str = this_run("")          # ckpt.pt to continue from; "auto": OUT/ckpt.pt when it exists
    demo: bool = this_run(False)        # train on a tiny generated dataset (CPU, seconds): the embedded default
    # ---- budget -----------------------------------------------------------------------------------
    # whole run in seconds (flag: 90s, 20m, 8h30m): start-up, training, generation, zip, MiFID; Kaggle stops at 9h
    time_budget: float = this_run(8.5 * 3600, duration=True)
    # stop training after this many thousand images over all sessions, the lr annealing by images instead of the
    # clock: a run of fixed length whatever the machine's load (0: no limit; the budget still applies)
    max_kimg: float = this_run(0.0)
    seed: int = from_ckpt(0)            # seeds python, numpy and torch (same seed + config + device = same run)
    device: str = this_run("auto")      # auto | cpu | cuda | cuda:N
    gpus: int = this_run(0)             # processes: 0 one per visible GPU, 1 a single one; on the CPU N (gloo)
    # ---- data -------------------------------------------------------------------------------------
    crop_margin: float = this_run(0.0)  # widen each box by this fraction of its size on every side before cropping
    max_images: int = this_run(0)       # read only N photos spread over the sorted list (0: all); quick iterations
    decode_workers: int = this_run(0)   # processes decoding JPEGs at start-up (0: one per CPU core)
    # drop dogs whose box's shortest side is under this many px (capped at half the photo's shortest side): blown up
    # more than 4x to 64 px they are smudges (2.2 % of the dev pack's boxes, none of Stanford's full-size ones); 0: keep
    # all. Decided when the data are decoded, before a checkpoint is read, like crop_margin.
    min_box: int = this_run(16)
    flip: bool = from_ckpt(True)        # random horizontal flips of real images
    # DiffAugment policy on real and fake before D ("": off). BigGAN's DiffAugment runs (CIFAR-10, 10-20 % data) use
    # translation,cutout; colour jitter (StyleGAN2's low-shot policy adds it) slows early learning in short runs
    diffaug: str = from_ckpt("translation,cutout")
    # ADA (StyleGAN2-ADA's heuristic, src/ada.py): > 0 applies each DiffAugment op to each image with a probability p
    # that starts at 0 and moves every 4 D steps so that E[sign D(real)] approaches this target (ADA's 0.6); 0: every
    # op on every image. With ADA the policy may include colour: at a low p it costs little
    ada_target: float = from_ckpt(0.0)
    ada_kimg: float = from_ckpt(500.0)  # thousands of images for ADA's p to move by 1 (ADA's 500; short runs: less)
    # G's breeds in training and in the submission: "data", in the data's proportions (Kaggle's reference is the
    # photos as they are; uniform fakes let a conditional D tell rare breeds' fakes by their label alone), or
    # "uniform"; see generate.TRAINING_BREEDS and BENCHMARKS.md (the real-dog proxy)
    labels: str = from_ckpt("data", choices=("uniform", "data"))
    # what D sees as real: the dog crops, the whole photos squashed to 64x64 (what Kaggle's MiFID compares with), or
    # both (the crops, then the photos); see data.training_images
    train_on: str = from_ckpt("crops", choices=("crops", "photos", "both"))
    # ---- models -----------------------------------------------------------------------------------
    recipe: str = model_shape("biggan")  # named set of overrides below (see RECIPES); flags given explicitly win
    arch: str = model_shape("resnet", choices=("resnet", "dcgan"))  # ResNet: the SNGAN/BigGAN family
    z_dim: int = model_shape(128)       # latent size
    g_ch: int = model_shape(64)         # generator width multiplier
    d_ch: int = model_shape(64)         # discriminator width multiplier
    shared_dim: int = model_shape(128)  # BigGAN shared class embedding size fed to every G block (0: none)
    hier_z: bool = model_shape(True)    # BigGAN hierarchical z: split z across the G blocks
    attn_res: int = model_shape(0)      # self-attention at this resolution in G and D (0: off; 32 for SAGAN)
    cond: str = model_shape("projection", choices=("none", "projection", "acgan", "concat"))  # how labels enter D
    g_sn: bool = model_shape(True)      # spectral norm in G (SAGAN/BigGAN)
    d_sn: bool = model_shape(True)      # spectral norm in D
    pixel_norm: bool = model_shape(False)  # pixelwise feature normalisation in G (ProGAN)
    mbstd: bool = model_shape(False)    # minibatch standard deviation channel in D's last block
    # DCGAN only: G draws at 32x32 (upsampled bilinearly to 64x64 for the images), D judges the 2x2-averaged reals (a
    # quarter of the work per image, for CPU runs such as the demo); 64 draws every pixel
    draw_res: int = model_shape(64, choices=(32, 64))
    # ---- losses -----------------------------------------------------------------------------------
    loss: str = from_ckpt("hinge", choices=("hinge", "bce", "ls", "rals", "wgan-gp"))  # see losses.GAN_LOSSES
    aux_weight: float = from_ckpt(1.0)  # weight of the auxiliary breed-classification loss (cond=acgan)
    gp_weight: float = from_ckpt(10.0)  # gradient-penalty weight (loss=wgan-gp)
    # LeCam regularization (Tseng et al. 2021): D's outputs anchored to moving averages of the other side's; its
    # weight (0: off; the authors' BigGAN runs 0.3)
    lecam_weight: float = from_ckpt(0.0)
    real_label_min: float = from_ckpt(1.0)  # noisy soft labels for bce/ls: real targets drawn from [min, 1]
    fake_label_max: float = from_ckpt(0.0)  # fake targets drawn from [0, max]
    # ---- optimisation -----------------------------------------------------------------------------
    batch_size: int = from_ckpt(64)     # images per D step
    lr_g: float = from_ckpt(1e-4)       # TTUR: G's learning rate
    lr_d: float = from_ckpt(4e-4)       # TTUR: D's learning rate
    beta1: float = from_ckpt(0.0)       # Adam beta1 (0 for SN-GANs, 0.5 for DCGAN)
    beta2: float = from_ckpt(0.999)     # Adam beta2
    lr_ref_batch: int = from_ckpt(0)    # >0: scale both lrs linearly by batch_size / lr_ref_batch
    n_dis: int = from_ckpt(1)           # D steps per G step
    dis_loss_limit: float = from_ckpt(0.0)  # >0: add D steps (up to n_dis_max) while D's loss stays above this
    n_dis_max: int = from_ckpt(5)       # ceiling of the adaptive D steps
    g_steps: int = from_ckpt(1)         # G steps per round (the Kaggle kernel used 2)
    # cosine and linear anneal to the deadline; restarts: cosine warm restarts
    lr_schedule: str = from_ckpt("cosine", choices=("const", "cosine", "linear", "restarts"))
    lr_min_ratio: float = from_ckpt(0.1)  # the annealed lr ends at lr * this
    restart_cycles: int = from_ckpt(4)  # cosine warm restarts: cycles within the training time (doubling lengths)
    ema_beta: float = from_ckpt(0.999)  # G_ema = beta * G_ema + (1 - beta) * G
    # G_ema averages over at most this fraction of the steps so far (StyleGAN2-ADA's ramp-up): short runs get a
    # short average instead of a G_ema stuck near init
    ema_rampup: float = from_ckpt(0.05)
    # > 0: G_ema's half-life in thousands of images (StyleGAN2-ADA's ema_kimg, 10 per 32 images of batch), ema_rampup
    # then a fraction of the images seen; a batch change keeps the horizon. 0: ema_beta per step
    ema_kimg: float = from_ckpt(0.0)
    # ---- speed ------------------------------------------------------------------------------------
    amp: str = this_run("auto", choices=("auto", "bf16", "fp16", "fp32"))  # auto: bf16 on sm>=80, fp16 below, CPU fp32
    channels_last: bool = this_run(True)  # NHWC convolutions on the GPU
    compile: bool = this_run(False)     # torch.compile G and D (compile time comes out of the budget)
    # before training, run every stage briefly on the device (rounds, grid, zip, MiFID backbone): a failure is one
    # line in the first minute, not hours later; it changes nothing the run then does
    self_check: bool = this_run(True)
    # ---- watching ---------------------------------------------------------------------------------
    status_every: float = this_run(10.0, duration=True)  # status line and one stats.jsonl record
    grid_every: float = this_run(600.0, duration=True)   # sample grid from the fixed grid_z
    ckpt_every: float = this_run(1800.0, duration=True)  # checkpoint (also written before the deadline and on SIGTERM)
    fid_every: float = this_run(0.0, duration=True)      # FID of G_ema during training with the backbone (0: off)
    fid_samples: int = this_run(2000)   # generated images per training-time FID
    # ---- generation and score ---------------------------------------------------------------------
    n_images: int = this_run(10000)     # images in images.zip (Kaggle wants exactly 10,000)
    truncation: float = this_run(0.0)   # resample |z| above this (0: off); "search" below picks it by FID
    truncation_search: bool = this_run(False)  # measure FID for a few truncations at the end and keep the best
    fid_backbone: str = this_run("auto", choices=("auto", "inception", "efficientnet-lite0"))  # auto: by weights file
    fid_weights: str = this_run("")     # weights file for MiFID; empty: look under /kaggle/input, else skip MiFID
    mifid_eps: float = this_run(0.0)    # memorization threshold (0: the backbone's documented default)
    # what in-run FID, the truncation search and the final MiFID compare with: "photos", every whole photo squashed
    # to 64x64 (Kaggle's reference, what the leaderboard measured), or "crops", the training crops
    fid_reference: str = this_run("photos", choices=("photos", "crops"))


# A recipe is a few overrides of Config: the write-ups' models, built from the same modules.
RECIPES: dict[str, dict] = {
    # Radford et al.: Linear -> ConvTranspose G, strided-conv D, BCE, Adam 2e-4 / beta1 0.5.
    "dcgan": dict(arch="dcgan", cond="none", g_sn=False, d_sn=False, shared_dim=0, hier_z=False,
                  loss="bce", lr_g=2e-4, lr_d=2e-4, beta1=0.5, n_dis=1, diffaug="", z_dim=100),
    # Conditional DCGAN: label embedding concatenated to z and to D's input.
    "cgan": dict(arch="dcgan", cond="concat", g_sn=False, d_sn=False, shared_dim=0, hier_z=False,
                 loss="bce", lr_g=2e-4, lr_d=2e-4, beta1=0.5, n_dis=1, diffaug="", z_dim=100),
    # ACGAN: D also classifies the breed; RaLS + auxiliary classifier as in a winning entry.
    "acgan": dict(arch="dcgan", cond="acgan", g_sn=False, d_sn=True, shared_dim=0, hier_z=False,
                  loss="rals", lr_g=2e-4, lr_d=2e-4, beta1=0.5, n_dis=1, diffaug="", z_dim=100),
    # SNGAN (Miyato et al.): ResNet, spectral norm, projection D, hinge, n_dis rising to 5 while D lags.
    "sngan": dict(arch="resnet", cond="projection", shared_dim=0, hier_z=False, attn_res=0,
                  loss="hinge", lr_g=2e-4, lr_d=2e-4, beta1=0.0, beta2=0.9, n_dis=1,
                  dis_loss_limit=0.5, n_dis_max=5, diffaug=""),
    # SAGAN (Zhang et al.): + self-attention at 32x32, TTUR G 1e-4 / D 4e-4, Adam (0, 0.9).
    "sagan": dict(arch="resnet", cond="projection", shared_dim=0, hier_z=False, attn_res=32,
                  loss="hinge", lr_g=1e-4, lr_d=4e-4, beta1=0.0, beta2=0.9, n_dis=1, diffaug=""),
    # The default: BigGAN-style ResNet, shared embedding, hierarchical z, projection D, hinge,
    # DiffAugment, EMA, lr annealed to the deadline.
    "biggan": dict(),
    # The embedded default's model (--demo): a small conditional DCGAN that learns the cartoon dogs on 2 CPU cores in
    # 45 s. Why each setting: BENCHMARKS.md, "What makes the demo learn" and "The demo reaches the bar".
    "demo": dict(arch="dcgan", cond="concat", g_sn=False, d_sn=False, shared_dim=32, hier_z=False, z_dim=64,
                 g_ch=16, d_ch=16, draw_res=32, mbstd=True, loss="hinge", diffaug="", batch_size=16,
                 lr_g=1e-3, lr_d=1e-3, beta1=0.0, n_dis=1, lr_min_ratio=0.5, ema_rampup=0.2),
}

# What each recipe trains, in the words the start-up banner uses.
RECIPE_SUMMARIES: dict[str, str] = {
    "dcgan": "unconditional DCGAN, BCE, Adam 2e-4 / beta1 0.5",
    "cgan": "conditional DCGAN (breed concatenated to z and to D's input), BCE",
    "acgan": "DCGAN with an auxiliary breed classifier in D, RaLS",
    "sngan": "ResNet SNGAN, projection D, hinge, adaptive D steps",
    "sagan": "ResNet SAGAN, self-attention at 32x32, hinge, TTUR",
    "biggan": "BigGAN-style ResNet, shared class embedding, hierarchical z, projection D, hinge, DiffAugment",
    "demo": "small conditional DCGAN drawing at 32x32 (16 channels, batch 16, hinge, lr 1e-3, minibatch stddev)",
}

# --demo: the tiny generated data set, on the CPU, for 45 s, watched often; the model is the "demo" recipe unless
# --recipe names another. Only this_run settings: a recipe never sees them.
DEMO_RUN: dict = dict(time_budget=45.0, device="cpu", status_every=3.0, grid_every=10.0, ckpt_every=15.0)


def parse_duration(text: str | float | int) -> float:
    """'90s', '20m', '8h', '8h30m', '1h2m3s' or a bare number of seconds -> seconds (finite, not negative)."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        seconds = _read_duration(str(text))
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration {text!r} must be a finite number of seconds, 0 or more: use e.g. 90s, 20m, 8h or 8h30m")
    return seconds


def _read_duration(text: str) -> float:
    # the number or h/m/s form of parse_duration, before the range check
    s = text.strip().lower()
    try:
        return float(s)
    except ValueError:
        pass
    total, number, seen_unit = 0.0, "", False
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    for ch in s:
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total += float(number) * units[ch]
            number, seen_unit = "", True
        else:
            raise ValueError(f"cannot read duration {text!r}: use e.g. 90s, 20m, 8h or 8h30m")
    if number or not seen_unit:
        raise ValueError(f"cannot read duration {text!r}: use e.g. 90s, 20m, 8h or 8h30m")
    return total


def format_duration(seconds: float) -> str:
    """Seconds -> '1h02m03s' / '2m03s' / '4.5s' for status lines."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _flag_type(config_field):
    # durations are read as text and settled (with the flag's name in any error) by make_config
    if config_field.metadata["duration"]:
        return str
    return type(config_field.default)


def _flag_help(config_field) -> str:
    default = config_field.default
    return f"default: {format_duration(default) if config_field.metadata['duration'] else repr(default)}"


def build_arg_parser() -> argparse.ArgumentParser:
    """One flag per Config field (--time-budget for time_budget); booleans also get --no-X."""
    parser = argparse.ArgumentParser(
        prog="kernel.py",  # in a notebook sys.argv[0] is Jupyter's launcher
        description="dogkernel: train a GAN on the Kaggle dogs and write images.zip",
        allow_abbrev=False,
        epilog="Each flag sets the Config field of the same name (see class Config for what it does); "
               "--recipe picks a named set of defaults, and flags given explicitly override it. "
               "Durations read 90s, 20m, 8h or 8h30m.",
        argument_default=argparse.SUPPRESS)  # absent flags stay absent, so recipes can fill them
    for config_field in dataclasses.fields(Config):
        flag = "--" + config_field.name.replace("_", "-")
        if isinstance(config_field.default, bool):
            parser.add_argument(flag, dest=config_field.name, action=argparse.BooleanOptionalAction)
        else:
            metavar = "DURATION" if config_field.metadata["duration"] else type(config_field.default).__name__.upper()
            parser.add_argument(flag, dest=config_field.name, type=_flag_type(config_field), metavar=metavar,
                                help=_flag_help(config_field))
    parser.add_argument("--report", metavar="OUT", dest="report",
                        help="rebuild the plots of a finished run from OUT/stats.jsonl and exit")
    return parser


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def settle_durations(values: dict) -> dict:
    """values with every duration field read as seconds ('90s' -> 90.0); a bad one is a ConfigError naming its flag."""
    settled = dict(values)
    for f in dataclasses.fields(Config):
        if f.metadata["duration"] and f.name in settled:
            try:
                settled[f.name] = parse_duration(settled[f.name])
            except ValueError as error:
                raise ConfigError(f"{_flag_name(f.name)}: {error}") from None
    return settled


def make_config(overrides: dict | None = None) -> Config:
    """Config from the recipe named in overrides (the "demo" recipe for --demo), --demo's run settings, then the
    explicit overrides on top; durations become seconds and everything is validated here, once."""
    overrides = dict(overrides or {})
    recipe = overrides.get("recipe", "demo" if overrides.get("demo") else Config.recipe)
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    demo_run = DEMO_RUN if overrides.get("demo") else {}
    cfg = Config(**settle_durations({**RECIPES[recipe], **demo_run, "recipe": recipe, **overrides}))
    validate_config(cfg)
    return cfg


def validate_config(cfg: Config) -> None:
    """Reject settings that cannot work, with the flag's name in the message."""
    for f in dataclasses.fields(Config):
        allowed = f.metadata["choices"]
        if allowed and getattr(cfg, f.name) not in allowed:
            raise ConfigError(f"{_flag_name(f.name)} {getattr(cfg, f.name)!r}: choose one of {', '.join(allowed)}")
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flag_name(f.name)} must be a finite number, got {value}")
    if cfg.time_budget <= 0:
        raise ConfigError(f"--time-budget must be more than 0, got {format_duration(cfg.time_budget)}: "
                          f"use e.g. 90s, 20m or 8h30m")
    positive = ("batch_size", "z_dim", "g_ch", "d_ch", "n_dis", "g_steps", "n_images")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{_flag_name(name)} must be positive, got {getattr(cfg, name)}")
    not_negative = ("max_kimg", "lecam_weight", "ema_kimg", "max_images", "decode_workers", "fid_samples", "crop_margin",
                    "truncation", "mifid_eps", "min_box")
    for name in not_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{_flag_name(name)} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.hier_z and cfg.arch != "resnet":
        raise ConfigError("--hier-z needs --arch resnet")
    if cfg.draw_res != 64 and cfg.arch != "dcgan":
        raise ConfigError(f"--draw-res {cfg.draw_res} is a DCGAN option (the ResNet G draws at 64): use --arch dcgan")
    try:
        parse_diffaug_policy(cfg.diffaug)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not 0 <= cfg.ada_target <= 1 or cfg.ada_kimg <= 0:
        raise ConfigError(f"--ada-target {cfg.ada_target} must be in [0, 1] (a mean of signs; 0: off) and --ada-kimg "
                          f"{cfg.ada_kimg} more than 0")
    if cfg.ada_target > 0 and not cfg.diffaug:
        raise ConfigError("--ada-target needs a DiffAugment policy to steer: give --diffaug, e.g. translation,cutout")


def strip_jupyter_args(argv: list[str]) -> list[str]:
    """argv without the kernel's own `-f FILE` / `--f=FILE` that Jupyter puts in sys.argv; everything else stays."""
    kept, index = [], 0
    while index < len(argv):
        if argv[index] == "-f" and index + 1 < len(argv):
            index += 2
            continue
        if not argv[index].startswith("--f="):
            kept.append(argv[index])
        index += 1
    return kept


def parse_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Config from command-line flags. In a notebook only Jupyter's own `-f kernel.json` is dropped; any other
    unknown argument is an error there too, so a mistyped flag is never silently ignored.
    `--help` and argparse's errors raise SystemExit after printing (main turns that into a return code)."""
    parser = build_arg_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if running_in_notebook():
        argv = strip_jupyter_args(argv)
    args = parser.parse_args(argv)
    extras = argparse.Namespace(report=getattr(args, "report", None))
    overrides = {k: v for k, v in vars(args).items() if k != "report"}
    return make_config(overrides), extras


def fields_with_role(role: str) -> tuple[str, ...]:
    """Names of the Config fields whose resume role is `role` (one of RESUME_ROLES)."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["resume"] == role)


def recipe_diff(cfg: Config) -> dict:
    """Fields that differ from cfg's recipe as it stands: what the flags (and --demo's run settings) changed."""
    base = Config(**{**RECIPES[cfg.recipe], "recipe": cfg.recipe})
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)
            if getattr(cfg, f.name) != getattr(base, f.name)}

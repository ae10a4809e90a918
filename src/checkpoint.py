"""One ckpt.pt holding everything a run needs to continue: models, optimisers, scalers, counters, RNG, config.

Everything is stored in a form `torch.load(weights_only=True)` accepts (tensors, dicts, lists, numbers,
strings), and written atomically: a reader sees the previous checkpoint or the whole new one.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import random
import time

import numpy as np
import torch

from src.atomic import atomic_path
from src.config import Config, fields_with_role
from src.console import log
from src.ema import standing_bn_stats_
from src.models import build_models
from src.nets import GanNets, LoopState

CKPT_NAME = "ckpt.pt"
CKPT_FORMAT = 2                  # 2: the FID history and best G_ema moved from 'progress' into 'fid'
# Fields named in the line about a checkpoint's missing config fields before the rest are only counted.
CKPT_FIELDS_NAMED = 12
CKPT_REQUIRED_KEYS = ("format", "config", "n_classes", "G", "D", "G_ema", "opt_g", "opt_d", "progress")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run; the message says what to do."""




def ckpt_cpu_copy(obj):
    """A deep copy of nested dicts/lists/tuples with every tensor cloned to the CPU (detached from training)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: ckpt_cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(ckpt_cpu_copy(value) for value in obj)
    return obj


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states as plain lists and tensors (weights_only-safe)."""
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                       float(np_gauss)],
             "torch": torch.get_rng_state(),
             "cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the generator states saved by capture_rng_state() (CUDA only when the device count matches)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def training_snapshot(nets: GanNets, state: LoopState) -> dict:
    """A CPU copy of everything the optimisation changes: the rollback point and the core of a checkpoint."""
    return ckpt_cpu_copy({"G": nets.G.state_dict(), "D": nets.D.state_dict(), "G_ema": nets.G_ema.state_dict(),
                          "opt_g": nets.opt_g.state_dict(), "opt_d": nets.opt_d.state_dict(),
                          "scaler_g": nets.scaler_g.state_dict(), "scaler_d": nets.scaler_d.state_dict(),
                          "progress": dataclasses.asdict(state)})


def restore_training_snapshot(nets: GanNets, snapshot: dict) -> LoopState:
    """Load models, optimisers and scalers from a snapshot or checkpoint (copies: the snapshot stays reusable);
    returns the snapshot's counters."""
    nets.G.load_state_dict(snapshot["G"])
    nets.D.load_state_dict(snapshot["D"])
    nets.G_ema.load_state_dict(snapshot["G_ema"])
    # optimiser tensors already on the right device would be taken over as they are: hand over copies
    nets.opt_g.load_state_dict(ckpt_cpu_copy(snapshot["opt_g"]))
    nets.opt_d.load_state_dict(ckpt_cpu_copy(snapshot["opt_d"]))
    if snapshot.get("scaler_g"):
        nets.scaler_g.load_state_dict(snapshot["scaler_g"])
    if snapshot.get("scaler_d"):
        nets.scaler_d.load_state_dict(snapshot["scaler_d"])
    return LoopState(**snapshot["progress"])


def write_training_checkpoint(path: str, nets: GanNets, state: LoopState, reason: str, **extra) -> None:
    """Save the run to `path` atomically (snapshot + `extra`: config, grid, FID history, RNG); a failed write is
    logged and the previous checkpoint stays."""
    ckpt = training_snapshot(nets, state)
    ckpt.update(format=CKPT_FORMAT, rng=capture_rng_state(), **extra)
    start = time.time()
    try:
        save_checkpoint(path, ckpt)
        log("checkpoint", f"{reason} -> {path} in {time.time() - start:.1f}s")
    except OSError as error:
        log("checkpoint", f"WARNING: could not write {path} ({error}); the previous checkpoint is kept")


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save `state` to `path` atomically (a temporary file beside it, fsynced, then renamed over it)."""
    with atomic_path(path) as tmp_path:
        torch.save(state, tmp_path)


def _ckpt_not_a_file(path: str) -> str:
    """What stands at a checkpoint path that is not a file: 'no such file', 'a directory, ...', ..."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    if os.path.isdir(path):
        return "a directory, not a checkpoint file"
    if os.path.exists(path):
        return "not a regular file (a device, pipe or socket)"
    return "no such file"


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a ckpt.pt written by save_checkpoint; a damaged file raises CheckpointError naming it and the fix."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: {_ckpt_not_a_file(path)}; check the path, or pass --resume \"\" "
                              f"to start fresh")
    advice = (f"delete {path} (or move it away), or pass --resume \"\" to start a fresh run")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise CheckpointError(f"cannot open checkpoint {path} ({error.strerror or error}); {advice}") from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for broken zips / pickles; all mean the same here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is damaged, truncated or not a dogkernel "
                              f"checkpoint ({type(error).__name__}: {reason[:200]}); {advice}") from None
    missing = [key for key in CKPT_REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a dogkernel checkpoint (missing {', '.join(missing)}); {advice}")
    if state["format"] != CKPT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state['format']}, this code reads {CKPT_FORMAT}; {advice}")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} holds no config dict (a {type(state['config']).__name__}): it was not "
                              f"written by dogkernel; {advice}")
    return state


def resolve_resume_path(resume: str, out_dir: str) -> str | None:
    """--resume: '' -> None (fresh run), 'auto' -> OUT/ckpt.pt when it exists, else the given file (must exist).

    'auto' with no OUT/ckpt.pt says so and starts fresh; anything else standing there, or a --resume path that is
    no file, is refused."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(out_dir, CKPT_NAME)
        if os.path.isfile(path):
            return path
        if os.path.lexists(path):
            raise CheckpointError(f"--resume auto: {path} is {_ckpt_not_a_file(path)}; move it away, or pass "
                                  f"--resume \"\" to start fresh")
        log("checkpoint", f"--resume auto: there is no {path}, so training starts fresh")
        return None
    if not os.path.isfile(resume):
        raise CheckpointError(f"--resume {resume}: {_ckpt_not_a_file(resume)}; give an existing ckpt.pt, 'auto', "
                              f"or \"\" to start fresh")
    return resume


def _ckpt_check_value(name: str, value, current) -> None:
    """A setting the resumed run takes from the checkpoint must be of this kernel's type and among its choices: a
    newer kernel's new loss or model, or a foreign file, stops here in one line instead of deep in training."""
    choices = next(f.metadata["choices"] for f in dataclasses.fields(Config) if f.name == name)
    expected = type(current)
    fits = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
    fits = fits or (expected is float and isinstance(value, int) and not isinstance(value, bool))
    if fits and (not choices or value in choices):
        return
    wanted = f"one of {', '.join(map(str, choices))}" if choices else f"a {expected.__name__}"
    raise CheckpointError(f"the checkpoint's config has {name}={value!r}, which this kernel cannot train with "
                          f"(it takes {wanted}): resume with the kernel.py that wrote it, or pass --resume \"\" "
                          f"to start fresh")


def merge_resumed_config(cfg: Config, saved: dict) -> Config:
    """The config a resumed run uses: each field by its resume role in Config (this_run / from_ckpt / model_shape).

    Fields this kernel does not know (the checkpoint was written by a newer kernel.py) are ignored, and fields the
    checkpoint lacks (written by an older one) keep this run's value; each is said in one line.
    """
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(saved) - known)
    if unknown:
        log("checkpoint", f"the checkpoint's config has fields this kernel does not know (written by a newer "
            f"kernel.py?), ignored: {', '.join(unknown)}")
    lacking = [f"{name}={getattr(cfg, name)!r}" for name in sorted(known) if name not in saved]
    if lacking:
        log("checkpoint", f"the checkpoint's config lacks fields of this kernel (written by an older kernel.py?), "
            f"this run's values are used: {', '.join(lacking[:CKPT_FIELDS_NAMED])}"
            + (f" and {len(lacking) - CKPT_FIELDS_NAMED} more" if len(lacking) > CKPT_FIELDS_NAMED else ""))
    shape_fields = fields_with_role("model_shape")
    kept = set(shape_fields + fields_with_role("from_ckpt"))
    from_ckpt = {k: v for k, v in saved.items() if k in kept}
    for name, value in from_ckpt.items():
        _ckpt_check_value(name, value, getattr(cfg, name))
    shape_diffs = [f"{k}={getattr(cfg, k)!r} (checkpoint {v!r})" for k, v in from_ckpt.items()
                   if k in shape_fields and getattr(cfg, k) != v]
    other_diffs = [f"{k}={getattr(cfg, k)!r} (checkpoint {v!r})" for k, v in from_ckpt.items()
                   if k not in shape_fields and getattr(cfg, k) != v]
    if shape_diffs:
        log("checkpoint", "WARNING: model settings differ from the checkpoint's, using the checkpoint's: "
            + ", ".join(shape_diffs))
    if other_diffs:
        log("checkpoint", "training settings come from the checkpoint; ignored here: " + ", ".join(other_diffs))
    return dataclasses.replace(cfg, **from_ckpt)


def open_resume(cfg: Config, out_dir: str) -> tuple[Config, dict | None]:
    """Settle --resume before anything uses the config: (the config this run trains with, the checkpoint or None).
    The checkpoint's "models" are G, D and G_ema (on the CPU) with its weights loaded: the nets the run trains.

    A missing, damaged or foreign checkpoint raises CheckpointError here, before the data is decoded and before any
    output is touched; check_resume_fits_data compares its breeds with the data once that is loaded.
    """
    path = resolve_resume_path(cfg.resume, out_dir)
    if path is None:
        return cfg, None
    saved = load_checkpoint(path)
    merged = merge_resumed_config(cfg, saved["config"])
    G, D = build_models(merged, saved["n_classes"])
    G_ema = copy.deepcopy(G)
    for name, module in (("G", G), ("D", D), ("G_ema", G_ema)):
        try:
            module.load_state_dict(saved[name])
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise CheckpointError(f"{path}: its {name} does not fit the model its config describes ({first[:160]}); "
                                  f"it was written by other code: pass --resume \"\" to start fresh") from None
    saved["path"] = path
    saved["models"] = (G, D, G_ema)  # checked against the checkpoint, and the run trains these: built once
    return merged, saved


def check_resume_fits_data(saved: dict | None, n_classes: int) -> None:
    """A checkpoint trained on other breeds cannot continue on this data."""
    if saved is not None and saved["n_classes"] != n_classes:
        raise CheckpointError(f"{saved['path']} was trained on {saved['n_classes']} breeds, this data has {n_classes}: "
                              f"use the same data, or pass --resume \"\" to start fresh")


def load_generator_from_checkpoint(path: str, cfg: Config, n_classes: int, device) -> torch.nn.Module:
    """G_ema (the best-FID one when the run kept one) from a checkpoint, built with the checkpoint's model config."""
    state = load_checkpoint(path)
    if state["progress"]["step"] == 0:
        raise CheckpointError(f"{path} holds an untrained generator (step 0)")
    if state["n_classes"] != n_classes:
        raise CheckpointError(f"{path} was trained with {state['n_classes']} breeds, this data has {n_classes}")
    merged = merge_resumed_config(cfg, state["config"])
    G_ema, _ = build_models(merged, n_classes)
    best = (state.get("fid") or {}).get("best_G_ema")
    G_ema.load_state_dict(best or state["G_ema"])
    G_ema = G_ema.to(device).requires_grad_(False)
    # the best G_ema was kept with its own BN statistics; the last one carries G's, so they are recomputed
    return G_ema.eval() if best else standing_bn_stats_(G_ema, seed=merged.seed)

"""The run's device settings, decided once from what the device is: precision, torch.compile, batch sizes.

One pure function (`plan_for_device`) turns the device's facts (a `DeviceFacts`, read by `read_device_facts` or
faked in tests) into a `DevicePlan`; `device_plan_line` says it in one line. `check_torch_drives_gpu` stops a run at
start-up when this torch build has no code for the GPU (Kaggle's P100 under a torch built without sm_60).
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

import torch

from src.config import ConfigError

# Saved activations of one training round of the default model (BigGAN-style ResNet, ch 64, 64x64) per image: G's
# forward and D on a real and a fake batch, counted with saved-tensor hooks on the CPU (distinct storages). Under
# bf16 autocast the same count gave 38.9 MiB: norms and losses stay in fp32, so half precision saves ~40 %, not 50 %.
TRAIN_BYTES_PER_IMAGE_FP32 = int(62.9 * 2**20)
HALF_PRECISION_ACTIVATIONS = 0.62
# Share of a GPU's memory the training activations may take; the rest holds the weights, Adam's moments, G_ema,
# cuDNN's workspaces, the allocator's slack and the generation batch.
ACTIVATION_MEMORY_SHARE = 0.5
# Largest suggested batch per GPU. Assumed, not measured: beyond it a 64x64 model's step is compute-bound on these
# GPUs, so a larger batch buys fewer updates rather than more speed.
BATCH_PER_DEVICE_MAX = 256
# On the CPU time, not memory, limits the batch: the Config default.
CPU_BATCH = 64
# Images per forward when generating, by device type, where nothing measured a faster batch (training-time FID, the
# truncation search; the reserve times 64 and 500 at start-up and generates the submission with the faster).
GENERATE_BATCH = {"cpu": 64, "cuda": 500}
# Triton, torch.compile's GPU code generator, needs compute capability 7.0 (Volta) or newer.
TRITON_MIN_CAPABILITY = (7, 0)
# bf16 runs on fast tensor cores from compute capability 8.0 (Ampere) on; below it fp16 with loss scaling.
BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class DeviceFacts:
    """What the run's device is, as far as the settings depend on it."""
    type: str                     # "cuda" | "cpu" | ...
    name: str                     # "Tesla T4", or the CPU's name
    capability: tuple[int, int]   # CUDA compute capability, (0, 0) off CUDA
    total_memory: int             # bytes per device (0 where unknown)
    count: int                    # devices the run trains on (its processes)
    torch_version: str
    triton: bool                  # Triton importable (torch.compile's GPU backend)


@dataclass(frozen=True)
class DevicePlan:
    """The run's device settings."""
    precision: str                # "bf16" | "fp16" | "fp32": the autocast dtype (fp32: none)
    use_scaler: bool              # fp16 needs a loss scaler
    compile: bool                 # torch.compile G and D
    batch_per_device: int         # suggested training batch per device
    batch_size: int               # the same for the whole run (all devices)
    generate_batch: int           # images per forward when generating
    notes: tuple[str, ...]        # requests the device changed, one line each


def pick_precision(amp: str, device_type: str, capability: tuple[int, int]) -> tuple[str, str]:
    """(precision, note): auto is bf16 on CUDA sm >= 8.0, fp16 below (P100, T4), fp32 off CUDA; an explicit amp the
    device cannot run falls back, and the note (else "") says so."""
    on_cuda = device_type == "cuda"
    wanted = amp
    if amp == "auto":
        wanted = ("bf16" if capability >= BF16_MIN_CAPABILITY else "fp16") if on_cuda else "fp32"
    if wanted == "bf16" and on_cuda and capability < BF16_MIN_CAPABILITY:
        return "fp16", (f"bf16 needs compute capability 8.0, this GPU has {capability[0]}.{capability[1]}: "
                        f"using fp16")
    if wanted in ("bf16", "fp16") and not on_cuda:
        return "fp32", f"--amp {wanted} is for CUDA devices; training in fp32 on {device_type}"
    return wanted, ""


def compile_refusal(facts: DeviceFacts) -> str:
    """Why torch.compile cannot run on this device ("" when it can): on CUDA it needs Triton and sm >= 7.0."""
    if facts.type == "cpu":
        return ""
    if facts.type != "cuda":
        return f"torch.compile is not supported here on {facts.type}: running eager"
    if facts.capability < TRITON_MIN_CAPABILITY:
        return (f"torch.compile needs Triton, which needs compute capability 7.0; the {facts.name} has "
                f"{facts.capability[0]}.{facts.capability[1]}: running eager")
    if not facts.triton:
        return "torch.compile needs Triton, which is not installed: running eager"
    return ""


def suggested_batch_per_device(facts: DeviceFacts, precision: str,
                               train_bytes_per_image: int = TRAIN_BYTES_PER_IMAGE_FP32) -> int:
    """The largest power of two up to BATCH_PER_DEVICE_MAX whose training activations fit ACTIVATION_MEMORY_SHARE of
    one GPU's memory (at least 1); CPU_BATCH off CUDA."""
    if facts.type != "cuda" or facts.total_memory <= 0:
        return CPU_BATCH
    per_image = train_bytes_per_image * (1.0 if precision == "fp32" else HALF_PRECISION_ACTIVATIONS)
    fits = int(ACTIVATION_MEMORY_SHARE * facts.total_memory // per_image)
    batch = 1
    while batch * 2 <= min(fits, BATCH_PER_DEVICE_MAX):
        batch *= 2
    return batch


def plan_for_device(facts: DeviceFacts, amp: str = "auto", compile_wanted: bool = False,
                    train_bytes_per_image: int = TRAIN_BYTES_PER_IMAGE_FP32) -> DevicePlan:
    """The run's settings on this device, given what the flags asked for (--amp, --compile)."""
    precision, precision_note = pick_precision(amp, facts.type, facts.capability)
    compile_note = compile_refusal(facts) if compile_wanted else ""
    per_device = suggested_batch_per_device(facts, precision, train_bytes_per_image)
    return DevicePlan(precision=precision, use_scaler=precision == "fp16",
                      compile=compile_wanted and not compile_note, batch_per_device=per_device,
                      batch_size=per_device * max(1, facts.count),
                      generate_batch=GENERATE_BATCH.get(facts.type, GENERATE_BATCH["cuda"]),
                      notes=tuple(note for note in (precision_note, compile_note) if note))


def triton_importable() -> bool:
    """Triton is installed (found without importing it: importing costs seconds)."""
    return importlib.util.find_spec("triton") is not None


def read_device_facts(device: torch.device | str, count: int = 1) -> DeviceFacts:
    """The facts of `device` (creates the CUDA context on a GPU: call it in the process that trains there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceFacts(type=device.type, name=device.type, capability=(0, 0), total_memory=0, count=count,
                           torch_version=torch.__version__, triton=triton_importable())
    props = torch.cuda.get_device_properties(device)
    return DeviceFacts(type="cuda", name=props.name, capability=(props.major, props.minor),
                       total_memory=props.total_memory, count=count, torch_version=torch.__version__,
                       triton=triton_importable())


def device_plan_line(facts: DeviceFacts, plan: DevicePlan) -> str:
    """The plan in one line, e.g. '2 x Tesla T4 (sm 7.5, 15.0 GiB), torch 2.4.1: fp16 + loss scaling, eager, ...'."""
    if facts.type == "cuda":
        device = (f"{facts.count} x {facts.name} (sm {facts.capability[0]}.{facts.capability[1]}, "
                  f"{facts.total_memory / 2**30:.1f} GiB)")
    else:
        device = f"{facts.count} x {facts.type}"
    precision = {"fp16": "fp16 + loss scaling", "bf16": "bf16"}.get(plan.precision, "fp32")
    per = "GPU" if facts.type == "cuda" else "process"
    if facts.type != "cuda":
        batch = "the batch as asked (memory does not limit it here)"
    elif facts.count > 1:
        batch = f"suggested batch {plan.batch_per_device} per {per} ({plan.batch_size} in all)"
    else:
        batch = f"suggested batch {plan.batch_size}"
    notes = "".join(f"; {note}" for note in plan.notes)
    return (f"{device}, torch {facts.torch_version}: {precision}, {'torch.compile' if plan.compile else 'eager'}, "
            f"{batch}, generation batch {plan.generate_batch}{notes}")


# ---- a GPU this torch cannot drive ----------------------------------------------------------------------

def _arch_number(entry: str) -> tuple[str, int, str] | None:
    # "sm_86" -> ("sm", 86, ""), "compute_90a" -> ("compute", 90, "a"); anything else (gfx names) -> None
    found = re.fullmatch(r"(sm|compute)_(\d+)([a-z]?)", entry)
    return (found.group(1), int(found.group(2)), found.group(3)) if found else None


def torch_drives_capability(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """True when the build has code this GPU runs: a cubin of its major version and a minor version no newer
    (sm_80 runs on 8.6), or PTX of any older or equal capability (the driver compiles it). Architecture-specific
    entries (sm_90a) count only for exactly their GPU."""
    major, minor = capability
    device_number = major * 10 + minor
    for kind, number, suffix in filter(None, map(_arch_number, arch_list)):
        if suffix:
            if number == device_number:
                return True
        elif kind == "sm" and number // 10 == major and number % 10 <= minor:
            return True
        elif kind == "compute" and number <= device_number:
            return True
    return False


def unsupported_gpu_message(name: str, capability: tuple[int, int], arch_list: list[str],
                            torch_version: str) -> str:
    """One line saying this torch has no code for the GPU and what to do; "" when it has (or lists no CUDA
    architectures at all: a ROCm or CPU build, which this check cannot judge)."""
    if not any(_arch_number(entry) for entry in arch_list) or torch_drives_capability(capability, arch_list):
        return ""
    sm = f"sm_{capability[0]}{capability[1]}"
    return (f"this torch {torch_version} cannot drive the {name} (compute capability {capability[0]}.{capability[1]}, "
            f"{sm}): it was built for {' '.join(arch_list)}. Install a torch build that includes {sm} (for Pascal "
            f"and Volta GPUs such as the P100: a CUDA 12.6 build) or pick another accelerator in the notebook's "
            f"settings (e.g. GPU T4 x2)")


def check_torch_drives_gpu(device: torch.device) -> None:
    """Raise ConfigError (one line) when `device` is a GPU this torch build has no code for; nothing off CUDA."""
    if device.type != "cuda":
        return
    props = torch.cuda.get_device_properties(device)
    message = unsupported_gpu_message(props.name, (props.major, props.minor), torch.cuda.get_arch_list(),
                                      torch.__version__)
    if message:
        raise ConfigError(message)

"""The one mixed-precision setup: autocast dtype, grad scalers, Adam flavour and memory layout per device."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from src.console import log
from src.device_plan import pick_precision


@dataclass(frozen=True)
class Precision:
    """How the training step runs on this device."""
    device_type: str            # "cuda" | "cpu" | ...
    dtype: torch.dtype | None   # autocast dtype; None: plain fp32
    use_scaler: bool            # fp16 needs a loss scaler (one per optimiser)
    channels_last: bool         # NHWC activations and weights

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")


def choose_precision(amp: str, device: torch.device | str, channels_last: bool = True) -> Precision:
    """The Precision of `amp` on `device`, as device_plan.pick_precision decides it (auto: bf16 on CUDA sm >= 8.0,
    fp16 + GradScaler below, fp32 on the CPU); an explicit amp the device cannot run falls back with a one-line note.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if on_cuda else (0, 0)
    name, note = pick_precision(amp, device.type, tuple(capability))
    if note:
        log("precision", note)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
    return Precision(device_type=device.type, dtype=dtype, use_scaler=name == "fp16",
                     channels_last=bool(channels_last) and on_cuda)


def precision_autocast(precision: Precision):
    """The autocast context of the forward passes (a no-op in fp32)."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=precision.device_type, dtype=precision.dtype)


def autocast_disabled(precision: Precision):
    """A context that turns autocast off (e.g. for the double-backward of a gradient penalty)."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=precision.device_type, enabled=False)


def make_grad_scaler(precision: Precision):
    """A GradScaler (enabled only for fp16); a disabled one passes losses and steps straight through."""
    if not hasattr(torch.amp, "GradScaler"):  # torch < 2.3 (older Kaggle images)
        return torch.cuda.amp.GradScaler(enabled=precision.use_scaler)
    return torch.amp.GradScaler(precision.device_type if precision.use_scaler else "cpu",
                                enabled=precision.use_scaler)


def make_adam(params, lr: float, betas: tuple[float, float], precision: Precision) -> torch.optim.Adam:
    """Adam with the fused CUDA kernel on the GPU, the foreach implementation elsewhere."""
    if precision.device_type == "cuda":
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def to_memory_format(x: torch.Tensor, precision: Precision) -> torch.Tensor:
    """NCHW -> channels_last when the setup uses it (4-d tensors only)."""
    if precision.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def place_module(module: torch.nn.Module, device, precision: Precision) -> torch.nn.Module:
    """Move a model to the device in the setup's memory format."""
    module = module.to(device)
    if precision.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def configure_backends(device) -> None:
    """Speed settings for CUDA: cuDNN autotuning (fixed shapes) and TF32 matmuls/convs on sm >= 8.0.

    They make GPU runs differ from each other in the last bits; CPU runs stay bit-reproducible.
    """
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

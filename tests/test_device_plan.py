"""The device decides the run's settings once (src/device_plan.py), a torch without code for the GPU stops at
start-up in one line, and a failing torch.compile falls back to eager (src/compile_fallback.py). No GPU is needed:
the device properties and the arch lists are faked."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from src.compile_fallback import compile_or_eager
from src.config import ConfigError
from src.device_plan import (DeviceFacts, check_torch_drives_gpu, device_plan_line, plan_for_device,
                             torch_drives_capability, unsupported_gpu_message)
from src.distributed import dist_resolve_device
from src.main import main

GiB = 2**30


def cuda(name: str, capability: tuple[int, int], memory: int, count: int = 1, triton: bool = True) -> DeviceFacts:
    return DeviceFacts(type="cuda", name=name, capability=capability, total_memory=memory, count=count,
                       torch_version="2.4.1", triton=triton)


CPU = DeviceFacts(type="cpu", name="cpu", capability=(0, 0), total_memory=0, count=1, torch_version="2.4.1",
                  triton=False)
# total_memory as torch reports these cards
P100 = cuda("Tesla P100-PCIE-16GB", (6, 0), 17_071_734_784)
T4 = cuda("Tesla T4", (7, 5), 15_835_398_144)
A100_40 = cuda("NVIDIA A100-SXM4-40GB", (8, 0), 42_505_273_344)
A100_80 = cuda("NVIDIA A100-SXM4-80GB", (8, 0), 85_899_345_920)
H100 = cuda("NVIDIA H100 80GB HBM3", (9, 0), 85_045_231_616)

# Suggested batch: the largest power of two (<= 256) whose activations, 62.9 MiB per image in fp32 and 0.62 of that
# in fp16/bf16, fit half the card: T4 0.5 * 15.8e9 / 40.9e6 = 193 -> 128; P100 208 -> 128; A100-40 519 -> 256 (cap).
PLANS = [
    # facts, amp, compile asked -> precision, scaler, compile, batch per device, whole batch, generation batch
    (P100, "auto", True, ("fp16", True, False, 128, 128, 500)),
    (T4, "auto", True, ("fp16", True, True, 128, 128, 500)),
    (cuda("Tesla T4", (7, 5), 15_835_398_144, count=2), "auto", False, ("fp16", True, False, 128, 256, 500)),
    (A100_40, "auto", True, ("bf16", False, True, 256, 256, 500)),
    (A100_80, "auto", False, ("bf16", False, False, 256, 256, 500)),
    (H100, "auto", True, ("bf16", False, True, 256, 256, 500)),
    (H100, "fp16", False, ("fp16", True, False, 256, 256, 500)),
    (T4, "fp32", False, ("fp32", False, False, 64, 64, 500)),   # 0.5 * 15.8e9 / 66.0e6 = 120 -> 64
    (CPU, "auto", False, ("fp32", False, False, 64, 64, 64)),
    (CPU, "auto", True, ("fp32", False, True, 64, 64, 64)),     # on the CPU compile runs only when asked
]


@pytest.mark.parametrize("facts, amp, compile_wanted, expected", PLANS,
                         ids=["P100", "T4", "2xT4", "A100-40", "A100-80", "H100", "H100-fp16", "T4-fp32", "CPU",
                              "CPU-compile"])
def test_the_plan_of_each_device(facts, amp, compile_wanted, expected):
    plan = plan_for_device(facts, amp=amp, compile_wanted=compile_wanted)
    assert (plan.precision, plan.use_scaler, plan.compile, plan.batch_per_device, plan.batch_size,
            plan.generate_batch) == expected
    if compile_wanted and not plan.compile:
        assert len(plan.notes) == 1


@pytest.mark.parametrize("facts, amp, compile_wanted, note", [
    (P100, "auto", True, "torch.compile needs Triton, which needs compute capability 7.0; the Tesla P100-PCIE-16GB "
                         "has 6.0: running eager"),
    (cuda("Tesla T4", (7, 5), 15_835_398_144, triton=False), "auto", True,
     "torch.compile needs Triton, which is not installed: running eager"),
    (T4, "bf16", False, "bf16 needs compute capability 8.0, this GPU has 7.5: using fp16"),
    (CPU, "fp16", False, "--amp fp16 is for CUDA devices; training in fp32 on cpu"),
])
def test_a_request_the_device_cannot_run_is_changed_with_a_note(facts, amp, compile_wanted, note):
    plan = plan_for_device(facts, amp=amp, compile_wanted=compile_wanted)
    assert plan.notes == (note,)
    assert not plan.compile and plan.precision in ("fp16", "fp32")


def test_the_plan_is_said_in_one_line():
    two_t4 = cuda("Tesla T4", (7, 5), 15_835_398_144, count=2)
    assert device_plan_line(two_t4, plan_for_device(two_t4)) == (
        "2 x Tesla T4 (sm 7.5, 14.7 GiB), torch 2.4.1: fp16 + loss scaling, eager, suggested batch 128 per GPU "
        "(256 in all), generation batch 500")
    assert device_plan_line(P100, plan_for_device(P100, compile_wanted=True)) == (
        "1 x Tesla P100-PCIE-16GB (sm 6.0, 15.9 GiB), torch 2.4.1: fp16 + loss scaling, eager, suggested batch 128, "
        "generation batch 500; torch.compile needs Triton, which needs compute capability 7.0; the Tesla "
        "P100-PCIE-16GB has 6.0: running eager")
    # the CPU's batch is whatever the run asked for: no suggested batch that the run does not use
    assert device_plan_line(CPU, plan_for_device(CPU)) == (
        f"1 x cpu, torch 2.4.1: fp32, eager, the batch as asked (memory does not limit it here), generation batch "
        f"{plan_for_device(CPU).generate_batch}")


# ---- a GPU this torch cannot drive ----------------------------------------------------------------------

NEW_TORCH = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]     # a CUDA 12.8+ build: no Pascal
OLD_TORCH = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize("capability, arch_list, drives", [
    ((6, 0), NEW_TORCH, False),                   # Kaggle's P100 under a cu128 torch
    ((6, 0), OLD_TORCH, True),
    ((7, 5), NEW_TORCH, True),
    ((8, 9), ["sm_80", "sm_90"], True),           # an sm_80 cubin runs on 8.9 (same major, older minor)
    ((9, 0), ["sm_80", "sm_86"], False),          # no cubin of major 9 and no PTX
    ((9, 0), ["sm_80", "compute_80"], True),      # PTX of 8.0: the driver compiles it for 9.0
    ((7, 0), ["sm_75", "compute_75"], False),     # PTX newer than the GPU does not run
    ((9, 0), ["sm_90a"], True),                   # an arch-specific cubin runs on exactly its GPU
    ((10, 0), ["sm_90a", "compute_90a"], False),  # ... and nowhere else
])
def test_whether_a_build_drives_a_capability(capability, arch_list, drives):
    assert torch_drives_capability(capability, arch_list) is drives


def test_an_undriveable_gpu_is_one_line_naming_it_the_arch_list_and_what_to_do():
    message = unsupported_gpu_message("Tesla P100-PCIE-16GB", (6, 0), NEW_TORCH, "2.9.0+cu128")
    assert message == ("this torch 2.9.0+cu128 cannot drive the Tesla P100-PCIE-16GB (compute capability 6.0, sm_60): "
                       "it was built for sm_75 sm_80 sm_86 sm_90 sm_100 sm_120. Install a torch build that includes "
                       "sm_60 (for Pascal and Volta GPUs such as the P100: a CUDA 12.6 build) or pick another "
                       "accelerator in the notebook's settings (e.g. GPU T4 x2)")
    assert "\n" not in message
    assert unsupported_gpu_message("Tesla T4", (7, 5), NEW_TORCH, "2.9.0+cu128") == ""
    assert unsupported_gpu_message("AMD Instinct MI300X", (9, 4), ["gfx90a", "gfx942"], "2.9.0+rocm6.4") == ""
    assert unsupported_gpu_message("Tesla P100-PCIE-16GB", (6, 0), [], "2.4.1+cpu") == ""


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], arch_list: list[str]) -> None:
    props = SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=16 * GiB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))


def test_start_up_refuses_a_gpu_this_torch_cannot_drive(monkeypatch, tmp_path, capsys):
    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0), NEW_TORCH)
    with pytest.raises(ConfigError, match=re.escape("cannot drive the Tesla P100-PCIE-16GB (compute capability 6.0")):
        check_torch_drives_gpu(torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="sm_60"):
        dist_resolve_device("auto")
    # through the whole start-up: one line on stderr, exit code 2, nothing written
    assert main(["--device", "cuda", "--demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[dogkernel] error: this torch ") and "sm_60" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_driveable_gpu_and_the_cpu_pass_the_check(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5), NEW_TORCH)
    check_torch_drives_gpu(torch.device("cuda", 0))
    check_torch_drives_gpu(torch.device("cpu"))  # never asks CUDA


# ---- torch.compile falling back to eager ----------------------------------------------------------------

class Doubler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.scale


def test_a_compile_failing_on_its_first_call_falls_back_to_eager_in_one_line(capsys):
    calls = []

    def broken_compile(module):
        def compiled(x):
            calls.append(x)
            raise RuntimeError("Found Tesla P100-PCIE-16GB which is too old to be supported by the triton GPU "
                               "compiler, which is used as the backend.\nTriton only supports devices of CUDA "
                               "Capability >= 7.0")
        return compiled

    D = compile_or_eager(Doubler(), "D", compile_fn=broken_compile)
    x = torch.arange(3.0)
    assert torch.equal(D(x), 2 * x) and torch.equal(D(x), 2 * x)
    assert len(calls) == 1  # after the failure the compiled path is not tried again
    assert capsys.readouterr().out.splitlines() == [
        "[compile] torch.compile of D failed (RuntimeError: Found Tesla P100-PCIE-16GB which is too old to be "
        "supported by the triton GPU compiler, which is used as the backend.); running D eager"]
    assert list(D.state_dict()) == ["eager.scale"]


def test_after_a_compiled_call_worked_errors_are_the_models_and_out_of_memory_always_propagates(capsys):
    outcomes = iter(["ok", RuntimeError("shape mismatch")])

    def flaky_compile(module):
        def compiled(x):
            outcome = next(outcomes)
            if isinstance(outcome, Exception):
                raise outcome
            return module(x) + 1
        return compiled

    D = compile_or_eager(Doubler(), "D", compile_fn=flaky_compile)
    assert torch.equal(D(torch.ones(2)), torch.full((2,), 3.0))  # the compiled path ran
    with pytest.raises(RuntimeError, match="shape mismatch"):
        D(torch.ones(2))

    def out_of_memory(module):
        def compiled(x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return compiled

    with pytest.raises(torch.cuda.OutOfMemoryError):
        compile_or_eager(Doubler(), "G", compile_fn=out_of_memory)(torch.ones(2))
    assert capsys.readouterr().out == ""

"""Multi-GPU training: process-group set-up, and the few collectives the training loop needs.

The ranks are started by src/launch.py (one forked process per GPU, from a plain `python kernel.py` or a notebook
cell) or by `torchrun --standalone --nproc_per_node=2 kernel.py ...`; both set the torchrun environment read here.
With one process (world_size 1) nothing here talks to other processes.
"""
from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from src.config import ConfigError
from src.console import log
from src.device_plan import check_torch_drives_gpu

# Under DDP the ranks agree on stop/tick decisions every this many training rounds (one small all-reduce).
DDP_SYNC_STEPS = 20


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool       # rank 0: the only process that writes files and prints status


def dist_resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' / 'cuda:N' must exist, and this torch must have code for it."""
    if device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        resolved = torch.device(device)
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    check_torch_drives_gpu(resolved)
    return resolved


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU), else a single process.

    Under torchrun each rank uses cuda:LOCAL_RANK (or the CPU when there is no GPU or --device cpu).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dist_resolve_device(device), is_main=True)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        rank_device = torch.device("cuda", local_rank)
        check_torch_drives_gpu(rank_device)
    else:
        rank_device = torch.device("cpu")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    if rank == 0:
        log("distributed", f"{world_size} processes, backend {torch_dist.get_backend()}")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=rank_device, is_main=rank == 0)


# Seconds without the GIL before leaving the process group. Older torch (2.4 at least; pytorch PR #154976, 2025,
# fixed it) destroys a gloo group holding the GIL while it joins gloo's worker threads, and a worker that is still
# dropping the tensors of the last collective needs the GIL for that: a rank hung there for good (seen on torch
# 2.4.1 after training's last all-reduce). Sleeping lets such a worker finish first.
GLOO_WORKERS_SETTLE_S = 0.2


def cleanup_distributed() -> None:
    """Leave the process group (no-op for a single process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        time.sleep(GLOO_WORKERS_SETTLE_S)
        torch_dist.destroy_process_group()


def current_dist_info(device: torch.device | str) -> DistInfo:
    """The rank and world size of this process as the process group knows them (1 process when there is none)."""
    device = torch.device(device)
    if torch_dist.is_available() and torch_dist.is_initialized():
        rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
        return DistInfo(rank=rank, world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", rank)),
                        device=device, is_main=rank == 0)
    return DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)


def any_rank_flags(flags: list[bool], device: torch.device, world_size: int) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one tiny all-reduce), so every rank takes the same branch.

    Used for the stop / tick / snapshot decisions: if rank 0's clock says stop, or any rank caught SIGTERM,
    all ranks stop after the same step and no rank waits forever in a gradient all-reduce.
    """
    if world_size <= 1:
        return list(flags)
    flag_tensor = torch.tensor([float(f) for f in flags], device=device)
    torch_dist.all_reduce(flag_tensor, op=torch_dist.ReduceOp.MAX)
    return [bool(v) for v in flag_tensor.tolist()]


def max_over_ranks(value: float, device: torch.device, world_size: int) -> float:
    """The largest of one number over all ranks (one tiny all-reduce), so every rank plans with the same figure."""
    if world_size <= 1:
        return value
    value_tensor = torch.tensor([float(value)], device=device)
    torch_dist.all_reduce(value_tensor, op=torch_dist.ReduceOp.MAX)
    return float(value_tensor.item())


def mean_over_ranks(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """The mean of a tensor over ranks (SUM / world_size: gloo has no AVG)."""
    if world_size <= 1:
        return values
    summed = values.clone()
    torch_dist.all_reduce(summed, op=torch_dist.ReduceOp.SUM)
    return summed / world_size


def wrap_ddp(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around `module` when world_size > 1 (else the module itself).

    No buffer broadcast at each DDP forward (broadcast_buffers=False): D runs twice per step (real, then fake), and
    on torch 2.4 the broadcast before the second forward overwrote buffers the first one had saved for backward
    (BatchNorm's running stats, SN's u/v: "modified by an inplace operation"). Rank 0's buffers are copied once
    here, as DDP copies the weights. After that nothing in training reads another rank's buffers: SN's u/v advance
    by the same explicit power iteration on the same weights on every rank, and BatchNorm's running statistics,
    each rank's own, serve only in eval mode, after sync_buffers() copied rank 0's (which are what the broadcast
    kept: rank 0 was its source). BatchNorm normalises with each rank's own batch statistics (no SyncBatchNorm).
    """
    if info.world_size <= 1:
        return module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    sync_buffers(module, info.world_size)
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **no_forward_buffer_sync())


def no_forward_buffer_sync() -> dict:
    """DistributedDataParallel's keyword for "no buffer broadcast at each forward": newer torch calls it
    forward_sync_buffers (and warns about the old name), torch 2.4 knows only broadcast_buffers."""
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def sync_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Copy rank 0's buffers (running stats, power-iteration vectors) to every rank."""
    if world_size <= 1:
        return
    for buffer in module.buffers():
        torch_dist.broadcast(buffer.data, src=0)

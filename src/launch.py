"""Every visible GPU from one notebook cell: the run starts one training process per GPU itself, as torchrun would.

A notebook's Run button gives one process, and functions defined in a pasted cell cannot be pickled for a spawned
one. So the processes are forked (Hugging Face Accelerate's notebook_launcher does the same): each child inherits
the parent's objects and calls the same run as under torchrun, with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT set (setup_distributed joins the group from them). A GPU cannot be used in a child when the parent
created a CUDA context before the fork, so the parent only counts the GPUs (NVML: torch.cuda.device_count()).

The parent supervises: SIGINT (a notebook's Interrupt, Ctrl-C) and SIGTERM are passed on to every rank, whose
training saves a checkpoint and rank 0 still writes images.zip; a rank that dies ends the run in one line naming it,
and the others get WORKER_STOP_GRACE_S to end by themselves before SIGKILL, as do ranks still running that long after
rank 0 ended (a hang in their teardown must not hold the cell). The children die with the parent
(PR_SET_PDEATHSIG on Linux), so a killed notebook kernel leaves nothing on the GPUs.
On the CPU (`--device cpu`, or no GPU) `--gpus N` starts N processes on the gloo backend.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time

import torch

from src.config import Config, ConfigError
from src.console import log
from src.interrupt import handling_stop_signals

# After a rank died, the others get this long to end by themselves, then SIGKILL. On gloo a survivor's next collective
# fails at once and rank 0 goes on to write images.zip (from the last checkpoint), which a SIGTERM would stop; on NCCL
# a survivor waits on the dead peer until NCCL's own timeout, so only SIGKILL ends it.
WORKER_STOP_GRACE_S = 60.0
# linux/prctl.h: deliver a signal to this process when the thread that forked it ends.
PR_SET_PDEATHSIG = 1


def visible_gpu_count() -> int:
    """CUDA devices this process may use, counted without creating a CUDA context (NVML where it answers)."""
    return torch.cuda.device_count()


def worker_count(gpus: int, device: str, visible_gpus: int) -> int:
    """Processes the run trains on. On CUDA: --gpus 0 means every visible GPU, N at most those; a named GPU
    (cuda:N) is one process. On the CPU (--device cpu, or auto without a GPU): N processes for --gpus N, else one."""
    if gpus < 0:
        raise ConfigError(f"--gpus must be 0 (every visible GPU) or more, got {gpus}")
    on_cpu = device == "cpu" or (device == "auto" and visible_gpus == 0)
    if on_cpu:
        return max(1, gpus)
    if device not in ("auto", "cuda"):
        if gpus > 1:
            raise ConfigError(f"--gpus {gpus} with --device {device}: one named device is one process; "
                              f"use --device cuda (or auto) to train on several GPUs")
        return 1
    if gpus > visible_gpus > 0:
        raise ConfigError(f"--gpus {gpus}: only {visible_gpus} CUDA device(s) are visible here")
    return gpus or max(1, visible_gpus)


def started_by_a_launcher() -> bool:
    """True under torchrun or in a process this module started (both set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def wants_workers(cfg: Config) -> bool:
    """True when this run should start several training processes itself (see worker_count)."""
    return not started_by_a_launcher() and worker_count(cfg.gpus, cfg.device, visible_gpu_count()) > 1


def free_port() -> int:
    """A TCP port free on this machine now, for rank 0's rendezvous store."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent ends (a killed notebook kernel leaves no training on the
    GPUs); if the parent is already gone, end now. Elsewhere nothing (the parent still stops its children)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def become_rank(rank: int, world_size: int, port: int, parent_pid: int) -> None:
    """In a forked child: the signals, process group and environment of one torchrun-style rank."""
    # the parent's forwarding handler was inherited; the run installs its own handlers from here on
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # a group of its own: a terminal's Ctrl-C (or a notebook's group-wide Interrupt) reaches the parent alone, which
    # passes it on once, instead of every rank seeing it twice
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    die_with_parent(parent_pid)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the ranks share the machine's cores (torchrun sets one thread per process)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // world_size)))


def _rank_process_main(rank: int, world_size: int, port: int, parent_pid: int, worker) -> None:
    # the child's whole life: multiprocessing exits the process with the SystemExit's code
    become_rank(rank, world_size, port, parent_pid)
    raise SystemExit(worker())


def exit_code_of_process(exitcode: int) -> int:
    """multiprocessing's exitcode as a shell reports it: -N (killed by signal N) -> 128 + N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def describe_exit(exitcode: int) -> str:
    """'exited with code 3' / 'was killed by SIGKILL'."""
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        return f"was killed by {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"was killed by signal {-exitcode}"


def start_rank_processes(world_size: int, worker, processes: list) -> None:
    """Fork one process per rank, each running worker() as that rank, appending each to `processes` as it starts
    (so that a signal during the start reaches those already running)."""
    context = multiprocessing.get_context("fork")
    port, parent_pid = free_port(), os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()  # a child must not print the parent's buffered output again
    for rank in range(world_size):
        process = context.Process(target=_rank_process_main, name=f"dogkernel-rank{rank}",
                                  args=(rank, world_size, port, parent_pid, worker))
        process.start()
        processes.append(process)


def forward_signals_to(processes: list):
    """A signal handler passing SIGINT/SIGTERM on to every rank still running. A child that inherits it before
    become_rank replaces it must not signal its siblings: there it does nothing."""
    owner = os.getpid()

    def forward(signum, frame):
        if os.getpid() != owner:
            return
        for process in processes:
            if process.exitcode is None:
                os.kill(process.pid, signum)

    return forward


def supervise(processes: list, grace_s: float) -> int:
    """Wait for every rank. The first to end non-zero is named in one line, and the others get grace_s seconds to
    end by themselves before SIGKILL; so do ranks still running grace_s after rank 0 ended (they have nothing left to
    do then: a hang in their teardown must not hold the cell). Returns the first failing rank's exit code, else
    rank 0's, as a shell reports it."""
    failed = None          # multiprocessing exitcode of the first rank that ended non-zero
    kill_at = None         # when the ranks still running get SIGKILL
    killed = set()         # pids sent SIGKILL
    while any(process.exitcode is None for process in processes):
        timeout = 1.0 if kill_at is None else max(0.0, min(1.0, kill_at - time.time()))
        multiprocessing.connection.wait([p.sentinel for p in processes if p.exitcode is None], timeout)
        for rank, process in enumerate(processes):
            if failed is None and process.exitcode not in (None, 0) and process.pid not in killed:
                failed, kill_at = process.exitcode, time.time() + grace_s
                alive = any(p.exitcode is None for p in processes)
                stopping = f": the other rank(s) get {grace_s:.0f}s to end, then SIGKILL" if alive else ""
                log("launch", f"rank {rank} (pid {process.pid}) {describe_exit(process.exitcode)}{stopping}",
                    error=True)
        if kill_at is None and processes[0].exitcode is not None:
            kill_at = time.time() + grace_s
        if kill_at is not None and time.time() >= kill_at:
            for rank, process in enumerate(processes):
                if process.exitcode is None and process.pid not in killed:
                    if failed is None:  # after a failure its line said so already
                        log("launch", f"rank {rank} (pid {process.pid}) was still running {grace_s:.0f}s after "
                            f"rank 0 ended: killed", error=True)
                    process.kill()
                    killed.add(process.pid)
    for process in processes:
        process.join()
    log("launch", "exit codes: " + ", ".join(f"rank {rank} {describe_exit(p.exitcode)}"
                                              for rank, p in enumerate(processes)))
    return exit_code_of_process(failed if failed is not None else processes[0].exitcode)


def launch_workers(cfg: Config, worker) -> int:
    """Run worker() (the whole run, e.g. main() again) in one forked process per GPU, or per --gpus on the CPU;
    returns the exit code (see supervise). The parent does no CUDA work, so the children can."""
    visible = visible_gpu_count()
    world_size = worker_count(cfg.gpus, cfg.device, visible)
    where = "on the CPU, backend gloo" if cfg.device == "cpu" or visible == 0 else "one per GPU, backend nccl"
    processes: list = []
    with handling_stop_signals(forward_signals_to(processes)):
        start_rank_processes(world_size, worker, processes)
        log("launch", f"{world_size} training processes ({where}): "
            + ", ".join(f"rank {rank} pid {p.pid}" for rank, p in enumerate(processes))
            + "; rank 0 prints and writes the files")
        return supervise(processes, WORKER_STOP_GRACE_S)

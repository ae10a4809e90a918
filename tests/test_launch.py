"""One process per GPU from one cell (src/launch.py): how many, the torchrun environment of each rank, a parent that
never touches CUDA, signals passed on, a dead rank named in one line; and the whole demo on two gloo CPU ranks, from
an IPython shell (Interrupt) and from a shell (a rank killed)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

import src.launch as launch
from src.config import ConfigError, make_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("gpus, device, visible, expected", [
    (0, "auto", 2, 2), (1, "auto", 2, 1), (2, "auto", 2, 2), (0, "cuda", 2, 2), (0, "cuda:1", 2, 1),
    (0, "auto", 1, 1), (0, "auto", 0, 1), (2, "auto", 0, 2), (2, "cpu", 2, 2), (0, "cpu", 2, 1),
])
def test_worker_count_by_flags_and_visible_gpus(gpus, device, visible, expected):
    assert launch.worker_count(gpus, device, visible) == expected


@pytest.mark.parametrize("gpus, device, visible, message", [
    (3, "auto", 2, "--gpus 3: only 2 CUDA device(s) are visible here"),
    (2, "cuda:1", 2, "--gpus 2 with --device cuda:1: one named device is one process"),
    (-1, "auto", 2, "--gpus must be 0 (every visible GPU) or more, got -1"),
])
def test_impossible_gpu_counts_are_one_line(gpus, device, visible, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        launch.worker_count(gpus, device, visible)


def _forbid_cuda_context(monkeypatch, visible: int) -> None:
    # the parent may count GPUs (NVML) and nothing else: any call that would create a CUDA context fails the test
    def forbidden(*args, **kwargs):
        raise AssertionError("the parent created a CUDA context before forking")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    for name in ("is_available", "init", "_lazy_init", "current_device", "get_device_properties",
                 "get_device_capability", "get_device_name", "set_device"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", forbidden, raising=False)


def test_ranks_get_the_torchrun_environment_and_the_parent_no_cuda_context(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _forbid_cuda_context(monkeypatch, visible=2)
    cfg = make_config({})  # --gpus 0, --device auto: every visible GPU

    def worker():
        record = {name: os.environ[name] for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        record.update(pid=os.getpid(), own_group=os.getpgid(0) == os.getpid(),
                      sigint_default=signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        (tmp_path / f"rank{record['RANK']}.json").write_text(json.dumps(record))
        return 0

    handlers_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert launch.wants_workers(cfg)
    assert launch.launch_workers(cfg, worker) == 0
    assert not torch.cuda.is_initialized()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers_before
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for r in ranks] == [("0", "0", "2"), ("1", "1", "2")]
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.1"} and len({r["MASTER_PORT"] for r in ranks}) == 1
    assert all(r["own_group"] and r["sigint_default"] and r["pid"] != os.getpid() for r in ranks)
    out = capfd.readouterr().out
    assert re.search(r"\[launch\] 2 training processes \(one per GPU, backend nccl\): rank 0 pid \d+, rank 1 pid \d+",
                     out)
    assert "[launch] exit codes: rank 0 exited with code 0, rank 1 exited with code 0" in out
    monkeypatch.setenv("WORLD_SIZE", "2")  # inside a rank (or under torchrun) nothing more is started
    assert not launch.wants_workers(cfg)


def test_a_signal_to_the_parent_reaches_every_rank(tmp_path, monkeypatch):
    cfg = make_config({"device": "cpu", "gpus": 2})

    def worker():
        caught = []
        signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
        (tmp_path / f"ready{os.environ['RANK']}").touch()
        deadline = time.time() + 20
        while not caught and time.time() < deadline:
            time.sleep(0.05)
        return 0 if caught else 5

    def interrupt_when_ready():
        while not all((tmp_path / f"ready{rank}").exists() for rank in range(2)):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    assert launch.launch_workers(cfg, worker) == 0  # each rank caught the SIGINT (else it returns 5)


def test_a_killed_rank_is_named_in_one_line_and_no_rank_outlives_the_run(monkeypatch, capfd):
    monkeypatch.setattr(launch, "WORKER_STOP_GRACE_S", 1.0)
    cfg = make_config({"device": "cpu", "gpus": 2})

    def worker():
        if os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank stuck in a collective: only SIGKILL ends it
        time.sleep(60)
        return 0

    start = time.time()
    assert launch.launch_workers(cfg, worker) == 128 + signal.SIGKILL
    assert time.time() - start < 15
    captured = capfd.readouterr()
    pids = [int(pid) for pid in re.findall(r"rank \d pid (\d+)", captured.out)]
    assert len(pids) == 2
    assert captured.err.splitlines() == [f"[launch] rank 1 (pid {pids[1]}) was killed by SIGKILL: the other rank(s) "
                                         f"get 1s to end, then SIGKILL"]
    assert "[launch] exit codes: rank 0 was killed by SIGKILL, rank 1 was killed by SIGKILL" in captured.out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_rank_still_running_after_rank_0_ended_is_killed_and_the_run_keeps_rank_0s_code(monkeypatch, capfd):
    monkeypatch.setattr(launch, "WORKER_STOP_GRACE_S", 1.0)
    cfg = make_config({"device": "cpu", "gpus": 2})

    def worker():
        if os.environ["RANK"] == "0":
            return 0
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # hung in its teardown (seen: torch 2.4's gloo group)
        time.sleep(60)
        return 0

    start = time.time()
    assert launch.launch_workers(cfg, worker) == 0
    assert time.time() - start < 15
    captured = capfd.readouterr()
    pid = int(re.search(r"rank 1 pid (\d+)", captured.out).group(1))
    assert captured.err.splitlines() == [f"[launch] rank 1 (pid {pid}) was still running 1s after rank 0 ended: killed"]
    assert "[launch] exit codes: rank 0 exited with code 0, rank 1 was killed by SIGKILL" in captured.out


PARENT = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
from src.config import make_config
from src.launch import launch_workers

def worker():
    time.sleep(60)
    return 0

launch_workers(make_config({"device": "cpu", "gpus": 2}), worker)
'''


def process_is_gone(pid: int) -> bool:
    """No such process, or a zombie waiting for a reaper (its parent was killed)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.split()[:2] == ["State:", "Z"] for line in status)
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_ranks_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    process = subprocess.Popen([sys.executable, str(script), str(ROOT)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        pids = [int(pid) for pid in re.findall(r"pid (\d+)", process.stdout.readline())]
        assert len(pids) == 2
        process.kill()  # a notebook kernel restarted or killed outright: no chance to stop its children
        process.wait(timeout=10)
        deadline = time.time() + 10
        while not all(map(process_is_gone, pids)) and time.time() < deadline:
            time.sleep(0.05)
        assert all(map(process_is_gone, pids))
    finally:
        process.kill()


# ---- the whole demo on two gloo CPU ranks -------------------------------------------------------------------

DEMO_FLAGS = ["--demo", "--gpus", "2", "--time-budget", "90s", "--n-images", "200"]

NOTEBOOK = r'''
import sys
from IPython.core.interactiveshell import InteractiveShell

kernel_text, flags = open(sys.argv[1]).read(), sys.argv[2:]
shell = InteractiveShell.instance()
jupyter = ["/opt/conda/lib/python3.10/site-packages/ipykernel_launcher.py", "-f", "/root/kernel-1.json"]
shell.run_cell(f"import sys; sys.argv = {jupyter + flags!r}")
result = shell.run_cell(kernel_text)
error = result.error_before_exec or result.error_in_exec
print(f"CELL ERROR {type(error).__name__}: {error}" if error else "CELL OK", flush=True)
shell.run_cell("print('NEXT CELL RAN', flush=True)")
'''


class LineReader:
    """The lines of a process's stdout (stderr merged), collected by a thread; wait_for() a pattern."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(process.stdout.readline, "")),
                                       daemon=True)
        self.thread.start()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f}s:\n" + "".join(self.lines)[-4000:])

    def text(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.lines)


def start(command: list[str], cwd: Path) -> tuple[subprocess.Popen, LineReader]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE", "RANK")}
    process = subprocess.Popen(command, cwd=cwd, env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    return process, LineReader(process)


def rank_pids(reader: LineReader) -> list[int]:
    found = reader.wait_for(r"\[launch\] 2 training processes \(on the CPU, backend gloo\): rank 0 pid (\d+), "
                            r"rank 1 pid (\d+); rank 0 prints and writes the files", 60)
    return [int(found.group(1)), int(found.group(2))]


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.skipif(importlib.util.find_spec("IPython") is None, reason="IPython is not installed")
def test_two_cpu_ranks_from_a_notebook_cell_train_and_an_interrupt_leaves_ckpt_and_zip(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "notebook.py"
    script.write_text(NOTEBOOK)
    process, reader = start([sys.executable, str(script), str(ROOT / "kernel.py"), *DEMO_FLAGS, "--out", str(out)],
                            tmp_path)
    try:
        pids = rank_pids(reader)
        reader.wait_for(r"^\[train\] step \d+ ", 120)
        process.send_signal(signal.SIGINT)  # the notebook's Interrupt
        process.wait(timeout=120)
    finally:
        process.kill()
    log = reader.text()
    assert process.returncode == 0, log[-4000:]
    assert "CELL OK" in log and log.count("NEXT CELL RAN") == 1  # no rank came back into the notebook
    assert "[distributed] 2 processes, backend gloo" in log and "[train] device cpu (1 threads) x2" in log
    # rank 0 alone prints: one banner, one line per event
    assert log.count("[main] dogkernel: recipe demo") == 1
    assert log.count("[train] caught SIGINT: finishing this step, saving a checkpoint, stopping") == 1
    assert "[main] training stopped (signal)" in log
    assert "[launch] exit codes: rank 0 exited with code 0, rank 1 exited with code 0" in log
    assert (out / "ckpt.pt").is_file()
    with zipfile.ZipFile(out / "images.zip") as archive:
        assert len(archive.namelist()) == 200
    assert_gone(pids)


def test_a_rank_killed_while_training_ends_the_run_in_one_line_with_no_process_left(tmp_path):
    process, reader = start([sys.executable, str(ROOT / "kernel.py"), *DEMO_FLAGS, "--out", str(tmp_path / "out")],
                            tmp_path)
    try:
        pids = rank_pids(reader)
        reader.wait_for(r"^\[train\] step \d+ ", 120)
        os.kill(pids[1], signal.SIGKILL)
        process.wait(timeout=90)
    finally:
        process.kill()
    log = reader.text()
    assert process.returncode == 128 + signal.SIGKILL, log[-4000:]
    named = [line for line in log.splitlines() if line.startswith("[launch] rank")]
    assert named == [f"[launch] rank 1 (pid {pids[1]}) was killed by SIGKILL: the other rank(s) get 60s to end, "
                     f"then SIGKILL"]
    assert_gone(pids)

"""Two CPU processes with the gloo backend, as torchrun would start them: both finish, their models agree."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from src.distributed import DistInfo, cleanup_distributed, wrap_ddp

REPO = Path(__file__).resolve().parents[1]

WORKER = r'''
import os, sys
import torch
torch.set_num_threads(1)
from src.budget import Deadline
from src.config import make_config
from src.data import load_dogs
from src.distributed import cleanup_distributed, setup_distributed
import src.train as train_module

data_dir, out_dir = sys.argv[1], sys.argv[2]
info = setup_distributed("cpu")
train_module.DDP_SYNC_STEPS = 2  # agree on stop/tick every 2 steps so the short run crosses a few sync points
data = load_dogs(data_dir, workers=1)
cfg = make_config(dict(recipe="acgan", g_ch=8, d_ch=8, batch_size=8, z_dim=16, status_every="0", dis_loss_limit=0.5))
result = train_module.train(cfg, data, Deadline(600), out_dir, info.device, max_steps=4)
torch.save({"G": result.G.state_dict(), "D": result.D.state_dict(), "G_ema": result.G_ema.state_dict(),
            "steps": result.progress.step, "images_seen": result.progress.images_seen, "reason": result.stop_reason.value,
            "rank": info.rank, "world_size": info.world_size},
           os.path.join(out_dir, f"rank{info.rank}.pt"))
cleanup_distributed()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_train_in_step(tiny_data_dir, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), tiny_data_dir, str(out)], cwd=str(REPO), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["steps"] for r in ranks] == [4, 4] and {r["reason"] for r in ranks} == {"max_steps"}
    # global batch 8 = 4 per rank; 1 D step per round at first, more while D loss > 0.5
    assert ranks[0]["images_seen"] == ranks[1]["images_seen"] >= 4 * 8
    for name in ("G", "D", "G_ema"):
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), f"{name}.{key} differs between the ranks"
    # only rank 0 writes: one status line per tick, one checkpoint; rank 1 printed no status
    assert (out / "ckpt.pt").is_file() and (out / "stats.jsonl").is_file()
    assert "[train] step" in logs[0] and "[train] step" not in logs[1]


RESERVE_WORKER = r'''
import os, sys, time
import torch
torch.set_num_threads(1)
from src.budget import BudgetError, Deadline
from src.config import make_config
from src.distributed import cleanup_distributed, setup_distributed
from src.models import build_models
from src.reserve import plan_reserve

out_dir = sys.argv[1]
info = setup_distributed("cpu")
cfg = make_config(dict(recipe="cgan", g_ch=8, d_ch=8, z_dim=16, shared_dim=16, n_images=200))
# rank 1's clock says the budget is already spent; rank 0's has an hour
deadline = Deadline(3600 if info.rank == 0 else 1, time.time() - (0 if info.rank == 0 else 10))
try:
    G, D = build_models(cfg, 4)
    plan_reserve(cfg, deadline, G, D, info.device, None, os.path.join(out_dir, f"out{info.rank}"))
    outcome = f"planned {deadline.reserve_s:.6f}"
except BudgetError:
    outcome = "refused"
with open(os.path.join(out_dir, f"rank{info.rank}.txt"), "w") as f:
    f.write(outcome)
cleanup_distributed()
'''


def test_ranks_agree_on_the_reserve_and_refuse_together(tmp_path):
    """A budget too small on one rank's clock is refused on every rank: none is left waiting in a collective."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    script = tmp_path / "reserve_worker.py"
    script.write_text(RESERVE_WORKER)
    for rank in range(2):
        (tmp_path / f"out{rank}").mkdir()
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=str(REPO), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(REPO),
                                       OMP_NUM_THREADS="1"))
             for rank in range(2)]
    try:
        logs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], logs
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["refused", "refused"]


def test_the_ddp_wrapper_syncs_no_buffers_at_forwards_and_warns_nothing(tmp_path):
    """D's two forwards per step must not find their saved buffers overwritten (torch 2.4 failed so): no buffer
    broadcast at each forward, under whichever keyword this torch has, without a deprecation warning."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ddp = wrap_ddp(torch.nn.BatchNorm1d(3), DistInfo(rank=0, world_size=2, local_rank=0,
                                                             device=torch.device("cpu"), is_main=True))
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        assert not ddp.will_sync_module_buffers()
    finally:
        cleanup_distributed()

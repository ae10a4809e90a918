"""The bundled kernel.py, run alone (no src/ on the path) on a tiny dataset: a valid images.zip, in budget."""
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from PIL import Image

from src.budget import OVERRUN_GRACE_S
from src.config import parse_duration

ROOT = Path(__file__).resolve().parents[1]
# The conditional DCGAN generates 10,000 images on a CPU ~5x faster than the ResNet (the default model is tested in test_train).
SMALL = ["--recipe", "cgan", "--device", "cpu", "--g-ch", "8", "--d-ch", "8", "--shared-dim", "16", "--z-dim", "32",
         "--batch-size", "16", "--decode-workers", "1", "--status-every", "2s"]


def run_kernel(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Copy kernel.py into an empty folder and run it there, so nothing from src/ can be imported."""
    workdir = tmp_path / "run"
    workdir.mkdir(exist_ok=True)
    shutil.copy(ROOT / "kernel.py", workdir / "kernel.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "kernel.py", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_valid_submission(zip_path: Path, n: int = 10000) -> None:
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        assert len(names) == n and all(name.endswith(".png") for name in names)
        for name in names[:: max(1, n // 20)]:
            img = Image.open(io.BytesIO(archive.read(name)))
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)


def test_kernel_trains_and_writes_a_valid_zip_within_budget(tmp_path, tiny_data_dir):
    out = tmp_path / "out"
    start = time.time()
    result = run_kernel(tmp_path, "--data-dir", str(tiny_data_dir), "--out", str(out), "--time-budget", "40s", *SMALL)
    took = time.time() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_valid_submission(out / "images.zip")
    assert (out / "samples" / "latest.png").exists() and (out / "stats.jsonl").exists() and (out / "ckpt.pt").exists()
    assert took < 40 + 10, f"the kernel took {took:.0f}s on a 40s budget"  # python start-up and import are outside its clock
    assert "training stopped (deadline)" in result.stdout
    # on its own clock the run ends at most a few seconds past the budget
    done = re.search(r"\[main\] done in (\S+) of 40.0s", result.stdout)
    assert done and parse_duration(done.group(1)) <= 40 + OVERRUN_GRACE_S, result.stdout[-2000:]


def test_kernel_missing_data_dir_is_one_clear_line(tmp_path):
    result = run_kernel(tmp_path, "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), *SMALL, timeout=60)
    assert result.returncode == 2
    assert "error:" in result.stderr and "nope" in result.stderr and "Traceback" not in result.stderr


def test_kernel_refuses_a_budget_too_small_for_the_output_in_one_line(tmp_path, tiny_data_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "images.zip").write_bytes(b"the previous submission")
    result = run_kernel(tmp_path, "--data-dir", str(tiny_data_dir), "--out", str(out), "--time-budget", "3s", *SMALL)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stdout
    found = re.fullmatch(r"\[dogkernel\] error: --time-budget 3s is too small for this model on cpu: .*10000 images "
                         r"take ~.* give --time-budget (\w+) or more \(or fewer --n-images for a local test\)", lines[0])
    assert found, lines[0]
    assert parse_duration(found.group(1)) > 3
    # refused before training: the old zip is untouched and no checkpoint was written
    assert (out / "images.zip").read_bytes() == b"the previous submission"
    assert not (out / "ckpt.pt").exists()


def test_sigterm_mid_run_saves_a_checkpoint_and_still_writes_the_zip(tmp_path, tiny_data_dir):
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(ROOT / "kernel.py", workdir / "kernel.py")
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "kernel.py", "--data-dir", str(tiny_data_dir), "--out", str(out),
                                "--time-budget", "10m", *SMALL], cwd=workdir, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:  # wait until training really runs, then stop it as Kaggle would
        lines.append(line)
        if "first round took" in line:
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=240) == 0, "".join(lines)[-3000:]
    log = "".join(lines)
    assert "caught SIGTERM" in log and "training stopped (signal)" in log
    assert (out / "ckpt.pt").exists()
    assert_valid_submission(out / "images.zip")

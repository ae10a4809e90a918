"""Start-up checks of the output folder, so a run does not find out after its whole budget that it cannot write."""
from __future__ import annotations

import os
import shutil
import time

from src.atomic import remove_stale_tmp_files
from src.console import is_rank_zero, log

# Subfolders of OUT that atomic writes go to (grids, the real-feature cache) besides OUT itself.
OUT_SUBFOLDERS = ("samples", "cache")
# Bytes written (and fsynced) to time the disk: enough to get past the page cache's first gulp, quick anywhere.
WRITE_PROBE_BYTES = 8 * 2**20
# Room kept free beyond the zip and the checkpoint: sample grids, stats.jsonl, plots, mifid.json.
OUT_SPARE_BYTES = 32 * 2**20


class OutputError(RuntimeError):
    """--out cannot take this run's files (not a folder, not writable, too little free space); says what to do."""


def prepare_out_dir(out_dir: str) -> None:
    """Create OUT if needed and prove it writable (a probe file created and removed); on rank 0, remove the temporary
    files a killed run left there. Raises OutputError with one clear line otherwise."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"--out {out_dir} is a file, not a folder: pass a folder (it is created if missing)")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".dogkernel-write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as error:
        raise OutputError(f"--out {out_dir} is not writable ({error.strerror or error}): pass a folder this "
                          f"process can write to") from None
    if not is_rank_zero():
        return  # under torchrun only rank 0 writes files, so only it clears (a slow rank must not delete live ones)
    removed = []
    for folder in (out_dir, *(os.path.join(out_dir, name) for name in OUT_SUBFOLDERS)):
        removed += remove_stale_tmp_files(folder)
    if removed:
        log("main", f"removed {len(removed)} temporary file(s) an interrupted run left: "
            f"{', '.join(os.path.basename(p) for p in removed)}")


def measure_write_speed(out_dir: str, n_bytes: int = WRITE_PROBE_BYTES) -> float:
    """Bytes per second written and fsynced in OUT (the zip and checkpoint writes end with an fsync)."""
    probe = os.path.join(out_dir, f".dogkernel-speed-test-{os.getpid()}")
    block = os.urandom(2**20)  # random: a compressing file system cannot shrink it
    start = time.time()
    try:
        with open(probe, "wb") as f:
            for _ in range(max(1, n_bytes // len(block))):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    return max(1, n_bytes // len(block)) * len(block) / max(1e-6, time.time() - start)


def check_free_space(out_dir: str, need: dict[str, int]) -> None:
    """Raise OutputError unless OUT's disk has room for every file in `need` ({name: bytes}) written anew beside its
    old version (atomic writes keep the old file until the new one is whole), plus OUT_SPARE_BYTES."""
    total = sum(need.values()) + OUT_SPARE_BYTES
    free = shutil.disk_usage(out_dir).free
    if free < total:
        parts = ", ".join(f"{name} ~{size / 2**20:.0f} MiB" for name, size in need.items())
        raise OutputError(f"--out {out_dir} has {free / 2**20:.0f} MiB free, this run needs ~{total / 2**20:.0f} MiB "
                          f"({parts}, plus samples and logs): free some space or pass another --out")

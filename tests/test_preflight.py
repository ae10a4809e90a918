"""Output problems are found at start-up, in one line, not after the budget is spent: --out a file, not writable,
too little free space; a disk that fills up while zipping keeps the old zip."""
import errno
import os
import time
import zipfile
from collections import namedtuple

import pytest
import torch

import src.preflight
from src.budget import Deadline
from src.config import make_config
from src.main import main, write_submission
from src.preflight import OutputError, check_free_space, measure_write_speed

SMALL = ["--recipe", "cgan", "--g-ch", "8", "--d-ch", "8", "--shared-dim", "16", "--z-dim", "32",
         "--batch-size", "16", "--decode-workers", "1", "--n-images", "100", "--time-budget", "12s"]


def run_main(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_out_that_is_a_file_is_one_line_before_anything_runs(tmp_path, tiny_data_dir, capsys):
    out_file = tmp_path / "out.txt"
    out_file.write_text("not a folder")
    code, out, err = run_main(["--data-dir", tiny_data_dir, "--out", str(out_file), *SMALL], capsys)
    assert code == 2
    assert err == f"[dogkernel] error: --out {out_file} is a file, not a folder: pass a folder (it is created if missing)\n"
    assert "[data]" not in out and out_file.read_text() == "not a folder"


def test_out_that_cannot_be_written_is_one_line_before_anything_runs(tmp_path, tiny_data_dir, capsys, monkeypatch):
    # root writes anywhere, so a read-only folder is played by the probe write failing as it would there
    def read_only(path, mode="r", *args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(src.preflight, "open", read_only, raising=False)
    out_dir = tmp_path / "out"
    code, out, err = run_main(["--data-dir", tiny_data_dir, "--out", str(out_dir), *SMALL], capsys)
    assert code == 2
    assert err == (f"[dogkernel] error: --out {out_dir} is not writable (Read-only file system): pass a folder this "
                   f"process can write to\n")
    assert "[data]" not in out


def test_out_that_cannot_be_created_is_one_line(tmp_path, tiny_data_dir, capsys):
    parent = tmp_path / "a_file"
    parent.write_text("x")
    code, _, err = run_main(["--data-dir", tiny_data_dir, "--out", str(parent / "out"), *SMALL], capsys)
    assert code == 2 and err.startswith(f"[dogkernel] error: --out {parent / 'out'} is not writable (")
    assert err.count("\n") == 1


def test_too_little_free_space_is_one_line_before_training(tmp_path, tiny_data_dir, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(src.preflight.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 5 * 2**20, 5 * 2**20))
    out_dir = tmp_path / "out"
    code, out, err = run_main(["--data-dir", tiny_data_dir, "--out", str(out_dir), *SMALL], capsys)
    assert code == 2
    assert err.startswith(f"[dogkernel] error: --out {out_dir} has 5 MiB free, this run needs ~") and err.count("\n") == 1
    assert "images.zip ~1 MiB, ckpt.pt ~" in err and "free some space or pass another --out" in err
    assert "[train]" not in out and not (out_dir / "ckpt.pt").exists()


def test_free_space_need_adds_the_spare_room(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    need = {"images.zip": 100 * 2**20, "ckpt.pt": 50 * 2**20}
    room = 150 * 2**20 + src.preflight.OUT_SPARE_BYTES
    monkeypatch.setattr(src.preflight.shutil, "disk_usage", lambda path: usage(0, 0, room))
    check_free_space(str(tmp_path), need)
    monkeypatch.setattr(src.preflight.shutil, "disk_usage", lambda path: usage(0, 0, room - 1))
    with pytest.raises(OutputError, match="images.zip ~100 MiB, ckpt.pt ~50 MiB"):
        check_free_space(str(tmp_path), need)


def test_write_speed_probe_leaves_nothing(tmp_path):
    assert measure_write_speed(str(tmp_path), n_bytes=2**20) > 0
    assert os.listdir(tmp_path) == []


class TinyG(torch.nn.Module):
    z_dim, n_classes = 4, 3

    def forward(self, z, y):
        return torch.tanh(z[:, :1, None, None]).expand(-1, 3, 64, 64)


def test_a_disk_that_fills_up_while_zipping_keeps_the_old_zip(tmp_path, capsys, monkeypatch):
    zip_path = tmp_path / "images.zip"
    zip_path.write_bytes(b"the previous submission")

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", disk_full)
    cfg = make_config({"n_images": 50})
    assert write_submission(TinyG(), cfg, str(tmp_path), "cpu", 0.0, Deadline(3600)) is None
    assert zip_path.read_bytes() == b"the previous submission" and os.listdir(tmp_path) == ["images.zip"]
    assert capsys.readouterr().err == (f"[main] could not write {zip_path}: [Errno 28] No space left on device; "
                                       f"the previous images.zip is kept\n")


def test_a_full_disk_at_the_end_of_a_run_is_exit_code_1_not_a_traceback(tmp_path, tiny_data_dir, capsys, monkeypatch):
    real_writestr = zipfile.ZipFile.writestr

    def disk_full_for_images(self, info, data, *args, **kwargs):
        if self.filename is not None:  # on disk; the start-up probe zips in memory
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writestr(self, info, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", disk_full_for_images)
    start = time.time()
    code, out, err = run_main(["--data-dir", tiny_data_dir, "--out", str(tmp_path / "out"), *SMALL,
                               "--time-budget", "10s", "--grid-every", "0"], capsys)
    assert code == 1 and "Traceback" not in out + err
    assert err.endswith("No space left on device; no images.zip was written\n") and err.count("\n") == 1
    assert time.time() - start < 10 + 3

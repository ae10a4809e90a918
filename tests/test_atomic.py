"""Atomic output: files get the umask's mode, an interrupted write leaves nothing, a killed run's leftovers go."""
import os
import stat

import pytest
import torch

from src.atomic import ATOMIC_TMP_NAME, atomic_path, atomic_write_bytes, remove_stale_tmp_files
from src.checkpoint import save_checkpoint
from src.generate import write_images_zip
from src.preflight import prepare_out_dir


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_get_the_mode_the_umask_gives(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_bytes(str(tmp_path / "plain.bin"), b"data")
    write_images_zip(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), str(tmp_path / "images.zip"))
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"step": torch.tensor(1)})
    for name in ("plain.bin", "images.zip", "ckpt.pt"):
        assert mode_of(tmp_path / name) == expected, name


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_an_interrupted_write_leaves_no_temporary_and_the_old_file(tmp_path, stop):
    path = tmp_path / "images.zip"
    path.write_bytes(b"old")
    with pytest.raises(stop):
        with atomic_path(str(path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of the new one")
            raise stop()
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["images.zip"]


def test_temporary_names_are_recognised_and_nothing_else():
    for name in (".images.zip.1a2b3c4d.tmp", ".ckpt.pt.x_y9ab12.tmp", ".grid_000012.png.abcdefgh.tmp"):
        assert ATOMIC_TMP_NAME.match(name), name
    for name in ("images.zip", "notes.tmp", ".hidden", ".images.zip.tmp", ".images.zip.1A2B3C4D.tmp",
                 "images.zip.1a2b3c4d.tmp"):
        assert not ATOMIC_TMP_NAME.match(name), name


def test_the_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "cache").mkdir()
    leftovers = [out / ".images.zip.1a2b3c4d.tmp", out / ".ckpt.pt.x_y9ab12.tmp",
                 out / "samples" / ".latest.png.0f0f0f0f.tmp", out / "cache" / ".real_features_x.pt.12345678.tmp"]
    kept = [out / "images.zip", out / "notes.tmp", out / ".hidden", out / "samples" / "latest.png"]
    for path in leftovers + kept:
        path.write_bytes(b"x")
    prepare_out_dir(str(out))
    assert [p for p in leftovers if p.exists()] == [] and all(p.exists() for p in kept)
    assert "removed 4 temporary file(s) an interrupted run left" in capsys.readouterr().out
    assert remove_stale_tmp_files(str(tmp_path / "missing")) == []

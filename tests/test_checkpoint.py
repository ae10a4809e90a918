"""ckpt.pt: weights_only-safe RNG state, atomic writes, clear errors for damaged files, resume config rules."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import src.atomic
from src.budget import Deadline
from src.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, load_generator_from_checkpoint,
                            check_resume_fits_data, merge_resumed_config, open_resume, resolve_resume_path,
                            restore_rng_state, save_checkpoint)
from src.config import make_config
from src.data import load_dogs
from src.train import train

TINY = dict(recipe="dcgan", g_ch=8, d_ch=8, batch_size=8, z_dim=16, status_every="0")


@pytest.fixture(scope="module")
def trained_run(tiny_data_dir, tmp_path_factory):
    """(data, out_dir) of a 2-step run; tests copy its ckpt.pt before damaging anything."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = load_dogs(tiny_data_dir, workers=1)
    out = str(tmp_path_factory.mktemp("ckpt_run"))
    train(make_config(TINY), data, Deadline(3600), out, "cpu", max_steps=2)
    torch.set_num_threads(threads)
    return data, out


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    path = str(tmp_path / "rng.pt")
    save_checkpoint(path, {"rng": capture_rng_state()})
    expected = draws()
    restore_rng_state(torch.load(path, weights_only=True)["rng"])
    assert draws() == expected


def test_checkpoint_holds_everything_to_resume(trained_run):
    _, out = trained_run
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    for key in ("G", "D", "G_ema", "opt_g", "opt_d", "scaler_g", "scaler_d", "progress", "config", "grid_z",
                "grid_y", "rng", "fid", "n_classes"):
        assert key in ckpt
    assert ckpt["progress"]["step"] == 2 and ckpt["progress"]["images_seen"] == 16
    assert 0.0 <= ckpt["progress"]["schedule_progress"] < 0.01
    assert ckpt["grid_z"].shape == (64, 16)


def test_garbage_and_truncated_files_give_a_clear_error(trained_run, tmp_path):
    _, out = trained_run
    good = open(os.path.join(out, "ckpt.pt"), "rb").read()
    for name, content in (("garbage.pt", b"this is not a checkpoint" * 10), ("truncated.pt", good[: len(good) // 2]),
                          ("empty.pt", b"")):
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert path in message and "--resume \"\"" in message and "delete" in message
    # a readable file that is not a dogkernel checkpoint
    other = str(tmp_path / "other.pt")
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a dogkernel checkpoint"):
        load_checkpoint(other)


def test_resume_is_settled_or_refused_before_training(trained_run, tmp_path):
    """A damaged, foreign-shaped or other-breeds checkpoint is refused by open_resume, before data or outputs."""
    data, out = trained_run
    path = str(tmp_path / "ckpt.pt")
    with open(path, "wb") as f:
        f.write(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        open_resume(make_config({**TINY, "resume": path}), str(tmp_path))
    # a checkpoint whose weights do not fit the model its own config describes (written by other code)
    saved = load_checkpoint(os.path.join(out, "ckpt.pt"))
    saved["G"] = {k: v[..., :1] if v.dim() else v for k, v in saved["G"].items()}
    save_checkpoint(path, saved)
    with pytest.raises(CheckpointError, match="its G does not fit the model its config describes"):
        open_resume(make_config({**TINY, "resume": path}), str(tmp_path))
    cfg, good = open_resume(make_config({**TINY, "resume": os.path.join(out, "ckpt.pt"), "lr_g": 1.0}), out)
    assert good["path"] == os.path.join(out, "ckpt.pt") and cfg.lr_g != 1.0  # the checkpoint's recipe continues
    check_resume_fits_data(good, len(data.breeds))
    with pytest.raises(CheckpointError, match="breeds, this data has"):
        check_resume_fits_data(good, len(data.breeds) + 1)


def test_failed_rename_keeps_the_old_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"value": torch.tensor([1.0])})

    def killed_before_rename(src, dst):
        raise OSError("killed between write and rename")

    monkeypatch.setattr(src.atomic.os, "replace", killed_before_rename)
    with pytest.raises(OSError, match="killed between write and rename"):
        save_checkpoint(path, {"value": torch.tensor([2.0])})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True)["value"].item() == 1.0


def test_resolve_resume_path(tmp_path):
    out = str(tmp_path)
    assert resolve_resume_path("", out) is None
    assert resolve_resume_path("auto", out) is None
    open(os.path.join(out, "ckpt.pt"), "wb").close()
    assert resolve_resume_path("auto", out) == os.path.join(out, "ckpt.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_resume_path(str(tmp_path / "missing.pt"), out)


def test_merge_keeps_session_flags_and_the_checkpoint_model(capsys):
    saved = vars(make_config(dict(recipe="dcgan", g_ch=32, lr_g=3e-4, time_budget="1h", out="old")))
    now = make_config(dict(recipe="dcgan", g_ch=64, time_budget="2h", out="new", data_dir="/data"))
    merged = merge_resumed_config(now, dict(saved, some_future_field=1))
    assert (merged.g_ch, merged.lr_g) == (32, 3e-4)
    assert (merged.time_budget, merged.out, merged.data_dir) == (7200.0, "new", "/data")
    log = capsys.readouterr().out
    assert "WARNING: model settings differ" in log and "g_ch=64 (checkpoint 32)" in log


def test_generator_from_checkpoint_uses_the_checkpoint_shapes(trained_run):
    data, out = trained_run
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    G_ema = load_generator_from_checkpoint(os.path.join(out, "ckpt.pt"), make_config(dict(g_ch=64)),
                                           len(data.breeds), "cpu")
    assert not G_ema.training and G_ema.z_dim == 16
    assert all(torch.equal(v, ckpt["G_ema"][k]) for k, v in G_ema.state_dict().items())
    with pytest.raises(CheckpointError, match="breeds"):
        load_generator_from_checkpoint(os.path.join(out, "ckpt.pt"), make_config({}), len(data.breeds) + 1, "cpu")

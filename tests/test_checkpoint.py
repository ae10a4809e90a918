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


def test_resolve_resume_path(tmp_path, capsys):
    out = str(tmp_path)
    assert resolve_resume_path("", out) is None
    assert capsys.readouterr().out == ""
    assert resolve_resume_path("auto", out) is None
    assert capsys.readouterr().out.strip() == (f"[checkpoint] --resume auto: there is no {out}/ckpt.pt, "
                                               f"so training starts fresh")
    open(os.path.join(out, "ckpt.pt"), "wb").close()
    assert resolve_resume_path("auto", out) == os.path.join(out, "ckpt.pt")
    assert capsys.readouterr().out == ""


def _odd_path(tmp_path, kind: str) -> str:
    """A path of one kind that is no checkpoint file: missing, a directory, a link to nothing, a FIFO."""
    path = tmp_path / "ckpt.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "dangling link":
        path.symlink_to(tmp_path / "gone.pt")
    elif kind == "fifo":
        os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("kind, seen", [("missing", "no such file"),
                                        ("directory", "a directory, not a checkpoint file"),
                                        ("dangling link", "a symbolic link to .*gone.pt, which does not exist"),
                                        ("fifo", r"not a regular file \(a device, pipe or socket\)")])
def test_a_resume_path_that_is_no_file_says_what_is_there(tmp_path, kind, seen):
    path = _odd_path(tmp_path, kind)
    with pytest.raises(CheckpointError, match=f"--resume {path}: {seen}; give an existing ckpt.pt"):
        resolve_resume_path(path, str(tmp_path))
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: {seen}; check the path"):
        load_checkpoint(path)
    if kind != "missing":  # auto starts fresh only when nothing is there; anything else is refused, not overwritten
        with pytest.raises(CheckpointError, match=f"--resume auto: {path} is {seen}; move it away"):
            resolve_resume_path("auto", str(tmp_path))


def test_an_unreadable_checkpoint_says_it_cannot_be_opened(trained_run, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    path = tmp_path / "ckpt.pt"
    path.write_bytes(open(os.path.join(trained_run[1], "ckpt.pt"), "rb").read())
    path.chmod(0)
    with pytest.raises(CheckpointError, match="cannot open checkpoint .*Permission denied"):
        load_checkpoint(str(path))


def test_merge_keeps_session_flags_and_the_checkpoint_model(capsys):
    saved = vars(make_config(dict(recipe="dcgan", g_ch=32, lr_g=3e-4, time_budget="1h", out="old")))
    now = make_config(dict(recipe="dcgan", g_ch=64, time_budget="2h", out="new", data_dir="/data"))
    merged = merge_resumed_config(now, saved)
    assert (merged.g_ch, merged.lr_g) == (32, 3e-4)
    assert (merged.time_budget, merged.out, merged.data_dir) == (7200.0, "new", "/data")
    log = capsys.readouterr().out
    assert "WARNING: model settings differ" in log and "g_ch=64 (checkpoint 32)" in log
    assert "does not know" not in log and "lacks" not in log  # the same kernel wrote it: nothing to say


@pytest.mark.parametrize("future", [["warp_drive"], ["quantum_ema", "warp_drive", "hyper_res"]])
def test_fields_from_a_newer_kernel_are_named_and_ignored(capsys, future):
    saved = dict(vars(make_config(dict(recipe="dcgan"))), **{name: 0.6 for name in future})
    merged = merge_resumed_config(make_config(dict(recipe="dcgan")), saved)
    assert not any(hasattr(merged, name) for name in future)
    lines = [line for line in capsys.readouterr().out.splitlines() if "does not know" in line]
    assert lines == ["[checkpoint] the checkpoint's config has fields this kernel does not know (written by a newer "
                     f"kernel.py?), ignored: {', '.join(sorted(future))}"]


@pytest.mark.parametrize("lacking", [["ema_rampup"], ["mbstd", "lr_g", "fid_every"]])
def test_fields_an_older_checkpoint_lacks_take_this_runs_value(capsys, lacking):
    now = make_config(dict(recipe="dcgan", lr_g=5e-4, ema_rampup=0.3, mbstd=True, fid_every="5m"))
    saved = {k: v for k, v in vars(make_config(dict(recipe="dcgan"))).items() if k not in lacking}
    merged = merge_resumed_config(now, saved)
    assert all(getattr(merged, name) == getattr(now, name) for name in lacking)
    values = ", ".join(f"{name}={getattr(now, name)!r}" for name in sorted(lacking))
    lines = [line for line in capsys.readouterr().out.splitlines() if "lacks" in line]
    assert lines == ["[checkpoint] the checkpoint's config lacks fields of this kernel (written by an older "
                     f"kernel.py?), this run's values are used: {values}"]


@pytest.mark.parametrize("name, value, wanted", [
    ("loss", "lecam-hinge", "one of hinge, bce, ls, rals, wgan-gp"),    # a newer kernel's loss
    ("arch", "stylegan", "one of resnet, dcgan"),
    ("draw_res", 16, "one of 32, 64"),
    ("g_ch", "64", "a int"),
    ("g_ch", 64.0, "a int"),
    ("flip", 1, "a bool"),
    ("lr_g", "fast", "a float"),
    ("batch_size", None, "a int"),
])
def test_checkpoint_values_this_kernel_cannot_train_with_are_refused_in_one_line(name, value, wanted):
    saved = dict(vars(make_config(dict(recipe="dcgan"))), **{name: value})
    with pytest.raises(CheckpointError, match=rf"config has {name}={value!r}, which this kernel cannot train with "
                                              rf"\(it takes {wanted}\)"):
        merge_resumed_config(make_config(dict(recipe="dcgan")), saved)


def test_a_config_lacking_most_fields_names_the_first_twelve(capsys):
    now = make_config(dict(recipe="dcgan"))
    merge_resumed_config(now, {"seed": 0})
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "lacks" in line]
    lacking = [f"{name}={value!r}" for name, value in sorted(vars(now).items()) if name != "seed"]
    assert line.endswith(f"this run's values are used: {', '.join(lacking[:12])} and {len(lacking) - 12} more")


def test_an_int_where_a_float_is_kept_is_a_float_value(capsys):
    saved = dict(vars(make_config(dict(recipe="dcgan"))), lr_g=1)
    assert merge_resumed_config(make_config(dict(recipe="dcgan")), saved).lr_g == 1


def test_resuming_a_newer_kernels_checkpoint_says_what_it_ignores(trained_run, tmp_path, capsys):
    saved = load_checkpoint(os.path.join(trained_run[1], "ckpt.pt"))
    config = {k: v for k, v in saved["config"].items() if k != "ema_rampup"}
    save_checkpoint(str(tmp_path / "ckpt.pt"), dict(saved, config=dict(config, hyper_res="photos", warp_drive=0.6)))
    cfg, resumed = open_resume(make_config({**TINY, "resume": "auto", "ema_rampup": 0.3}), str(tmp_path))
    assert resumed["path"] == str(tmp_path / "ckpt.pt") and cfg.ema_rampup == 0.3
    out = capsys.readouterr().out
    assert "does not know (written by a newer kernel.py?), ignored: hyper_res, warp_drive\n" in out
    assert "lacks fields of this kernel (written by an older kernel.py?), this run's values are used: " \
           "ema_rampup=0.3\n" in out


def test_a_checkpoint_without_a_config_dict_is_refused(trained_run, tmp_path):
    saved = load_checkpoint(os.path.join(trained_run[1], "ckpt.pt"))
    for config in (["not", "a", "dict"], "recipe=dcgan"):
        save_checkpoint(str(tmp_path / "ckpt.pt"), dict(saved, config=config))
        with pytest.raises(CheckpointError, match="holds no config dict"):
            open_resume(make_config({**TINY, "resume": "auto"}), str(tmp_path))


def test_generator_from_checkpoint_uses_the_checkpoint_shapes(trained_run):
    data, out = trained_run
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    G_ema = load_generator_from_checkpoint(os.path.join(out, "ckpt.pt"), make_config(dict(g_ch=64)),
                                           len(data.breeds), "cpu")
    assert not G_ema.training and G_ema.z_dim == 16
    assert all(torch.equal(v, ckpt["G_ema"][k]) for k, v in G_ema.state_dict().items())
    with pytest.raises(CheckpointError, match="breeds"):
        load_generator_from_checkpoint(os.path.join(out, "ckpt.pt"), make_config({}), len(data.breeds) + 1, "cpu")

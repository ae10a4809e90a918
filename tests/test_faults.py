"""Faults injected into a tiny run: NaN losses, CUDA out-of-memory, SIGTERM, a crash after some steps."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import signal

import pytest
import torch

import src.atomic
import src.losses
import src.train as train_module
from src.budget import Deadline
from src.config import make_config
from src.ema import standing_bn_stats_
from src.train import train

TINY = dict(recipe="dcgan", g_ch=8, d_ch=8, batch_size=8, z_dim=16, status_every="0", lr_schedule="const")


def read_records(out_dir):
    with open(os.path.join(out_dir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def patch_round(monkeypatch, action):
    """Run `action(call_number)` before each gan_round call (1-based), then the real round."""
    real_round = train_module.gan_round
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        action(calls["n"])
        return real_round(*args, **kwargs)

    monkeypatch.setattr(train_module, "gan_round", patched)
    return calls


def nan_d_loss(nan_calls):
    """The bce objective with its D loss NaN on the listed calls (1-based)."""
    bce = src.losses.GAN_LOSSES["bce"]
    calls = {"n": 0}

    def d_loss(*args):
        calls["n"] += 1
        loss = bce.d_loss(*args)
        return loss * float("nan") if calls["n"] in nan_calls else loss

    return dataclasses.replace(bce, d_loss=d_loss)


def test_nan_loss_rolls_back_with_halved_learning_rates(dogs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(src.losses.GAN_LOSSES, "bce", nan_d_loss({3}))
    out = str(tmp_path)
    result = train(make_config(TINY), dogs, Deadline(3600), out, "cpu", max_steps=5)
    assert result.progress.rollbacks == 1 and result.stop_reason == "max_steps"
    assert all(torch.isfinite(p).all() for m in (result.G, result.D, result.G_ema) for p in m.parameters())
    assert "rolled back to step 0 and halved both learning rates" in capsys.readouterr().out
    records = read_records(out)
    events = [r for r in records if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["lr_scale"] == 0.5
    status = [r for r in records if "event" not in r]
    assert [r["lr_g"] for r in status] == [2e-4, 2e-4] + [1e-4] * 5
    # the rollback restored the step counter, so the run reached step 5 after redoing steps 1..3
    assert [r["step"] for r in status] == [1, 2, 1, 2, 3, 4, 5]


def test_persistent_nan_gives_up_with_a_clear_message(dogs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(src.losses.GAN_LOSSES, "bce", nan_d_loss(set(range(1, 100))))
    result = train(make_config(TINY), dogs, Deadline(3600), str(tmp_path), "cpu", max_steps=50)
    assert result.stop_reason == "error" and result.error.startswith("losses or weights became NaN/Inf")
    assert result.progress.rollbacks == train_module.MAX_ROLLBACKS + 1
    assert all(torch.isfinite(p).all() for p in result.G_ema.parameters())
    assert "giving up" in capsys.readouterr().out
    # every step diverged, so the last good state is the untrained start: it never becomes a checkpoint
    assert result.progress.step == 0 and not os.path.isfile(os.path.join(str(tmp_path), "ckpt.pt"))


def test_out_of_memory_halves_the_batch_and_goes_on(dogs, tmp_path, monkeypatch, capsys):
    def oom_once(n):
        if n == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    patch_round(monkeypatch, oom_once)
    out = str(tmp_path)
    result = train(make_config(TINY), dogs, Deadline(3600), out, "cpu", max_steps=3)
    assert result.stop_reason == "max_steps" and result.progress.step == 3
    assert result.progress.batch_size == 4
    assert result.progress.images_seen == 8 + 4 + 4
    assert "CUDA out of memory at batch 8" in capsys.readouterr().out
    records = read_records(out)
    assert any(r.get("event") == "oom" and r["batch_size"] == 4 for r in records)
    assert [r["batch_size"] for r in records if "event" not in r] == [8, 4, 4]


def test_sigterm_saves_a_checkpoint_and_returns_signal(dogs, tmp_path, monkeypatch):
    previous = signal.getsignal(signal.SIGTERM)

    def sigterm_in_round_3(n):
        if n == 3:
            signal.raise_signal(signal.SIGTERM)

    patch_round(monkeypatch, sigterm_in_round_3)
    out = str(tmp_path)
    result = train(make_config(TINY), dogs, Deadline(3600), out, "cpu", max_steps=100)
    # the step in progress finishes, then the loop stops
    assert result.stop_reason == "signal" and result.progress.step == 3
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["progress"]["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_crash_after_some_steps_returns_the_last_good_state(dogs, tmp_path, monkeypatch):
    def crash(n):
        if n == 3:
            raise RuntimeError("device fell over")

    patch_round(monkeypatch, crash)
    result = train(make_config(TINY), dogs, Deadline(3600), str(tmp_path), "cpu", max_steps=10)
    assert result.stop_reason == "error" and result.error == "RuntimeError: device fell over"
    assert result.progress.step == 0  # the in-memory rollback point is the start of the session
    assert not os.path.isfile(os.path.join(str(tmp_path), "ckpt.pt"))  # an untrained state is never saved


def test_a_crash_in_the_first_round_is_raised(dogs, tmp_path, monkeypatch):
    def crash(n):
        raise RuntimeError("bad set-up")

    patch_round(monkeypatch, crash)
    with pytest.raises(RuntimeError, match="bad set-up"):
        train(make_config(TINY), dogs, Deadline(3600), str(tmp_path), "cpu", max_steps=10)


def test_the_deadline_stops_training(dogs, tmp_path, monkeypatch):
    deadline = Deadline(3600)
    # about 1 s of training window from the first round on (set-up time on a busy machine aside), no step limit
    patch_round(monkeypatch, lambda n: n == 1 and deadline.reserve(deadline.remaining() - 1.0))
    result = train(make_config(TINY), dogs, deadline, str(tmp_path), "cpu")
    assert result.stop_reason == "deadline" and result.progress.step >= 1
    assert os.path.isfile(os.path.join(str(tmp_path), "ckpt.pt"))


def test_the_loop_starts_no_round_it_cannot_finish_inside_the_window(dogs, tmp_path, monkeypatch):
    """Rounds of ~0.4 s and a 1.5 s window: the loop predicts each round from the last one (a session's first
    round, warm-up, aside) and stops before one that would end past the window, instead of running into the reserve."""
    deadline = Deadline(3600)

    def slow_round(n):
        if n == 1:  # the window: 1.5 s from the first round on, whatever the set-up took
            deadline.reserve(deadline.remaining() - 1.5)
        time.sleep(0.4)

    calls = patch_round(monkeypatch, slow_round)
    ends = []
    real_round = train_module.gan_round

    def timed(*args, **kwargs):
        result = real_round(*args, **kwargs)
        ends.append(time.time())
        return result

    monkeypatch.setattr(train_module, "gan_round", timed)
    result = train(make_config(TINY), dogs, deadline, str(tmp_path), "cpu")
    assert result.stop_reason == "deadline" and calls["n"] >= 2
    assert max(ends) <= deadline.train_end + 0.1  # the last round ended inside the window (timing jitter aside)
    assert deadline.round_s >= 0.4  # what the loop expects of the next round: the measured one


def test_failing_renames_keep_the_old_checkpoint_and_the_run_goes_on(dogs, tmp_path, monkeypatch, capsys):
    out = str(tmp_path)
    train(make_config(TINY), dogs, Deadline(3600), out, "cpu", max_steps=1)
    samples = os.path.join(out, "samples")
    before = sorted(os.listdir(out)), sorted(os.listdir(samples))

    def killed_before_rename(src, dst):
        raise OSError("killed between write and rename")

    # every atomic write (checkpoint, grids, strip) now dies before its rename
    monkeypatch.setattr(src.atomic.os, "replace", killed_before_rename)
    result = train(make_config(TINY), dogs, Deadline(3600), out, "cpu", max_steps=2)
    monkeypatch.undo()
    assert result.stop_reason == "max_steps" and result.progress.step == 2
    log = capsys.readouterr().out
    assert "could not write" in log and "the previous checkpoint is kept" in log
    assert (sorted(os.listdir(out)), sorted(os.listdir(samples))) == before  # no temporary file left behind
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["progress"]["step"] == 1


def has_its_own_bn_statistics(G_ema, seed):
    """True when G_ema's batch-norm buffers are the standing statistics of its own weights (not G's copies)."""
    own = copy.deepcopy(G_ema)
    standing_bn_stats_(own, seed=seed)
    return all(torch.equal(mine, fresh) for mine, fresh in zip(G_ema.buffers(), own.buffers()))


@pytest.mark.parametrize("path", ["rollback at the final tick", "crash after some steps", "gave up"])
def test_g_ema_leaves_training_with_its_own_bn_statistics_on_every_path(dogs, tmp_path, monkeypatch, path):
    cfg = make_config({**TINY, "status_every": "1h"})  # one status tick: the final one
    if path == "rollback at the final tick":
        monkeypatch.setitem(src.losses.GAN_LOSSES, "bce", nan_d_loss({3}))
        expected = ("max_steps", 1)
    elif path == "crash after some steps":
        patch_round(monkeypatch, lambda n: (_ for _ in ()).throw(RuntimeError("device fell over")) if n == 3 else None)
        expected = ("error", 0)
    else:
        monkeypatch.setattr(train_module, "MAX_ROLLBACKS", 0)
        monkeypatch.setitem(src.losses.GAN_LOSSES, "bce", nan_d_loss({3}))
        expected = ("error", 1)
    result = train(cfg, dogs, Deadline(3600), str(tmp_path), "cpu", max_steps=3)
    assert (result.stop_reason.value, result.progress.rollbacks) == expected
    # the restored state is the start of the session; G_ema still gets its own statistics, not the snapshot's
    assert result.progress.step == 0
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in result.G_ema.modules())
    assert has_its_own_bn_statistics(result.G_ema, cfg.seed)

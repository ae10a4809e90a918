"""The budget is a promise: the reserve measured at start-up, a budget that cannot hold the output refused in one
line naming one that can, and output stages that stop a few seconds past the end instead of overrunning."""
import json
import os
import re
import time
import types
import zipfile

import pytest
import torch

import src.reserve
from src.budget import (OVERRUN_GRACE_S, RECHECK_LEAD, RECHECK_LEAD_MIN_S, RESERVE_SAFETY, Deadline, OutOfTime,
                        budget_flag_text, deadline_check, reserve_margin, smallest_budget)
from src.config import make_config, parse_duration
from src.main import main, write_submission
from src.models import build_models
from src.monitor import StatusLog
from src.reserve import (OutputPlan, checkpoint_bytes, mifid_share, plan_reserve, recheck_reserve, reserve_seconds,
                         training_round_seconds)

SMALL = ["--recipe", "cgan", "--g-ch", "8", "--d-ch", "8", "--shared-dim", "16", "--z-dim", "32",
         "--batch-size", "16", "--decode-workers", "1", "--status-every", "0", "--grid-every", "0"]


@pytest.mark.parametrize("seconds, text", [(50, "50s"), (150, "2m30s"), (420, "7m"), (4200, "1h10m"), (3601, "1h1s"),
                                           (49.2, "50s")])
def test_budget_flag_text_is_a_valid_flag_value(seconds, text):
    assert budget_flag_text(seconds) == text
    assert parse_duration(text) == pytest.approx(-(-seconds // 1))


@pytest.mark.parametrize("needed, expected", [
    (41.0, 50.0),       # (41 + 3) / 0.99 = 44.4 -> next 10 s
    (150.0, 180.0),     # (150 + 3) / 0.99 = 154.5 -> next minute
    (7000.0, 7200.0),   # 7073.7, margin 73.7 s -> next 10 minutes
    (20000.0, 20400.0),  # the margin is capped at 120 s: 20120 -> next 10 minutes
])
def test_smallest_budget_covers_the_margin_and_rounds_up(needed, expected):
    budget = smallest_budget(needed)
    assert budget == expected
    assert budget >= needed + reserve_margin(budget)


def test_round_estimate_by_hand():
    cfg = make_config({"batch_size": 10, "n_dis": 1, "g_steps": 1})
    # n_dis 1: one G forward (its fakes serve the G step), 2 D forwards in the D step + 1 in the G step; x3 backward
    assert training_round_seconds(cfg, gen_s=0.01, d_s=0.002, n_dis=1) == pytest.approx(3 * 10 * (1 * 0.01 + 3 * 0.002))
    cfg = make_config({"batch_size": 10, "n_dis": 2, "g_steps": 2})
    # 4 D steps: 4 + 2 G forwards, 2 * 4 + 2 D forwards
    assert training_round_seconds(cfg, gen_s=0.01, d_s=0.002, n_dis=4) == pytest.approx(3 * 10 * (6 * 0.01 + 10 * 0.002))


def test_the_reserve_counts_the_round_the_run_starts_with_not_the_adaptive_ceiling(tmp_path, monkeypatch):
    """sngan's adaptive D steps (1 rising to 5) were counted at 5 and a 2-minute budget was refused; the loop
    measures its rounds, so the start-up estimate is the round at cfg.n_dis, and the loop's first prediction."""
    cfg = make_config({"recipe": "sngan", "g_ch": 4, "d_ch": 4, "z_dim": 16, "batch_size": 8, "n_images": 100})
    assert cfg.dis_loss_limit > 0 and cfg.n_dis == 1 and cfg.n_dis_max == 5
    counted = []
    monkeypatch.setattr(src.reserve, "training_round_seconds",
                        lambda cfg, gen_s, d_s, n_dis: counted.append(n_dis) or 0.25 * n_dis)
    torch.manual_seed(0)
    G, D = build_models(cfg, 3)
    deadline = Deadline(3600)
    plan = plan_reserve(cfg, deadline, G, D, torch.device("cpu"), None, str(tmp_path))
    assert counted == [1] and plan.round_s == 0.25
    assert deadline.round_s == 0.25 and deadline.last_start() == pytest.approx(deadline.train_end - 0.25)


def test_checkpoint_size_estimate_covers_a_real_checkpoint(tmp_path):
    cfg = make_config({"recipe": "cgan", "g_ch": 8, "d_ch": 8, "z_dim": 16})
    G, D = build_models(cfg, 4)
    # what a checkpoint holds: G, D, G_ema, best G_ema, and Adam's two moments per parameter
    def copy(module):
        return {name: tensor.clone() for name, tensor in module.state_dict().items()}

    state = {"G": copy(G), "D": copy(D), "G_ema": copy(G), "best_G_ema": copy(G),
             "opt_g": [torch.zeros_like(p) for p in G.parameters() for _ in range(2)],
             "opt_d": [torch.zeros_like(p) for p in D.parameters() for _ in range(2)]}
    torch.save(state, tmp_path / "ckpt.pt")
    real = (tmp_path / "ckpt.pt").stat().st_size
    assert real <= checkpoint_bytes(G, D) <= real + 2**20 + 0.05 * real


def test_mifid_share_by_hand():
    assert mifid_share(make_config({"n_images": 10000, "fid_samples": 2000})) == pytest.approx(10000 / 12000)
    searched = make_config({"n_images": 10000, "fid_samples": 2000, "truncation_search": True})
    assert mifid_share(searched) == pytest.approx(10000 / (10000 + 4 * 2000 + 2000))


def test_deadline_check_allows_the_grace_then_stops():
    deadline = Deadline(10, start=time.time() - 10 - OVERRUN_GRACE_S + 1)  # ended, but within the grace
    deadline_check(deadline, "writing images.zip")()
    late = Deadline(10, start=time.time() - 10 - OVERRUN_GRACE_S - 1)
    with pytest.raises(OutOfTime, match=r"writing images.zip ran 4s past the end of the 10s budget and was stopped"):
        deadline_check(late, "writing images.zip")()


class TinyG(torch.nn.Module):
    z_dim, n_classes = 4, 3

    def forward(self, z, y):
        return torch.tanh(z[:, :1, None, None]).expand(-1, 3, 64, 64)


def test_a_zip_that_would_end_past_the_budget_is_abandoned_and_the_old_one_kept(tmp_path, capsys):
    zip_path = tmp_path / "images.zip"
    zip_path.write_bytes(b"the previous submission")
    cfg = make_config({"n_images": 1200})
    gone = Deadline(5, start=time.time() - 5 - OVERRUN_GRACE_S - 1)
    assert write_submission(TinyG(), cfg, str(tmp_path), "cpu", 0.0, gone) is None
    assert zip_path.read_bytes() == b"the previous submission" and sorted(os.listdir(tmp_path)) == ["images.zip"]
    err = capsys.readouterr().err
    assert err == (f"[main] could not write {zip_path}: writing images.zip ran 4s past the end of the 5s budget and "
                   f"was stopped; the previous images.zip is kept\n")


def test_too_small_a_budget_is_refused_at_start_up_and_the_named_one_fits(tmp_path, tiny_data_dir, capsys,
                                                                         monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "images.zip").write_bytes(b"the previous submission")
    args = ["--data-dir", tiny_data_dir, "--out", str(out), "--n-images", "300", *SMALL]
    assert main([*args, "--time-budget", "2s"]) == 2
    captured = capsys.readouterr()
    found = re.fullmatch(r"\[dogkernel\] error: --time-budget 2s is too small for this model on cpu: start-up took .*, "
                         r"300 images take ~.* to generate and zip here, a training round ~.*; give --time-budget "
                         r"(\w+) or more \(or fewer --n-images for a local test\)\n", captured.err)
    assert found, captured.err
    assert (out / "images.zip").read_bytes() == b"the previous submission"
    assert sorted(os.listdir(out)) == ["images.zip"]  # refused before training: nothing else written

    named = found.group(1)
    monkeypatch.setattr(src.reserve, "RECHECK_COST_SHARE", 100.0)  # the output is tiny: recheck it all the same
    start = time.time()
    assert main([*args, "--time-budget", named]) == 0
    took = time.time() - start
    assert took <= parse_duration(named) + OVERRUN_GRACE_S, f"{took:.1f}s on a {named} budget"
    printed = capsys.readouterr().out
    assert "training stopped (deadline)" in printed
    assert printed.count("output measured again with the trained G_ema") == 1  # the loop rechecked the reserve once
    with zipfile.ZipFile(out / "images.zip") as archive:
        assert len(archive.namelist()) == 300


def test_plan_reserve_leaves_the_run_models_as_it_found_them(tmp_path):
    """The reserve is measured on the run's own models: their modes, weights and buffers, the RNG the training
    draws from, stay as they were, and the plan keeps no tensor (no probe images held through training)."""
    cfg = make_config({"recipe": "biggan", "g_ch": 4, "d_ch": 4, "shared_dim": 8, "z_dim": 20, "n_images": 100})
    torch.manual_seed(0)
    G, D = build_models(cfg, 3)
    G.train()
    D.train()
    D.blocks[0].eval()  # a mixed state comes back mixed
    modes = [m.training for m in (*G.modules(), *D.modules())]
    weights = {f"{name}.{key}": value.clone() for name, model in (("G", G), ("D", D))
               for key, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    plan = plan_reserve(cfg, Deadline(3600), G, D, torch.device("cpu"), None, str(tmp_path))
    assert [m.training for m in (*G.modules(), *D.modules())] == modes
    after = {f"{name}.{key}": value for name, model in (("G", G), ("D", D)) for key, value in model.state_dict().items()}
    assert all(torch.equal(weights[key], after[key]) for key in weights)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(isinstance(value, torch.Tensor) for value in vars(plan).values())
    assert plan.generate_batch in (64, 100) and plan.gen_s > 0 and plan.zip_s > 0


def plan_of(gen_s: float, n_images: int = 10000) -> OutputPlan:
    return OutputPlan(n_images=n_images, generate_batch=64, gen_s=gen_s, zip_s=0.0, write_speed=1e12, tail_s=1.0,
                      scoring_s=0.0, mifid_s=0.0, round_s=0.5)


class SleepyG(torch.nn.Module):
    """A generator that takes `per_image` seconds per image."""
    z_dim, n_classes = 4, 3

    def __init__(self, per_image: float):
        super().__init__()
        self.per_image = per_image

    def forward(self, z, y):
        time.sleep(self.per_image * len(z))
        return torch.zeros(len(z), 3, 64, 64)


@pytest.mark.parametrize("start_up_gen_s, trained_gen_s", [(0.004, 0.001), (0.001, 0.003)])
def test_the_recheck_moves_the_end_of_training_by_the_measured_difference(start_up_gen_s, trained_gen_s):
    plan = plan_of(start_up_gen_s)
    deadline = Deadline(600)
    deadline.reserve(reserve_seconds(plan, deadline.budget_s))
    train_end = deadline.train_end
    recheck_reserve(plan, deadline, SleepyG(trained_gen_s), "cpu")
    assert plan.gen_s == pytest.approx(trained_gen_s, rel=0.5, abs=2e-4)
    measured_change = RESERVE_SAFETY * plan.n_images * (start_up_gen_s - plan.gen_s - plan.zip_s)
    assert deadline.train_end - train_end == pytest.approx(measured_change, rel=1e-6)
    assert (deadline.train_end > train_end) == (trained_gen_s < start_up_gen_s)


def test_one_slow_recheck_probe_moves_nothing(monkeypatch, capsys):
    """Something else on the machine slows the first probe tenfold: the median of the start-up figure and the two
    probes is the true speed, and the end of training stays where it was (a busy CPU once measured 2m19s for an
    output that then took 62 s)."""
    plan = plan_of(0.001)
    deadline = Deadline(600)
    deadline.reserve(reserve_seconds(plan, deadline.budget_s))
    train_end = deadline.train_end
    G = SleepyG(0.001)
    real_measure, speeds = src.reserve.measure_generation, iter([0.01, 0.001])

    def busy_then_idle(G, device, batch_sizes):
        G.per_image = next(speeds)
        return real_measure(G, device, batch_sizes)

    monkeypatch.setattr(src.reserve, "measure_generation", busy_then_idle)
    recheck_reserve(plan, deadline, G, "cpu")
    assert plan.gen_s == pytest.approx(0.001, rel=0.5)
    assert abs(deadline.train_end - train_end) < 0.5 * RESERVE_SAFETY * plan.n_images * 0.001
    assert "the median of the start-up" in capsys.readouterr().out


class UnusableG(SleepyG):
    def forward(self, z, y):
        raise AssertionError("the recheck measured although its cost was out of proportion")


def test_the_recheck_keeps_the_reserve_when_measuring_would_cost_too_much():
    plan = plan_of(0.001, n_images=200)  # the whole output is one batch: measuring again costs more than it saves
    deadline = Deadline(600)
    deadline.reserve(20.0)
    recheck_reserve(plan, deadline, UnusableG(0.0), "cpu")
    assert deadline.reserve_s == 20.0 and not deadline.recheck_due(deadline.train_end)


class OutOfMemoryG(SleepyG):
    def forward(self, z, y):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_the_recheck_keeps_the_reserve_and_training_goes_on(capsys):
    deadline = Deadline(600)
    deadline.reserve(20.0)
    recheck_reserve(plan_of(0.001), deadline, OutOfMemoryG(0.0), "cpu")
    assert deadline.reserve_s == 20.0 and not deadline.recheck_due(deadline.train_end)
    assert capsys.readouterr().out == ("[main] output not measured again: out of memory beside training at batch 64; "
                                       "the start-up reserve stands\n")


def test_the_recheck_is_due_once_near_the_end_of_the_window():
    start = time.time()
    deadline = Deadline(100, start=start)
    deadline.reserve(40.0)  # the window ends at start + 60; the recheck comes 0.3 x 40 = 12 s before
    assert RECHECK_LEAD * 40.0 > RECHECK_LEAD_MIN_S
    assert not deadline.recheck_due(start + 60 - 12.5)
    assert deadline.recheck_due(start + 60 - 11.5)
    deadline.revise_reserve(30.0)
    assert deadline.train_end == start + 70 and not deadline.recheck_due(start + 69)
    short = Deadline(100, start=start)
    short.reserve(4.0)  # a small reserve still leaves RECHECK_LEAD_MIN_S to act on
    assert short.recheck_due(start + 96 - RECHECK_LEAD_MIN_S + 0.1)


def test_the_status_line_counts_down_to_the_window_the_recheck_moved(tmp_path, capsys):
    """The status line's "left" follows the deadline: after the recheck moved the end of training by 30 s, the
    time left says so (it used the window's end from the session's start)."""
    deadline = Deadline(600)
    deadline.reserve(300.0)
    status_log = StatusLog(str(tmp_path / "stats.jsonl"), True, 100, time.time(), deadline)
    state = types.SimpleNamespace(step=1, images_seen=8, batch_size=8, n_dis=1, schedule_progress=0.0)
    means = {"images_per_s": 1.0, "g_loss": 0.0, "d_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
    now = time.time()
    status_log.status(now, state, means, (1e-4, 1e-4), {})
    deadline.revise_reserve(270.0)
    status_log.status(now, state, means, (1e-4, 1e-4), {})
    first, second = [json.loads(line)["train_left_s"] for line in open(tmp_path / "stats.jsonl")]
    assert second - first == pytest.approx(30.0)
    assert "left" in capsys.readouterr().out

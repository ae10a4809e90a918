"""The budget is a promise: the reserve measured at start-up, a budget that cannot hold the output refused in one
line naming one that can, and output stages that stop a few seconds past the end instead of overrunning."""
import os
import re
import time
import zipfile

import pytest
import torch

from src.budget import (OVERRUN_GRACE_S, Deadline, OutOfTime, budget_flag_text, deadline_check, reserve_margin,
                        smallest_budget)
from src.config import make_config, parse_duration
from src.main import main, write_submission
from src.models import build_models
from src.reserve import checkpoint_bytes, mifid_share, training_round_seconds

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
    assert training_round_seconds(cfg, gen_s=0.01, d_s=0.002) == pytest.approx(3 * 10 * (1 * 0.01 + 3 * 0.002))
    cfg = make_config({"batch_size": 10, "n_dis": 2, "g_steps": 2, "dis_loss_limit": 0.5, "n_dis_max": 4})
    # the adaptive D steps may reach n_dis_max: 4 + 2 G forwards, 2 * 4 + 2 D forwards
    assert training_round_seconds(cfg, gen_s=0.01, d_s=0.002) == pytest.approx(3 * 10 * (6 * 0.01 + 10 * 0.002))


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


def test_too_small_a_budget_is_refused_at_start_up_and_the_named_one_fits(tmp_path, tiny_data_dir, capsys):
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
    start = time.time()
    assert main([*args, "--time-budget", named]) == 0
    took = time.time() - start
    assert took <= parse_duration(named) + OVERRUN_GRACE_S, f"{took:.1f}s on a {named} budget"
    assert "training stopped (deadline)" in capsys.readouterr().out
    with zipfile.ZipFile(out / "images.zip") as archive:
        assert len(archive.namelist()) == 300

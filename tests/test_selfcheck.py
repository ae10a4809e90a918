"""The first-minute self-check: it leaves the run untouched, names a failing stage in one line, and falls back to
eager when a compiled round fails."""
import pytest
import torch

import src.selfcheck as selfcheck_module
from src.config import make_config
from src.distributed import current_dist_info
from src.main import main
from src.selfcheck import SelfCheckError, run_self_check
from src.train import build_run_nets

TINY = dict(recipe="dcgan", g_ch=8, d_ch=8, batch_size=8, z_dim=16)


def state_of(nets):
    return {name: {k: v.clone() for k, v in module.state_dict().items()}
            for name, module in (("G", nets.G), ("D", nets.D), ("G_ema", nets.G_ema))}


def test_the_check_runs_every_stage_and_puts_everything_back(dogs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = make_config(TINY)
    dist = current_dist_info("cpu")
    nets = build_run_nets(cfg, len(dogs.breeds), "cpu", dist)
    before, rng = state_of(nets), torch.get_rng_state()
    seconds = run_self_check(cfg, nets, dogs, None, dist)
    assert seconds > 0 and "every stage ran on the device" in capsys.readouterr().out
    after = state_of(nets)
    assert all(torch.equal(before[m][k], after[m][k]) for m in before for k in before[m])
    assert torch.equal(torch.get_rng_state(), rng)  # training draws the same batches and noise as without the check
    assert not nets.opt_d.state and not nets.opt_g.state  # Adam starts from scratch, as without the check
    assert list(tmp_path.iterdir()) == []  # it writes no file, not even into the working folder


@pytest.mark.parametrize("broken, stage", [
    ("GanStep.d_phase", "a training round"),
    ("encode_png", "generation, PNG"),
    ("standing_bn_stats_", "standing statistics"),
])
def test_a_failing_stage_is_one_line_naming_it(dogs, monkeypatch, broken, stage):
    def fail(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    if broken == "GanStep.d_phase":
        monkeypatch.setattr(selfcheck_module.GanStep, "d_phase", fail)
    else:
        monkeypatch.setattr(selfcheck_module, broken, fail)
    cfg = make_config(TINY)
    dist = current_dist_info("cpu")
    nets = build_run_nets(cfg, len(dogs.breeds), "cpu", dist)
    with pytest.raises(SelfCheckError) as caught:
        run_self_check(cfg, nets, dogs, None, dist)
    message = str(caught.value)
    assert "self-check failed in " in message and stage in message and "no kernel image" in message
    assert "\n" not in message


def test_a_failing_compiled_round_falls_back_to_eager(dogs, monkeypatch, capsys):
    class BrokenCompiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("triton: compute capability 6.0 is not supported")

    monkeypatch.setattr(torch, "compile", lambda module: BrokenCompiled(module))
    cfg = make_config({**TINY, "compile": True})
    dist = current_dist_info("cpu")
    nets = build_run_nets(cfg, len(dogs.breeds), "cpu", dist)
    assert isinstance(nets.D_train.compiled, BrokenCompiled)
    run_self_check(cfg, nets, dogs, None, dist)
    log = capsys.readouterr().out
    for name in ("G", "D"):
        assert f"torch.compile of {name} failed (RuntimeError: triton: compute capability 6.0" in log
        assert f"running {name} eager" in log
    assert nets.G_train.compiled is None and nets.D_train.compiled is None  # training runs them eager
    assert "every stage ran on the device" in log


def test_main_ends_in_one_line_when_the_check_fails(tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(selfcheck_module, "encode_png", lambda *a, **k: (_ for _ in ()).throw(OSError("EIO")))
    code = main(["--data-dir", tiny_data_dir, "--out", str(tmp_path / "out"), "--recipe", "dcgan", "--g-ch", "8",
                 "--d-ch", "8", "--decode-workers", "1", "--time-budget", "1m"])
    captured = capsys.readouterr()
    assert code == 2
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "self-check failed in" in errors[0] and "OSError: EIO" in errors[0]
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "out" / "images.zip").exists()

"""Config: durations, recipes, flag precedence, bad flags."""
import sys

import pytest

from src.config import (RECIPE_SUMMARIES, RECIPES, Config, ConfigError, format_duration, make_config,
                        parse_config, parse_duration, recipe_diff, strip_jupyter_args)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("8h", 28800), ("8h30m", 30600),
                                           ("1h2m3s", 3723), ("45", 45), (" 1.5h ", 5400), (12, 12)])
def test_parse_duration_reads_every_documented_form(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "10x", "5m3", "1d", "nan", "inf", "-inf", "-5", "1e400", float("nan"), -1])
def test_parse_duration_rejects_garbage_with_an_example(text):
    with pytest.raises(ValueError, match="8h30m"):
        parse_duration(text)


def test_format_duration():
    assert format_duration(4.54) == "4.5s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3723) == "1h02m03s"


def test_recipe_then_flags_precedence():
    cfg, _ = parse_config(["--recipe", "dcgan", "--lr-g", "0.001", "--no-flip"])
    assert cfg.arch == "dcgan" and cfg.loss == "bce" and cfg.beta1 == 0.5  # from the recipe
    assert cfg.lr_g == 0.001 and cfg.lr_d == RECIPES["dcgan"]["lr_d"]     # the explicit flag wins
    assert cfg.flip is False


def test_demo_is_one_named_recipe_plus_its_run_settings():
    cfg, _ = parse_config(["--demo", "--g-ch", "8"])
    assert cfg.device == "cpu" and cfg.time_budget == 45.0 and cfg.recipe == "demo" and cfg.arch == "dcgan"
    assert cfg.g_ch == 8 and cfg.draw_res == 32  # the flag wins, the rest is the demo recipe's
    # everything the demo trains with is the recipe: the banner's "recipe demo" and the flags say it all
    assert recipe_diff(cfg) == {"demo": True, "device": "cpu", "time_budget": 45.0, "status_every": 3.0,
                                "grid_every": 10.0, "ckpt_every": 15.0, "g_ch": 8}
    cfg, _ = parse_config(["--demo", "--recipe", "biggan"])
    assert cfg.recipe == "biggan" and cfg.arch == "resnet" and cfg.device == "cpu"
    assert (cfg.g_ch, cfg.batch_size) == (64, 64)  # --demo's run settings never touch a recipe's model


def test_every_recipe_has_a_summary_for_the_banner():
    assert set(RECIPE_SUMMARIES) == set(RECIPES)


@pytest.mark.parametrize("argv, seconds", [
    (["--time-budget", "8h30m"], {"time_budget": 30600.0}),
    (["--status-every", "90s", "--grid-every", "2m", "--ckpt-every", "1h", "--fid-every", "0"],
     {"status_every": 90.0, "grid_every": 120.0, "ckpt_every": 3600.0, "fid_every": 0.0}),
    ([], {"time_budget": 30600.0, "status_every": 10.0, "grid_every": 600.0, "ckpt_every": 1800.0}),
])
def test_durations_are_settled_as_seconds(argv, seconds):
    cfg, _ = parse_config(argv)
    assert {name: getattr(cfg, name) for name in seconds} == seconds


def test_the_diffaug_policy_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="unknown DiffAugment policy 'colour' in --diffaug 'colour,cutout'"):
        parse_config(["--diffaug", "colour,cutout"])


def test_default_recipe_is_the_plain_config():
    assert make_config() == Config()
    assert recipe_diff(make_config()) == {}
    assert recipe_diff(make_config({"recipe": "sngan", "g_ch": 16})) == {"g_ch": 16}


def test_every_recipe_builds_a_valid_config():
    for name in RECIPES:
        cfg = make_config({"recipe": name})
        assert cfg.recipe == name


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "stylegan9"], "unknown recipe 'stylegan9'"),
    (["--loss", "wasserstein"], "--loss 'wasserstein': choose one of"),
    (["--time-budget", "soon"], "--time-budget"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--time-budget", "nan"], "--time-budget: duration 'nan' must be a finite number of seconds, 0 or more"),
    (["--time-budget", "inf"], "--time-budget: duration 'inf' must be a finite number"),
    (["--time-budget", "-5"], "--time-budget: duration '-5' must be a finite number of seconds, 0 or more"),
    (["--time-budget", "0"], "--time-budget must be more than 0, got 0.0s"),
    (["--time-budget", "0h0m"], "--time-budget must be more than 0, got 0.0s"),
    (["--recipe", "biggan", "--draw-res", "32"], "--draw-res 32 is a DCGAN option"),
    (["--status-every=-1"], "--status-every: duration '-1' must be a finite number of seconds, 0 or more"),
    (["--ckpt-every", "nan"], "--ckpt-every: duration 'nan' must be a finite number"),
    (["--lr-g", "nan"], "--lr-g must be a finite number, got nan"),
    (["--crop-margin=-inf"], "--crop-margin must be a finite number, got -inf"),
    (["--fid-samples=-3"], "--fid-samples must be 0 or more, got -3"),
    (["--max-kimg=-1"], "--max-kimg must be 0 or more, got -1.0"),
    (["--lecam-weight=-0.3"], "--lecam-weight must be 0 or more, got -0.3"),
    (["--ema-kimg=-1"], "--ema-kimg must be 0 or more, got -1.0"),
    (["--ada-target", "1.5"], "--ada-target 1.5 must be in \\[0, 1\\]"),
    (["--ada-target", "0.6", "--ada-kimg", "0"], "--ada-kimg 0.0 more than 0"),
    (["--ada-target", "0.6", "--diffaug", ""], "--ada-target needs a DiffAugment policy"),
    (["--labels", "zipf"], "--labels 'zipf': choose one of uniform, data"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_unknown_flag_is_an_error_from_a_shell(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--time-budjet", "5m"])
    assert "unrecognized arguments: --time-budjet" in capsys.readouterr().err


def test_jupyter_arguments_are_ignored_in_a_notebook(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    cfg, _ = parse_config(["-f", "/root/.local/share/jupyter/runtime/kernel-1234.json"])
    assert cfg == Config()
    cfg, _ = parse_config(["--f=/root/.local/share/jupyter/runtime/kernel-v2-77.json", "--time-budget", "1h"])
    assert cfg.time_budget == 3600.0


def test_a_misspelt_flag_in_a_notebook_is_refused_not_dropped(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    with pytest.raises(SystemExit) as exit_request:
        parse_config(["-f", "/root/.local/share/jupyter/runtime/kernel-1234.json", "--time-buget", "60s"])
    assert exit_request.value.code == 2
    assert "kernel.py: error: unrecognized arguments: --time-buget 60s" in capsys.readouterr().err


@pytest.mark.parametrize("argv, kept", [
    (["-f", "k.json"], []),
    (["--f=k.json", "--demo"], ["--demo"]),
    (["--out", "-f", "k.json"], ["--out"]),
    (["--demo", "-f"], ["--demo", "-f"]),  # a -f without its file is not Jupyter's: argparse refuses it
])
def test_strip_jupyter_args_drops_only_the_kernel_file(argv, kept):
    assert strip_jupyter_args(argv) == kept


def test_report_flag_is_not_a_config_field():
    cfg, extras = parse_config(["--report", "some/out"])
    assert extras.report == "some/out" and cfg == Config()


def test_every_field_declares_its_resume_role():
    import dataclasses
    from src.config import RESUME_ROLES, fields_with_role
    for f in dataclasses.fields(Config):
        assert f.metadata.get("resume") in RESUME_ROLES, f"Config.{f.name} has no resume role"
    # the model's shapes always come from the checkpoint; the budget and the paths always from this run
    assert {"arch", "g_ch", "d_ch", "z_dim", "cond"} <= set(fields_with_role("model_shape"))
    assert {"time_budget", "out", "data_dir", "resume"} <= set(fields_with_role("this_run"))
    assert {"lr_g", "loss", "batch_size"} <= set(fields_with_role("from_ckpt"))


def test_choices_are_the_registries_names():
    """Each setting picked from a registry lists exactly the registry's names (one list, checked here)."""
    import dataclasses
    from src.data import TRAIN_ON_CHOICES
    from src.generate import TRAINING_BREEDS
    from src.losses import GAN_LOSSES
    from src.schedule import LR_SCHEDULES
    choices = {f.name: set(f.metadata["choices"]) for f in dataclasses.fields(Config)}
    assert choices["loss"] == set(GAN_LOSSES)
    assert choices["lr_schedule"] == set(LR_SCHEDULES)
    assert choices["labels"] == set(TRAINING_BREEDS)
    assert choices["train_on"] == set(TRAIN_ON_CHOICES)


def test_a_name_outside_the_choices_is_refused_with_the_list():
    with pytest.raises(ConfigError, match="--lr-schedule 'cosin': choose one of const, cosine, linear, restarts"):
        make_config({"lr_schedule": "cosin"})

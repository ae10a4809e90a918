"""The pipeline around training: a failed or interrupted run still leaves a valid images.zip."""
import re
import sys
import zipfile

import pytest

import src.main as main_module
from src.main import main

SMALL = ["--recipe", "cgan", "--g-ch", "8", "--d-ch", "8", "--shared-dim", "16", "--z-dim", "32",
         "--batch-size", "16", "--decode-workers", "1", "--n-images", "200", "--time-budget", "12s"]


def zip_count(path):
    with zipfile.ZipFile(path) as archive:
        return len(archive.namelist())


def test_training_crash_still_writes_the_zip_from_the_last_checkpoint(tmp_path, tiny_data_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(["--data-dir", tiny_data_dir, "--out", str(out), "--grid-every", "0", *SMALL]) == 0
    first_zip = (out / "images.zip").read_bytes()

    def broken_train(*args, **kwargs):
        raise RuntimeError("simulated crash inside training")

    monkeypatch.setattr(main_module, "train", broken_train)
    assert main(["--data-dir", tiny_data_dir, "--out", str(out), *SMALL]) == 1
    captured = capsys.readouterr()
    log = captured.out + captured.err
    assert "simulated crash inside training" in log and f"using G_ema from {out / 'ckpt.pt'}" in log
    assert zip_count(out / "images.zip") == 200
    assert (out / "images.zip").read_bytes() == first_zip  # same G_ema and seed -> the same images


def test_training_crash_without_checkpoint_uses_an_untrained_generator(tmp_path, tiny_data_dir, monkeypatch, capsys):
    monkeypatch.setattr(main_module, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert main(["--data-dir", tiny_data_dir, "--out", str(tmp_path / "out"), *SMALL]) == 1
    assert zip_count(tmp_path / "out" / "images.zip") == 200


def test_damaged_resume_checkpoint_is_one_clear_error(tmp_path, tiny_data_dir, capsys):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    code = main(["--data-dir", tiny_data_dir, "--out", str(tmp_path / "out"), "--resume", str(bad), *SMALL])
    captured = capsys.readouterr()
    assert code == 2
    assert f"cannot read checkpoint {bad}" in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize("argv, message", [
    (["--data-dir", "/nonexistent/dogs"], "/nonexistent/dogs"),
    (["--fid-weights", "/nonexistent/weights.pth"], "MiFID weights not found"),
])
def test_bad_paths_are_one_clear_error(tmp_path, tiny_data_dir, capsys, argv, message):
    args = ["--out", str(tmp_path / "out"), *SMALL, *argv]
    if "--data-dir" not in argv:
        args = ["--data-dir", tiny_data_dir, *args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("[dogkernel] error:")


def test_report_rebuilds_plots_from_stats(tmp_path, tiny_data_dir):
    out = tmp_path / "out"
    assert main(["--data-dir", tiny_data_dir, "--out", str(out), "--status-every", "1s", *SMALL]) == 0
    (out / "plots.png").unlink()
    assert main(["--report", str(out)]) == 0
    assert (out / "plots.png").stat().st_size > 1000


def test_cuda_device_without_cuda_is_one_clear_error(tmp_path, tiny_data_dir, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["--data-dir", tiny_data_dir, "--out", str(tmp_path / "out"), *SMALL, "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err


def test_an_existing_zip_is_only_replaced_by_a_trained_generator(tmp_path, tiny_data_dir, monkeypatch, capsys):
    """Failed resumes (damaged, missing, foreign) and runs that trained nothing leave the old images.zip alone."""
    import types

    from src.nets import LoopState
    from src.train import StopReason

    out = tmp_path / "out"
    out.mkdir()
    (out / "images.zip").write_bytes(b"the previous submission")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x02 not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    import torch
    torch.save({"format": 2, "config": {}, "n_classes": 4, "G": {}, "D": {}, "G_ema": {}, "opt_g": {},
                "opt_d": {}, "progress": {}}, foreign)
    (out / "ckpt.pt").write_bytes(b"truncated")
    for resume, message in ((str(damaged), "cannot read checkpoint"), (str(tmp_path / "missing.pt"), "no such file"),
                            (str(foreign), "does not fit the model"), ("auto", "cannot read checkpoint")):
        code = main(["--data-dir", tiny_data_dir, "--out", str(out), "--resume", resume, *SMALL])
        captured = capsys.readouterr()
        assert code == 2, resume
        assert message in captured.err and "Traceback" not in captured.out + captured.err
        assert (out / "images.zip").read_bytes() == b"the previous submission"
    (out / "ckpt.pt").unlink()

    def crashes_before_a_step(*args, **kwargs):
        raise RuntimeError("set-up failed")

    def trains_nothing(*args, **kwargs):
        return types.SimpleNamespace(progress=LoopState(), G_ema=None, stop_reason=StopReason.DEADLINE)

    for fake_train, code in ((crashes_before_a_step, 1), (trains_nothing, 1)):
        monkeypatch.setattr(main_module, "train", fake_train)
        assert main(["--data-dir", tiny_data_dir, "--out", str(out), *SMALL]) == code
        assert "is kept as it is" in capsys.readouterr().out
        assert (out / "images.zip").read_bytes() == b"the previous submission"


def test_fit_batch_to_data_by_hand(capsys):
    from src.config import make_config
    from src.data import DataError
    from src.settle import fit_batch_to_data
    cfg = make_config({"batch_size": 64})
    assert fit_batch_to_data(cfg, 500, 1) is cfg  # room for a batch: unchanged, nothing said
    assert capsys.readouterr().out == ""
    assert fit_batch_to_data(cfg, 5, 1).batch_size == 5
    assert capsys.readouterr().out == "[main] only 5 dog images, fewer than one batch of 64: this run uses batches of 5\n"
    assert fit_batch_to_data(cfg, 5, 2).batch_size == 10  # each of 2 ranks draws its 5 from the whole set
    with pytest.raises(DataError, match="only 1 dog image\\(s\\) could be loaded; training needs at least 2"):
        fit_batch_to_data(cfg, 1, 1)


def test_fewer_images_than_a_batch_trains_on_a_smaller_batch(tmp_path, tiny_data_dir, capsys):
    out = tmp_path / "out"
    code = main(["--data-dir", tiny_data_dir, "--out", str(out), *SMALL, "--max-images", "3", "--time-budget", "10s"])
    log = capsys.readouterr()
    assert code == 0, log.err
    found = re.search(r"\[main\] only (\d+) dog images, fewer than one batch of 16: this run uses batches of (\d+)\n",
                      log.out)
    assert found and found.group(1) == found.group(2) and int(found.group(1)) < 16
    assert "Traceback" not in log.out + log.err and "training stopped (deadline)" in log.out
    assert zip_count(out / "images.zip") == 200


def test_help_and_bad_flags_in_a_notebook_end_without_systemexit(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    jupyter = ["/opt/conda/lib/python3.10/site-packages/ipykernel_launcher.py", "-f",
               "/root/.local/share/jupyter/runtime/kernel-1234.json"]
    monkeypatch.setattr(sys, "argv", [*jupyter, "--help"])
    main_module.entry_point()  # no SystemExit: a notebook would print its traceback noise
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: kernel.py [-h]") and "finished with exit code" not in captured.out
    monkeypatch.setattr(sys, "argv", [*jupyter, "--time-buget", "60s"])
    main_module.entry_point()
    captured = capsys.readouterr()
    assert "kernel.py: error: unrecognized arguments: --time-buget 60s" in captured.err
    assert captured.out == "[dogkernel] finished with exit code 2\n"
    monkeypatch.setattr(sys, "argv", [*jupyter, "--time-budget", "nan"])
    main_module.entry_point()
    captured = capsys.readouterr()
    assert captured.err.startswith("[dogkernel] error: --time-budget: duration 'nan' must be a finite number")
    assert captured.out == "[dogkernel] finished with exit code 2\n"


def test_ranks_other_than_0_print_nothing_but_errors(tmp_path, tiny_data_dir, capsys, monkeypatch):
    import warnings
    monkeypatch.setenv("RANK", "1")  # what torchrun sets; WORLD_SIZE stays 1, so this process runs alone
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert main(["--data-dir", tiny_data_dir, "--out", str(tmp_path / "out"), *SMALL, "--time-budget", "10s",
                     "--n-images", "100"]) == 0
        warnings.warn("a library's warning on rank 1")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("train_on", ["photos", "both"])
def test_train_on_photos_trains_on_the_whole_photos(tmp_path, tiny_data_dir, capsys, train_on):
    out = tmp_path / "out"
    code = main(["--data-dir", tiny_data_dir, "--out", str(out), *SMALL, "--train-on", train_on, "--time-budget", "15s"])
    log = capsys.readouterr().out
    assert code == 0 and zip_count(out / "images.zip") == 200
    # the tiny set: 96 photos holding 115 dogs
    said, banner = {"photos": ("training on photos: 96 images", "data: 96 images"),
                    "both": ("training on both: 211 images (115 dog crops + 96 whole photos)", "data: 211 images")}[train_on]
    assert said in log and banner in log


def test_a_resumed_run_builds_its_models_once(tmp_path, tiny_data_dir, monkeypatch):
    """Resume validation, the reserve probe and training all use one G and one D (they were built up to three
    times: once to check the checkpoint, once for the reserve, once to train)."""
    import src.checkpoint
    import src.models
    import src.nets
    out = str(tmp_path / "out")
    flags = ["--data-dir", tiny_data_dir, "--out", out, "--grid-every", "0", "--no-self-check", *SMALL[:-2],
             "--max-kimg", "0.032", "--time-budget", "5m"]
    assert main(flags) == 0
    built = []

    def counting_build(*args, **kwargs):
        built.append(1)
        return src.models.build_models(*args, **kwargs)

    for module in (src.checkpoint, src.nets, main_module):
        monkeypatch.setattr(module, "build_models", counting_build)
    assert main([*flags[:-4], "--max-kimg", "0.064", "--time-budget", "5m", "--resume", "auto"]) == 0
    assert len(built) == 1

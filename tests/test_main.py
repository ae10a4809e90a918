"""The pipeline around training: a failed or interrupted run still leaves a valid images.zip."""
import zipfile

import pytest

import src.main as main_module
from src.main import main

SMALL = ["--recipe", "cgan", "--g-ch", "8", "--d-ch", "8", "--shared-dim", "16", "--z-dim", "32",
         "--batch-size", "16", "--decode-workers", "1", "--n-images", "200", "--time-budget", "8s"]


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
    log = capsys.readouterr().out
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

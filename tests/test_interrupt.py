"""SIGTERM and Ctrl-C outside training: every stage ends in one line, leaves no temporary file, keeps the old zip,
and decode workers print nothing. Real signals, sent to this process or to a subprocess."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import src.main as main_module
from src.generate import generate_images, write_images_zip
from src.interrupt import INTERRUPT_STAGES, RunInterrupted, interrupt_stage_of, signals_interrupt_run
from src.main import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--recipe", "cgan", "--g-ch", "8", "--d-ch", "8", "--shared-dim", "16", "--z-dim", "32",
         "--batch-size", "16", "--decode-workers", "1", "--status-every", "0", "--grid-every", "0"]


def test_the_stage_is_the_outermost_pipeline_function_on_the_stack():
    def write_submission():
        def generate_images():
            return interrupt_stage_of(sys._getframe())
        return generate_images()

    assert write_submission() == INTERRUPT_STAGES["write_submission"]
    assert interrupt_stage_of(sys._getframe()) == ""


def test_handlers_are_restored_and_a_signal_raises_in_between():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted) as stopped:
        with signals_interrupt_run():
            signal.raise_signal(signal.SIGTERM)
    assert stopped.value.signum == signal.SIGTERM and str(stopped.value) == "stopped by SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def signal_on_second_call(signum):
    """A stop_check that sends `signum` to this process the second time it is called (mid-stage)."""
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signum)
    return check


@pytest.mark.parametrize("stage, signum", [("zip", signal.SIGTERM), ("generation", signal.SIGINT)])
def test_a_signal_while_writing_the_zip_keeps_the_old_one(tmp_path, tiny_data_dir, capsys, monkeypatch, stage, signum):
    if stage == "zip":
        monkeypatch.setattr(main_module, "write_images_zip", lambda images, path, stop_check=None: write_images_zip(
            images, path, stop_check=signal_on_second_call(signum)))
    else:
        monkeypatch.setattr(main_module, "generate_images", lambda *args, stop_check=None, **kwargs: generate_images(
            *args, stop_check=signal_on_second_call(signum), **kwargs))
    out = tmp_path / "out"
    out.mkdir()
    (out / "images.zip").write_bytes(b"the previous submission")
    code = main(["--data-dir", tiny_data_dir, "--out", str(out), "--n-images", "1200", "--time-budget", "10s", *SMALL])
    captured = capsys.readouterr()
    name = signal.Signals(signum).name
    assert code == 128 + signum
    assert captured.err == (f"[dogkernel] stopped by {name} while writing images.zip; any previous images.zip is kept "
                            f"and no temporary file is left\n")
    assert "Traceback" not in captured.out and "KeyboardInterrupt" not in captured.out
    assert (out / "images.zip").read_bytes() == b"the previous submission"
    assert not [p for p in out.rglob("*.tmp")]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


SLOW_DECODE = textwrap.dedent("""
    import sys, time
    import src.data
    from src.main import main

    real_chunk = src.data._dog_decode_chunk

    def slow_chunk(job):
        print("decoding a chunk", flush=True)
        time.sleep(60)
        return real_chunk(job)

    src.data._dog_decode_chunk = slow_chunk
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True)])
def test_a_signal_while_decoding_ends_in_one_line_and_ends_the_workers(tmp_path, tiny_data_dir, signum, to_group):
    """SIGTERM to the process (a job manager), to the whole group (systemd, Slurm) or Ctrl-C in a terminal (SIGINT to
    the group), while two worker processes decode: one line, no worker traceback, no process left behind."""
    script = tmp_path / "slow_decode.py"
    script.write_text(SLOW_DECODE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(script), "--data-dir", tiny_data_dir, "--out", str(tmp_path / "out"),
                                "--decode-workers", "2", "--recipe", "cgan"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        for line in process.stdout:
            if "decoding a chunk" in line:
                break
        if to_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        # communicate() returns only when every process holding the pipes (the workers too) has ended
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum
    assert err == f"[dogkernel] stopped by {name} while loading the data; nothing was written\n"
    assert "Traceback" not in out and "decode pool failed" not in out

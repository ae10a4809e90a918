"""SIGTERM and Ctrl-C outside the training loop: the stage in progress unwinds cleanly and the run ends in one line.

The training loop catches the same signals itself (it finishes its step, saves a checkpoint and returns, so the
zip still gets written). Around everything else (data decoding, measuring, generation, the zip, scoring) a signal
raises RunInterrupted in the main thread: `with` blocks and `finally` clauses run (atomic writes delete their
temporary file, the old images.zip stays), and main() prints which stage was stopped.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

# Functions of the pipeline, outermost first, and what a stop inside each of them means for the outputs.
INTERRUPT_STAGES = {
    "load_dogs": "while loading the data; nothing was written",
    "real_features": "while computing the real images' features; nothing was written",
    "plan_reserve": "while measuring the output time; nothing was written",
    "train": "while setting up or wrapping up training; ckpt.pt is the last complete checkpoint",
    "fallback_generator": "before images.zip was written; any previous images.zip is kept",
    "pick_truncation": "while choosing the truncation; any previous images.zip is kept",
    "write_submission": "while writing images.zip; any previous images.zip is kept and no temporary file is left",
    "report_mifid": "while scoring; images.zip is complete",
    "write_plots": "while drawing the plots; images.zip is complete",
}


class RunInterrupted(BaseException):
    """SIGTERM/SIGINT outside training. A BaseException, like KeyboardInterrupt, so `except Exception` handlers
    (the decode pool's fallback, a failing grid) do not swallow it."""

    def __init__(self, signum: int, stage: str):
        self.signum, self.stage = signum, stage
        super().__init__(f"stopped by {signal.Signals(signum).name} {stage}".rstrip())


def interrupt_stage_of(frame) -> str:
    """What the outermost pipeline function on the stack was doing when the signal came (see INTERRUPT_STAGES)."""
    stage = ""
    while frame is not None:
        stage = INTERRUPT_STAGES.get(frame.f_code.co_name, stage)
        frame = frame.f_back
    return stage


@contextlib.contextmanager
def handling_stop_signals(on_signal):
    """While inside, SIGTERM and SIGINT call on_signal(signum, frame); the previous handlers come back afterwards.
    Yields False (and changes nothing) outside the main thread, where Python cannot catch signals."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_interrupt_run():
    """While inside: SIGTERM and SIGINT raise RunInterrupted in this process's main thread.

    Processes forked meanwhile (the decode pool) inherit the handler: there SIGINT is ignored (the parent decides,
    and a terminal's Ctrl-C reaches the whole group) and SIGTERM ends the worker quietly.
    Outside the main thread (signals cannot be caught there) this does nothing.
    """
    owner = os.getpid()

    def on_signal(signum, frame):
        if os.getpid() != owner:
            # SystemExit, not os._exit: a worker stopped inside the pool's queue lock must release it on the way
            # out (the parent's pool.terminate() takes that lock), and multiprocessing prints no traceback for it
            if signum == signal.SIGTERM:
                raise SystemExit(128 + signum)
            return
        raise RunInterrupted(signum, interrupt_stage_of(frame))

    with handling_stop_signals(on_signal):
        yield

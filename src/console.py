"""One way to print progress: `log(tag, message)` writes '[tag] message' and flushes.

Under torchrun every rank runs the same code; only rank 0 prints, except errors (`error=True`, to stderr),
so a failure on any rank is still seen. quiet_other_ranks() extends that to Python's warnings.
"""
from __future__ import annotations

import os
import sys
import warnings


def is_rank_zero() -> bool:
    """True unless torchrun started this process as a rank other than 0 (RANK is set before any import)."""
    return os.environ.get("RANK", "0") == "0"


def log(tag: str, message: str, *, error: bool = False) -> None:
    """'[tag] message' on stdout (rank 0 only), or on stderr from every rank when error is set."""
    if error:
        print(f"[{tag}] {message}", file=sys.stderr, flush=True)
    elif is_rank_zero():
        print(f"[{tag}] {message}", flush=True)


def quiet_other_ranks() -> None:
    """On a torchrun rank other than 0, drop Python warnings too (torch's and the libraries'): rank 0 shows them
    once, and the other ranks print errors only."""
    if not is_rank_zero():
        warnings.filterwarnings("ignore")

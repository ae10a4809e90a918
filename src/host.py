"""Where this process runs: a Kaggle kernel, a Jupyter/IPython notebook. Paths and argument handling depend on it."""
from __future__ import annotations

import os
import sys


def on_kaggle() -> bool:
    """True inside a Kaggle notebook or kernel run."""
    return os.path.isdir("/kaggle/input") or "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def running_in_notebook() -> bool:
    """True inside Jupyter/IPython (Kaggle notebooks), where sys.argv holds the kernel's own arguments."""
    return "ipykernel" in sys.modules or "IPython" in sys.modules

"""torch.compile that cannot cost a run: a module whose compiling fails runs eager instead, said in one line.

torch.compile compiles on the first call (and again for new shapes); a Triton or Inductor failure then surfaces
as an exception from that call, hours of budget before any result. `compile_or_eager` catches it until a compiled
call has succeeded once; after that an exception is the model's own and propagates.
"""
from __future__ import annotations

import torch

from src.console import log

OUT_OF_MEMORY_ERRORS = (torch.cuda.OutOfMemoryError,) + (
    (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ())


class CompiledOrEager(torch.nn.Module):
    """Calls `compiled` until it fails before its first success, then `eager` for good (one line says why).
    Out-of-memory errors are not compile failures: they propagate (the loop halves the batch)."""

    def __init__(self, eager: torch.nn.Module, compiled, name: str):
        super().__init__()
        self.eager, self.name = eager, name
        # None once fallen back; kept out of the registered submodules (it wraps `eager`, registered already)
        self.__dict__["compiled"] = compiled
        self.proven = False           # a compiled call has succeeded

    def forward(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        if self.proven:
            return self.compiled(*args, **kwargs)
        try:
            result = self.compiled(*args, **kwargs)
        except OUT_OF_MEMORY_ERRORS:
            raise
        except Exception as error:  # Triton / Inductor / Dynamo failures have no common base class
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            log("compile", f"torch.compile of {self.name} failed ({type(error).__name__}: {first_line}); "
                f"running {self.name} eager")
            self.compiled = None
            return self.eager(*args, **kwargs)
        self.proven = True
        return result


def compile_or_eager(module: torch.nn.Module, name: str, compile_fn=torch.compile) -> CompiledOrEager:
    """`module` compiled with `compile_fn`, falling back to `module` itself when compiling fails (see above)."""
    try:
        compiled = compile_fn(module)
    except Exception as error:  # e.g. a Python version torch.compile does not support yet
        log("compile", f"torch.compile of {name} is unavailable ({type(error).__name__}: {error}); running it eager")
        compiled = None
    return CompiledOrEager(module, compiled, name)

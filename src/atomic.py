"""Atomic file output: a reader sees the old file or the whole new one, never a half-written one."""
from __future__ import annotations

import contextlib
import os
import re
import secrets

# The temporary names atomic_path uses: ".<target name>.<8 characters>.tmp" beside the target. Eight lowercase
# letters, digits or underscores also match the names of tempfile.mkstemp, which earlier versions used.
ATOMIC_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _atomic_create_tmp(folder: str, name: str) -> str:
    # O_EXCL with mode 0o666: the kernel applies the umask, so the finished file gets the mode any new file gets
    # here (0644 under umask 022), not mkstemp's 0600
    while True:
        tmp_path = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp_path
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    On an exception (or KeyboardInterrupt / a stop signal) the temporary file is removed and `path` is left
    untouched. A process killed outright leaves the temporary behind: remove_stale_tmp_files() clears it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = _atomic_create_tmp(folder, os.path.basename(path))
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp_path:
        with open(tmp_path, "wb") as f:
            f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_tmp_files(folder: str) -> list[str]:
    """Delete the temporary files atomic_path left in `folder` when a run was killed mid-write; returns their paths.

    Only names of atomic_path's form are touched; a missing folder is nothing to clean.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        path = os.path.join(folder, name)
        if ATOMIC_TMP_NAME.match(name) and os.path.isfile(path):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass  # not ours to fight over: the next atomic write uses a fresh name anyway
    return removed

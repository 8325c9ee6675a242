"""Atomic output folders: write into a temporary sibling, rename into place at the end.

A failed or interrupted job leaves no partial output, and an existing output is only replaced (``overwrite``)
once the new one is complete.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile


class OutputExistsError(FileExistsError):
    pass


def _mkdir_unique(parent: str, prefix: str) -> str:
    """Like tempfile.mkdtemp, but with the usual umask-based mode (mkdtemp's 0700 would stick to the final output)."""
    for _ in range(1000):
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary folder {prefix}* in {parent}")


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False):
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise OutputExistsError(f"{dst} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = _mkdir_unique(parent, f".{os.path.basename(dst)}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename: readers see the old file or the new one,
    never a half-written one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

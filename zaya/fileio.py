"""Atomic output folders: write into a temporary sibling, rename into place at the end.

A failed or interrupted job leaves no partial output, and an existing output is only replaced (``overwrite``)
once the new one is complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


class OutputExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False):
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise OutputExistsError(f"{dst} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
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

"""Progress bars that stay out of logs: tqdm on a terminal or in a notebook, none when stderr is redirected (a log
file, CI, ``zaya demo > log``), where every update would add one more carriage-return line to the file."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm as _tqdm


def interactive() -> bool:
    """stderr is a terminal, or we run in a Jupyter kernel (its bars are widgets, not text)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def tqdm(*args, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm``, disabled unless :func:`interactive`."""
    return _tqdm(*args, disable=disable or not interactive(), **kwargs)

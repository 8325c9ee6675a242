"""Progress bars: drawn on a terminal, absent when stderr is a file (the demo's log: no carriage-return updates)."""
import io
import sys

from zaya import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run_bar(monkeypatch, stream, **kw) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    bar = progress.tqdm(total=1000, desc="train", mininterval=0, file=stream, **kw)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    return stream.getvalue()


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch):
    assert _run_bar(monkeypatch, io.StringIO()) == ""
    assert not progress.interactive()


def test_bar_on_a_terminal_unless_disabled(monkeypatch):
    out = _run_bar(monkeypatch, _Terminal())
    assert "\r" in out and "1000/1000" in out and progress.interactive()
    assert _run_bar(monkeypatch, _Terminal(), disable=True) == ""

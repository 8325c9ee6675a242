"""zaya bench forward/decode --vs-transformers: one random checkpoint in both, same logits and tokens, ratios."""
import argparse

import pytest

from conftest import require

require("torch", why="the comparison needs torch (pip install torch==2.13.0, CPU wheel)")
require("transformers", minversion="5.24", why="the comparison needs transformers >= 5.24 (mainline `zaya`)")

from zaya.bench import cli, vs_transformers  # noqa: E402


def test_quick_run_same_weights_same_tokens(tmp_path):
    rows = vs_transformers.run(out=str(tmp_path), quick=True)
    fwd, *dec = rows
    assert fwd["what"] == "forward" and fwd["max_abs_logit_diff"] < 1e-4  # one checkpoint, converted, not retrained
    assert fwd["zaya_ms"] > 0 and fwd["transformers_ms"] > 0 and fwd["ratio"] == fwd["zaya_ms"] / fwd["transformers_ms"]
    assert [r["same_tokens"] for r in dec] == [True, True] and {r["what"] for r in dec} == {
        "decode (AR greedy, host loop)", "decode (AR greedy, device loop)"}
    assert (tmp_path / "vs_transformers.md").read_text().count("zaya / transformers") == 1


@pytest.mark.parametrize("what", ["forward", "decode"])
def test_cli_flag_dispatches(monkeypatch, what):
    calls = []
    monkeypatch.setattr(vs_transformers, "run", lambda what, out, quick: calls.append((what, out, quick)) or [])
    cli.main(argparse.Namespace(what=what, preset=None, out=None, quick=True, compile_cache=False,
                                vs_transformers=True))
    assert calls == [((what,), None, True)]

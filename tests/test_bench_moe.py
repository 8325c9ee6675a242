"""Smoke test of the MoE dispatch benchmark (tiny sizes; no speed checks)."""
import os

from zaya.bench import moe as bench_moe
from zaya.kernels import platform
from zaya.model import moe, moe_dispatch


def test_moe_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(moe_dispatch, "GATHER_MAX_BYTES", 1)  # gather refuses: the row says so, the rest runs
    rows = bench_moe.run(str(tmp_path), quick=True, impls=("ragged", "sorted", "gather", "pallas", "auto"),
                         tokens=(3,), batches=(2,), repeats=1)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"ragged", "sorted", "gather", "pallas", "auto"} and all(r["tokens"] == 6 for r in rows)
    assert by["ragged"]["vs_ragged"] == 1.0 and by["sorted"]["ms"] > 0 and by["sorted"]["gb_s"] > 0
    assert by["auto"]["runs"] == moe.auto_impl(6, bench_moe.QUICK["num_experts"])
    assert "refused" in by["gather"]["note"] and "ms" not in by["gather"]
    if platform.interpret():  # CPU: the kernel is interpreted (its time is no speed) and there is no HBM
        assert by["pallas"]["note"] == "interpret (not speed)" and "vs_ragged" not in by["pallas"]
        assert by["sorted"]["hbm_frac"] is None
    for f in ("moe.md", "moe.json", "moe.csv"):
        assert os.path.getsize(tmp_path / f) > 0
    assert "machine:" in (tmp_path / "moe.md").read_text()

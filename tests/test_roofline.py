"""The roofline report (zaya.bench.roofline): predicted-vs-measured rows and the ZAYA1-8B tables."""
import pytest

import zaya
from zaya.bench import roofline as R
from zaya.bench import roofline_model as M


def test_cpu_comparison_rows():
    rows = [{"preset": "tiny", "batch": 1, "cache_len": 8, "cache_slots": 40, "T": T, "ms": 0.5 + 0.01 * T,
             "ratio": (0.5 + 0.01 * T) / 0.51, "dtype": "float32"} for T in (1, 4, 16, 32)]
    out = R.cpu_comparison(rows, R.Hardware("cpu", 1e10, 1e11, overhead=1e-5))
    assert [r["T"] for r in out] == [1, 4, 16, 32]
    assert out[0]["pure_ratio"] == pytest.approx(1.0) and out[0]["fit_ratio"] == pytest.approx(1.0)
    assert all(r["fit_ratio"] == pytest.approx(r["measured_ratio"], rel=0.3) for r in out)
    # more tokens never move fewer bytes or FLOPs
    assert all(a["mbytes"] <= b["mbytes"] and a["gflops"] < b["gflops"] for a, b in zip(out, out[1:]))


def test_zaya8b_table_reads_the_model():
    rows = R.zaya8b_table(hardware=("H100",), batches=(1, 16), contexts=(4096,), beta=0.85)
    c = zaya.preset("zaya1-8b", dtype="bfloat16")
    for r in rows:
        for name, s, lv in R.LAYOUTS_8B:
            st = M.step_cost(c, M.HARDWARE["H100"], s, r["batch"], 4096, 16, lv, 0.85)
            assert r[name] == pytest.approx(st["speedup"])
    md = R.zaya8b_markdown(rows)
    assert md.count("\n") == len(rows) + 1 and f"**{rows[0]['TF K=16']:.2f}**×" in md

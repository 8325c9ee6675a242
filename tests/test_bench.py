"""Smoke tests of the benchmarks (tiny sizes): rows with the expected keys and files in the out dir. No speed checks."""
import argparse
import json
import os

import pytest

from zaya.bench import cli, common, decode, forward, roofline, samplers


def test_machine_description_names_the_hardware():
    m = common.machine()
    for k in ("cpu", "cores", "jax", "backend", "devices"):
        assert m[k]
    md = common.machine_markdown(m)
    assert m["cpu"] in md and f"jax {m['jax']}" in md and m["backend"] in md


def test_forward_smoke(tmp_path):
    res = forward.run(("tiny",), str(tmp_path), quick=True, batches=(1,), seqs=(8,), widths=(1, 4), cache_len=8)
    assert {"throughput", "ratio", "machine"} <= set(res)
    (t,) = res["throughput"]
    assert {"preset", "batch", "seq", "ms", "tokens_per_s"} <= set(t) and t["tokens"] == 8
    assert [r["T"] for r in res["ratio"]] == [1, 4]
    assert res["ratio"][0]["ratio"] == 1.0 and res["ratio"][1]["cache_len"] == 8
    for f in ("forward.md", "forward.json", "forward_throughput.csv", "forward_ratio.csv", "forward_ratio.png"):
        assert os.path.getsize(tmp_path / f) > 0
    md = (tmp_path / "forward.md").read_text()
    assert "machine:" in md and "t(T)/t(1)" in md
    # the roofline comparison consumes these rows
    cmp = roofline.cpu_comparison(res["ratio"], roofline.Hardware("cpu", 1e10, 1e11, overhead=1e-5))
    assert [r["T"] for r in cmp] == [1, 4] and cmp[0]["pure_ratio"] == pytest.approx(1.0)
    assert {"measured_ratio", "pure_ratio", "ideal_ratio", "pure_bound", "achieved_gb_s"} <= set(cmp[1])


def test_decode_smoke(tmp_path):
    rows = decode.run(("tiny",), str(tmp_path), quick=True, batches=(2,), prompt_len=4, new_tokens=3)
    (r,) = rows
    assert {"preset", "batch", "ms_per_token", "ms_per_step", "tokens_per_s", "forwards", "prefill_ms"} <= set(r)
    assert r["batch"] == 2 and r["tokens"] == 6 and r["forwards"] == 2
    for f in ("decode.md", "decode.json", "decode.csv"):
        assert os.path.getsize(tmp_path / f) > 0


def test_samplers_smoke(tmp_path):
    grid = [dict(sampler="two_forward", block_size=2, levels=None, acceptance="greedy", batch=2)]
    # 3 prompts in batches of 2: two generate calls per config, pooled
    rows = samplers.run(out=str(tmp_path), grid=grid, max_new_tokens=3, repeats=1, compile_cache=False, prompt_len=4,
                        num_prompts=3)
    (r,) = rows
    for k in ("config", "acceptance", "batch", "tokens_per_forward", "tokens_per_step", "tokens_per_step_hist",
              "acceptance_per_position", "useful_slot_fraction", "speedup", "speedup_e2e", "equal_ar",
              "seconds", "ar_seconds"):
        assert k in r, k
    assert r["equal_ar"] is True and r["loop"] == "host"  # greedy two-forward is exactly AR
    # 3 new tokens per row, the first from the prefill, K + 1 = 3 per step: one perfect step per batch of 2
    assert r["oracle_steps"] == 2 and r["speedup_oracle"] >= r["speedup"] * (1 - 1e-9)
    assert len(r["acceptance_per_position"]) == 2 and r["batch"] == 2 and r["prompts"] == 3 and r["tokens"] == 9
    for f in ("samplers.md", "samplers.csv", "samplers.json", "samplers_acceptance.png", "samplers_speedup.png"):
        assert os.path.getsize(tmp_path / f) > 0
    data = json.loads((tmp_path / "samplers.json").read_text())
    assert "RANDOM" in data["model"] and data["rows"][0]["config"] == "TF K=2" and data["loop"] == "host"
    assert "decode loop: host" in (tmp_path / "samplers.md").read_text()


def test_compare_pads_every_batch_to_one_length(monkeypatch):
    """Prompts in different 16-token length buckets (3 and 21 tokens) decode at one padded length, so one compiled
    program serves every batch; the tokens stay AR's."""
    import zaya
    m = samplers.common.random_model("tiny", "float32", std=0.3)
    seen, real = [], zaya.generate

    def spy(model, rows, **kw):
        seen.append(-(-max(map(len, rows)) // kw["pad_to"]) * kw["pad_to"])
        return real(model, rows, **kw)
    monkeypatch.setattr(zaya, "generate", spy)
    prompts = [[2, 7, 9], [2] + list(range(10, 30))]
    cfg = dict(sampler="two_forward", block_size=2, levels=None, acceptance="greedy", batch=1)
    r = samplers.compare(m, prompts, cfg, max_new_tokens=3, repeats=1)
    assert set(seen) == {32} and r["equal_ar"] is True and r["tokens"] == 6


def test_pooled_stats_equal_one_run_over_all_rows():
    """Pooling batch-by-batch results reproduces the counts of the runs (acceptance from raw counts, not averages)."""
    import zaya
    m = samplers.common.random_model("tiny", "float32", std=0.3)
    prompts = [[2, 7, 9, 11], [2, 8, 8], [2, 30, 31, 32, 33]]
    runs = [zaya.generate(m, [p], sampler="two_forward", block_size=3, max_new_tokens=5) for p in prompts]
    st = samplers.pooled(runs)
    assert st["tokens"] == 15 and st["rows"] == 3
    assert st["forwards"] == sum(r.stats["forwards"] for r in runs)
    assert st["acceptance_reached"][0] == sum(r.stats["counts"]["row_steps"] for r in runs)
    acc = sum(r.stats["counts"]["accepted"][0] for r in runs) / sum(r.stats["counts"]["reached"][0] for r in runs)
    assert st["acceptance_per_position"][0] == pytest.approx(acc)
    c = [r.stats["counts"] for r in runs]  # the first token of each row comes from the prefill, not a step
    assert st["tokens_per_step"] == pytest.approx(sum(x["committed"] for x in c) / sum(x["row_steps"] for x in c))


def test_oracle_steps_counts_the_longest_row_of_each_batch():
    from types import SimpleNamespace as NS
    runs = [NS(tokens=[[5] * 1, [5] * 9]), NS(tokens=[[5] * 4]), NS(tokens=[[5] * 17, [5] * 2])]
    # per step 4: ceil(8/4) = 2, ceil(3/4) = 1, ceil(16/4) = 4; a one-token row needs no step
    assert samplers.oracle_steps(runs, 4) == 7
    assert samplers.oracle_steps(runs, 16) == 3 and samplers.oracle_steps([NS(tokens=[[5]])], 4) == 0


def test_samplers_grid_and_prompts():
    g = samplers.default_grid()
    assert {c["sampler"] for c in g} == {"two_forward", "single_forward", "tidar"}
    assert {c["batch"] for c in g} == {1, 8} and {c["block_size"] for c in g} == {4, 8, 16}
    assert all(c.get("anchor") == "mask" for c in samplers.default_grid(anchor="mask") if c["sampler"] == "two_forward")
    assert samplers.label(dict(sampler="two_forward", block_size=15, anchor="mask")) == "TF K=15 mask-anchor"
    assert samplers.sparse_levels(16) == (0, 4, 7, 11)
    assert all(samplers.sparse_levels(k)[0] == 0 and max(samplers.sparse_levels(k)) <= k for k in range(1, 33))
    import zaya
    c = zaya.preset("tiny").replace(vocab_size=261)
    p, desc = samplers.make_prompts(c, 3)
    assert "tasks" in desc and len(p) == 3 and all(x[0] == 2 and max(x) < 261 for x in p)
    assert "tasks" in samplers.make_prompts(c.replace(vocab_size=264), 1)[1]  # byte vocab padded to a multiple of 8
    lp, ldesc = samplers.make_prompts(c, 3, "tasks", task_set="long")
    assert "long tasks" in ldesc and min(map(len, lp)) > 20 > max(map(len, p))   # 20+ char strings vs short ones
    p, desc = samplers.make_prompts(zaya.preset("tiny"), 2, length=7)
    assert "random" in desc and all(len(x) == 7 for x in p)


@pytest.mark.parametrize("what", ["forward", "decode", "convert", "samplers", "all"])
def test_cli_dispatch(monkeypatch, tmp_path, what):
    calls = []
    from zaya.bench import convert
    monkeypatch.setattr(forward, "run", lambda *a, **k: calls.append("forward") or {"ratio": []})
    monkeypatch.setattr(decode, "run", lambda *a, **k: calls.append("decode") or [])
    monkeypatch.setattr(convert, "run", lambda *a, **k: calls.append("convert") or {})
    monkeypatch.setattr(samplers, "run", lambda *a, **k: calls.append(("samplers", k.get("model_path"),
                                                                      k.get("preset"))) or [])
    monkeypatch.setattr(roofline, "measure_cpu", lambda *a, **k: roofline.Hardware("cpu", 1e10, 1e11))
    a = argparse.Namespace(what=what, preset=None, out=str(tmp_path / "o"), size_gb=0.01, quick=True,
                           compile_cache=False)
    cli.main(a)
    want = {"forward": ["forward"], "decode": ["decode"], "convert": ["convert"],
            "samplers": [("samplers", None, "tiny")],
            "all": ["forward", "decode", ("samplers", None, "tiny"), "convert"]}[what]
    assert calls == want


@pytest.mark.parametrize("what", ["attention", "moe", "system"])
def test_cli_dispatch_kernels_and_system(monkeypatch, what):
    import importlib
    mod = importlib.import_module(f"zaya.bench.{what}")
    calls = []
    monkeypatch.setattr(mod, "run", lambda *a, **k: calls.append(a) or [])
    cli.main(argparse.Namespace(what=what, preset=["zaya1-8b-4l"], out=None, quick=True, compile_cache=False))
    want = {"attention": (None, True), "moe": (None, True), "system": ("zaya1-8b-4l", None, True)}[what]
    assert calls == [want]


def test_compile_cache_is_scoped_to_the_command(monkeypatch, tmp_path):
    """`zaya bench` uses jax's persistent cache while it runs and leaves jax.config as it found it (a benchmark run
    from a notebook must not switch the process onto the on-disk cache)."""
    import jax
    seen = []
    monkeypatch.setenv("ZAYA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(decode, "run", lambda *a, **k: seen.append(jax.config.jax_compilation_cache_dir) or [])
    before = [getattr(jax.config, k) for k in common._CACHE_OPTIONS]
    cli.main(argparse.Namespace(what="decode", preset=None, out=None, size_gb=1.0, quick=True, compile_cache=True))
    assert seen == [str(tmp_path / "cache")]
    assert [getattr(jax.config, k) for k in common._CACHE_OPTIONS] == before
    with pytest.raises(RuntimeError):  # restored on an error too
        with common.compile_cache(str(tmp_path / "c2")) as path:
            assert jax.config.jax_compilation_cache_dir == path == str(tmp_path / "c2")
            assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5
            raise RuntimeError
    assert [getattr(jax.config, k) for k in common._CACHE_OPTIONS] == before


def test_cli_samplers_model_folder(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(samplers, "run", lambda *a, **k: calls.append((k.get("model_path"), k.get("preset"),
                                                                      k.get("loop"))) or [])
    monkeypatch.delenv("ZAYA_BENCH_MODEL", raising=False)
    a = argparse.Namespace(what="samplers", preset=[str(tmp_path)], out=None, size_gb=1.0, quick=True,
                           compile_cache=False, loop="device")
    cli.main(a)
    assert calls == [(str(tmp_path), None, "device")]

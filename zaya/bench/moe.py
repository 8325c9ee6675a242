"""MoE expert-block benchmark: every dispatch impl at ZAYA1-8B geometry (one layer's experts), decode to prefill.

For each token shape (T new tokens per row x batch B) and each impl (dense, ragged, gather, sorted, pallas, auto;
``zaya.model.moe``), the jitted expert block (routing given: uniform over the E real experts, fixed seed) is timed
round-robin with the others (``common.time_interleaved``), so machine load hits all alike, each call preceded by a
cache flush (a read of FLUSH_BYTES: one expert's bf16 weights, 25 MB, fit a 32 MiB L3 or a GPU's L2, and a decode
step of a real model finds them evicted by the other layers' weights), and reported as:

  ms           median wall time, compile excluded
  GB/s         useful bytes / time; useful bytes = weights of the experts the tokens are routed to (each once) +
               activations (input in the weight dtype, fp32 output), i.e. what a routed-only kernel must move
  HBM          GB/s as a fraction of the GPU's nominal bandwidth (the roofline's hardware table; GPU runs only)
  vs ragged    t(impl) / t(ragged) in the same run (< 1: faster than ragged)

On CPU ``pallas`` runs in interpret mode: run only with ``quick`` (small sizes) and labelled "interpret (not speed)";
``gather`` refuses shapes whose gathered weights exceed ``moe_dispatch.GATHER_MAX_BYTES`` (shown as "refused").
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from zaya.bench import common
from zaya.bench.roofline_model import hbm_bandwidth

IMPLS = ("dense", "ragged", "gather", "sorted", "pallas", "auto")
FULL = dict(hidden_size=2048, moe_intermediate_size=2048, num_experts=16)  # ZAYA1-8B
QUICK = dict(hidden_size=128, moe_intermediate_size=128, num_experts=16)
TOKENS, BATCHES = (1, 17, 85, 272, 512), (1, 16)
FLUSH_BYTES = 256 << 20


def _setup(geom: dict, dtype: str, B: int, T: int, seed: int = 0):
    from zaya.config import preset
    c = preset("tiny").replace(dtype=dtype, **geom)
    D, F, E = c.hidden_size, c.moe_intermediate_size, c.num_experts
    rng = np.random.default_rng(seed)
    p = {"gate_up": jnp.asarray(0.02 * rng.standard_normal((E, D, 2 * F), np.float32), dtype),
         "down": jnp.asarray(0.02 * rng.standard_normal((E, F, D), np.float32), dtype)}
    m = jnp.asarray(rng.standard_normal((B, T, D), np.float32))
    choice = jnp.asarray(rng.integers(0, E, (B, T)), jnp.int32)
    gate = jnp.asarray(rng.uniform(0.1, 1.0, (B, T)), jnp.float32)
    return c, p, m, choice, gate


def useful_bytes(c, p, choice) -> int:
    """Weights of the distinct routed experts + input (weight dtype) + output (fp32)."""
    n_touched = len(np.unique(np.asarray(choice)[np.asarray(choice) < c.num_experts]))
    per_expert = (p["gate_up"][0].size + p["down"][0].size) * p["gate_up"].dtype.itemsize
    N = choice.size
    return n_touched * per_expert + N * c.hidden_size * (p["gate_up"].dtype.itemsize + 4)


def flush_call():
    """(fn, args) whose call reads FLUSH_BYTES, evicting the caches (timed separately, never reported)."""
    buf = jnp.ones(FLUSH_BYTES // 4, jnp.float32)
    return jax.jit(lambda b: b.sum()), (buf,)


def _fn(impl: str, c):
    from zaya.model import moe
    f = moe.get_impl(impl)
    return jax.jit(lambda p, m, choice, gate: f(p, c, m, choice, gate))


def bench_shape(geom: dict, dtype: str, B: int, T: int, impls=IMPLS, repeats: int = 3,
                min_seconds: float = 0.0) -> list[dict]:
    """Time every impl on one (B, T) shape, interleaved; rows with ms, GB/s, HBM fraction, ratio to ragged."""
    from zaya.kernels import platform
    from zaya.model import moe
    c, p, m, choice, gate = _setup(geom, dtype, B, T)
    args = (p, m, choice, gate)
    nbytes = useful_bytes(c, p, choice)
    hbm = hbm_bandwidth(jax.devices()[0].device_kind) if platform.backend() != "cpu" else None
    rows, calls = [], []
    for impl in impls:
        row = {"impl": impl, "B": B, "T": T, "tokens": B * T, "dtype": dtype, "useful_MB": nbytes / 1e6,
               "runs": moe.auto_impl(B * T, c.num_experts) if impl == "auto" else impl}
        if impl == "pallas" and platform.interpret():
            row["note"] = "interpret (not speed)"
        f = _fn(impl, c)
        try:
            jax.block_until_ready(f(*args))  # compile; gather refuses oversize shapes here
        except ValueError as e:
            row["note"] = f"refused: {str(e).split(';')[0]}"
            rows.append(row)
            continue
        rows.append(row)
        calls.append((row, f))
    # Rounds in the listed order, then as many in reverse: a call right after a heavy one (dense, gather) measured
    # up to 2x slower on CPU even after the flush, so each impl gets both positions; medians over all samples.
    flush = flush_call()
    timed = [x for _, f in calls for x in (flush, (f, args))]
    fwd = common.time_interleaved(timed, repeats=repeats, min_seconds=min_seconds / 2)[1::2]
    timed_rev = [x for _, f in calls[::-1] for x in (flush, (f, args))]
    rev = common.time_interleaved(timed_rev, repeats=repeats, min_seconds=min_seconds / 2)[1::2][::-1]
    for (row, _), a, b in zip(calls, fwd, rev):
        ts = a["times"] + b["times"]
        med = float(np.median(ts))
        row.update(ms=1e3 * med, ms_min=1e3 * min(ts), repeats=len(ts),
                   gb_s=nbytes / med / 1e9, hbm_frac=None if hbm is None else nbytes / med / hbm)
    ragged = next((r.get("ms") for r in rows if r["impl"] == "ragged"), None)
    for r in rows:
        if r.get("ms") and ragged and "interpret" not in r.get("note", ""):
            r["vs_ragged"] = r["ms"] / ragged
    return rows


def run(out: str | None = None, quick: bool = False, dtype: str = "bfloat16", impls=None, tokens=None,
        batches=None, repeats: int | None = None) -> list[dict]:
    """The table over tokens x batches (quick: small geometry and sizes); prints it and writes moe.md/json/csv."""
    from zaya.kernels import platform
    on_cpu = platform.interpret()
    impls = impls or tuple(i for i in IMPLS if quick or not (on_cpu and i == "pallas"))
    geom = QUICK if quick else FULL
    tokens = tokens or ((1, 17) if quick else TOKENS)
    batches = batches or ((1, 2) if quick else BATCHES)
    repeats = repeats or (2 if quick else 3)
    mach = common.machine()
    rows = []
    for B in batches:
        for T in tokens:
            print(f"[bench moe] B={B} T={T} ({B * T} tokens)", flush=True)
            rows += bench_shape(geom, dtype, B, T, impls, repeats, 0.0 if quick or on_cpu else 0.5)
    g = geom
    title = (f"MoE expert block, D={g['hidden_size']} F={g['moe_intermediate_size']} E={g['num_experts']} {dtype}, "
             f"top-1 uniform routing ({mach['backend']})")
    md = "\n".join(["## MoE dispatch benchmark", "", common.machine_markdown(mach), common.md_table(rows, [
        "B", "T", "tokens", "impl", "runs", ("ms", "ms (median)", ".2f"), ("gb_s", "GB/s", ".1f"),
        ("hbm_frac", "of HBM", ".0%"), ("vs_ragged", "t / t(ragged)", ".3f"), ("useful_MB", "useful MB", ".1f"),
        "repeats", "note"], title), "",
        "GB/s: (weights of the routed experts + activations) / time. t / t(ragged): same run, < 1 is faster."])
    print(md, flush=True)
    common.write_outputs(out, "moe", md, {"machine": mach, "rows": rows}, {"": rows})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--impls", help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--tokens", help="comma-separated T values")
    ap.add_argument("--batches", help="comma-separated B values")
    a = ap.parse_args(argv)
    ints = lambda s: tuple(int(x) for x in s.split(",")) if s else None
    run(a.out, a.quick, a.dtype, tuple(a.impls.split(",")) if a.impls else None, ints(a.tokens), ints(a.batches))


if __name__ == "__main__":
    main()

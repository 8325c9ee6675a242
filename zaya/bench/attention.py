"""Verify-attention benchmark: the Pallas split-K kernel (attention impl ``pallas``) against the XLA path.

One attention call of one layer at ZAYA1-8B geometry (H=8 query heads, K=2 kv heads, head dim 128): T new tokens
(1 AR, 17 two-forward verify at N=16, 85 single-forward with 4 levels, 272 TiDAR at N=16) over a full cache of C
slots (4k, 32k, 128k), batch 1 and 16. ``pallas`` is timed against the XLA impl that ``auto`` picks without the
kernel (``reference`` when T x (C + T) is small, ``chunked`` otherwise), both through ``attention.attend`` (cache
part, new-chunk part and merge) on the same arrays, interleaved so machine load hits both alike.

Achieved bandwidth counts the bytes the call must move: the valid cache K and V (B x cache_len x K x d x 2) plus the
queries, the new keys/values and the output; "of HBM" divides by the device's nominal bandwidth (the roofline's
hardware table, None for devices not listed). On CPU the kernel runs in Pallas interpret mode: ``quick`` then runs a
tiny size as a smoke test and the table is labelled as interpret-mode numbers, which say nothing about speed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya import layouts
from zaya.bench import common
from zaya.bench.roofline_model import hbm_bandwidth
from zaya.kernels import decode_attention as kernel
from zaya.kernels import platform
from zaya.model import attention

H, K, D = 8, 2, 128  # ZAYA1-8B attention geometry
WIDTHS = (1, 17, 85, 272)
CACHES = (4096, 32768, 131072)
BATCHES = (1, 16)
def _layout(T: int, length_B):
    """The decode layout of that width: causal (AR), verify, single_forward (levels 0,4,7,11), tidar_published."""
    N = 16
    if T == (N + 1) * 5:
        return layouts.single_forward(length_B, N, (0, 4, 7, 11))
    if T == N * (N + 1):
        return layouts.tidar_published(length_B, N)
    return layouts.verify(length_B, T - 1)


def _attend(impl: str):
    return jax.jit(lambda q, k, v, lay, ck, cv, n: attention.attend(q, k, v, lay, ck, cv, n, impl=impl))


def case(B: int, T: int, C: int, dtype: str, repeats: int, min_seconds: float) -> dict:
    """Time one (batch, width, cache) point; returns its table row."""
    dt = jnp.dtype(dtype)
    ks = jax.random.split(jax.random.PRNGKey(B * 7919 + T * 31 + C), 5)
    q = jax.random.normal(ks[0], (B, T, H, D), dt)
    k, v = (jax.random.normal(x, (B, T, K, D), dt) for x in ks[1:3])
    ck, cv = (jax.random.normal(x, (B, C, K, D), dt) for x in ks[3:5])
    length_B = jnp.full((B,), C, jnp.int32)  # a full cache: every slot is valid and read
    lay = _layout(T, length_B)
    xla = attention.auto_choice(T, C + T)  # what auto runs without the kernel
    args = (q, k, v, lay, ck, cv, length_B)
    f_kernel, f_xla = _attend("pallas"), _attend(xla)
    err = float(jnp.abs(f_kernel(*args).astype(jnp.float32) - f_xla(*args).astype(jnp.float32)).max())
    t_kernel, t_xla = common.time_interleaved([(f_kernel, args), (f_xla, args)], repeats, min_seconds)
    item = dt.itemsize
    nbytes = item * (2 * B * C * K * D + 2 * B * T * H * D + 2 * B * T * K * D)  # cache K+V, q + out, new k+v
    p = kernel.plan(B, K, H // K, T, D, C)  # what the kernel runs with
    bw = hbm_bandwidth(jax.devices()[0].device_kind)
    gb_s = nbytes / t_kernel["median"] / 1e9
    return {"batch": B, "T": T, "cache": C, "dtype": dtype, "xla_impl": xla,
            "splits": p["splits"], "block_q": p["block_q"], "block_k": p["block_k"],
            "ms_kernel": 1e3 * t_kernel["median"], "ms_xla": 1e3 * t_xla["median"],
            "ratio": t_kernel["median"] / t_xla["median"], "mbytes": nbytes / 1e6, "gb_s": gb_s,
            "gb_s_xla": nbytes / t_xla["median"] / 1e9, "hbm_frac": None if bw is None else gb_s * 1e9 / bw,
            "max_err": err, "repeats": t_kernel["repeats"]}


def run(out: str | None = None, quick: bool = False, dtype: str = "bfloat16", widths=None, caches=None,
        batches=None) -> list[dict]:
    """Sweep widths x caches x batches; print a Markdown table (machine first) and, with ``out``, write
    attention.md / .json / .csv. ``quick``: a small sweep (on CPU a tiny cache, interpret mode)."""
    interp = platform.interpret()
    if quick:
        widths = widths or (1, 17)
        caches = caches or ((64,) if interp else (4096,))
        batches = batches or ((1, 2) if interp else BATCHES)
    widths, caches, batches = widths or WIDTHS, caches or CACHES, batches or BATCHES
    repeats, min_seconds = (1, 0.0) if quick or interp else (5, 0.1)  # 24 points, each compiled twice: keep short
    m = common.machine()
    rows = []
    for C in caches:
        for B in batches:
            for T in widths:
                print(f"[bench attention] batch {B}, T {T}, cache {C}", flush=True)
                rows.append(case(B, T, C, dtype, repeats, min_seconds))
    bw = hbm_bandwidth(jax.devices()[0].device_kind)
    title = (f"verify attention, one layer: H={H}, K={K}, d={D}, {dtype}; pallas kernel vs XLA "
             f"(nominal HBM {'unknown' if bw is None else f'{bw / 1e12:.2f} TB/s'})")
    parts = ["## Attention kernel benchmark", "", common.machine_markdown(m)]
    if interp:
        parts += ["**Pallas interpret mode (no GPU): the kernel runs as a slow emulation; these numbers check that "
                  "the benchmark runs, they are not speed.**", ""]
    parts += [common.md_table(rows, ["batch", "T", "cache", ("ms_kernel", "kernel ms", ".3f"),
                                     ("ms_xla", "XLA ms", ".3f"), "xla_impl", ("ratio", "kernel/XLA", ".2f"),
                                     ("gb_s", "kernel GB/s"), ("hbm_frac", "of HBM", ".2f"),
                                     ("gb_s_xla", "XLA GB/s"), "splits", "block_q", "block_k",
                                     ("max_err", "max abs diff", ".2g")], title), ""]
    md = "\n".join(parts)
    print(md, flush=True)
    common.write_outputs(out, "attention", md, {"machine": m, "interpret": interp, "rows": rows}, {"": rows})
    return rows

"""Forward-pass benchmarks: full causal forward throughput, and the block-decoding forward-cost ratio.

1. Throughput: ``apply`` over B x T tokens (no cache), tokens/s, for a batch x length sweep.
2. Cost ratio: t(forward of T new tokens after a cache of length C) / t(forward of 1 token), T in
   1, 2, 4, 8, 17, 34, 68, 136, 272 (the query widths of AR, K+1 layouts, single-forward layouts and TiDAR's b+b^2
   at b=16). This ratio decides block decoding's payoff: a step that commits E tokens with forwards of width T is
   faster than AR only while sum(ratios) < E. ``zaya.bench.roofline`` predicts the same ratio from bytes and FLOPs.

Random weights (zaya.model.params.init), float32 on CPU, bfloat16 on accelerators. The functions are jitted and
compiled before timing; each call is followed by block_until_ready; numbers are medians of repeats.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from zaya.bench import common

RATIO_T = (1, 2, 4, 8, 17, 34, 68, 136, 272)
DEFAULT_CACHE = {"tiny": 224, "small-100m": 1024}  # tiny: C + 272 stays within its 512 positions


@functools.lru_cache(maxsize=8)
def _apply_fn(cfg, with_cache: bool):
    from zaya import layouts
    from zaya.model.transformer import apply

    if with_cache:
        @jax.jit
        def f(params, tokens, cache):
            B, T = tokens.shape
            logits, chunk, _ = apply(params, cfg, tokens, layouts.causal(B, T, start=cache.length), cache)
            return logits, chunk
    else:
        @jax.jit
        def f(params, tokens):
            B, T = tokens.shape
            return apply(params, cfg, tokens, layouts.causal(B, T))[0]
    return f


def _tokens(cfg, B, T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(5, cfg.vocab_size, (B, T)), jnp.int32)


def throughput(model, batches=(1, 4), seqs=(128, 512), repeats=3, min_seconds: float = 0.5) -> list[dict]:
    cfg = model.config
    f = _apply_fn(cfg, False)
    rows = []
    for B in batches:
        for T in seqs:
            tok = _tokens(cfg, B, T)
            t = common.time_compiled(f, model.params, tok, repeats=repeats, min_seconds=min_seconds)
            rows.append({"batch": B, "seq": T, "tokens": B * T, "ms": 1e3 * t["median"],
                         "ms_min": 1e3 * t["min"], "tokens_per_s": B * T / t["median"], "repeats": t["repeats"]})
    return rows


def cost_ratio(model, cache_len: int, widths=RATIO_T, batch: int = 1, repeats=5,
               min_seconds: float = 0.3) -> list[dict]:
    """t(T new tokens after a cache of cache_len) / t(1 token). The cache holds max(widths) spare slots."""
    from zaya.model.cache import init_cache

    cfg = model.config
    S = cache_len + max(widths)
    cache = init_cache(cfg, batch, S)
    cache = cache.replace(length=jnp.full((batch,), cache_len, jnp.int32))
    f = _apply_fn(cfg, True)
    # all widths timed round-robin: background load shifts every width alike, so the ratios stay comparable
    ts = common.time_interleaved([(f, (model.params, _tokens(cfg, batch, T), cache)) for T in widths], repeats,
                                 min_seconds)
    rows = [{"batch": batch, "cache_len": cache_len, "cache_slots": S, "T": T, "ms": 1e3 * t["median"],
             "ms_min": 1e3 * t["min"], "repeats": t["repeats"]} for T, t in zip(widths, ts)]
    t1 = next(r for r in rows if r["T"] == min(widths))
    for r in rows:
        r["ratio"] = r["ms"] / t1["ms"]
        r["ratio_min"] = r["ms_min"] / t1["ms_min"]
        r["ms_per_token"] = r["ms"] / (r["T"] * batch)
    return rows


def run(presets=("tiny", "small-100m"), out: str | None = None, quick: bool = False, batches=None, seqs=None,
        widths=None, cache_len: int | None = None, dtype: str | None = None) -> dict:
    """Run both benchmarks for each preset; print and (with ``out``) write forward.md/json/csv and a figure."""
    batches = batches or ((1,) if quick else (1, 4))
    seqs = seqs or ((32,) if quick else (128, 512))
    widths = widths or ((1, 4, 17) if quick else RATIO_T)
    repeats = 1 if quick else 5
    m = common.machine()
    res = {"machine": m, "throughput": [], "ratio": []}
    parts = ["## Forward benchmarks", "", common.machine_markdown(m)]
    for name in presets:
        model = common.random_model(name, dtype)
        C = cache_len if cache_len is not None else (16 if quick else DEFAULT_CACHE.get(name, 512))
        print(f"[bench forward] {name}: {common.config_summary(model.config)}", flush=True)
        thr = [dict(preset=name, dtype=model.config.dtype, **r)
               for r in throughput(model, batches, seqs, repeats, 0.0 if quick else 0.5)]
        rat = [dict(preset=name, dtype=model.config.dtype, **r)
               for r in cost_ratio(model, C, widths, 1, repeats if quick else 7, 0.0 if quick else 3.0)]
        res["throughput"] += thr
        res["ratio"] += rat
        parts += [f"### {name} ({common.config_summary(model.config)})", "",
                  common.md_table(thr, ["batch", "seq", ("ms", "ms (median)", ".1f"), ("ms_min", "ms (min)", ".1f"),
                                        ("tokens_per_s", "tokens/s (median)", ".0f"), "repeats"],
                                  "full causal forward (no cache)"), "",
                  common.md_table(rat, ["T", "cache_len", ("ms", "ms (median)", ".2f"), ("ratio", "t(T)/t(1)", ".2f"),
                                        ("ms_min", "ms (min)", ".2f"), ("ratio_min", "ratio of mins", ".2f"),
                                        ("ms_per_token", "ms per new token", ".3f"), "repeats"],
                                  f"forward-cost ratio (batch 1, cache length {C}, {C + max(widths)} slots)"), ""]
        del model
    md = "\n".join(parts)
    print(md, flush=True)
    if out:
        common.write_outputs(out, "forward", md, res, {"throughput": res["throughput"], "ratio": res["ratio"]})
        _plot(res["ratio"], out)
    return res


def _plot(rows, out):
    plt = common.pyplot()
    if plt is None:
        return
    import os
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["preset"] for r in rows):
        rr = [r for r in rows if r["preset"] == name]
        ax.plot([r["T"] for r in rr], [r["ratio"] for r in rr], "o-", label=name)
    ts = sorted({r["T"] for r in rows})
    ax.plot(ts, ts, "k:", lw=0.8, label="ratio = T (no amortisation)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("new tokens per forward T")
    ax.set_ylabel("t(T) / t(1)")
    ax.set_title("forward-cost ratio")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "forward_ratio.png"), dpi=120)
    plt.close(fig)

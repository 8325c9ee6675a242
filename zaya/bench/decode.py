"""AR decode benchmark: ms per token and tokens/s of ``zaya.generate(model, prompts, sampler='ar')``.

Batch 1 and 8, prompt 64 tokens, 64 new tokens, random weights (float32 on CPU, bfloat16 on accelerators).
``generate`` compiles its prefill and step functions before its timers start, so ``seconds`` (the decode loop) and
``prefill_seconds`` exclude compilation. Each configuration runs once to warm up, then ``repeats`` times; the table
reports medians. "ms per step" is the latency of one decode step (one token per row); "ms per token" divides by the
batch.
"""
from __future__ import annotations

import statistics

import numpy as np

from zaya.bench import common


def _prompts(cfg, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[cfg.bos_token_id] + rng.integers(5, cfg.vocab_size, length - 1).tolist() for _ in range(batch)]


def bench(model, batch: int, prompt_len: int = 64, new_tokens: int = 64, repeats: int = 3) -> dict:
    import zaya
    prompts = _prompts(model.config, batch, prompt_len)
    zaya.generate(model, prompts, sampler="ar", max_new_tokens=new_tokens)  # warm-up (compiles)
    runs = [zaya.generate(model, prompts, sampler="ar", max_new_tokens=new_tokens).stats for _ in range(repeats)]
    sec = statistics.median(s["seconds"] for s in runs)
    pre = statistics.median(s["prefill_seconds"] for s in runs)
    s0 = runs[0]
    steps = s0["steps"]
    return {"batch": batch, "prompt": prompt_len, "new_tokens": new_tokens, "tokens": s0["tokens"],
            "forwards": s0["forwards"], "steps": steps, "seconds": sec, "prefill_ms": 1e3 * pre,
            "ms_per_step": 1e3 * sec / steps, "ms_per_token": 1e3 * sec / s0["tokens"],
            "tokens_per_s": s0["tokens"] / sec, "seconds_all": [s["seconds"] for s in runs], "repeats": repeats}


def run(presets=("tiny", "small-100m"), out: str | None = None, quick: bool = False, batches=None,
        prompt_len: int | None = None, new_tokens: int | None = None, dtype: str | None = None) -> list[dict]:
    batches = batches or ((1, 2) if quick else (1, 8))
    prompt_len = prompt_len or (8 if quick else 64)
    new_tokens = new_tokens or (8 if quick else 64)
    repeats = 1 if quick else 3
    m = common.machine()
    rows = []
    for name in presets:
        model = common.random_model(name, dtype)
        print(f"[bench decode] {name}: {common.config_summary(model.config)}", flush=True)
        for B in batches:
            rows.append(dict(preset=name, dtype=model.config.dtype,
                             **bench(model, B, prompt_len, new_tokens, repeats)))
        del model
    md = "\n".join(["## AR decode (zaya.generate, sampler='ar')", "", common.machine_markdown(m),
                    common.md_table(rows, ["preset", "dtype", "batch", "prompt", "new_tokens",
                                           ("ms_per_step", "ms/step", ".2f"), ("ms_per_token", "ms/token", ".2f"),
                                           ("tokens_per_s", "tokens/s", ".0f"), ("prefill_ms", "prefill ms", ".1f"),
                                           "forwards", "repeats"]),
                    "", "ms/step: one forward (one new token per row); ms/token = ms/step / batch. "
                        "Medians over repeats; compile excluded."])
    print(md, flush=True)
    if out:
        common.write_outputs(out, "decode", md, {"machine": m, "rows": rows}, {"": rows})
    return rows

"""Systems measurement of decoding at real context lengths, beside the roofline (``zaya bench system``).

  AR steps   ms per AR step in the device loop (one ``lax.while_loop`` over the steps: no host dispatch per step)
             for batch x context, against the roofline's time of a 1-token forward on this accelerator
  samplers   each block sampler end to end in the device loop at a controlled acceptance: the ``synthetic`` rule
             accepts each draft with probability beta, i.i.d. (lossy by design: a systems measurement with random
             weights), so the measured speedup over AR sits beside the roofline's bound at the same beta

Long contexts without a long prefill: a short prompt is prefilled into a cache with room for ``context`` more
tokens, then every row's cache length moves up by ``context``. Those slots hold zeros; each step reads and attends
to them exactly as it would to real keys, which is all a timing needs (the tokens are meaningless). The CCA conv
ring is kept at ``CONV_WINDOW`` slots (decoding never rolls back further), not at the cache length.

Random weights (``zaya.bench.common.random_model``): bf16 on accelerators, fp32 on CPU. Compile is excluded;
every timed run starts from a fresh state (the loop donates it); medians of repeats.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from zaya.bench import common
from zaya.bench.roofline_model import Hardware, fits, forward_cost, hardware_of, step_cost

CONV_WINDOW = 512
PROMPT = 16
SAMPLERS = (  # (label, sampler, options) at block size 16: the ZAYA1 recipe's block
    ("two_forward", "two_forward", dict(block_size=16, anchor="mask")),
    ("single_forward sparse", "single_forward", dict(block_size=16, levels=(0, 4, 7, 11))),
    ("tidar", "tidar", dict(block_size=16)),
)


def detect_hardware() -> Hardware | None:
    """The roofline's entry for this accelerator (by device kind), or None (CPU, or a GPU it has no numbers for)."""
    if jax.default_backend() == "cpu":
        return None
    return hardware_of(jax.devices()[0].device_kind)


def _state_fn(model, sampler: str, batch: int, context: int, max_new: int, seed: int = 0, **opts):
    """(make_state() -> a fresh decode state with ``context`` cached tokens per row, compiled device loop, options)."""
    from zaya.decode import generate as gen
    from zaya.decode import samplers as registry
    from zaya.model.cache import init_cache
    smp = registry.get(sampler)
    o = smp.options(max_new_tokens=max_new, **opts)
    cfg, params, impl = model.config, model.params, model.impl
    pre, init, _, loop, _ = gen._jitted(smp, cfg, impl, o)
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.integers(5, cfg.vocab_size, (batch, PROMPT)), jnp.int32)
    length = jnp.full((batch,), PROMPT, jnp.int32)
    capacity = PROMPT + context + max_new + smp.cache_slack(o)

    def make_state():
        cache = init_cache(cfg, batch, capacity, window=min(CONV_WINDOW, capacity))
        state = pre(params, prompt, length, cache, jax.random.PRNGKey(seed))
        state = state.replace(cache=state.cache.replace(length=state.cache.length + context))
        if init is not None:
            state = init(params, state)
        return jax.block_until_ready(state)

    return make_state, loop.lower(params, make_state()).compile(), o


def time_loop(model, sampler: str, batch: int, context: int, max_new: int, repeats: int = 3, **opts) -> dict:
    """Median seconds of the whole device loop, its steps and the tokens it produced."""
    make_state, loop, _ = _state_fn(model, sampler, batch, context, max_new, **opts)
    runs = []
    for _ in range(repeats + 1):  # the first run warms up
        state = make_state()
        t0 = time.perf_counter()
        state, _, steps = loop(model.params, state)
        steps = int(steps)
        runs.append((time.perf_counter() - t0, steps, int(np.asarray(state.n).sum())))
    runs = runs[1:]
    sec = statistics.median(r[0] for r in runs)
    _, steps, tokens = runs[0]
    print(f"[bench system] {sampler} {opts.get('beta', '')} batch {batch} context {context}: {steps} steps, "
          f"{1e3 * sec / steps:.3f} ms/step, {tokens} tokens", flush=True)  # a cut-off run keeps its rows
    # the first token of each row comes from the prefill's logits: steps produced tokens - batch
    return {"sampler": sampler, "batch": batch, "context": context, "seconds": sec, "steps": steps,
            "tokens": tokens, "ms_per_step": 1e3 * sec / steps, "tokens_per_step": (tokens - batch) / batch / steps,
            "tokens_per_s": tokens / sec, "seconds_all": [r[0] for r in runs]}


def ar_steps(model, batches, contexts, max_new: int, repeats: int, hw: Hardware | None) -> list[dict]:
    rows = []
    for context in contexts:
        for B in batches:
            if hw is not None and not fits(model.config, hw, B, context):
                rows.append({"batch": B, "context": context, "skipped": "does not fit in device memory"})
                continue
            r = time_loop(model, "ar", B, context, max_new, repeats)
            if hw is not None:
                pred = forward_cost(model.config, hw, B, 1, context)["seconds"]
                r.update(roofline_ms=1e3 * pred, vs_roofline=r["ms_per_step"] / (1e3 * pred))
            rows.append(r)
    return rows


def sampler_speedups(model, batch: int, context: int, betas, max_new: int, repeats: int, hw: Hardware | None,
                     samplers=SAMPLERS) -> list[dict]:
    ar = time_loop(model, "ar", batch, context, max_new, repeats)
    rows = [dict(ar, label="ar", beta=None, step_cost=1.0, speedup=1.0)]
    for label, name, opts in samplers:
        for beta in betas:
            r = time_loop(model, name, batch, context, max_new, repeats, acceptance="synthetic", beta=beta, **opts)
            r.update(label=label, beta=beta, step_cost=r["ms_per_step"] / ar["ms_per_step"],
                     speedup=r["tokens_per_s"] / ar["tokens_per_s"])
            if hw is not None:
                bound = step_cost(model.config, hw, name, batch, context, K=opts["block_size"],
                                  levels=opts.get("levels"), beta=beta)
                r.update(roofline_step_cost=bound["cost_ratio"], roofline_speedup=bound["speedup"],
                         of_bound=r["speedup"] / bound["speedup"])
            rows.append(r)
    return rows


def run(preset: str | None = None, out: str | None = None, quick: bool = False, batches=None, contexts=None,
        sampler_batch: int | None = None, sampler_context: int | None = None, betas=None,
        max_new: int | None = None, repeats: int | None = None, samplers=SAMPLERS, ar_grid: bool = True) -> dict:
    """Both tables for one random-weight preset (default: zaya1-8b on an accelerator, tiny on CPU); ``ar_grid=False``
    leaves out the AR batch x context table (a second call for more samplers)."""
    on_cpu = jax.default_backend() == "cpu"
    preset = preset or ("tiny" if on_cpu or quick else "zaya1-8b")
    small = quick or on_cpu
    batches = batches or ((1, 2) if small else (1, 16, 64))
    contexts = contexts or ((64,) if small else (4096, 32768))
    sampler_batch = sampler_batch or (2 if small else 16)
    sampler_context = sampler_context or (64 if small else 32768)
    betas = betas or ((0.85,) if small else (0.7, 0.85, 0.95))
    max_new = max_new or (24 if small else 128)
    repeats = repeats or (1 if small else 3)
    hw = detect_hardware()
    m = common.machine()
    model = common.random_model(preset)
    print(f"[bench system] {preset}: {common.config_summary(model.config)}; roofline hardware: "
          f"{hw.name if hw else 'none (CPU or unknown accelerator: no bound printed)'}", flush=True)
    ar = ar_steps(model, batches, contexts, max_new, repeats, hw) if ar_grid else []
    smp = sampler_speedups(model, sampler_batch, sampler_context, betas, max_new, repeats, hw, samplers)
    label = "" if hw else " (no roofline for this device: ratios only)"
    md = "\n".join([
        f"## Decoding at context, device loop, {preset} random weights ({model.config.dtype}){label}", "",
        common.machine_markdown(m),
        common.md_table(ar, ["batch", "context", ("ms_per_step", "AR ms/step", ".3f"),
                             ("roofline_ms", "roofline ms", ".3f"), ("vs_roofline", "measured / roofline", ".2f"),
                             "steps", "skipped"], "AR step"),
        "", common.md_table(smp, ["label", "beta", "batch", "context", ("ms_per_step", "ms/step", ".3f"),
                                  ("step_cost", "step cost / AR", ".2f"),
                                  ("roofline_step_cost", "roofline step cost", ".2f"),
                                  ("tokens_per_step", "tokens/step", ".2f"), ("speedup", "speedup over AR", ".2f"),
                                  ("roofline_speedup", "roofline bound", ".2f"), ("of_bound", "of bound", ".2f")],
                            "Block samplers end to end, synthetic acceptance (i.i.d. beta; lossy, systems only)"),
        "", "Cached slots beyond the prompt hold zeros (see zaya.bench.system): timing only. "
            "Medians over repeats; compile excluded."])
    print(md, flush=True)
    res = {"machine": m, "preset": preset, "ar": ar, "samplers": smp}
    if out:
        common.write_outputs(out, "system", md, res, {"ar": ar, "samplers": smp})
    return res

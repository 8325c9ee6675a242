"""``zaya.generate``: prompts in, generated ids per row and statistics out, for every registered sampler.

A sampler is a ``zaya.decode.samplers.Sampler`` record; its step ``step(params, config, impl, o, state) -> (state,
info)`` is jitted once per (sampler record, config, impl, options) and driven by a Python loop with a progress bar
(or by one ``lax.while_loop``). The options ``o`` are one ``DecodeOptions``, validated once per call. With
``Model.mesh`` set, the rows (prompt, cache, state) are split over the mesh's batch axes and the weights stay where
``zaya.load`` put them (tensor / expert axes): XLA partitions every step from those placements.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from zaya.decode import samplers as registry
from zaya.decode.options import DecodeOptions
from zaya.decode.samplers import Sampler
from zaya.decode.state import State, prefill
from zaya.model.cache import init_cache
from zaya.progress import tqdm
from zaya.sharding import to_host


@dataclasses.dataclass
class Result:
    tokens: list            # generated ids per row (EOS included when hit)
    stats: dict             # forwards, tokens, seconds, tokens_per_s, tokens_per_forward, ...
    trace: list | None = None  # trace=True: per step, per row {next, kept} (+ drafts, accepted, active: block)

    def __iter__(self):  # `tokens, stats = zaya.generate(...)`
        return iter((self.tokens, self.stats))


def _as_rows(prompt_ids):
    if isinstance(prompt_ids, np.ndarray) or hasattr(prompt_ids, "shape"):
        arr = np.asarray(prompt_ids)
        rows = [list(arr)] if arr.ndim == 1 else [list(r) for r in arr]
    else:
        rows = [list(prompt_ids)] if prompt_ids and np.isscalar(prompt_ids[0]) else [list(r) for r in prompt_ids]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (prepend BOS for an unconditional start)")
    return [[int(t) for t in r] for r in rows]


def _compiled(cache: dict, fn, args):
    """AOT-compiled executable of a jitted fn for these argument shapes and placements (one device or a mesh), kept
    in ``cache`` (one dict per jitted fn set, so it lives and dies with them: no stale entry can serve another
    config)."""
    sig = (fn, str(jax.tree.structure(args)),
           tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None))
                 for x in jax.tree.leaves(args)))
    if sig not in cache:
        cache[sig] = fn.lower(*args).compile()
    return cache[sig]


@functools.lru_cache(maxsize=64)
def _jitted(smp: Sampler, cfg, impl, o: DecodeOptions, mesh=None, rules=None):
    """The jitted prefill, init, step and device loop of one sampler for one set of options. Keyed on the sampler
    record and the options (which hold the resolved acceptance rule), not on names: a sampler or rule registered
    again under the same name gets new functions. On a mesh every function returns the state in one placement
    (rows over the batch axes), so each step's output is the next step's input."""
    place = functools.partial(_place_state, mesh=mesh, rules=rules)

    def step_fn(params, state):
        state, info = smp.step(params, cfg, impl, o, state)
        return place(state), info
    step = jax.jit(step_fn, donate_argnums=(1,))
    init = smp.init
    if smp.uses_prefill(o):  # the sampler's own prefill (e.g. first drafts in the same forward)
        init = None
        pre = jax.jit(lambda params, prompt, length, cache, key: place(smp.prefill(params, cfg, impl, o, prompt,
                                                                                 length, cache, key)))
    else:
        pre = jax.jit(lambda params, prompt, length, cache, key: place(prefill(params, cfg, impl, prompt, length,
                                                                               cache, o.max_new_tokens, key)))
    init_j = None if init is None else jax.jit(lambda params, state: place(init(params, cfg, impl, o, state)))
    loop = jax.jit(lambda params, state: run_on_device(lambda s: step_fn(params, s), state, o.max_new_tokens),
                   donate_argnums=(1,))
    return pre, init_j, step, loop, {}


def _place_state(state: State, mesh=None, rules=None) -> State:
    """On a mesh: the cache as ``sharding.cache_shardings``, per-row arrays over the batch axes, the key and the
    forward count replicated. Without one: the state as it is."""
    if mesh is None:
        return state
    from zaya import sharding
    B = state.n.shape[0]
    put = jax.lax.with_sharding_constraint
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    new = {}
    for f in dataclasses.fields(state):
        x = getattr(state, f.name)
        if x is None:
            continue
        if f.name == "cache":
            new[f.name] = put(x, sharding.cache_shardings(mesh, x, rules))
        elif f.name in ("key", "forwards"):
            new[f.name] = put(x, replicated)
        else:
            new[f.name] = put(x, sharding.batch_sharding(mesh, rules, B, x.ndim))
    return state.replace(**new)


def run_on_device(step, state: State, max_steps: int):
    """Every step in one ``lax.while_loop``: no host round trip per step. Same steps as the host loop (at least one,
    then until every row is done; each step commits >= 1 token per active row, so ``max_steps = max_new_tokens``
    bounds it). Returns (state, infos stacked on a leading [max_steps] axis, number of steps run)."""
    shapes = jax.eval_shape(step, state)[1]
    bufs = jax.tree.map(lambda s: jnp.zeros((max_steps,) + s.shape, s.dtype), shapes)

    def cond(carry):
        i, st, _ = carry
        return (i == 0) | ((i < max_steps) & ~st.done.all())

    def body(carry):
        i, st, b = carry
        st, info = step(st)
        return i + 1, st, jax.tree.map(lambda buf, x: buf.at[i].set(x), b, info)
    n, state, bufs = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, bufs))
    return state, bufs, n


def generate(model, prompt_ids, sampler: str = "ar", max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
             stop: list | None = None, progress: bool = False, trace: bool = False, pad_to: int = 16,
             loop: str = "host", **sampler_opts) -> Result:
    """Generate up to ``max_new_tokens`` per row. Returns Result(tokens per row, stats).

    sampler: a name registered in ``zaya.decode.samplers`` (ar, two_forward, single_forward, tidar, or your own).
    Rows stop independently on ``eos_id``, on a ``stop`` sequence (list of id lists) or on the budget.
    ``sampler_opts``: the block samplers' fields of ``DecodeOptions`` (block_size, acceptance, levels, ...) and the
    acceptance rule's own options (e.g. epsilon). ``trace=True`` keeps every step's drafts, accepted counts and next
    tokens (for notebooks and debugging). ``pad_to``: the padded prompt length is rounded up to a multiple of it, so
    prompts of similar lengths share one compiled prefill and step. ``loop``: "host" (a Python loop, one sync per
    step, live progress bar) or "device" (all steps in one ``lax.while_loop`` executable: no per-step dispatch or
    sync; same tokens and statistics).
    """
    smp = registry.get(sampler)
    if loop not in ("host", "device"):
        raise ValueError(f"loop={loop!r}; use 'host' (Python loop, progress bar) or 'device' (one lax.while_loop)")
    o = smp.options(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                    stop=stop, **sampler_opts)  # the one validation of this call
    cfg, params, impl = model.config, model.params, model.impl
    mesh = getattr(model, "mesh", None)
    if mesh is not None:
        from zaya.sharding import mesh_impl
        impl = mesh_impl(impl, mesh)  # no Pallas custom call on a multi-device mesh (it would gather the cache)
    rows = _as_rows(prompt_ids)
    pad_to = max(int(pad_to), 1)
    B, Tp = len(rows), -(-max(map(len, rows)) // pad_to) * pad_to
    if any(t < 0 or t >= cfg.vocab_size for r in rows for t in r):
        raise ValueError(f"prompt ids must be in [0, {cfg.vocab_size})")
    pre, init, step, run, compiled = _jitted(smp, cfg, impl, o, mesh, getattr(model, "rules", None) if mesh else None)

    prompt = np.full((B, Tp), cfg.pad_token_id, np.int32)
    for b, r in enumerate(rows):
        prompt[b, : len(r)] = r
    length_B = jnp.asarray([len(r) for r in rows], jnp.int32)
    cache = init_cache(cfg, B, Tp + max_new_tokens + smp.cache_slack(o))
    args = (params, jnp.asarray(prompt), length_B, cache, jax.random.PRNGKey(seed))
    if mesh is not None:
        args = _on_mesh(model, args)
    pre_c = _compiled(compiled, pre, args)  # compile outside the timed region
    t0 = time.perf_counter()
    state: State = pre_c(*args)
    if init is not None:
        state = init(params, state)
    jax.block_until_ready(state.n)
    prefill_s = time.perf_counter() - t0
    step_c = _compiled(compiled, step if loop == "host" else run, (params, state))
    t1 = time.perf_counter()
    infos = []
    bar = tqdm(total=B * max_new_tokens, desc=f"generate[{sampler}]", unit="tok", disable=not progress)
    if loop == "device":
        state, bufs, steps = step_c(params, state)
        steps = int(to_host(steps))  # waits for the whole loop
        t2 = time.perf_counter()
        bufs = to_host(bufs)
        infos = [jax.tree.map(lambda b: b[i], bufs) for i in range(steps)]
        bar.update(int(to_host(state.n).sum()))
    else:
        done_tokens = 0
        while True:
            state, info = step_c(params, state)
            infos.append(info)
            n_B, done_B = to_host((state.n, state.done))  # one host sync per step; rows finish independently
            bar.update(int(n_B.sum()) - done_tokens)
            done_tokens = int(n_B.sum())
            if done_B.all():
                break
        t2 = time.perf_counter()
        infos = to_host(infos)  # once, after the timed loop (the device loop's buffers come back the same way)
    bar.close()
    out, n, forwards, row_forwards = to_host((state.out, state.n, state.forwards, state.row_forwards))
    tokens = [out[b, : n[b]].tolist() for b in range(B)]
    forwards, row_forwards = int(forwards), int(row_forwards.sum())
    first = int(np.minimum(n, 1).sum())  # one token per row comes from the prefill's logits, for every sampler
    stats = {"sampler": sampler, "forwards": forwards, "steps": len(infos), "tokens": int(n.sum()),
             "seconds": t2 - t1, "prefill_seconds": prefill_s, "tokens_per_s": float(n.sum()) / max(t2 - t1, 1e-9),
             # tokens the decode forwards produced, per forward per active row (a row is charged only the forwards
             # that ran while it was still generating: AR gives exactly 1 at any batch), and per forward per batch
             # row (rows that finished early ride along in the batch's later forwards, and are charged for them)
             "prefill_tokens": first, "row_forwards": row_forwards,
             "tokens_per_forward": float(n.sum() - first) / max(row_forwards, 1),
             "tokens_per_forward_batch": float(n.sum() - first) / max(forwards, 1) / B}
    if smp.summarize is not None:
        stats.update(smp.summarize(infos, o))
    steps = None
    if trace:
        steps = [{k: v.tolist() for k, v in info.items()} for info in infos]
    return Result(tokens, stats, steps)


def _on_mesh(model, args):
    """Rows over the mesh's batch axes (prompt, lengths, cache), the key replicated; params are already placed."""
    from zaya import sharding
    params, prompt_BT, length_B, cache, key = args
    mesh, rules, B = model.mesh, model.rules, prompt_BT.shape[0]
    rows = lambda x: sharding.put_global(x, sharding.batch_sharding(mesh, rules, B, x.ndim))
    return (params, rows(prompt_BT), rows(length_B), sharding.shard_cache(cache, mesh, rules),
            sharding.put_global(key, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))

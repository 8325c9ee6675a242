"""Pieces shared by the block samplers: options, drafting from logits, the initial draft, statistics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zaya import layouts
from zaya.decode import acceptance
from zaya.decode.sampling import sample
from zaya.decode.state import State, append, prefill_with_block
from zaya.model.transformer import apply

DEFAULTS = dict(block_size=16, acceptance="greedy", draft_temperature=0.0, mix_weight=None, anchor="token",
                block_causal=False, levels=None)


def options(opts: dict) -> dict:
    o = {**DEFAULTS, **{k: v for k, v in opts.items() if v is not None or k not in DEFAULTS}}
    if o["block_size"] < 1:
        raise ValueError(f"block_size must be >= 1, got {o['block_size']}")
    if o["anchor"] not in ("token", "mask"):
        raise ValueError(f"anchor must be 'token' (draft [a', mask x K]) or 'mask' ([mask x (K+1)]), got {o['anchor']!r}")
    acceptance.get(o["acceptance"], o["mix_weight"])  # validates the name
    return o


def rule(o):
    return acceptance.get(o["acceptance"], o["mix_weight"])


def draft_tokens(z_BKV, key, o):
    """Drafts by argmax (Dirac drafter: probs None) or sampled at the draft temperature (probs returned)."""
    if o["draft_temperature"] == 0.0:
        return jnp.argmax(z_BKV, -1).astype(jnp.int32), None
    zt = z_BKV.astype(jnp.float32) / o["draft_temperature"]
    return jax.random.categorical(key, zt, -1).astype(jnp.int32), jax.nn.softmax(zt, -1)


def keep_logits(o) -> bool:
    return acceptance.needs_draft_logits(o["acceptance"], o["mix_weight"])


def draft_after(params, c, impl, o, state: State, key) -> State:
    """The drafting forward: one block [a', mask x K] (or [mask x (K+1)]) after the cache; nothing is committed."""
    K = o["block_size"]
    B = state.n.shape[0]
    first = state.pending if o["anchor"] == "token" else jnp.full((B,), c.mask_token_id, jnp.int32)
    tokens = jnp.concatenate([first[:, None], jnp.full((B, K), c.mask_token_id, jnp.int32)], 1)
    logits, _, _ = apply(params, c, tokens, layouts.draft_anchored(state.cache.length, K, o["block_causal"]), state.cache, impl)
    z = logits[:, 1:]
    drafts, probs = draft_tokens(z, key, o)
    return state.replace(drafts=drafts, draft_probs=probs, draft_logits=z if keep_logits(o) else None,
                         forwards=state.forwards + 1)


def cache_slack(opts) -> int:
    """Cache slots beyond prompt + max_new_tokens: a block committed in the step that reaches the budget."""
    return 2 * (opts.get("block_size") or DEFAULTS["block_size"]) + 4


def start(params, c, impl, o, state: State) -> State:
    """First token from the prefill logits (the pending token), then one drafting forward after it."""
    state = first_token(c, o, state)
    key, sub = jax.random.split(state.key)
    return draft_after(params, c, impl, o, state.replace(key=key), sub)


def drafts_in_prefill(o) -> bool:
    """Mask-anchored first drafts ([mask x (K+1)] after the prompt) need no token: they ride on the prefill."""
    return o["anchor"] == "mask"


def prefill_and_start(params, c, impl, opts, prompt_BT, lengths_B, cache, max_new, key) -> State:
    """``start`` fused into the prefill: one forward over [prompt | mask x (K+1)] gives the first token (prefill
    logits) and the first K drafts (mask slots 1..K; slot 0 stands at the first token's position)."""
    o = options(opts)
    K = o["block_size"]
    state, z = prefill_with_block(params, c, impl, prompt_BT, lengths_B, cache, max_new, key, K + 1)
    state = first_token(c, o, state)
    key, sub = jax.random.split(state.key)
    drafts, probs = draft_tokens(z[:, 1:], sub, o)
    return state.replace(drafts=drafts, draft_probs=probs, draft_logits=z[:, 1:] if keep_logits(o) else None,
                         key=key)


def first_token(c, o, state: State) -> State:
    """Decide the first new token from the prefill logits (AR) and make it the pending token."""
    key, sub = jax.random.split(state.key)
    a = sample(state.logits, sub, o["temperature"], o["top_k"], o["top_p"])
    state, _ = append(state, a[:, None], jnp.ones_like(state.n), o["eos_id"], o.get("stop"))
    return state.replace(pending=a, key=key)


def accept_and_append(o, state: State, z_verify, key):
    """Run the acceptance rule; append [d_1..d_n, next] per row. Returns (state, n, next, active, kept): kept[b]
    is how many tokens were really appended (n + 1 unless EOS, a stop sequence or the budget cut the block)."""
    active = ~state.done
    extra = dict(o, draft_logits=state.draft_logits, diff_logits=state.draft_logits)
    n, nxt = rule(o)(z_verify, state.drafts, state.draft_probs, key, extra)
    new = jnp.concatenate([state.drafts, jnp.zeros_like(nxt)[:, None]], 1)
    new = new.at[jnp.arange(new.shape[0]), n].set(nxt)
    state, kept = append(state, new, n + 1, o["eos_id"], o.get("stop"))
    return state, n, nxt, active, kept


def summarize(infos, o) -> dict:
    """Tokens per step (mean, histogram), acceptance per draft position, useful-slot fraction.

    Only what was appended counts: drafts the rule "accepted" after an EOS, a stop sequence or the budget are not
    tokens, and the positions after such a cut are not reached (an accepted EOS is an accepted draft)."""
    n = np.stack([np.asarray(i["accepted"]) for i in infos])  # [steps, B] drafts accepted
    act = np.stack([np.asarray(i["active"]) for i in infos])
    kept = np.stack([np.asarray(i["kept"]) for i in infos])  # [steps, B] tokens really appended
    K = o["block_size"]
    committed = kept * act
    cut = kept < n + 1  # the full append is n + 1 tokens
    # TF/SF append [d_1..d_n, next]; the TiDAR layout appends [D_0, D_1..D_n] (its always-kept D_0 first)
    n = np.minimum(n, np.maximum(kept - o.get("_kept_first", 0), 0))
    reached = [(n >= k) & act & ~(cut & (k >= n)) for k in range(K)]
    accepted = [(n > k) & act for k in range(K)]
    per_pos = [float(a.sum()) / max(float(r.sum()), 1.0) for a, r in zip(accepted, reached)]
    hist = np.bincount(committed[act].astype(int), minlength=K + 2).tolist()
    slots = float(act.sum()) * o["_query_tokens"]
    return {"tokens_per_step": float(committed.sum() / max(act.sum(), 1)), "tokens_per_step_hist": hist,
            "acceptance_per_position": per_pos, "useful_slot_fraction": float(committed.sum()) / max(slots, 1.0),
            "query_tokens_per_step": o["_query_tokens"],
            # raw counts, so runs over several prompt batches can be pooled exactly (zaya.bench.samplers)
            "counts": {"committed": int(committed.sum()), "row_steps": int(act.sum()),
                       "reached": [int(r.sum()) for r in reached], "accepted": [int(a.sum()) for a in accepted]}}

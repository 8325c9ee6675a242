"""Two-forward block sampler (Zyphra's "TF"): verify [a, d_1..d_K] causally, accept, then draft [a', mask x K].

Per step: the verify forward gives AR logits for every draft and the bonus; the acceptance rule returns how many
drafts survive (n) and the next token a'; the cache keeps a, d_1..d_n (n + 1 tokens, fewer when an EOS, a stop
sequence or the budget cuts the block); the draft forward proposes the K tokens after a'. Mask tokens and rejected
drafts never enter the cache. With block_size 1 this is AR decoding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya import layouts
from zaya.decode import block
from zaya.decode.state import State
from zaya.model.cache import commit
from zaya.model.transformer import apply


cache_slack = block.cache_slack


def fuses_prefill(opts) -> bool:
    """Mask anchor: the first drafts ride on the prefill forward (``prefill``). Token anchor: generate prefills,
    then ``init`` drafts after the first token."""
    return block.drafts_in_prefill(block.options(opts))


def prefill(params, c, impl, opts, prompt_BT, lengths_B, cache, max_new, key):
    return block.prefill_and_start(params, c, impl, opts, prompt_BT, lengths_B, cache, max_new, key)


def init(params, c, impl, opts, state: State) -> State:
    return block.start(params, c, impl, block.options(opts), state)


def step(params, c, impl, opts, state: State):
    o = block.options(opts)
    K = o["block_size"]
    drafts = state.drafts
    key, k_acc, k_draft = jax.random.split(state.key, 3)
    tokens = jnp.concatenate([state.pending[:, None], state.drafts], 1)
    z, chunk, _ = apply(params, c, tokens, layouts.verify(state.cache.length, K), state.cache, impl)
    state, n, nxt, active, kept = block.accept_and_append(o, state, z, k_acc)
    cache = commit(state.cache, chunk, jnp.where(active, kept, 0))  # a, d_1..d_n minus what EOS/stop/budget cut
    state = state.replace(cache=cache, pending=nxt, key=key, forwards=state.forwards + 1)
    # no drafting forward once every row is done: its drafts would never be verified (nor counted as a forward)
    state = jax.lax.cond(state.done.all(), lambda s: s, lambda s: block.draft_after(params, c, impl, o, s, k_draft),
                         state)
    return state, {"accepted": n, "active": active, "drafts": drafts, "next": nxt, "kept": kept}


def summarize(infos, opts):
    o = block.options(opts)
    return block.summarize(infos, dict(o, _query_tokens=2 * (o["block_size"] + 1)))

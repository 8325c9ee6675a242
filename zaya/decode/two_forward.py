"""Two-forward block sampler (Zyphra's "TF"): verify [a, d_1..d_N] causally, accept, then draft [a', mask x N].

Per step: the verify forward gives AR logits for every draft and the bonus; the acceptance rule returns how many
drafts survive (n) and the next token a'; the cache keeps a, d_1..d_n (n + 1 tokens, fewer when an EOS, a stop
sequence or the budget cuts the block); the draft forward proposes the N tokens after a'. Mask tokens and rejected
drafts never enter the cache. With block_size 1 this is AR decoding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya import layouts
from zaya.decode import block
from zaya.decode.options import DecodeOptions
from zaya.decode.samplers import Sampler, register
from zaya.decode.state import State, count_forward
from zaya.model.cache import commit
from zaya.model.transformer import apply


def step(params, c, impl, o: DecodeOptions, state: State):
    N = o.block_size
    drafts = state.drafts
    key, k_acc, k_draft = jax.random.split(state.key, 3)
    tokens = jnp.concatenate([state.pending[:, None], state.drafts], 1)
    z, chunk, _ = apply(params, c, tokens, layouts.verify(state.cache.length, N), state.cache, impl)
    counted = count_forward(state)  # the verify forward ran for every row active before the acceptance
    state, n, nxt, active, kept = block.accept_and_append(o, state, z, k_acc)
    cache = commit(state.cache, chunk, jnp.where(active, kept, 0))  # a, d_1..d_n minus what EOS/stop/budget cut
    state = state.replace(cache=cache, pending=nxt, key=key, **counted)
    # no drafting forward once every row is done: its drafts would never be verified (nor counted as a forward)
    state = jax.lax.cond(state.done.all(), lambda s: s, lambda s: block.draft_after(params, c, impl, o, s, k_draft),
                         state)
    return state, {"accepted": n, "active": active, "drafts": drafts, "next": nxt, "kept": kept}


def query_tokens(o: DecodeOptions) -> tuple[int, ...]:
    return (o.block_size + 1, o.block_size + 1)  # verify, then draft


TWO_FORWARD = register(Sampler(
    "two_forward", step, query_tokens,
    expected_tokens_per_step=lambda beta, o: block.tokens_per_step_iid(beta, o.block_size),
    # mask anchor: the first drafts ride on the prefill forward; token anchor: prefill, then a drafting forward
    prefill=block.prefill_and_start, fuses_prefill=lambda o: o.anchor == "mask", init=block.start,
    cache_slack=block.cache_slack,
    summarize=lambda infos, o: block.summarize(infos, o.block_size, sum(query_tokens(o))),
    label=lambda o: f"TF K={o.block_size}" + (" mask-anchor" if o.anchor == "mask" else ""),
    layout=lambda o: "TF", perfect_tokens_per_step=lambda o: o.block_size + 1))

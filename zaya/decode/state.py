"""Decoding state shared by every sampler, the prefill, and the bookkeeping of committed tokens.

All functions are pure and jit with static shapes; rows advance independently (each has its own cache length,
output count and done flag).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from zaya import layouts
from zaya.config import ZayaConfig
from zaya.model.cache import Cache, commit
from zaya.model.transformer import Impl, apply


@struct.dataclass
class State:
    cache: Cache
    logits: jnp.ndarray   # [B, V] AR logits for the next token (from the last committed token)
    out: jnp.ndarray      # [B, M] generated ids; entries at or past n[b] are padding
    n: jnp.ndarray        # [B] tokens generated per row
    done: jnp.ndarray     # [B] row finished (EOS, stop sequence or max_new_tokens)
    key: jax.Array
    forwards: jnp.ndarray  # scalar: model forwards so far (prefill excluded)
    row_forwards: jnp.ndarray  # [B] forwards that ran while the row was still generating (see count_forward)
    # Block samplers only (None for ar):
    pending: jnp.ndarray | None = None       # [B] next token: already in `out`, not yet in the cache
    drafts: jnp.ndarray | None = None        # [B, N] drafts for the N positions after `pending`
    draft_probs: jnp.ndarray | None = None   # [B, N, V] drafter distribution (None: argmax "Dirac" drafter)
    draft_logits: jnp.ndarray | None = None  # [B, N, V] raw drafting logits (RuleInputs: logit mixing, TiDAR ratio)


def prefill(params, c: ZayaConfig, impl: Impl, prompt_BT, length_B, cache: Cache, max_new: int, key) -> State:
    """Run the right-padded prompts through the model and commit length[b] tokens per row."""
    return prefill_with_block(params, c, impl, prompt_BT, length_B, cache, max_new, key, 0)[0]


def prefill_with_block(params, c: ZayaConfig, impl: Impl, prompt_BT, length_B, cache: Cache, max_new: int, key,
                       block: int):
    """``prefill`` plus, in the same forward, a block of ``block`` masks right after each row's prompt (positions
    length[b] .., bidirectional, seeing the prompt): the first drafting block of the mask-anchored samplers comes
    free with the prefill. Only the prompt is committed. Returns (state, mask logits [B, block, V] or None)."""
    B, T = prompt_BT.shape
    lay = layouts.causal(B, T, start=0, valid=length_B)
    tokens = prompt_BT
    if block:
        lay = layouts.prefill_block(length_B, T, block)
        tokens = jnp.concatenate([prompt_BT, jnp.full((B, block), c.mask_token_id, prompt_BT.dtype)], 1)
    logits, chunk, _ = apply(params, c, tokens, lay, cache, impl)
    cache = commit(cache, chunk, length_B)  # the prompt is the chunk's head: masks are never committed
    last = jnp.take_along_axis(logits[:, :T], (length_B - 1)[:, None, None], 1)[:, 0]
    state = State(cache=cache, logits=last, out=jnp.zeros((B, max_new), jnp.int32), n=jnp.zeros((B,), jnp.int32),
                  done=jnp.zeros((B,), bool) | (max_new <= 0), key=key, forwards=jnp.zeros((), jnp.int32),
                  row_forwards=jnp.zeros((B,), jnp.int32))
    return state, (logits[:, T:] if block else None)


def count_forward(state: State) -> dict:
    """The fields a forward updates: one more forward, charged to every row still generating when it runs.

    A batch keeps running forwards until its last row is done; rows that finished earlier ride along in them.
    ``forwards`` counts every forward (what the batch paid), ``row_forwards[b]`` only those row b needed, so
    tokens per forward per active row = generated tokens / sum(row_forwards) is a property of the sampler, not of
    how the rows of a batch happen to finish."""
    return dict(forwards=state.forwards + 1, row_forwards=state.row_forwards + (~state.done).astype(jnp.int32))


def append(state: State, tokens_BT, count_B, eos_id: int | None, stop_seqs=None):
    """Append the first count[b] of tokens[b] to each active row, cutting at EOS, a stop sequence or the budget.

    Returns (state, kept [B]): kept[b] is how many tokens were really appended (what the cache must keep).
    """
    B, M = state.out.shape
    T = tokens_BT.shape[1]
    i = jnp.arange(T)
    count = jnp.where(state.done, 0, jnp.minimum(count_B, M - state.n))
    valid = i[None, :] < count[:, None]
    if eos_id is not None:  # keep the EOS itself, drop what follows it
        is_eos = (tokens_BT == eos_id) & valid
        first = jnp.where(is_eos.any(1), jnp.argmax(is_eos, 1) + 1, T)
        count = jnp.minimum(count, first)
    hit_stop = jnp.zeros((B,), bool)
    if stop_seqs:
        count, hit_stop = _cut_stop(state, tokens_BT, count, stop_seqs)
    valid = i[None, :] < count[:, None]
    slot = jnp.where(valid, state.n[:, None] + i[None, :], M)
    out = state.out.at[jnp.arange(B)[:, None], slot].set(tokens_BT, mode="drop")
    n = state.n + count
    done = state.done | (n >= M) | hit_stop
    if eos_id is not None:
        done = done | ((tokens_BT == eos_id) & valid).any(1)
    return state.replace(out=out, n=n, done=done), count


def _cut_stop(state: State, tokens_BT, count, stop_seqs):
    """Cut each row right after the first completed stop sequence (searched over old tail + new tokens)."""
    B, M = state.out.shape
    T = tokens_BT.shape[1]
    m = max(len(s) for s in stop_seqs)
    # window = the last m-1 committed tokens followed by the new tokens
    idx = state.n[:, None] - (m - 1) + jnp.arange(m - 1)[None, :]
    tail = jnp.where(idx >= 0, jnp.take_along_axis(state.out, jnp.clip(idx, 0, M - 1), 1), -1)
    win = jnp.concatenate([tail, tokens_BT], 1)
    ends = jnp.full((B,), T + 1)
    for s in stop_seqs:
        s = jnp.asarray(s, jnp.int32)
        n_stop = s.shape[0]
        for j in range(T):  # stop sequence ending at new token j
            start = m - 1 + j - n_stop + 1
            if start < 0:
                continue
            match = (win[:, start:start + n_stop] == s[None]).all(1) & (j < count)
            ends = jnp.where(match & (j + 1 < ends), j + 1, ends)
    hit = ends <= T
    return jnp.where(hit, jnp.minimum(count, ends), count), hit

"""Single-forward block sampler (Zyphra's "SF"): verify and pre-draft every acceptance level in one forward.

Input per row: ``[verify (K+1) | proposal_1 (K+1) | ... | proposal_P (K+1)]``. Proposal j assumes ``levels[j]``
drafts will be accepted: it sits at L+l_j+1 .. L+l_j+K+1 and sees the cache plus verify[:l_j+1]; its slot 0 (at
the bonus position) is an "anchor mask" whose prediction is discarded. After acceptance of n drafts the proposal
with the largest level <= n supplies the next drafts (shifted by n - level; missing tail drafts are filled with
the mask id, which the lossless rules treat as ordinary Dirac drafts, so exactness holds). Levels: dense 0..K or
sparse (e.g. 0,4,7,11); 0 is required.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya import layouts
from zaya.decode import block
from zaya.decode.state import State
from zaya.model.cache import commit
from zaya.model.transformer import apply

def levels_of(o) -> tuple[int, ...]:
    K = o["block_size"]
    lv = tuple(range(K + 1)) if o["levels"] is None else tuple(int(x) for x in o["levels"])
    if 0 not in lv or list(lv) != sorted(set(lv)) or lv[-1] > K:
        raise ValueError(f"levels {lv} must be increasing, unique, include 0 and stay <= block_size {K}")
    return lv


cache_slack = block.cache_slack


def fuses_prefill(opts) -> bool:
    return True


def prefill(params, c, impl, opts, prompt_BT, lengths_B, cache, max_new, key) -> State:
    """The first drafts come with the prefill, mask-anchored like every proposal of this layout."""
    o = block.options(opts)
    levels_of(o)  # refuse bad levels before any work
    return block.prefill_and_start(params, c, impl, dict(opts, anchor="mask"), prompt_BT, lengths_B, cache, max_new,
                                   key)


def init(params, c, impl, opts, state: State) -> State:
    """Only without ``prefill`` (kept for callers that prefill themselves): first token, one drafting forward."""
    o = block.options(opts)
    levels_of(o)  # refuse bad levels before any work
    return block.start(params, c, impl, o, state)


def step(params, c, impl, opts, state: State):
    o = block.options(opts)
    K, lv = o["block_size"], levels_of(o)
    P, W = len(lv), o["block_size"] + 1
    B = state.n.shape[0]
    drafts = state.drafts
    key, k_acc, k_draft = jax.random.split(state.key, 3)
    tokens = jnp.concatenate([state.pending[:, None], state.drafts,
                              jnp.full((B, P * W), c.mask_token_id, jnp.int32)], 1)
    lay = layouts.single_forward(state.cache.length, K, lv, o["block_causal"])
    z, chunk, _ = apply(params, c, tokens, lay, state.cache, impl)
    state, n, nxt, active, kept = block.accept_and_append(o, state, z[:, :W], k_acc)
    cache = commit(state.cache, chunk, jnp.where(active, kept, 0))  # verify tokens come first; a cut drops the rest

    levels = jnp.asarray(lv, jnp.int32)
    j = (levels[None, :] <= n[:, None]).sum(1) - 1
    shift = n - levels[j]
    props = z[:, W:].reshape(B, P, W, -1)
    prop = jnp.take_along_axis(props, j[:, None, None, None], 1)[:, 0]  # [B, K+1, V]
    src = shift[:, None] + 1 + jnp.arange(K)[None, :]  # slot feeding each next draft position
    zd = jnp.take_along_axis(prop, jnp.minimum(src, K)[..., None], 1)
    drafts, probs = block.draft_tokens(zd, k_draft, o)
    valid = src <= K
    drafts = jnp.where(valid, drafts, c.mask_token_id)
    if probs is not None:
        probs = jnp.where(valid[..., None], probs, jax.nn.one_hot(drafts, probs.shape[-1]))
    zkeep = jnp.where(valid[..., None], zd, 0.0) if block.keep_logits(o) else None
    state = state.replace(cache=cache, pending=nxt, drafts=drafts, draft_probs=probs, draft_logits=zkeep, key=key,
                          forwards=state.forwards + 1)
    return state, {"accepted": n, "active": active, "drafts": drafts, "next": nxt, "kept": kept}


def summarize(infos, opts):
    o = block.options(opts)
    return block.summarize(infos, dict(o, _query_tokens=(o["block_size"] + 1) * (1 + len(levels_of(o)))))

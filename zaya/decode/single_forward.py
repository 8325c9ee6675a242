"""Single-forward block sampler (Zyphra's "SF"): verify and pre-draft every acceptance level in one forward.

Input per row: ``[verify (N+1) | proposal_1 (N+1) | ... | proposal_P (N+1)]``. Proposal j assumes ``levels[j]``
drafts will be accepted: it sits at L+l_j+1 .. L+l_j+N+1 (L: the row's cache length) and sees the cache plus
verify[:l_j+1]; its slot 0 (at the bonus position) is an "anchor mask" whose prediction is discarded. After
acceptance of n drafts the proposal with the largest level <= n supplies the next drafts (shifted by n - level;
missing tail drafts are filled with the mask id, which the lossless rules treat as ordinary Dirac drafts, so
exactness holds). Levels: dense 0..N or sparse (e.g. 0,4,7,11); 0 is required.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zaya import layouts
from zaya.decode import block
from zaya.decode.options import DecodeOptions
from zaya.decode.samplers import Sampler, register
from zaya.decode.state import State, count_forward
from zaya.model.cache import commit
from zaya.model.transformer import apply


def levels_of(o: DecodeOptions) -> tuple[int, ...]:
    """The proposal levels: ``o.levels`` or dense 0..N."""
    return tuple(range(o.block_size + 1)) if o.levels is None else o.levels


def check(o: DecodeOptions):
    """Refuse bad levels when the options are built (once per generate call)."""
    lv, N = levels_of(o), o.block_size
    if 0 not in lv or list(lv) != sorted(set(lv)) or lv[-1] > N:
        raise ValueError(f"levels {lv} must be increasing, unique, include 0 and stay <= block_size {N}")


def step(params, c, impl, o: DecodeOptions, state: State):
    N, lv = o.block_size, levels_of(o)
    P, W = len(lv), o.block_size + 1
    B = state.n.shape[0]
    drafts = state.drafts
    key, k_acc, k_draft = jax.random.split(state.key, 3)
    tokens = jnp.concatenate([state.pending[:, None], state.drafts,
                              jnp.full((B, P * W), c.mask_token_id, jnp.int32)], 1)
    lay = layouts.single_forward(state.cache.length, N, lv, o.block_causal)
    z, chunk, _ = apply(params, c, tokens, lay, state.cache, impl)
    counted = count_forward(state)  # the verify forward ran for every row active before the acceptance
    state, n, nxt, active, kept = block.accept_and_append(o, state, z[:, :W], k_acc)
    cache = commit(state.cache, chunk, jnp.where(active, kept, 0))  # verify tokens come first; a cut drops the rest

    levels = jnp.asarray(lv, jnp.int32)
    j = (levels[None, :] <= n[:, None]).sum(1) - 1
    shift = n - levels[j]
    props_BPWV = z[:, W:].reshape(B, P, W, -1)
    prop_BWV = jnp.take_along_axis(props_BPWV, j[:, None, None, None], 1)[:, 0]
    src_BN = shift[:, None] + 1 + jnp.arange(N)[None, :]  # slot feeding each next draft position
    zd = jnp.take_along_axis(prop_BWV, jnp.minimum(src_BN, N)[..., None], 1)
    drafts, probs = block.draft_tokens(zd, k_draft, o)
    valid = src_BN <= N
    drafts = jnp.where(valid, drafts, c.mask_token_id)
    if probs is not None:
        probs = jnp.where(valid[..., None], probs, jax.nn.one_hot(drafts, probs.shape[-1]))
    zkeep = jnp.where(valid[..., None], zd, 0.0) if o.keeps_draft_logits() else None
    state = state.replace(cache=cache, pending=nxt, drafts=drafts, draft_probs=probs, draft_logits=zkeep, key=key,
                          **counted)
    return state, {"accepted": n, "active": active, "drafts": drafts, "next": nxt, "kept": kept}


def query_tokens(o: DecodeOptions) -> tuple[int, ...]:
    return ((o.block_size + 1) * (1 + len(levels_of(o))),)


def tokens_per_step_levels(beta: float, N: int, levels) -> float:
    """Stationary E[tokens/step] with proposal ``levels`` and i.i.d. acceptance beta: the proposal chosen after n
    accepted drafts is the one at the largest level l <= n, shifted by n - l, so the next step has only N - (n - l)
    valid drafts (the rest are mask ids that are never accepted); the mean over that Markov chain."""
    lv = sorted(set(int(x) for x in levels))
    if lv[0] != 0:
        raise ValueError("levels must include 0")
    lvl_of = [max(l for l in lv if l <= n) for n in range(N + 1)]
    P = np.zeros((N + 1, N + 1))  # state m = number of valid drafts this step
    for m in range(N + 1):
        for n in range(m + 1):
            p = beta ** n * ((1 - beta) if n < m else 1.0)
            P[m, N - (n - lvl_of[n])] += p
    pi = np.zeros(N + 1)
    pi[N] = 1.0
    for _ in range(10000):
        nxt = pi @ P
        if np.abs(nxt - pi).max() < 1e-14:
            pi = nxt
            break
        pi = nxt
    return float(sum(pi[m] * block.tokens_per_step_iid(beta, m) for m in range(N + 1)))


def expected_tokens_per_step(beta: float, o: DecodeOptions) -> float:
    if o.levels is None:
        return block.tokens_per_step_iid(beta, o.block_size)
    return tokens_per_step_levels(beta, o.block_size, o.levels)


def label(o: DecodeOptions) -> str:
    return f"SF K={o.block_size} dense" if o.levels is None else f"SF K={o.block_size} L={','.join(map(str, o.levels))}"


def layout(o: DecodeOptions) -> str:
    return "SF dense" if o.levels is None else ("SF L=0" if o.levels == (0,) else "SF sparse")


SINGLE_FORWARD = register(Sampler(
    "single_forward", step, query_tokens, expected_tokens_per_step,
    prefill=block.prefill_and_start,  # the first drafts come with the prefill, mask-anchored like every proposal
    init=block.start,  # only without `prefill` (callers that prefill themselves): first token, a drafting forward
    cache_slack=block.cache_slack,
    summarize=lambda infos, o: block.summarize(infos, o.block_size, sum(query_tokens(o))),
    check=check, label=label, layout=layout, perfect_tokens_per_step=lambda o: o.block_size + 1))

"""TiDAR's published single-forward layout (b + b*b tokens per row), for parity runs with the authors' code.

Input per row: ``[D_0..D_{b-1} | set_1 .. set_b]``, set k = b masks at L+k .. L+k+b-1 seeing the cache and D[:k].
D_0 (the first slot of the previously selected set) is always kept; D_i (i >= 1) is verified against the AR logits
at D_{i-1}; after n tokens are kept, set n becomes the next D. There is no bonus token, so even greedy acceptance
is not bit-identical to AR (the block's first token comes from the diffusion head). Logit mixing uses the first slot
of set i (same context as the AR logit at D_{i-1}) as z_diff; ``tidar_ratio`` uses the previous drafting logits as q.
Here b = N = ``block_size``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya import layouts
from zaya.decode import block
from zaya.decode.acceptance import RuleInputs
from zaya.decode.options import DecodeOptions
from zaya.decode.samplers import Sampler, register
from zaya.decode.state import State, append, count_forward
from zaya.model.cache import commit
from zaya.model.transformer import apply


def init(params, c, impl, o: DecodeOptions, state: State) -> State:
    """TiDAR's prefill extra forward: b masks after the prompt give the first block D."""
    b, B = o.block_size, state.n.shape[0]
    key, sub = jax.random.split(state.key)
    masks = jnp.full((B, b), c.mask_token_id, jnp.int32)
    z, _, _ = apply(params, c, masks, layouts.draft_block(state.cache.length, b, o.block_causal), state.cache,
                    impl)
    d, probs = block.draft_tokens(z, sub, o)
    return state.replace(drafts=d, draft_probs=probs, draft_logits=z, key=key, **count_forward(state))


def step(params, c, impl, o: DecodeOptions, state: State):
    b, B = o.block_size, state.n.shape[0]
    key, k_acc, k_draft = jax.random.split(state.key, 3)
    tokens = jnp.concatenate([state.drafts, jnp.full((B, b * b), c.mask_token_id, jnp.int32)], 1)
    z, chunk, _ = apply(params, c, tokens, layouts.tidar_published(state.cache.length, b, o.block_causal),
                        state.cache, impl)
    sets = z[:, b:].reshape(B, b, b, -1)  # set k-1 holds the block that follows k kept tokens
    inputs = RuleInputs(draft_logits=state.draft_logits[:, 1:], diff_logits=sets[:, :b - 1, 0])
    n_acc, _ = o.accept()(z[:, :b], state.drafts[:, 1:], None if state.draft_probs is None
                          else state.draft_probs[:, 1:], k_acc, o.rule_kwargs(), inputs)
    keep = n_acc + 1  # D_0 is always kept
    counted = count_forward(state)  # the verify forward ran for every row active before the acceptance
    active = ~state.done
    state, kept = append(state, state.drafts, keep, o.eos_id, o.stop)
    cache = commit(state.cache, chunk, jnp.where(active, kept, 0))  # an EOS/stop/budget cut drops the rest
    znext = jnp.take_along_axis(sets, (keep - 1)[:, None, None, None], 1)[:, 0]
    d, probs = block.draft_tokens(znext, k_draft, o)
    state = state.replace(cache=cache, drafts=d, draft_probs=probs, draft_logits=znext, key=key,
                          **counted)
    return state, {"accepted": n_acc, "active": active, "drafts": tokens[:, :b], "next": tokens[:, 0],
                   "kept": kept}


def query_tokens(o: DecodeOptions) -> tuple[int, ...]:
    return (o.block_size * (o.block_size + 1),)


TIDAR = register(Sampler(
    "tidar", step, query_tokens,
    expected_tokens_per_step=lambda beta, o: block.tokens_per_step_iid(beta, o.block_size - 1),  # no bonus token
    init=init, cache_slack=block.cache_slack,
    summarize=lambda infos, o: block.summarize(infos, o.block_size, sum(query_tokens(o)), kept_first=1),
    label=lambda o: f"TiDAR b={o.block_size}", layout=lambda o: "TiDAR"))

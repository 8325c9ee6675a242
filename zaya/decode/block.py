"""Pieces shared by the block samplers: drafting from logits, the initial draft, acceptance, statistics.

Options are a validated ``DecodeOptions`` (``o``); N is the number of drafts per block (``o.block_size``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zaya import layouts
from zaya.decode.acceptance import RuleInputs
from zaya.decode.options import DecodeOptions
from zaya.decode.sampling import sample
from zaya.decode.state import State, append, count_forward, prefill_with_block
from zaya.model.transformer import apply


def draft_tokens(z_BNV, key, o: DecodeOptions):
    """Drafts by argmax (Dirac drafter: probs None) or sampled at the draft temperature (probs returned)."""
    if o.draft_temperature == 0.0:
        return jnp.argmax(z_BNV, -1).astype(jnp.int32), None
    zt = z_BNV.astype(jnp.float32) / o.draft_temperature
    return jax.random.categorical(key, zt, -1).astype(jnp.int32), jax.nn.softmax(zt, -1)


def draft_after(params, c, impl, o: DecodeOptions, state: State, key) -> State:
    """The drafting forward: one block [a', mask x N] (or [mask x (N+1)]) after the cache; nothing is committed."""
    N = o.block_size
    B = state.n.shape[0]
    first = state.pending if o.anchor == "token" else jnp.full((B,), c.mask_token_id, jnp.int32)
    tokens = jnp.concatenate([first[:, None], jnp.full((B, N), c.mask_token_id, jnp.int32)], 1)
    lay = layouts.draft_anchored(state.cache.length, N, o.block_causal)
    logits, _, _ = apply(params, c, tokens, lay, state.cache, impl)
    z = logits[:, 1:]
    drafts, probs = draft_tokens(z, key, o)
    return state.replace(drafts=drafts, draft_probs=probs, **count_forward(state),
                         draft_logits=z if o.keeps_draft_logits() else None)


def cache_slack(o: DecodeOptions) -> int:
    """Cache slots beyond prompt + max_new_tokens: a block committed in the step that reaches the budget."""
    return 2 * o.block_size + 4


def start(params, c, impl, o: DecodeOptions, state: State) -> State:
    """First token from the prefill logits (the pending token), then one drafting forward after it."""
    state = first_token(c, o, state)
    key, sub = jax.random.split(state.key)
    return draft_after(params, c, impl, o, state.replace(key=key), sub)


def prefill_and_start(params, c, impl, o: DecodeOptions, prompt_BT, length_B, cache, key) -> State:
    """``start`` fused into the prefill: one forward over [prompt | mask x (N+1)] gives the first token (prefill
    logits) and the first N drafts (mask slots 1..N; slot 0 stands at the first token's position)."""
    N = o.block_size
    state, z = prefill_with_block(params, c, impl, prompt_BT, length_B, cache, o.max_new_tokens, key, N + 1)
    state = first_token(c, o, state)
    key, sub = jax.random.split(state.key)
    drafts, probs = draft_tokens(z[:, 1:], sub, o)
    return state.replace(drafts=drafts, draft_probs=probs, key=key,
                         draft_logits=z[:, 1:] if o.keeps_draft_logits() else None)


def first_token(c, o: DecodeOptions, state: State) -> State:
    """Decide the first new token from the prefill logits (AR) and make it the pending token."""
    key, sub = jax.random.split(state.key)
    a = sample(state.logits, sub, o.temperature, o.top_k, o.top_p)
    state, _ = append(state, a[:, None], jnp.ones_like(state.n), o.eos_id, o.stop)
    return state.replace(pending=a, key=key)


def accept_and_append(o: DecodeOptions, state: State, z_verify, key):
    """Run the acceptance rule; append [d_1..d_n, next] per row. Returns (state, n, next, active, kept): n[b] drafts
    accepted, kept[b] tokens really appended (n + 1 unless EOS, a stop sequence or the budget cut the block)."""
    active = ~state.done
    inputs = RuleInputs(draft_logits=state.draft_logits, diff_logits=state.draft_logits)
    n, nxt = o.accept()(z_verify, state.drafts, state.draft_probs, key, o.rule_kwargs(), inputs)
    new = jnp.concatenate([state.drafts, jnp.zeros_like(nxt)[:, None]], 1)
    new = new.at[jnp.arange(new.shape[0]), n].set(nxt)
    state, kept = append(state, new, n + 1, o.eos_id, o.stop)
    return state, n, nxt, active, kept


def tokens_per_step_iid(beta: float, drafts: int) -> float:
    """E[1 + accepted] with `drafts` drafts and i.i.d. acceptance beta: (1 - beta^(drafts+1)) / (1 - beta)."""
    if beta >= 1.0:
        return float(drafts + 1)
    return (1.0 - beta ** (drafts + 1)) / (1.0 - beta)


def summarize(infos, N: int, query_tokens: int, kept_first: int = 0) -> dict:
    """Tokens per step (mean, histogram), acceptance per draft position, useful-slot fraction.

    Only what was appended counts: drafts the rule "accepted" after an EOS, a stop sequence or the budget are not
    tokens, and the positions after such a cut are not reached (an accepted EOS is an accepted draft). ``N``: drafts
    per block; ``query_tokens``: per row and step; ``kept_first``: tokens a step keeps before its verified drafts
    (TiDAR's layout keeps its D_0 unverified)."""
    n = np.stack([np.asarray(i["accepted"]) for i in infos])  # [steps, B] drafts accepted
    act = np.stack([np.asarray(i["active"]) for i in infos])
    kept = np.stack([np.asarray(i["kept"]) for i in infos])  # [steps, B] tokens really appended
    committed = kept * act
    cut = kept < n + 1  # the full append is n + 1 tokens
    # TF/SF append [d_1..d_n, next]; the TiDAR layout appends [D_0, D_1..D_n] (its always-kept D_0 first)
    n = np.minimum(n, np.maximum(kept - kept_first, 0))
    reached = [(n >= k) & act & ~(cut & (k >= n)) for k in range(N)]
    accepted = [(n > k) & act for k in range(N)]
    per_pos = [float(a.sum()) / max(float(r.sum()), 1.0) for a, r in zip(accepted, reached)]
    hist = np.bincount(committed[act].astype(int), minlength=N + 2).tolist()
    slots = float(act.sum()) * query_tokens
    return {"tokens_per_step": float(committed.sum() / max(act.sum(), 1)), "tokens_per_step_hist": hist,
            "acceptance_per_position": per_pos, "useful_slot_fraction": float(committed.sum()) / max(slots, 1.0),
            "query_tokens_per_step": query_tokens,
            # raw counts, so runs over several prompt batches can be pooled exactly (zaya.bench.samplers)
            "counts": {"committed": int(committed.sum()), "row_steps": int(act.sum()),
                       "reached": [int(r.sum()) for r in reached], "accepted": [int(a.sum()) for a in accepted]}}

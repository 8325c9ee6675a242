"""The autoregressive baseline sampler: one token per forward."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya import layouts
from zaya.config import ZayaConfig
from zaya.decode.options import DecodeOptions
from zaya.decode.sampling import sample
from zaya.decode.samplers import Sampler, register
from zaya.decode.state import State, append, count_forward
from zaya.model.cache import commit
from zaya.model.transformer import Impl, apply


def step(params, c: ZayaConfig, impl: Impl, o: DecodeOptions, state: State) -> tuple[State, dict]:
    """Sample the next token from the current logits, commit it, and compute the logits after it.

    The forward is skipped once every row is done: its logits would never be read, and counting it would charge AR
    one forward per prompt that the block samplers (whose steps end with the acceptance) never pay."""
    key, sub = jax.random.split(state.key)
    tok = sample(state.logits, sub, o.temperature, o.top_k, o.top_p)
    state, kept = append(state, tok[:, None], jnp.ones_like(state.n), o.eos_id, o.stop)
    B = tok.shape[0]

    def forward(state):
        lay = layouts.causal(B, 1, start=state.cache.length)
        logits, chunk, _ = apply(params, c, tok[:, None], lay, state.cache, impl)
        cache = commit(state.cache, chunk, kept)
        return state.replace(cache=cache, logits=logits[:, 0], **count_forward(state))

    state = jax.lax.cond(state.done.all(), lambda s: s, forward, state)
    return state.replace(key=key), {"kept": kept, "next": tok}


AR = register(Sampler("ar", step, query_tokens=lambda o: (1,), expected_tokens_per_step=lambda beta, o: 1.0))

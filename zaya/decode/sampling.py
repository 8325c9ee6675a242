"""Token sampling from logits: greedy, temperature, top-k, top-p (nucleus). Pure and jit-friendly.

``temperature``, ``top_k`` and ``top_p`` are static Python values (they pick the code path at trace time).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_XV, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """Logits after temperature, top-k and top-p filtering (removed entries are -inf). fp32."""
    z = logits_XV.astype(jnp.float32) / max(temperature, 1e-6)
    V = z.shape[-1]
    if top_k is not None and 0 < top_k < V:
        kth = jax.lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-z, axis=-1)
        zs = jnp.take_along_axis(z, order, -1)
        ps = jax.nn.softmax(zs, -1)
        before = jnp.cumsum(ps, -1) - ps  # mass strictly before each token: keep while < top_p (always keeps the top)
        keep_sorted = before < top_p
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, -1), -1)  # back to vocabulary order
        z = jnp.where(keep, z, -jnp.inf)
    return z


def probs(logits_XV, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """The sampling distribution (fp32) the sampler draws from; greedy (temperature 0) gives a one-hot."""
    if temperature == 0.0:
        return jax.nn.one_hot(jnp.argmax(logits_XV, -1), logits_XV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits_XV, temperature, top_k, top_p), -1)


def sample(logits_XV, key, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """One token per row: argmax when temperature == 0, else a draw from the filtered distribution."""
    if temperature == 0.0:
        return jnp.argmax(logits_XV, -1).astype(jnp.int32)
    z = filter_logits(logits_XV, temperature, top_k, top_p)
    return jax.random.categorical(key, z, -1).astype(jnp.int32)

"""Decoding cache: KV, CCA conv state and delayed value, per layer, for B rows of different lengths.

Per layer (stacked on a leading L axis):
  k, v  [L, B, S, K, d]   post-RoPE keys and values at slot = position
  xqk   [L, B, W, C]      raw concat(q, k) projections (the conv state), ring buffer at slot = position % W
  vd    [L, B, W, K*d/2]  delayed-value projections, same ring
  length [B]              committed tokens per row; slots at or above it are ignored

Only ``commit`` writes into the cache, and only the first n[b] tokens of a chunk: proposal and mask tokens never
enter it. Rolling back is setting ``length`` lower: the KV stays exact and the conv state of any earlier length
is in the ring as long as the rollback is at most W - 2 tokens (W = S keeps the whole history).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from zaya.config import ZayaConfig


@struct.dataclass
class Cache:
    k: jnp.ndarray
    v: jnp.ndarray
    xqk: jnp.ndarray
    vd: jnp.ndarray
    length: jnp.ndarray

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def window(self) -> int:
        return self.xqk.shape[2]


@struct.dataclass
class Chunk:
    """Per-layer states of the T tokens of one forward ([L, B, T, ...]), ready to commit."""
    k: jnp.ndarray
    v: jnp.ndarray
    xqk: jnp.ndarray
    vd: jnp.ndarray


def init_cache(c: ZayaConfig, batch: int, max_len: int, window: int | None = None, dtype=None) -> Cache:
    dt = jnp.dtype(dtype or c.dtype)
    L, K, d, C = c.num_layers, c.num_kv_heads, c.head_dim, c.conv_channels
    W = max_len if window is None else min(window, max_len)
    return Cache(
        k=jnp.zeros((L, batch, max_len, K, d), dt), v=jnp.zeros((L, batch, max_len, K, d), dt),
        xqk=jnp.zeros((L, batch, W, C), dt), vd=jnp.zeros((L, batch, W, K * d // 2), dt),
        length=jnp.zeros((batch,), jnp.int32))


def commit(cache: Cache, chunk: Chunk, n) -> Cache:
    """Append the first n[b] chunk tokens of each row at positions length[b] .. length[b] + n[b] - 1."""
    L, B, T = chunk.k.shape[:3]
    n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), (B,))
    t = jnp.arange(T, dtype=jnp.int32)
    pos = cache.length[:, None] + t[None, :]
    keep = t[None, :] < n[:, None]
    S, W = cache.max_len, cache.window
    slot = jnp.where(keep, pos, S)  # out of range -> dropped by the scatter
    ring = jnp.where(keep, pos % W, W)
    b = jnp.arange(B)[:, None]

    def put(dst, src, idx):
        return dst.at[:, b, idx].set(src.astype(dst.dtype), mode="drop")
    return Cache(k=put(cache.k, chunk.k, slot), v=put(cache.v, chunk.v, slot), xqk=put(cache.xqk, chunk.xqk, ring),
                 vd=put(cache.vd, chunk.vd, ring), length=jnp.minimum(cache.length + n, S))


def rollback(cache: Cache, length) -> Cache:
    """Forget everything at or after ``length`` (int or [B]); exact within the conv-state window (see module doc)."""
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), cache.length.shape)
    return cache.replace(length=jnp.minimum(length, cache.length))


def layer_view(cache: Cache | None):
    """(per-layer xs for lax.scan, length) or (None, None)."""
    if cache is None:
        return None, None
    return (cache.k, cache.v, cache.xqk, cache.vd), cache.length

"""Token layouts: who attends to whom, and which tokens feed CCA's sequence convolutions.

A ``Layout`` describes the T tokens of one forward pass with O(T) integers per row, never a dense [T, T] mask:

  pos  [B, T]  RoPE position (also the causal coordinate)
  seg  [B, T]  document id for packed sequences; -1 marks padding (attends to nothing, seen by nothing)
  blk  [B, T]  -1 for a clean (causal) token; b >= 0 for a token of mask block b
  ctx  [B, T]  the highest *clean* position the token may see (pos for clean tokens; the position before the
               block's first token for block tokens)
  prev [B, T, 2]  the tokens at distance 1 and 2 that feed the causal convolutions and the delayed value:
               an index into this chunk (>= 0), PREV_CACHE (read the cache at pos - distance) or PREV_ZERO
               (document start: zero input, exactly HF's left zero-padding)

The attention rule (``allowed``), for query i and key j of the same document:
  clean key:  pos_j <= ctx_i                       (causal over the clean stream)
  block key:  blk_j == blk_i                       (bidirectional inside a block; causal if block_causal)
Cached keys are clean tokens at positions [0, cache_length).

**CCA conv state under mask blocks.** A block token's conv inputs are the tokens at positions pos-1 and pos-2 that it
can see: earlier tokens of its own block, or, for the first tokens of a block, the clean tokens just before it. So a
block drafted after a clean prefix sees exactly the conv state and delayed value that decoding after that prefix
sees, and since block tokens never feed clean tokens' convolutions or attention, the clean tokens' states are
untouched. ``prev`` is built by the layout builders; tests check it against the visible-token definition.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

PREV_CACHE = -1
PREV_ZERO = -2


@struct.dataclass
class Layout:
    pos: jnp.ndarray
    seg: jnp.ndarray
    blk: jnp.ndarray
    ctx: jnp.ndarray
    prev: jnp.ndarray
    block_causal: bool = struct.field(pytree_node=False, default=False)

    @property
    def shape(self):
        return self.pos.shape


def allowed(q_pos, q_seg, q_blk, q_ctx, k_pos, k_seg, k_blk, block_causal=False):
    """Broadcasting mask rule over chunk keys (see module doc). Inputs broadcast as [..., Tq, 1] vs [..., 1, Tk]."""
    same_doc = (q_seg == k_seg) & (k_seg >= 0) & (q_seg >= 0)
    clean = (k_blk < 0) & (k_pos <= q_ctx)
    inblk = (k_blk >= 0) & (k_blk == q_blk)
    if block_causal:
        inblk = inblk & (k_pos <= q_pos)
    return same_doc & (clean | inblk)


def cache_allowed(q_ctx, q_seg, slot, length):
    """Cached keys: slot < length (valid) and slot <= ctx of the query. q [..., Tq, 1], slot [1, S], length [..., 1, 1]."""
    return (slot < length) & (slot <= q_ctx) & (q_seg >= 0)


def causal(batch: int, length: int, start=0, valid=None) -> Layout:
    """Plain causal layout for T new tokens at positions start..start+T-1 (start: int or [B]).

    With ``start`` > 0 the first two tokens read their conv inputs from the cache. ``valid`` [B] (number of real
    tokens per row) marks the rest as padding.
    """
    start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,))
    t = jnp.arange(length, dtype=jnp.int32)
    pos = start[:, None] + t[None, :]
    seg = jnp.zeros((batch, length), jnp.int32)
    if valid is not None:
        seg = jnp.where(t[None, :] < jnp.asarray(valid)[:, None], 0, -1)
    prev = jnp.stack([t - 1, t - 2], -1)[None].repeat(batch, 0)
    from_cache = jnp.where(pos[..., None] - jnp.array([1, 2]) >= 0, PREV_CACHE, PREV_ZERO)
    prev = jnp.where(prev < 0, from_cache, prev)
    return Layout(pos=pos, seg=seg, blk=jnp.full((batch, length), -1, jnp.int32), ctx=pos, prev=prev)


def packed(doc_ids) -> Layout:
    """Causal layout for packed documents: doc_ids [B, T] (-1 = padding); positions restart at each document."""
    doc = np.asarray(doc_ids)
    B, T = doc.shape
    pos = np.zeros((B, T), np.int32)
    prev = np.full((B, T, 2), PREV_ZERO, np.int32)
    for b in range(B):
        for t in range(T):
            if t > 0 and doc[b, t] == doc[b, t - 1]:
                pos[b, t] = pos[b, t - 1] + 1
                prev[b, t, 0] = t - 1
                prev[b, t, 1] = prev[b, t - 1, 0]
    blk = np.full((B, T), -1, np.int32)
    return Layout(pos=jnp.asarray(pos), seg=jnp.asarray(doc, jnp.int32), blk=jnp.asarray(blk), ctx=jnp.asarray(pos),
                  prev=jnp.asarray(prev))


def dense_mask(layout: Layout) -> np.ndarray:
    """[B, T, T] boolean mask of a layout (tests and debugging only)."""
    L = layout
    q = lambda x: np.asarray(x)[:, :, None]
    k = lambda x: np.asarray(x)[:, None, :]
    return np.asarray(allowed(q(L.pos), q(L.seg), q(L.blk), q(L.ctx), k(L.pos), k(L.seg), k(L.blk), L.block_causal))


def prev_from_mask(layout: Layout, has_cache: bool) -> np.ndarray:
    """Derive ``prev`` from the definition: the visible token at pos-1 (and its own pos-1 predecessor). Tests only."""
    m = dense_mask(layout)
    pos = np.asarray(layout.pos)
    B, T = pos.shape
    out = np.full((B, T, 2), PREV_ZERO, np.int32)
    for b in range(B):
        for i in range(T):
            for dist in (1, 2):
                p = pos[b, i] - dist
                cand = [j for j in range(T) if m[b, i, j] and pos[b, j] == p]
                if len(cand) > 1:
                    raise ValueError(f"row {b} token {i} sees {len(cand)} tokens at position {p}")
                if cand:
                    out[b, i, dist - 1] = cand[0]
                elif has_cache and p >= 0 and np.asarray(layout.seg)[b, i] >= 0:
                    out[b, i, dist - 1] = PREV_CACHE
    return out

"""TiDAR token layouts (docs/tidar_and_samplers.md §1.2, §1.4, §2).

Training: ``[x_0 .. x_{S-1} | mask x S]``, positions repeated. Clean tokens are causal and blind to masks; the mask
at index i (block k = i // b) sees the clean tokens of its document before the block start and its own block
bidirectionally. Built from ids (O(S) per row), never as a dense [2S, 2S] mask.

Decode: a block of mask tokens after the cached clean prefix (the drafting forward) sees the same context and conv
state as the training block at the same positions; tests check the two agree.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from zaya.model.layout import PREV_CACHE, PREV_ZERO, Layout


def training(doc_ids, block: int, block_causal: bool = False) -> Layout:
    """Layout of the 2S-token TiDAR training sequence. doc_ids [B, S] (document per clean token, -1 = padding)."""
    doc = np.asarray(doc_ids)
    B, S = doc.shape
    i = np.arange(S)
    new_doc = np.concatenate([np.ones((B, 1), bool), doc[:, 1:] != doc[:, :-1]], 1)
    start = np.maximum.accumulate(np.where(new_doc, i[None], 0), axis=1)  # index where each token's doc starts
    pos = i[None] - start
    kb = (i // block) * block
    lo = np.maximum(kb[None], start)  # first index of the token's (block ∩ document)
    m_ctx = np.maximum(kb[None] - start, 0) - 1

    c_prev = np.stack([np.where(pos >= d, i[None] - d, PREV_ZERO) for d in (1, 2)], -1)
    m_prev = np.stack([np.where(i[None] - d >= lo, S + i[None] - d, np.where(pos >= d, i[None] - d, PREV_ZERO))
                       for d in (1, 2)], -1)
    cat = lambda a, b: jnp.asarray(np.concatenate([a, b], 1), jnp.int32)
    seg = np.where(doc >= 0, doc, -1)
    return Layout(pos=cat(pos, pos), seg=cat(seg, seg), blk=cat(np.full((B, S), -1), np.broadcast_to(i // block, (B, S))),
                  ctx=cat(pos, m_ctx), prev=cat(c_prev, m_prev), block_causal=block_causal)


def draft_block(start_B, length: int, block_causal: bool = False) -> Layout:
    """``length`` mask tokens at positions start..start+length-1 after a cached clean prefix of ``start`` tokens."""
    start = jnp.asarray(start_B, jnp.int32)
    B = start.shape[0]
    t = jnp.arange(length, dtype=jnp.int32)
    prev = jnp.stack([jnp.where(t >= d, t - d, PREV_CACHE) for d in (1, 2)], -1)
    return Layout(pos=start[:, None] + t, seg=jnp.zeros((B, length), jnp.int32), blk=jnp.zeros((B, length), jnp.int32),
                  ctx=jnp.broadcast_to(start[:, None] - 1, (B, length)), prev=jnp.broadcast_to(prev, (B, length, 2)),
                  block_causal=block_causal)

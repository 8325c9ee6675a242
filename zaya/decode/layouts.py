"""Decode-time layouts of the block samplers (docs/tidar_and_samplers.md §1.4, §2.2, §7.2).

All are built with jnp from the per-row cache length L [B], so they jit with static shapes:

  verify(L, K)            [a, d_1..d_K] at L..L+K, causal over the cache         (= model.layout.causal)
  draft(L, K)             one block of K+1 tokens at L..L+K after the cache: [a', mask x K] (token anchor) or
                          [mask x (K+1)] (mask anchor); bidirectional inside     (= tidar.layout.draft_block)
  single_forward(L, K, levels)
                          [verify (K+1) | proposal_j (K+1) for each level]; proposal j sits at
                          L+l_j+1 .. L+l_j+K+1 and sees the cache plus verify[:l_j+1]
  tidar_published(L, b)   [D_0..D_{b-1} | set_1 .. set_b]; set k (b masks at L+k .. L+k+b-1) sees D[:k]
  prefill_block(n, T, W)  [prompt | mask x W]: the first drafting block in the prefill forward
"""
from __future__ import annotations

import jax.numpy as jnp

from zaya.model.layout import PREV_CACHE, PREV_ZERO, Layout, causal
from zaya.tidar.layout import draft_block


def verify(L_B, K: int) -> Layout:
    return causal(L_B.shape[0], K + 1, start=L_B)


def draft(L_B, K: int, block_causal: bool = False) -> Layout:
    return draft_block(L_B, K + 1, block_causal)


def _cat(*lays: Layout, block_causal=False) -> Layout:
    f = lambda n: jnp.concatenate([getattr(x, n) for x in lays], 1)
    return Layout(pos=f("pos"), seg=f("seg"), blk=f("blk"), ctx=f("ctx"), prev=f("prev"), block_causal=block_causal)


def _proposal(L_B, offset: int, width: int, anchor_idx: int, blk: int, base: int) -> Layout:
    """``width`` masks at L+offset.. (chunk indices base..) after the clean chunk token ``anchor_idx`` at L+offset-1.

    Conv predecessors: earlier masks of the proposal, else the clean chunk tokens before it, else the cache.
    """
    B = L_B.shape[0]
    t = jnp.arange(width, dtype=jnp.int32)
    prev = []
    for d in (1, 2):
        clean = anchor_idx + 1 + t - d
        prev.append(jnp.where(t >= d, base + t - d, jnp.where(clean >= 0, clean, PREV_CACHE)))
    return Layout(pos=L_B[:, None] + offset + t, seg=jnp.zeros((B, width), jnp.int32),
                  blk=jnp.full((B, width), blk, jnp.int32), ctx=jnp.broadcast_to(L_B[:, None] + offset - 1, (B, width)),
                  prev=jnp.broadcast_to(jnp.stack(prev, -1), (B, width, 2)))


def single_forward(L_B, K: int, levels: tuple[int, ...], block_causal: bool = False) -> Layout:
    parts = [verify(L_B, K)]
    W = K + 1
    for j, lvl in enumerate(levels):
        parts.append(_proposal(L_B, lvl + 1, W, lvl, j, W * (j + 1)))
    return _cat(*parts, block_causal=block_causal)


def prefill_block(lengths_B, T: int, width: int) -> Layout:
    """[prompt (T, right-padded) | mask x width] on an empty cache: the masks stand at lengths[b] .. and see the
    row's prompt and each other (one bidirectional block); conv predecessors are earlier masks (chunk index
    T + t - d), else the prompt's last tokens (chunk index = position)."""
    B = lengths_B.shape[0]
    L = jnp.asarray(lengths_B, jnp.int32)[:, None]
    t = jnp.arange(width, dtype=jnp.int32)
    prev = jnp.stack([jnp.where(t >= d, T + t - d, jnp.where(L - d + t >= 0, L - d + t, PREV_ZERO)) for d in (1, 2)],
                     -1)
    masks = Layout(pos=L + t, seg=jnp.zeros((B, width), jnp.int32), blk=jnp.zeros((B, width), jnp.int32),
                   ctx=jnp.broadcast_to(L - 1, (B, width)), prev=prev)
    return _cat(causal(B, T, start=0, valid=lengths_B), masks)


def tidar_published(L_B, b: int, block_causal: bool = False) -> Layout:
    parts = [causal(L_B.shape[0], b, start=L_B)]
    for k in range(1, b + 1):
        parts.append(_proposal(L_B, k, b, k - 1, k - 1, b * k))
    return _cat(*parts, block_causal=block_causal)

"""TiDAR token layouts (docs/tidar_and_samplers.md §1.2, §1.4, §2).

Training: ``[x_0 .. x_{S-1} | mask x S]``, positions repeated. Clean tokens are causal and blind to masks; the mask
at index i (block k = i // b) sees the clean tokens of its document before the block start and its own block
bidirectionally. Built from ids (O(S) per row), never as a dense [2S, 2S] mask.

Anchored training (K+1 blocks, Zyphra's drafting): the mask half is cut into chunks of b+1 slots,
``[anchor, mask x b]``. The anchor slot stands at position kb-1, just before the block; the block (anchor included)
sees the clean prefix up to kb-2 and itself bidirectionally, exactly like the decode-time drafting forward after a
cache holding positions 0..kb-2. The layout is the same whatever the anchor slot holds (the objective fills it): a
copy of x_{kb-1} (token anchor, ``[a', mask x K]``, ``draft_anchored``) or a mask (mask anchor, ``[mask x (K+1)]``
at the bonus position, Zyphra's serving layout, ``draft_block(kb-1, b+1)``).

Blocks are global (block k = indices kb..kb+b-1 of the row) by default, and all b masks of a block (and its anchor)
belong to the document of its first index (see ``training``), so the model never learns a document's length from
how many masks it sees; with ``doc_aligned`` they restart at each document start (block k of a document = its
positions kb..kb+b-1), so a packed document trains exactly as it would alone.

Every builder is traceable (jnp only): it runs under jit with traced ``doc_ids``.

Decode: a block of mask tokens after the cached clean prefix (the drafting forward) sees the same context and conv
state as the training block at the same positions; tests check the two agree.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zaya.model.layout import PREV_CACHE, PREV_ZERO, Layout


def _docs(doc_ids):
    """doc [B, S] int32, index i [S], index of each token's document start [B, S], in-document position [B, S]."""
    doc = jnp.asarray(doc_ids, jnp.int32)
    B, S = doc.shape
    i = jnp.arange(S, dtype=jnp.int32)
    new_doc = jnp.concatenate([jnp.ones((B, 1), bool), doc[:, 1:] != doc[:, :-1]], 1)
    start = jax.lax.cummax(jnp.where(new_doc, i[None], 0), axis=1)
    return doc, i, start, i[None] - start


def _clean_prev(i, pos):
    return jnp.stack([jnp.where(pos >= d, i[None] - d, PREV_ZERO) for d in (1, 2)], -1)


def clean(doc_ids) -> Layout:
    """Causal layout of packed documents (doc_ids [B, S], -1 = padding); traceable twin of ``layout.packed``."""
    doc, i, _, pos = _docs(doc_ids)
    B, S = doc.shape
    return Layout(pos=pos, seg=jnp.where(doc >= 0, doc, -1), blk=jnp.full((B, S), -1, jnp.int32), ctx=pos,
                  prev=_clean_prev(i, pos))


def row_block_owner(doc_ids, block: int):
    """[B, S] for row blocks: the document of each mask's block start (index kb = (i // block) * block), and
    ``foreign`` [B, S]: masks whose clean token belongs to another document (one that starts inside the block)."""
    doc = jnp.asarray(doc_ids, jnp.int32)
    S = doc.shape[1]
    kb = (jnp.arange(S, dtype=jnp.int32) // block) * block
    owner = doc[:, kb]
    return owner, (doc != owner) & (owner >= 0)


def training(doc_ids, block: int, block_causal: bool = False, doc_aligned: bool = False) -> Layout:
    """Layout of the 2S-token TiDAR training sequence. doc_ids [B, S] (document per clean token, -1 = padding).

    Mask index i sits at S + i. Row blocks (default): block k is indices kb..kb+b-1 of the row (``blk`` = k) and
    ALL its masks belong to the document of its first index (the "owner"): masks past the owner's end stand at
    the owner's next positions (a document that starts inside a block gets no masks there; ``row_block_owner``
    marks them, they carry no loss). So every block has b masks, as the decode-time drafting block does: a
    block cut at the document end would tell the model where its document ends (how many masks it can see).
    With ``doc_aligned``, ``blk`` is the index of the block's first token (blocks restart at document starts) and
    a document's last block is cut at its end (the length leaks through the mask count; kept for ablations).
    """
    doc, i, start, pos = _docs(doc_ids)
    B, S = doc.shape
    seg = jnp.where(doc >= 0, doc, -1)
    cat = lambda a, b: jnp.concatenate([a, b], 1).astype(jnp.int32)
    if doc_aligned:
        kb = start + (pos // block) * block
        lo = jnp.maximum(kb, start)  # first index of the token's (block ∩ document)
        m_ctx, m_pos, m_seg, blk = lo - start - 1, pos, seg, kb
        m_prev = jnp.stack([jnp.where(i[None] - d >= lo, S + i[None] - d,
                                      jnp.where(pos >= d, i[None] - d, PREV_ZERO)) for d in (1, 2)], -1)
    else:
        kb = (i // block) * block  # [S]
        owner, foreign = row_block_owner(doc, block)
        kpos = pos[:, kb]  # in-document position of the block start (in the owner document)
        m_pos = jnp.where(owner >= 0, kpos + (i - kb)[None], pos)
        m_seg = jnp.where(owner >= 0, owner, seg)
        m_ctx = jnp.where(owner >= 0, kpos - 1, -1)
        blk = jnp.broadcast_to(i // block, (B, S))
        m_prev = jnp.stack([jnp.where((i - d >= kb)[None], S + i[None] - d,
                                      jnp.where(m_pos >= d, i[None] - d, PREV_ZERO)) for d in (1, 2)], -1)
    return Layout(pos=cat(pos, m_pos), seg=cat(seg, m_seg), blk=cat(jnp.full((B, S), -1), blk),
                  ctx=cat(pos, m_ctx), prev=cat(_clean_prev(i, pos), m_prev), block_causal=block_causal)


def anchored_mask_index(S: int, block: int) -> np.ndarray:
    """[S] index, in the anchored training sequence, of the mask that reconstructs clean token i."""
    i = np.arange(S)
    return S + (i // block) * (block + 1) + 1 + i % block


def anchor_sources(doc_ids, block: int, doc_aligned: bool = False):
    """[B, S // block]: the clean index whose token fills chunk g's anchor slot, or -1 (no anchor in the chunk).

    Chunk g holds the masks of indices g*b .. g*b+b-1. Row blocks (default): the chunk is one block owned by the
    document of index g*b; it has an anchor x_{gb-1} unless g*b is its document's first token (or padding).
    ``doc_aligned``: a document block starting at index s with in-document position pos_s >= b (not the document's
    first block, so x_{s-1} is in the same document) has its anchor x_{s-1} in the chunk that contains s. Such a
    start is unique per chunk: two would lie in one document less than b apart, yet both at positions that are
    multiples of b.
    """
    doc, i, _, pos = _docs(doc_ids)
    B, S = doc.shape
    if S % block:
        raise ValueError(f"anchored layout needs the sequence length ({S}) to be a multiple of block ({block})")
    n = S // block
    if not doc_aligned:
        g0 = jnp.arange(n, dtype=jnp.int32) * block
        return jnp.where((doc[:, g0] >= 0) & (pos[:, g0] > 0), g0 - 1, -1)
    starts = ((pos % block == 0) & (pos > 0) & (doc >= 0)).reshape(B, n, block)
    s = jnp.arange(n, dtype=jnp.int32)[None] * block + jnp.argmax(starts, -1).astype(jnp.int32)
    return jnp.where(starts.any(-1), s - 1, -1)


def training_anchored(doc_ids, block: int, block_causal: bool = False, doc_aligned: bool = False) -> Layout:
    """Layout of the anchored training sequence ``[x_0 .. x_{S-1} | (anchor, mask x b) x S/b]``, S + (S/b)(b+1).

    Row blocks (default): chunk g is the block of indices gb..gb+b-1 with the owner rule of ``training``: its
    anchor and all b masks belong to the document of index gb and stand at its positions pos_gb - 1 .. pos_gb+b-1
    (a document that starts inside the chunk gets no masks there; ``row_block_owner`` marks them), so the mask
    count never tells a document's length. ``doc_aligned``: blocks restart at each document, and a document's
    last block is cut at its end (its length leaks through the mask count; kept for ablations). Anchor slots
    without an anchor (a document's first block, chunks where no block starts) are padding (seg -1), as are the
    masks of chunks owned by padding. Mask of clean index i sits at ``anchored_mask_index(S, b)[i]``; the anchor
    of the block containing i sits in the chunk of the block's first index.
    """
    doc, i, start, pos = _docs(doc_ids)
    B, S = doc.shape
    b = block
    n = S // b
    src = anchor_sources(doc, b, doc_aligned)  # [B, n] clean index of the anchor (= block start - 1)
    has = src >= 0
    s = jnp.maximum(src + 1, 0)  # block start index
    take = lambda x, idx: jnp.take_along_axis(x, idx, axis=1)
    a_pos = jnp.where(has, take(pos, s) - 1, 0)
    a_seg = jnp.where(has, take(doc, s), -1)
    a_prev = jnp.stack([jnp.where(has & (a_pos - d >= 0), src - d, PREV_ZERO) for d in (1, 2)], -1)

    seg = jnp.where(doc >= 0, doc, -1)
    if doc_aligned:
        kb = start + (pos // b) * b  # index of the block's first token
        kpos = (pos // b) * b  # its in-document position
        m_pos, m_seg = pos, seg
    else:
        kb = jnp.broadcast_to((i // b) * b, (B, S))
        owner, kpos = doc[:, kb[0]], pos[:, kb[0]]
        m_pos = jnp.where(owner >= 0, kpos + i[None] - kb, 0)
        m_seg = jnp.where(owner >= 0, owner, -1)
    slot = jnp.asarray(anchored_mask_index(S, b), jnp.int32)
    anchor_slot = S + (kb // b) * (b + 1)  # the anchor of this block lives in the chunk of its first index
    p = lambda d: m_pos - d

    def m_prev(d):
        in_blk = p(d) >= kpos
        at_anchor = (p(d) == kpos - 1) & (kpos > 0)
        mask_idx = jnp.take(slot, jnp.clip(i[None] - d, 0, S - 1))
        return jnp.where(in_blk, mask_idx, jnp.where(at_anchor, anchor_slot,
                                                     jnp.where(p(d) >= 0, i[None] - d, PREV_ZERO)))

    def chunks(anchor, masks):  # [B, n] + [B, S] (+ trailing dims) -> [B, n * (b + 1)]
        tail = masks.shape[2:]
        x = jnp.concatenate([anchor[:, :, None], masks.reshape(B, n, b, *tail)], 2)
        return x.reshape(B, n * (b + 1), *tail)

    cat = lambda a, b_: jnp.concatenate([a, b_], 1).astype(jnp.int32)
    return Layout(pos=cat(pos, chunks(a_pos, m_pos)), seg=cat(seg, chunks(a_seg, m_seg)),
                  blk=cat(jnp.full((B, S), -1), chunks(jnp.where(has, s, 0), kb)),
                  ctx=cat(pos, chunks(a_pos - 1, kpos - 2)),
                  prev=cat(_clean_prev(i, pos), chunks(a_prev, jnp.stack([m_prev(1), m_prev(2)], -1))),
                  block_causal=block_causal)


def draft_block(start_B, length: int, block_causal: bool = False) -> Layout:
    """``length`` mask tokens at positions start..start+length-1 after a cached clean prefix of ``start`` tokens."""
    start = jnp.asarray(start_B, jnp.int32)
    B = start.shape[0]
    t = jnp.arange(length, dtype=jnp.int32)
    prev = jnp.stack([jnp.where(t >= d, t - d, PREV_CACHE) for d in (1, 2)], -1)
    return Layout(pos=start[:, None] + t, seg=jnp.zeros((B, length), jnp.int32), blk=jnp.zeros((B, length), jnp.int32),
                  ctx=jnp.broadcast_to(start[:, None] - 1, (B, length)), prev=jnp.broadcast_to(prev, (B, length, 2)),
                  block_causal=block_causal)


def draft_anchored(start_B, length: int, block_causal: bool = False) -> Layout:
    """The anchored drafting forward ``[a, mask x length]`` (1 + length tokens) after a cache of ``start`` tokens.

    The anchor (the last accepted / bonus token, not yet cached) sits at position ``start`` with ctx start-1 and
    reads its conv predecessors from the cache; the masks follow at start+1 .. start+length, all one bidirectional
    block. This is ``draft_block(start, 1 + length)`` with a real token in slot 0, and it matches the training block
    [anchor x_{kb-1}, masks kb..kb+b-1] of ``training_anchored`` with start = kb - 1.
    """
    return draft_block(start_B, 1 + length, block_causal)

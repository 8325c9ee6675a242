"""Token layouts: who attends to whom, and which tokens feed CCA's sequence convolutions. Every builder lives here.

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

**CCA conv state under mask blocks.** A token's conv inputs are the tokens at positions pos-1 and pos-2 that it can
see (``conv_prev``): earlier tokens of its own block, else the clean tokens before the block, else the cache. So a
block drafted after a clean prefix sees exactly the conv state and delayed value that decoding after that prefix sees,
and since block tokens never feed clean tokens' convolutions or attention, the clean tokens' states are untouched.

Builders (all jnp, traceable, static shapes):
  training    causal, packed; TiDAR ``training`` ``[clean x S | mask x S]`` and ``training_anchored``
              ``[clean x S | (anchor, mask x b) x S/b]``
  decoding    verify ``[a, d_1..d_N]``; draft_block (``width`` masks after the cache), draft_anchored
              ``[a', mask x N]``; single_forward; tidar_published; prefill_block ``[prompt | mask x width]``
A new layout is one function returning a ``Layout`` (parts joined with ``concat``); build its ``prev`` with
``conv_prev``. ``tests/layout_reference.py`` checks any layout against its dense mask and the visible-token rule.
"""
from __future__ import annotations

import jax
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
    """Cached keys: slot < length (valid) and slot <= ctx of the query.
    q [..., Tq, 1], slot [1, S], length [..., 1, 1]."""
    return (slot < length) & (slot <= q_ctx) & (q_seg >= 0)


def conv_prev(pos, block_from=None, block_at=None, clean_from=None, clean_at=None, cache=False):
    """[..., 2] conv predecessors of tokens at positions ``pos``: for distance d = 1, 2 and p = pos - d, the visible
    token holding position p, looked up in this order:

      its own block     where p >= block_from:  chunk index ``block_at(d)``
      a clean token     where p >= clean_from:  chunk index ``clean_at(d)`` (the clean tokens of the chunk)
      the cache         where p >= 0 and ``cache``:  PREV_CACHE
      nothing           otherwise:  PREV_ZERO (document start)

    ``block_from`` / ``clean_from`` are the first positions the token's block / the chunk's clean tokens of its
    document hold; ``block_at`` / ``clean_at`` map d to chunk indices (arrays broadcasting against ``pos``). Leave a
    pair as None when the layout has no such tokens.
    """
    out = []
    for d in (1, 2):
        p = pos - d
        idx = jnp.where(p >= 0, PREV_CACHE, PREV_ZERO) if cache else jnp.full(jnp.shape(p), PREV_ZERO)
        if clean_at is not None:
            idx = jnp.where(p >= clean_from, clean_at(d), idx)
        if block_at is not None:
            idx = jnp.where(p >= block_from, block_at(d), idx)
        out.append(jnp.broadcast_to(idx, jnp.shape(p)))
    return jnp.stack(out, -1).astype(jnp.int32)


def concat(*lays: Layout, block_causal=False) -> Layout:
    """Layouts of consecutive parts of one chunk side by side (``prev`` indices must already be chunk indices)."""
    f = lambda n: jnp.concatenate([getattr(x, n) for x in lays], 1).astype(jnp.int32)
    return Layout(pos=f("pos"), seg=f("seg"), blk=f("blk"), ctx=f("ctx"), prev=f("prev"), block_causal=block_causal)


def _block(pos_BT, seg, blk, ctx, prev, block_causal=False) -> Layout:
    """A mask block's layout from its positions (blk, ctx broadcast to [B, T])."""
    shape = pos_BT.shape
    fill = lambda x: jnp.broadcast_to(x, shape).astype(jnp.int32)
    return Layout(pos=pos_BT, seg=fill(seg), blk=fill(blk), ctx=fill(ctx), prev=prev, block_causal=block_causal)


# ---------------------------------------------------------------------------------------------------------------
# Clean (causal) layouts.

def causal(batch: int, length: int, start=0, valid=None) -> Layout:
    """Plain causal layout for T new tokens at positions start..start+T-1 (start: int or [B]).

    With ``start`` > 0 the first two tokens read their conv inputs from the cache. ``valid`` [B] (number of real
    tokens per row) marks the rest as padding.
    """
    start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,))[:, None]
    t = jnp.arange(length, dtype=jnp.int32)
    pos = start + t[None, :]
    seg = jnp.zeros((batch, length), jnp.int32)
    if valid is not None:
        seg = jnp.where(t[None, :] < jnp.asarray(valid)[:, None], 0, -1)
    prev = conv_prev(pos, clean_from=start, clean_at=lambda d: t - d, cache=True)
    return Layout(pos=pos, seg=seg, blk=jnp.full((batch, length), -1, jnp.int32), ctx=pos, prev=prev)


def verify(length_B, N: int) -> Layout:
    """The verify forward ``[a, d_1..d_N]`` at length..length+N, causal over the cache."""
    return causal(length_B.shape[0], N + 1, start=length_B)


def _docs(doc_ids):
    """doc [B, S] int32, index i [S], index of each token's document start [B, S], in-document position [B, S]."""
    doc = jnp.asarray(doc_ids, jnp.int32)
    B, S = doc.shape
    i = jnp.arange(S, dtype=jnp.int32)
    new_doc = jnp.concatenate([jnp.ones((B, 1), bool), doc[:, 1:] != doc[:, :-1]], 1)
    start = jax.lax.cummax(jnp.where(new_doc, i[None], 0), axis=1)
    return doc, i, start, i[None] - start


def _clean_prev(i, pos):
    return conv_prev(pos, clean_from=0, clean_at=lambda d: i - d)


def packed(doc_ids) -> Layout:
    """Causal layout of packed documents: doc_ids [B, S] (-1 = padding); positions restart at each document."""
    doc, i, _, pos = _docs(doc_ids)
    B, S = doc.shape
    return Layout(pos=pos, seg=jnp.where(doc >= 0, doc, -1), blk=jnp.full((B, S), -1, jnp.int32), ctx=pos,
                  prev=_clean_prev(i, pos))


# ---------------------------------------------------------------------------------------------------------------
# TiDAR training: ``[x_0 .. x_{S-1} | mask x S]``, positions repeated. Clean tokens are causal and blind to masks;
# the mask at index i (block k = i // b) sees the clean tokens of its document before the block start and its own
# block bidirectionally.
#
# Anchored training cuts the mask half into chunks of b+1 slots, ``[anchor, mask x b]``. The anchor slot stands at
# position kb-1, just before the block; the block (anchor included) sees the clean prefix up to kb-2 and itself,
# exactly like the drafting forward after a cache of positions 0..kb-2. The layout is the same whatever the anchor
# slot holds (the objective fills it): x_{kb-1} (token anchor, ``draft_anchored``) or a mask (mask anchor, the
# ``[mask x (b+1)]`` drafting block at the bonus position).
#
# Blocks are row blocks by default (block k = indices kb..kb+b-1 of the row), and all b masks of a block (and its
# anchor) belong to the document of its first index, so the model never learns a document's length from how many
# masks it sees; with ``doc_aligned`` they restart at each document start (a packed document trains exactly as it
# would alone, but its last block is cut at its end).

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
    if doc_aligned:
        kb = start + (pos // block) * block  # index of the block's first token (never before the document start)
        m_ctx, m_pos, m_seg, blk = kb - start - 1, pos, seg, kb
    else:
        kb = (i // block) * block  # [S]
        owner, _ = row_block_owner(doc, block)
        kpos = pos[:, kb]  # in-document position of the block start (in the owner document)
        m_pos = jnp.where(owner >= 0, kpos + (i - kb)[None], pos)
        m_seg = jnp.where(owner >= 0, owner, seg)
        m_ctx = jnp.where(owner >= 0, kpos - 1, -1)
        blk = jnp.broadcast_to(i // block, (B, S))
    m_prev = conv_prev(m_pos, block_from=m_pos - (i - kb), block_at=lambda d: S + i - d, clean_from=0,
                       clean_at=lambda d: i - d)
    masks = _block(m_pos, m_seg, blk, m_ctx, m_prev)
    return concat(packed(doc), masks, block_causal=block_causal)


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
        raise ValueError(f"anchored layout needs the sequence length ({S}) to be a multiple of block ({block}); "
                         f"set seq_len to a multiple of tidar.block_size")
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
    a_prev = conv_prev(a_pos, clean_from=0, clean_at=lambda d: src - d)  # a_pos = 0 without an anchor: PREV_ZERO

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
    # the block holds positions kpos.. (masks) and kpos-1 (its anchor, when the block is not the document's first)
    m_prev = conv_prev(m_pos, block_from=jnp.where(kpos > 0, kpos - 1, kpos),
                       block_at=lambda d: jnp.where(m_pos - d >= kpos, jnp.take(slot, jnp.clip(i[None] - d, 0, S - 1)),
                                                    anchor_slot),
                       clean_from=0, clean_at=lambda d: i - d)

    def chunks(anchor, masks):  # [B, n] + [B, S] (+ trailing dims) -> [B, n * (b + 1)]
        tail = masks.shape[2:]
        x = jnp.concatenate([anchor[:, :, None], masks.reshape(B, n, b, *tail)], 2)
        return x.reshape(B, n * (b + 1), *tail)

    blocks = Layout(pos=chunks(a_pos, m_pos), seg=chunks(a_seg, m_seg), blk=chunks(jnp.where(has, s, 0), kb),
                    ctx=chunks(a_pos - 1, kpos - 2), prev=chunks(a_prev, m_prev))
    return concat(packed(doc), blocks, block_causal=block_causal)


# ---------------------------------------------------------------------------------------------------------------
# Decoding: built from the per-row cache length ``length_B`` (the clean prefix already cached); N drafts per block.

def draft_block(start_B, width: int, block_causal: bool = False) -> Layout:
    """``width`` mask tokens at positions start..start+width-1 after a cached clean prefix of ``start`` tokens:
    one bidirectional block, the decode-time twin of a ``training`` block at the same positions."""
    start = jnp.asarray(start_B, jnp.int32)[:, None]
    t = jnp.arange(width, dtype=jnp.int32)
    pos = start + t
    prev = conv_prev(pos, block_from=start, block_at=lambda d: t - d, cache=True)
    return _block(pos, 0, 0, start - 1, prev, block_causal)


def draft_anchored(start_B, N: int, block_causal: bool = False) -> Layout:
    """The anchored drafting forward ``[a, mask x N]`` (N + 1 tokens) after a cache of ``start`` tokens.

    The anchor (the last accepted / bonus token, not yet cached; or a mask: the mask-anchored samplers'
    ``[mask x (N+1)]``) sits at position ``start`` with ctx start-1 and reads its conv predecessors from the
    cache; the masks follow at start+1 .. start+N, all one bidirectional block. It matches the training chunk
    [anchor x_{kb-1}, masks kb..kb+b-1] of ``training_anchored`` with start = kb - 1 and N = b.
    """
    return draft_block(start_B, 1 + N, block_causal)


def _proposal(length_B, offset: int, width: int, blk: int, base: int) -> Layout:
    """``width`` masks at length+offset.. (chunk indices base..) after the clean chunk tokens at
    length..length+offset-1 (chunk indices 0..offset-1) that they see."""
    length = length_B[:, None]
    t = jnp.arange(width, dtype=jnp.int32)
    pos = length + offset + t
    prev = conv_prev(pos, block_from=length + offset, block_at=lambda d: base + t - d, clean_from=length,
                     clean_at=lambda d: offset + t - d, cache=True)
    return _block(pos, 0, blk, length + offset - 1, prev)


def single_forward(length_B, N: int, levels: tuple[int, ...], block_causal: bool = False) -> Layout:
    """``[verify (N+1) | proposal_p (N+1) for each level l_p]``: proposal p sits at length+l_p+1 ..
    length+l_p+N+1 and sees the cache plus verify[:l_p+1]."""
    W = N + 1
    parts = [verify(length_B, N)] + [_proposal(length_B, lvl + 1, W, p, W * (p + 1)) for p, lvl in enumerate(levels)]
    return concat(*parts, block_causal=block_causal)


def tidar_published(length_B, N: int, block_causal: bool = False) -> Layout:
    """The authors' ``[D_0..D_{N-1} | set_1 .. set_N]``: set k (N masks at length+k .. length+k+N-1) sees D[:k]."""
    parts = [causal(length_B.shape[0], N, start=length_B)]
    parts += [_proposal(length_B, k, N, k - 1, N * k) for k in range(1, N + 1)]
    return concat(*parts, block_causal=block_causal)


def prefill_block(lengths_B, T: int, width: int) -> Layout:
    """[prompt (T, right-padded) | mask x width] on an empty cache: the masks stand at lengths[b] .. and see the
    row's prompt and each other (one bidirectional block); conv predecessors are earlier masks (chunk index
    T + t - d), else the prompt's last tokens (chunk index = position)."""
    length = jnp.asarray(lengths_B, jnp.int32)[:, None]
    t = jnp.arange(width, dtype=jnp.int32)
    pos = length + t
    prev = conv_prev(pos, block_from=length, block_at=lambda d: T + t - d, clean_from=0, clean_at=lambda d: pos - d)
    return concat(causal(length.shape[0], T, start=0, valid=lengths_B), _block(pos, 0, 0, length - 1, prev))

"""Loop-built dense references for zaya.layouts (tests only): the [B, T, T] mask of a layout, the conv predecessors
by their definition (the visible token at pos-1 / pos-2), and the TiDAR training rule written out slot by slot."""
import numpy as np

from zaya.layouts import PREV_CACHE, PREV_ZERO, Layout, allowed


def dense_mask(layout: Layout) -> np.ndarray:
    """[B, T, T] boolean mask of a layout."""
    L = layout
    q = lambda x: np.asarray(x)[:, :, None]
    k = lambda x: np.asarray(x)[:, None, :]
    return np.asarray(allowed(q(L.pos), q(L.seg), q(L.blk), q(L.ctx), k(L.pos), k(L.seg), k(L.blk), L.block_causal))


def prev_from_mask(layout: Layout, has_cache: bool) -> np.ndarray:
    """``prev`` from the definition: the visible token at pos-1 (and pos-2); raises if it is not unique."""
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


def reference_layout(doc, b, anchor=False, block_causal=False, doc_aligned=True):
    """The paper's rule (TiDAR training: clean tokens causal, masks see the clean prefix before their block and their block) by loops, generalised to packed documents and anchored blocks.

    Returns (slots, pos [B, T], mask [B, T, T]); slots[r][t] = (kind, i) with kind clean/mask/anchor/pad and i the
    clean index it stands for (anchor: the block start it anchors).
    """
    doc = np.asarray(doc)
    B, S = doc.shape
    out_slots, out_pos, out_mask = [], [], []
    for r in range(B):
        d = doc[r]
        p = np.zeros(S, int)
        for i in range(1, S):
            p[i] = p[i - 1] + 1 if d[i] == d[i - 1] else 0
        slots = [("clean", i) for i in range(S)]
        if not anchor:
            slots += [("mask", i) for i in range(S)]
        else:
            for g in range(S // b):
                s = [j for j in range(g * b, g * b + b) if d[j] >= 0 and p[j] > 0 and (p[j] % b == 0 if doc_aligned
                                                                                     else j == g * b)]
                slots += [("anchor", s[0]) if s else ("pad", -1)] + [("mask", j) for j in range(g * b, g * b + b)]
        row = not doc_aligned
        kb = lambda i: i - i % b
        # row blocks: every mask of a block belongs to the document of the block's first index, at its positions
        # (anchored: a block owned by padding is padding)
        owned = lambda kind, i: row and kind == "mask" and (anchor or d[kb(i)] >= 0)
        doc_of = lambda kind, i: d[kb(i)] if owned(kind, i) else d[i]
        pos = np.array([p[kb(i)] + i % b if owned(k, i) else p[i] - (k == "anchor") if k != "pad" else 0
                        for k, i in slots])
        block = lambda i: p[i] // b if doc_aligned else i // b
        first = lambda i: p[i] - p[i] % b if doc_aligned else p[kb(i)]  # block start position
        T = len(slots)
        m = np.zeros((T, T), bool)
        for q, (qk, qi) in enumerate(slots):
            for k, (kk, ki) in enumerate(slots):
                if "pad" in (qk, kk) or doc_of(qk, qi) < 0 or doc_of(kk, ki) != doc_of(qk, qi):
                    continue
                if qk == "clean":
                    m[q, k] = kk == "clean" and p[ki] <= p[qi]
                elif kk == "clean":
                    m[q, k] = p[ki] < first(qi) - (1 if anchor else 0)
                else:
                    m[q, k] = block(ki) == block(qi) and (not block_causal or pos[k] <= pos[q])
        out_slots.append(slots)
        out_pos.append(pos)
        out_mask.append(m)
    return out_slots, np.stack(out_pos), np.stack(out_mask)

"""Document-aware packing of tokenized documents into fixed-length rows (pure numpy, no grain).

Per row of length S the outputs are ``tokens`` (int32, pad id in padding), ``doc_ids`` (int32: 0, 1, 2, ... for
the segments in the row, in order, each a contiguous run; -1 on padding) and ``loss_mask`` (float32).

``loss_mask[t]`` weights the loss of predicting ``tokens[t]`` from ``tokens[:t]`` of the same segment. It is 0 on
padding, on each segment's first token (bos, or the first token of a continuation chunk: nothing in the row
precedes it) and on the first ``n_masked`` tokens of a document (bos and, in SFT mode, the prompt); 1 elsewhere,
eos included. So ``loss_mask[t] == 1`` implies ``doc_ids[t - 1] == doc_ids[t]``: a trainer shifting targets by
one (``logits[:, :-1]`` vs ``tokens[:, 1:]``) uses ``loss_mask[:, 1:]``.

A document longer than S is cut into chunks of S tokens (the last shorter); each chunk is its own segment.
Chunks shorter than S are placed first-fit into up to ``max_open`` partly filled rows (the fullest row is closed
when a new one must be opened and ``max_open`` are open); full chunks are rows of their own.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenizedDocs:
    """Documents as one flat int32 token array: document i is ``tokens[offsets[i]:offsets[i+1]]``; its first
    ``n_masked[i]`` tokens carry no loss."""
    tokens: np.ndarray
    offsets: np.ndarray
    n_masked: np.ndarray

    def __len__(self):
        return len(self.offsets) - 1

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for a in (self.tokens, self.offsets, self.n_masked):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    @classmethod
    def build(cls, docs: list[np.ndarray], n_masked) -> "TokenizedDocs":
        lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
        offsets = np.zeros(len(docs) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
        return cls(tokens, offsets, np.asarray(n_masked, np.int64).reshape(len(docs)))


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Row r holds pieces ``row_pieces[row_ptr[r]:row_ptr[r+1]]``; piece p is tokens ``[lo[p], hi[p])`` of
    document ``doc[p]`` (positions within that document)."""
    seq_len: int
    row_ptr: np.ndarray
    row_pieces: np.ndarray
    doc: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for a in (self.row_ptr, self.row_pieces, self.doc, self.lo, self.hi):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(str(self.seq_len).encode())
        return h.hexdigest()


def plan(docs: TokenizedDocs, seq_len: int, order=None, max_open: int = 16) -> PackPlan:
    """Pack the documents, taken in ``order`` (default: as given), into rows of ``seq_len`` tokens."""
    S = int(seq_len)
    if S < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    order = np.arange(len(docs)) if order is None else np.asarray(order)
    lengths = np.diff(docs.offsets)
    p_doc, p_lo, p_hi = [], [], []
    for d in order.tolist():
        L = int(lengths[d])
        for lo in range(0, L, S):
            p_doc.append(d)
            p_lo.append(lo)
            p_hi.append(min(lo + S, L))
    p_doc, p_lo, p_hi = (np.asarray(a, np.int64) for a in (p_doc, p_lo, p_hi))
    sizes = p_hi - p_lo
    rows: list[list[int]] = []  # in order of opening
    open_rows: list[int] = []  # indices into rows
    room: list[int] = []  # free space of each open row
    for p, n in enumerate(sizes.tolist()):
        if n == S:
            rows.append([p])
            continue
        k = next((j for j, r in enumerate(room) if r >= n), -1)
        if k < 0:
            if len(open_rows) >= max_open:  # close the fullest open row
                k_close = room.index(min(room))
                del open_rows[k_close], room[k_close]
            rows.append([])
            open_rows.append(len(rows) - 1)
            room.append(S)
            k = len(room) - 1
        rows[open_rows[k]].append(p)
        room[k] -= n
    row_ptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=row_ptr[1:])
    row_pieces = np.asarray([p for r in rows for p in r], np.int64)
    return PackPlan(S, row_ptr, row_pieces, p_doc, p_lo, p_hi)


class PackedRows:
    """Random-access rows of a plan (a grain ``RandomAccessDataSource``: ``__len__`` and ``__getitem__``)."""

    def __init__(self, docs: TokenizedDocs, pack: PackPlan, pad_id: int):
        self.docs, self.pack, self.pad_id = docs, pack, int(pad_id)

    def __len__(self) -> int:
        return self.pack.num_rows

    def __getitem__(self, r: int) -> dict:
        r = int(r)
        if not 0 <= r < len(self):
            raise IndexError(f"row {r} out of range [0, {len(self)})")
        pk, S = self.pack, self.pack.seq_len
        tokens = np.full(S, self.pad_id, np.int32)
        doc_ids = np.full(S, -1, np.int32)
        mask = np.zeros(S, np.float32)
        pos = 0
        for seg, p in enumerate(pk.row_pieces[pk.row_ptr[r]:pk.row_ptr[r + 1]].tolist()):
            d, lo, hi = int(pk.doc[p]), int(pk.lo[p]), int(pk.hi[p])
            n = hi - lo
            start = int(self.docs.offsets[d])
            tokens[pos:pos + n] = self.docs.tokens[start + lo:start + hi]
            doc_ids[pos:pos + n] = seg
            first_trained = max(int(self.docs.n_masked[d]), lo + 1)  # doc position of the first loss token
            mask[pos + max(0, first_trained - lo):pos + n] = 1.0
            pos += n
        return {"tokens": tokens, "doc_ids": doc_ids, "loss_mask": mask}

    def empty_row(self) -> dict:
        S = self.pack.seq_len
        return {"tokens": np.full(S, self.pad_id, np.int32), "doc_ids": np.full(S, -1, np.int32),
                "loss_mask": np.zeros(S, np.float32)}

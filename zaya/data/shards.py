"""``zaya data prepare``: tokenize a corpus of any size once into token shards that training reads by random access.

Documents are read one at a time (:func:`zaya.data.sources.iter_documents`: text and JSONL globs, same parsing and
errors as the in-memory loaders), tokenized in batches of about ``batch_chars`` characters with the pipeline's
layout (``[bos] + prompt + text + [eos]``, the first ``1 + len(prompt)`` tokens masked when ``sft``, else 1: see
:func:`zaya.data.pipeline.tokenize`) and assigned to ``train`` or ``val`` by the pipeline's hash rule
(:func:`zaya.data.sources.split_value` of the document; when no document falls under ``val_fraction`` the one with
the smallest value is held out, as :func:`zaya.data.pipeline._split` does, at the cost of a second pass over the
input). Memory stays flat: only one batch of documents is held, and arrays are appended to their files.

Output folder (``OUT``)::

    manifest.json                    format, tokenizer identity, source and options, shards, totals per split
    train-00000.tokens.npy           uint16 ids (uint32 when the vocab has more than 65536 ids), documents back to back
    train-00000.offsets.npy          int64 [docs + 1]: document i is tokens[offsets[i]:offsets[i + 1]]
    train-00000.n_masked.npy         int32 [docs]: leading tokens of each document that carry no loss
    train-00001.* ... val-00000.* ...

A shard holds whole documents; a new shard starts once one reaches ``shard_tokens``. Every file is a plain ``.npy``
(``np.load(path, mmap_mode="r")``); the manifest records each file's byte size and sha256 (of the whole file, so
``sha256sum`` agrees). sha256 runs at about 1 GB/s here (SHA-NI), a few percent of the tokenizing time, so nothing
weaker is needed; it is checked by :func:`zaya.data.shard_source.verify` (``zaya data verify``), while opening shards
for training checks only sizes, ``.npy`` headers and the tokenizer, which costs no reading.

Atomicity: everything is written to ``OUT.tmp-<pid>`` and renamed to ``OUT`` at the end; any error (bad input, full
disk, Ctrl-C) removes that folder, so ``OUT`` is either absent, the previous output, or complete. An existing
non-empty ``OUT`` is refused unless ``overwrite`` (and then only a folder holding a ``manifest.json``). A process
killed with SIGKILL can leave its ``OUT.tmp-<pid>`` behind (delete it).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time

import numpy as np

from zaya.data import sources
from zaya.data.sources import DataError, Document, EmptyCorpusError
from zaya.data.tokenizer import Tokenizer, fingerprint, load_tokenizer
from zaya.progress import tqdm

FORMAT, VERSION = "zaya-token-shards", 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
ARRAYS = {"tokens": None, "offsets": np.int64, "n_masked": np.int32}  # None: the token dtype of the manifest
DEFAULT_SHARD_TOKENS = 1 << 26  # 128 MiB of uint16 ids per shard


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_identity(tokenizer: Tokenizer) -> dict:
    """What the manifest records about the tokenizer (``fingerprint`` decides equality; the rest is for messages)."""
    return {"name": str(getattr(tokenizer, "name", type(tokenizer).__name__)), "vocab_size": int(tokenizer.vocab_size),
            **{k: getattr(tokenizer, k, None) for k in ("bos_id", "eos_id", "pad_id", "mask_id")},
            "fingerprint": fingerprint(tokenizer)}


def sha256_file(path: str, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Writers.

class _NpyWriter:
    """A 1-D ``.npy`` file appended to in place. Its header is written first for length 0 and rewritten with the
    final length on close: numpy pads every 1-D header to 128 bytes, so the rewrite has the same size."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self._f = open(path, "wb")
        self._header_len = self._header(0)

    def _header(self, n: int) -> int:
        self._f.seek(0)
        np.lib.format.write_array_header_1_0(self._f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                       "fortran_order": False, "shape": (n,)})
        return self._f.tell()

    def append(self, a) -> None:
        a = np.ascontiguousarray(a, self.dtype)
        self._f.write(memoryview(a).cast("B"))
        self.count += len(a)

    def close(self) -> dict:
        end = self._f.tell()
        if self._header(self.count) != self._header_len:
            raise RuntimeError(f"{self.path}: the .npy header changed size")  # numpy changed its padding rule
        self._f.seek(end)
        self._f.close()
        return {"file": os.path.basename(self.path), "bytes": os.path.getsize(self.path),
                "sha256": sha256_file(self.path)}


class _SplitWriter:
    """The shards of one split: documents appended in order; a shard is closed once it holds ``shard_tokens``."""

    def __init__(self, folder: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, int(shard_tokens)
        self.shards: list[dict] = []
        self._open: dict | None = None
        self._tokens = self._docs = 0  # in the open shard

    def _start(self):
        stem = os.path.join(self.folder, f"{self.split}-{len(self.shards):05d}")
        self._open = {k: _NpyWriter(f"{stem}.{k}.npy", dt or self.dtype) for k, dt in ARRAYS.items()}
        self._open["offsets"].append(np.zeros(1, np.int64))
        self._tokens = self._docs = 0

    def _finish(self):
        files = {k: w.close() for k, w in self._open.items()}
        self.shards.append({"tokens": self._tokens, "docs": self._docs, "files": files})
        self._open = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray, n_masked: np.ndarray) -> None:
        """Append documents given as their concatenated ``tokens`` and per-document ``lengths`` / ``n_masked``."""
        ends = np.cumsum(lengths, dtype=np.int64)
        d = 0
        while d < len(lengths):
            if self._open is None:
                self._start()
            base = int(ends[d - 1]) if d else 0
            # documents d..k-1 go into this shard: up to and including the one that reaches shard_tokens
            k = int(np.searchsorted(ends, base + self.shard_tokens - self._tokens, side="left")) + 1
            k = min(max(k, d + 1), len(lengths))
            w, top = self._open, int(ends[k - 1])
            w["tokens"].append(tokens[base:top])
            w["offsets"].append(self._tokens + ends[d:k] - base)
            w["n_masked"].append(n_masked[d:k])
            self._tokens, self._docs = self._tokens + top - base, self._docs + k - d
            if self._tokens >= self.shard_tokens:
                self._finish()
            d = k

    def close(self) -> dict:
        if self._open is not None:
            self._finish()
        return {"tokens": sum(s["tokens"] for s in self.shards), "docs": sum(s["docs"] for s in self.shards),
                "shards": self.shards}


# --------------------------------------------------------------------------------------------------------------
# prepare.

def _check_out(out_dir: str, overwrite: bool) -> None:
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"output {out_dir} exists and is not a folder; choose another path")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise DataError(f"output folder {out_dir} exists and is not empty; pass --overwrite (overwrite=True) to "
                            "replace it, or choose another folder")
        if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
            raise DataError(f"output folder {out_dir} is not empty and holds no {MANIFEST}: --overwrite only replaces "
                            "a folder written by `zaya data prepare`; choose another folder")


def _replace(tmp: str, out_dir: str) -> None:
    """Move the finished ``tmp`` to ``out_dir``, replacing an existing ``out_dir`` (removed only once tmp is in)."""
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    old = f"{out_dir}.old-{os.getpid()}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _documents(source: str, jsonl_fields, text_split: str):
    """The source's documents, with unreadable or missing input reported as a DataError."""
    try:
        yield from sources.iter_documents(source, jsonl_fields=jsonl_fields, text_split=text_split)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None


def _write(tmp: str, docs, tok: Tokenizer, sft: bool, val_fraction: float, shard_tokens: int, batch_chars: int,
           force_val: int | None, bar) -> tuple[dict, int, int]:
    """Write the shards of both splits into ``tmp``: (split entries, documents read, index of the train document
    with the smallest split value)."""
    from zaya.data.pipeline import tokenize  # the layout of every document, shared with the in-memory path
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    batch: list[Document] = []
    is_val: list[bool] = []
    n_docs, chars, lowest = 0, 0, (math.inf, -1)

    def flush():
        td = tokenize(batch, tok, sft)
        if len(td.tokens) and (td.tokens.min() < 0 or td.tokens.max() >= tok.vocab_size):
            raise DataError(f"tokenizer {tok.name!r} produced id {int(td.tokens.max())} outside its vocab "
                            f"[0, {tok.vocab_size})")
        lengths, val = np.diff(td.offsets), np.asarray(is_val)
        for split, keep in (("train", ~val), ("val", val)):
            if keep.any():
                writers[split].add(td.tokens[np.repeat(keep, lengths)], lengths[keep], td.n_masked[keep])
        bar.update(chars)
        batch.clear()
        is_val.clear()

    for doc in docs:
        u = sources.split_value(doc.key)
        v = u < val_fraction or n_docs == force_val
        if not v and u < lowest[0]:
            lowest = (u, n_docs)
        batch.append(doc)
        is_val.append(v)
        n_docs += 1
        chars += len(doc.text) + len(doc.prompt)
        if chars >= batch_chars:
            flush()
            chars = 0
    if batch:
        flush()
    return {s: w.close() for s, w in writers.items()}, n_docs, lowest[1]


def prepare(source: str, out_dir: str, tokenizer: str | Tokenizer = "bytes", *, jsonl_fields="text",
            text_split: str = "file", sft: bool = False, val_fraction: float = 0.05,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False, batch_chars: int = 1 << 22,
            progress: bool = True) -> dict:
    """Tokenize ``source`` (``'text:<glob>'``, ``'jsonl:<path or glob>'`` or ``'shakespeare'``) into token shards in
    ``out_dir``; returns the manifest. Options mean what the data config fields of the same names mean
    (:data:`zaya.data.pipeline.DEFAULTS`; ``jsonl_fields`` may be comma-separated); training then reads
    ``source='shards:<out_dir>'``."""
    tok = load_tokenizer(tokenizer)
    if isinstance(jsonl_fields, str):  # 'prompt,response' as in the data config
        jsonl_fields = tuple(x.strip() for x in jsonl_fields.split(",") if x.strip())
    fields = sources._jsonl_fields(jsonl_fields)
    kind = source.partition(":")[0]
    if source != "shakespeare" and kind not in ("text", "jsonl"):
        raise DataError(f"cannot prepare source {source!r}; use 'text:<glob>', 'jsonl:<path or glob>' or "
                        "'shakespeare' ('tasks' are generated at training time)")
    if text_split not in ("file", "blank_line"):
        raise DataError(f"text split={text_split!r}; use 'file' or 'blank_line'")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if int(shard_tokens) < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    _check_out(out_dir, overwrite)
    try:
        total = sum(os.path.getsize(p) for p in sources.input_paths(source))
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        os.makedirs(tmp)
        force = None
        with tqdm(total=total or None, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
            while True:
                splits, n_docs, lowest = _write(tmp, _documents(source, fields, text_split), tok, sft, val_fraction,
                                                int(shard_tokens), int(batch_chars), force, bar)
                if n_docs == 0:
                    raise EmptyCorpusError(f"{source!r} yielded no documents (all files/records empty?)")
                if force is not None or val_fraction == 0 or splits["val"]["docs"] or n_docs < 2:
                    break
                force = lowest  # a small corpus still gets a validation document: redo with it held out
                shutil.rmtree(tmp)
                os.makedirs(tmp)
                bar.reset()
        manifest = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer_identity(tok), "source": source,
                    "jsonl_fields": list(fields), "text_split": text_split, "sft": bool(sft),
                    "val_fraction": float(val_fraction), "token_dtype": token_dtype(tok.vocab_size).name,
                    "shard_tokens": int(shard_tokens), "checksum": "sha256 of each whole file",
                    "documents": n_docs, "seconds": round(time.perf_counter() - t0, 3), "splits": splits}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

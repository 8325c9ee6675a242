"""``zaya convert`` and ``zaya export``: atomic, with clear errors and a progress bar."""
from __future__ import annotations

import os
import sys

from zaya.convert import checkpoint as ckpt
from zaya.convert.hf import export_hf, load_hf
from zaya.convert.safetensors_io import CheckpointError
from zaya.fileio import atomic_dir


def convert(src: str, dst: str, dtype: str = "auto", overwrite: bool = False):
    """HF folder (native or legacy) -> zaya folder (Orbax params + config + tokenizer.json)."""
    if os.path.exists(dst) and not overwrite:
        raise SystemExit(f"zaya convert: {dst} already exists; pass --overwrite to replace it")
    if not os.path.isdir(src):
        raise SystemExit(f"zaya convert: {src} is not a folder")
    try:
        cfg, params = load_hf(src, dtype)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"zaya convert: {e}") from None
    tok = os.path.join(src, "tokenizer.json")
    if os.path.exists(tok):
        _check_tokenizer(tok, cfg.vocab_size)
    ckpt.save(dst, params, cfg, tokenizer=tok if os.path.exists(tok) else None, overwrite=overwrite)
    print(f"wrote {dst}: {cfg.num_layers} layers, {cfg.num_experts} experts, dtype {cfg.dtype}")
    if not os.path.exists(tok):
        print(f"zaya convert: note: {src} has no tokenizer.json, so {dst} has none: `zaya generate` takes id prompts "
              f"only (copy the model's tokenizer.json into {dst} for text)", file=sys.stderr)


def _check_tokenizer(path: str, vocab: int):
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise SystemExit(f"zaya convert: {path} is not a valid tokenizers file ({e})") from None
    if tok.get_vocab_size() > vocab:
        raise SystemExit(f"zaya convert: tokenizer has {tok.get_vocab_size()} tokens, more than the model's "
                         f"vocab_size {vocab}")


def export(src: str, dst: str, overwrite: bool = False, max_shard_gb: float = 5.0):
    """zaya folder (or HF folder) -> native HF safetensors folder."""
    if os.path.exists(dst) and not overwrite:
        raise SystemExit(f"zaya export: {dst} already exists; pass --overwrite to replace it")
    try:
        if ckpt.is_zaya_dir(src):
            cfg, params = ckpt.load(src)
            tok = ckpt.tokenizer_path(src)
        else:
            cfg, params = load_hf(src, "auto")
            tok = os.path.join(src, "tokenizer.json")
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"zaya export: {e}") from None
    with atomic_dir(dst, overwrite) as tmp:
        export_hf(params, cfg, tmp, max_shard_bytes=int(max_shard_gb * 2**30))
        if tok and os.path.exists(tok):
            import shutil
            shutil.copy(tok, os.path.join(tmp, "tokenizer.json"))
    print(f"wrote {dst} (native HF layout)")

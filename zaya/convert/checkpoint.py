"""zaya's own model folders: an Orbax (tensorstore) checkpoint of the params plus config and tokenizer.

  DST/zaya_config.json   the ZayaConfig
  DST/params/            Orbax StandardCheckpointer (tensorstore/zarr), restorable with any target sharding
  DST/tokenizer.json     copied from the source when present
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from zaya.config import ZayaConfig
from zaya.convert.safetensors_io import CheckpointError
from zaya.fileio import atomic_dir
from zaya.model.params import abstract_params

CONFIG = "zaya_config.json"
TOKENIZER = "tokenizer.json"


def is_zaya_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, CONFIG))


def save(dst: str, params, cfg: ZayaConfig, tokenizer: str | None = None, overwrite: bool = False):
    with atomic_dir(dst, overwrite) as tmp:
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "params"), params)
        ckptr.wait_until_finished()
        if tokenizer and os.path.exists(tokenizer):
            shutil.copy(tokenizer, os.path.join(tmp, TOKENIZER))


def read_config(path: str) -> ZayaConfig:
    with open(os.path.join(path, CONFIG)) as f:
        return ZayaConfig.from_dict(json.load(f))


def load(path: str, shardings=None, dtype: str | None = None) -> tuple[ZayaConfig, dict]:
    """Restore (config, params). ``shardings``: a pytree of jax.sharding.Sharding matching the params (or None)."""
    cfg = read_config(path)
    target = abstract_params(cfg)
    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"), target)
    except Exception as e:  # orbax raises many types; the folder is what the user needs to know about
        raise CheckpointError(f"{path}: cannot restore params ({type(e).__name__}: {e})") from e
    if dtype is not None and dtype != cfg.dtype:
        from zaya.model.params import cast
        cfg = cfg.replace(dtype=dtype)
        params = cast(params, cfg)
    return cfg, params


def tokenizer_path(path: str) -> str | None:
    p = os.path.join(path, TOKENIZER)
    return p if os.path.exists(p) else None


__all__ = ["save", "load", "read_config", "is_zaya_dir", "tokenizer_path", "np"]

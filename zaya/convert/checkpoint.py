"""zaya's own model folders: an Orbax (tensorstore) checkpoint of the params plus config and tokenizer.

  DST/zaya_config.json   the ZayaConfig
  DST/params/            Orbax StandardCheckpointer (tensorstore/zarr), restorable with any target sharding
  DST/tokenizer.json     copied from the source when present
"""
from __future__ import annotations

import json
import logging
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
        _save_params(os.path.join(tmp, "params"), params)
        if tokenizer and os.path.exists(tokenizer):
            shutil.copy(tokenizer, os.path.join(tmp, TOKENIZER))


# Chunk size of the saved arrays. Orbax's default (one chunk per array) makes tensorstore compress each whole array
# in memory, and the stacked expert tensors hold most of the model.
CHUNK_BYTES = 32 * 2**20


def _save_params(path: str, params):
    """Save a param tree (numpy or jax arrays) with host memory ~ the params themselves plus a few chunks.

    Three things in Orbax's defaults each add about a model's worth of host memory when saving numpy params
    (measured on a 1.1 GB checkpoint: peak = params + 1.8 GB; with these settings: params + ~0.1 GB):
      - ``NumpyHandler`` deep-copies every numpy array first (``deepcopy_host_arrays``); the save here is synchronous
        and nothing mutates the arrays meanwhile, so the copy is not needed;
      - OCDBT keeps the compressed chunks of the whole checkpoint in memory until its final commit; plain zarr
        writes each chunk to its own file as soon as it is compressed;
      - one chunk per array: see CHUNK_BYTES.
    The result is a standard Orbax PyTree checkpoint; ``StandardCheckpointer().restore`` reads it.
    """
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, th.get_type_handler(jax.Array)),
        *[(t, th.get_type_handler(t)) for t in (int, float, bytes, np.number, str)],
    )
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
    # host arrays written by this process alone: in a multi-process job Orbax would otherwise wait at barriers
    # for processes that are not saving (a model folder is written by process 0 after a gather)
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me} if jax.process_count() > 1
                                            else None)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=registry,
                                                         multiprocessing_options=mp), multiprocessing_options=mp)
    log = logging.getLogger("absl")
    log.addFilter(_no_ocdbt_merge_warning)  # orbax warns that there is nothing to merge when OCDBT is off
    try:
        ckptr.save(path, args=ocp.args.PyTreeSave(params, save_args=save_args))  # synchronous
    finally:
        log.removeFilter(_no_ocdbt_merge_warning)


def _no_ocdbt_merge_warning(record) -> bool:
    return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


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

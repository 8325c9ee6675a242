"""Train checkpoints: Orbax CheckpointManager with three items per step (async, keep-N, atomic).

  WORKDIR/checkpoints/<step>/state   params, optimizer state, rng, step   (StandardSave: tensorstore, sharded)
                            /data    the data iterator's state              (JSON)
                            /meta    model config, optimizer structure, step (JSON; read first to refuse mismatches)

Orbax writes each step into a temporary folder and renames it when complete, so a ``kill -9`` mid-save leaves
the previous step as the latest one. Saves are async: the device->host copy happens before ``save`` returns (the
train step may then donate the buffers), the writes run in the background.

Fault injection (tests): ``Checkpoints(..., before_commit=fn)`` calls ``fn(step)`` inside each async save, after its
files are written to the temporary folder and before the rename that commits them; a test's ``fn`` can SIGKILL the
process there (a ``kill -9`` while a save is in flight).
"""
from __future__ import annotations

import base64
import os
from typing import Callable

import jax
import orbax.checkpoint as ocp

from zaya.config import ZayaConfig

class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to this run's model / optimizer config."""


def _encode(x):
    """JSON-safe copy of a data-iterator state (bytes become {"__bytes__": base64})."""
    if isinstance(x, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(x)).decode()}
    if isinstance(x, dict):
        return {str(k): _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    if hasattr(x, "item") and getattr(x, "shape", None) == ():
        return x.item()
    return x


def _decode(x):
    if isinstance(x, dict):
        if set(x) == {"__bytes__"}:
            return base64.b64decode(x["__bytes__"])
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def opt_structure(opt_state) -> str:
    """A string naming the optimizer-state tree structure (changes when the optimizer chain changes)."""
    return str(jax.tree.structure(opt_state))


def make_meta(model_cfg: ZayaConfig, opt_state, step: int, extra: dict | None = None) -> dict:
    return {"model": model_cfg.to_dict(), "opt_structure": opt_structure(opt_state), "step": int(step),
            **(extra or {})}


def check_meta(meta: dict, model_cfg: ZayaConfig, opt_state, where: str):
    """Refuse a checkpoint written for another model config or optimizer structure (clear message)."""
    want, got = model_cfg.to_dict(), meta.get("model", {})
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
        lines = ", ".join(f"{k}: checkpoint {got.get(k)!r} vs config {want.get(k)!r}" for k in diff)
        raise CheckpointMismatchError(
            f"{where} was written for a different model config ({lines}). Use a fresh --workdir, or start from its "
            "weights with --config.init_from=<a model folder>.")
    if meta.get("opt_structure") != opt_structure(opt_state):
        raise CheckpointMismatchError(
            f"{where} holds optimizer state of a different structure (the optim section changed, e.g. clip_norm "
            "switched on/off). Resume with the original optim settings or use a fresh --workdir.")


def _before_commit_class(before_commit: Callable[[int], None]):
    """Orbax's local atomic-rename path, calling ``before_commit(step)`` first (on the async save's background thread
    once every item is written, so the main thread may be a few train steps further)."""

    class CallBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):
        async def finalize(self):
            name = self.get_final().name  # the step folder (its items, state/data/meta, are finalized too)
            if name.isdigit():
                before_commit(int(name))
            await super().finalize()

    return CallBeforeCommit


class Checkpoints:
    """Thin wrapper over ``ocp.CheckpointManager`` for (state, data-iterator state, meta)."""

    def __init__(self, directory: str, keep: int = 3, use_async: bool = True,
                 before_commit: Callable[[int], None] | None = None):
        self.directory = os.path.abspath(directory)
        tmp_class = _before_commit_class(before_commit) if before_commit else None
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=use_async,
                                            cleanup_tmp_directories=True, temporary_path_class=tmp_class)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state_dict: dict, data_state, meta: dict):
        self.mngr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_dict), data=ocp.args.JsonSave(_encode(data_state)),
            meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict:
        return self.mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, target: dict) -> tuple[dict, object]:
        """(state dict laid out like ``target`` (ShapeDtypeStructs with shardings), data-iterator state)."""
        where = f"checkpoint {self.directory}/{step}"
        try:
            out = self.mngr.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; say which checkpoint and what to do
            raise CheckpointMismatchError(f"{where}: cannot restore the train state ({type(e).__name__}: {e}). "
                                          "It may come from another config; use a fresh --workdir.") from e
        return out["state"], _decode(out["data"])

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()

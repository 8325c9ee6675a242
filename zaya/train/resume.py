"""May a run folder be resumed by this config? What its latest checkpoint was written under, against what is asked.

A checkpoint's metadata carries the config it was trained under and a content stamp of its ``init_from`` model.
``train`` resumes only when both still hold: a workdir left by another config (another alpha, another data mix, a
code change to an experiment file) or started from a model that has since been retrained is refused with the list
of differing fields, before any data or state is restored, instead of silently continuing a different experiment.

Fields that may change on resume (``RESUMABLE``): how the run is logged, checkpointed, evaluated, laid out on
devices and compiled, and ``num_steps`` (extending a run). Everything else (model, objective, data, optimizer, seed,
shapes, init) is the experiment.
"""
from __future__ import annotations

import hashlib
import json
import os

from zaya.config import ConfigError

RESUMABLE = ("num_steps", "log.", "checkpoint.", "eval.", "impl.", "mesh.", "sharding_rules", "grad_accum", "notes",
             "export_model")
# a phase of a pipeline (``zaya demo``) is redone when its length or batching changed too
PHASE_RESUMABLE = tuple(p for p in RESUMABLE if p not in ("num_steps", "grad_accum"))
_SAMPLE = 1 << 16  # bytes read at each of 3 places of a file for its stamp


class ResumeConflict(ConfigError):
    """The workdir holds a run of another experiment."""


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(old: dict, new: dict, allow: tuple[str, ...] = (), new_fields: bool = True) -> list[str]:
    """``"key: old -> new"`` for every flattened field that differs, skipping fields named (or prefixed) in
    ``allow``. Lists and tuples compare equal (JSON has no tuples). ``new_fields=False``: fields that ``old`` lacks
    are not judged (added to zaya's configs after ``old`` was written, their defaults keep the old behaviour)."""
    norm = lambda v: json.loads(json.dumps(v, default=str))
    a, b = flat(norm(old)), flat(norm(new))
    keys = [k for k in sorted(set(a) | set(b)) if (new_fields or k in a)
            and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in allow)]
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def model_stamp(path: str) -> str | None:
    """A content stamp of a model folder (every file's relative path and size, and a hash of 64 KiB at its start,
    middle and end): it changes when the model is retrained or replaced, and survives a copy or a move. None for a
    path that is not a folder."""
    if not path or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            size = os.path.getsize(p)
            h.update(f"{os.path.relpath(p, path)}\0{size}\0".encode())
            with open(p, "rb") as f:
                for at in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                    f.seek(at)
                    h.update(f.read(_SAMPLE))
    return h.hexdigest()[:16]


def conflicts(meta: dict, cfg_dict: dict, init_stamp: str | None, allow: tuple[str, ...] = RESUMABLE) -> list[str]:
    """What differs between a checkpoint's metadata and the run asked for (empty: it may resume). Checkpoints
    written before configs were recorded in their metadata are not judged, nor config fields added since. With both
    init stamps known, the init model is judged by its contents, not its path (a moved or copied folder resumes)."""
    if "config" not in meta:
        return []
    old_stamp = meta.get("init_stamp")
    stamped = bool(old_stamp and init_stamp)
    diff = config_diff(meta["config"], cfg_dict, allow + (("init_from",) if stamped else ()), new_fields=False)
    if stamped and old_stamp != init_stamp:
        diff.append(f"init_from model {cfg_dict.get('init_from')!r}: its contents changed since this run started "
                    f"(stamp {old_stamp} -> {init_stamp}; it was retrained or replaced)")
    return diff


def check(meta: dict, cfg_dict: dict, init_stamp: str | None, where: str, allow: tuple[str, ...] = RESUMABLE):
    """Raise ResumeConflict listing what differs, with how to go on."""
    diff = conflicts(meta, cfg_dict, init_stamp, allow)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise ResumeConflict(f"{where} was trained under another experiment ({shown}). Resuming would mix two "
                             "experiments in one run: give this run a fresh workdir, or move that folder aside "
                             "(nothing is deleted for you).")


def saved_meta(workdir: str) -> dict | None:
    """The metadata of the workdir's latest checkpoint, or None when it has none."""
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return None
    from zaya.train.checkpoint import Checkpoints
    ck = Checkpoints(d, keep=None, use_async=False)
    try:
        step = ck.latest_step()
        return None if step is None else ck.read_meta(step)
    finally:
        ck.close()


def stale(cfg, workdir: str, allow: tuple[str, ...] = PHASE_RESUMABLE) -> list[str]:
    """What makes ``workdir`` unfit to resume ``cfg`` (empty when it has no checkpoint or may resume). The default
    ``allow`` is a pipeline phase's: ``train``'s, less ``num_steps`` and ``grad_accum``."""
    meta = saved_meta(workdir)
    if meta is None:
        return []
    return conflicts(meta, json.loads(cfg.to_json()), init_stamp(cfg.init_from), allow)


def init_stamp(init_from: str) -> str | None:
    """The stamp of a run's ``init_from`` model (a model folder or a workdir holding ``model/``); None when there is
    none, or it is gone: a resume reads its params from the checkpoint, so only a fresh start needs the model."""
    from zaya.train.loop import resolve_model_dir
    return model_stamp(resolve_model_dir(init_from)) if init_from and os.path.isdir(init_from) else None


def move_aside(workdir: str) -> str:
    """Rename ``workdir`` to the first free ``workdir.stale-N``; returns the new path."""
    n = 1
    while os.path.exists(f"{workdir}.stale-{n}"):
        n += 1
    os.rename(workdir, f"{workdir}.stale-{n}")
    return f"{workdir}.stale-{n}"

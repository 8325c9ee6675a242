"""Experiment configs: ml-collections ``get_config(arg)`` files, ``--config.a.b=value`` overrides, validation.

  load('experiments/X.py:tiny', ['model.num_layers=2', ...]) -> locked ConfigDict
  base() -> the ConfigDict every experiment starts from (all fields, typed defaults)
  validate(cfg) -> raises ConfigError naming the field for anything that would fail later

Overrides are ``ml_collections.config_flags``'s: each value is parsed by the type of the field it replaces (bool:
true/false/1/0; int; float; str; tuple: Python literal). The config is locked: an unknown key fails with the closest
existing names.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os

import ml_collections as mlc
from absl import flags
from ml_collections import config_flags

from zaya.config import ConfigError, ZayaConfig, preset


class ConfigOverrideError(ConfigError):
    """A ``--config.x=y`` override that names no field or does not fit the field's type."""


# --------------------------------------------------------------------------------------------------------------
# Defaults.

def model_config(name: str, **overrides) -> mlc.ConfigDict:
    """A ZayaConfig preset as a ConfigDict section (every field present, so overrides are type-checked)."""
    return mlc.ConfigDict(preset(name, **overrides).to_dict())


def data_defaults() -> mlc.ConfigDict:
    from zaya.data.pipeline import default_config
    return default_config()


def tidar_defaults() -> dict:
    """TidarOptions' defaults; position_gamma (None) is a float placeholder so ``--config.tidar.position_gamma=0.9``
    type-checks (config_flags cannot override a field whose only value so far is None)."""
    from zaya.tidar.objective import TidarOptions
    return {**dataclasses.asdict(TidarOptions()), "position_gamma": mlc.config_dict.placeholder(float)}


def base() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.model = model_config("tiny")    # ZayaConfig fields; model.dtype is the compute dtype (master weights are fp32)
    c.init_from = ""                  # a zaya model folder (`zaya convert` output or WORKDIR/model of another run)
    c.require_init = False            # phases that continue a previous one refuse to start from random weights
    c.tokenizer = "bytes"             # 'bytes' or a tokenizer.json path
    c.data = data_defaults()          # zaya.data.pipeline's config (source, sft, tasks_fraction, val_fraction ...)
    c.seq_len = 64
    c.batch_size = 8                  # global batch (rows) per optimizer step
    c.grad_accum = 1                  # microbatches per step (batch_size / grad_accum rows each)
    c.num_steps = 100
    c.seed = 0
    c.tidar = mlc.ConfigDict(tidar_defaults())
    c.optim = mlc.ConfigDict(dict(lr=3e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, decay_fraction=0.2,
                                  decay_shape="linear", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
                                  decay_embeddings=False, router_balance_rate=1e-3))
    # fast_compile: XLA opt level 0 (CPU smoke runs, tests); capacity_factor: expert parallelism's slots per
    # destination device (0: dropless; f > 0: ceil(f * tokens / expert), the rest dropped and logged as
    # moe_drop_rate; evaluation and runs without expert parallelism are always dropless)
    # remat_group: with remat, layers per checkpointed group (g > 1: residual stream kept every g layers, one more
    # forward per group in the backward)
    # ep_transport: expert parallelism's token exchange, "all_to_all" (fixed capacity, any backend) or "ragged"
    # (lax.ragged_all_to_all: routed rows only, dropless; GPU/TPU, emulated on CPU)
    c.impl = mlc.ConfigDict(dict(attention="auto", moe="ragged", remat=False, remat_group=1, fast_compile=False,
                                 capacity_factor=0.0, ep_transport="all_to_all"))
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, num_devices=0))  # -1: the remaining devices
    c.sharding_rules = ()             # (logical axis, mesh axes) pairs; () = zaya.sharding.DEFAULT_RULES
    c.checkpoint = mlc.ConfigDict(dict(every_steps=50, keep=3, use_async=True))
    c.log = mlc.ConfigDict(dict(every_steps=1, progress=True, tensorboard=True, plots=True))
    c.eval = mlc.ConfigDict(dict(every_steps=0, num_batches=2, batch_size=8))  # every_steps 0: only at the end
    c.export_model = True             # save the final params as a zaya model folder in WORKDIR/model
    c.notes = ""                      # free text (the full-size recipe's provenance)
    return c


# --------------------------------------------------------------------------------------------------------------
# Loading and overrides.

def load_file(spec: str) -> mlc.ConfigDict:
    """``path.py[:arg]`` -> ``get_config(arg)`` (``get_config()`` when no arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (cwd {os.getcwd()}); expected experiments/X.py[:variant]")
    mod_name = "zaya_experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec_ = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path} has no get_config(arg) function")
    cfg = mod.get_config(arg) if arg else mod.get_config()
    if not isinstance(cfg, mlc.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict, got {type(cfg).__name__}")
    return cfg


def _fields(d: mlc.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, mlc.ConfigDict):
            out.extend(_fields(v, prefix + k + "."))
    return out


def _check_key(cfg: mlc.ConfigDict, key: str):
    """An override must name a leaf field: say which part is unknown (with the closest names) or a section."""
    node, parts = cfg, key.split(".")
    for i, p in enumerate(parts):
        if not isinstance(node, mlc.ConfigDict) or p not in node:
            close = difflib.get_close_matches(key, _fields(cfg), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigOverrideError(f"--config.{key}: the config has no field {'.'.join(parts[:i + 1])!r}.{hint}")
        node = node[p]
    if isinstance(node, mlc.ConfigDict):
        raise ConfigOverrideError(f"--config.{key} is a section; set one of its fields ({', '.join(node.keys())})")


def apply_overrides(cfg: mlc.ConfigDict, argv: list[str]) -> mlc.ConfigDict:
    """Apply ``--config.a.b=value`` (or ``--config.a.b value``) command-line overrides to ``cfg`` in place, with
    ``ml_collections.config_flags``: values are parsed by the type of the field they replace (bool: true/false/1/0;
    tuples: a Python literal), and the config is locked, so a typo fails with the closest field names."""
    for arg in argv:
        if arg.startswith("--config."):
            _check_key(cfg, arg[len("--config."):].split("=", 1)[0])
        elif arg.startswith("--"):
            raise ConfigOverrideError(f"unrecognized argument {arg!r}; overrides look like --config.optim.lr=1e-3")
    argv = ["zaya", *argv]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", cfg, flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        rest = fv(argv)[1:]
    except flags.Error as e:
        raise ConfigOverrideError(str(e)) from None
    if rest:
        raise ConfigOverrideError(f"unrecognized argument {rest[0]!r}; overrides look like --config.optim.lr=1e-3 "
                                  "(bools take =: --config.log.progress=false)")
    return cfg


def load(spec: str, overrides=(), argv=()) -> mlc.ConfigDict:
    """Load ``path.py[:arg]``, apply overrides, lock, validate.

    overrides: ``'a.b=v'`` strings or ``(key, value)`` pairs (Python code, ``ablate``); argv: raw command-line
    arguments (``['--config.a.b=v', ...]``, ``zaya train``). Both go through :func:`apply_overrides`."""
    cfg = load_file(spec)
    pairs = [(o.split("=", 1) + [""])[:2] if isinstance(o, str) else o for o in overrides]
    apply_overrides(cfg, [f"--config.{k.removeprefix('--config.')}={v}" for k, v in pairs] + list(argv))
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Validation.

def model_from(cfg) -> ZayaConfig:
    try:
        return ZayaConfig.from_dict(dict(cfg.model))
    except ConfigError as e:
        raise ConfigError(f"config.model: {e}") from None


def tidar_options(cfg):
    from zaya.tidar.objective import TidarOptions
    try:
        return TidarOptions(**dict(cfg.tidar))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.tidar: {e}") from None


def mesh_sizes(cfg, num_devices: int | None) -> dict:
    """Mesh sizes with the single -1 entry filled from ``num_devices``."""
    m = {k: int(cfg.mesh[k]) for k in ("data", "fsdp", "tensor", "expert")}
    free = [k for k, v in m.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in m.values()):
        raise ConfigError(f"config.mesh={m}: sizes are positive, at most one may be -1 (fill)")
    fixed = 1
    for k, v in m.items():
        fixed *= v if v > 0 else 1
    if free and num_devices is not None:
        if num_devices % fixed:
            raise ConfigError(f"config.mesh={m}: {num_devices} devices do not divide by the fixed sizes ({fixed})")
        m[free[0]] = num_devices // fixed
    elif free:
        m[free[0]] = 1
    if num_devices is not None and fixed * (1 if not free else m[free[0]]) != num_devices:
        raise ConfigError(f"config.mesh={m} needs {fixed} devices but {num_devices} are used")
    return m


def validate(cfg):
    """Check everything checkable without devices or data (the 'full' variants pass this without running)."""
    mc = model_from(cfg)
    for f in ("seq_len", "batch_size", "grad_accum", "num_steps"):
        if int(cfg[f]) < 1:
            raise ConfigError(f"config.{f}={cfg[f]} must be >= 1")
    if cfg.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"config.seq_len={cfg.seq_len} exceeds model.max_position_embeddings="
                          f"{mc.max_position_embeddings}")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"config.batch_size={cfg.batch_size} must divide by config.grad_accum={cfg.grad_accum}")
    o = cfg.optim
    from zaya.train.optim import SCHEDULES
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"config.optim.schedule={o.schedule!r}; choose one of {SCHEDULES}")
    if o.decay_shape not in ("linear", "sqrt"):
        raise ConfigError(f"config.optim.decay_shape={o.decay_shape!r}; use 'linear' or 'sqrt'")
    if o.warmup_steps < 0:
        raise ConfigError(f"config.optim.warmup_steps={o.warmup_steps} must be >= 0")
    if not 0 < o.decay_fraction <= 1 or not 0 <= o.min_lr_ratio <= 1 or o.lr <= 0:
        raise ConfigError("config.optim: need lr > 0, 0 < decay_fraction <= 1 and 0 <= min_lr_ratio <= 1")
    tidar_options(cfg)
    if cfg.require_init and not cfg.init_from:
        raise ConfigError("this experiment continues a previous phase: set --config.init_from=<model folder> (e.g. "
                          "the WORKDIR/model of the previous run, or a `zaya convert` output)")
    nd = int(cfg.mesh.num_devices) or None
    sizes = mesh_sizes(cfg, nd)
    from zaya.sharding import batch_split
    axes, shards = batch_split(sizes, tuple(tuple(r) for r in cfg.sharding_rules) or None)
    if nd is not None and cfg.batch_size % (shards * cfg.grad_accum):
        raise ConfigError(f"config.batch_size={cfg.batch_size} must divide by {'*'.join(axes) or '1'}*grad_accum="
                          f"{shards * cfg.grad_accum} (rows per batch shard per microbatch)")
    if nd is not None and cfg.eval.num_batches and cfg.eval.batch_size % shards:
        raise ConfigError(f"config.eval.batch_size={cfg.eval.batch_size} must divide by {'*'.join(axes)}={shards} "
                          "(the batch shards evaluation rows are split over)")
    if cfg.impl.remat_group < 1 or mc.num_layers % cfg.impl.remat_group:
        raise ConfigError(f"config.impl.remat_group={cfg.impl.remat_group} must be >= 1 and divide num_layers="
                          f"{mc.num_layers}")
    if cfg.impl.remat_group > 1 and not cfg.impl.remat:
        raise ConfigError(f"config.impl.remat_group={cfg.impl.remat_group} groups rematerialised layers: set "
                          "config.impl.remat=true too (or remat_group=1)")
    if cfg.impl.ep_transport not in ("all_to_all", "ragged"):
        raise ConfigError(f"config.impl.ep_transport={cfg.impl.ep_transport!r}; use 'all_to_all' or 'ragged'")
    if cfg.impl.ep_transport == "ragged" and cfg.impl.capacity_factor:
        raise ConfigError("config.impl.ep_transport='ragged' moves every routed token (dropless): set "
                          "config.impl.capacity_factor=0")
    if cfg.impl.capacity_factor < 0:
        raise ConfigError(f"config.impl.capacity_factor={cfg.impl.capacity_factor} must be >= 0 (0: dropless)")
    if cfg.checkpoint.every_steps < 1 or cfg.checkpoint.keep < 1:
        raise ConfigError("config.checkpoint.every_steps and .keep must be >= 1")
    from zaya.model.attention import IMPLS
    if cfg.impl.attention not in IMPLS:
        raise ConfigError(f"config.impl.attention={cfg.impl.attention!r}; registered: {sorted(IMPLS)}")
    from zaya.model.moe import EXPERT_IMPLS
    if cfg.impl.moe not in EXPERT_IMPLS:
        raise ConfigError(f"config.impl.moe={cfg.impl.moe!r}; registered: {sorted(EXPERT_IMPLS)}")
    return cfg

"""Meshes, logical-axis rules and shardings for the ZAYA1 pytrees (params, tokens, decode cache).

Params carry *logical* axis names (``zaya.model.params.param_specs``); a rule table maps each name to a mesh axis,
a tuple of mesh axes, or None (replicated). Rules are plain data (a tuple of pairs) so they can live in a config::

  rules = (("batch", ("data", "fsdp", "expert")), ("embed", "fsdp"), ("heads", "tensor"), ...)

``logical_to_spec`` turns one leaf's logical axes into a ``PartitionSpec``: each mesh axis is used at most once per
spec, size-1 mesh axes are left out, and a mesh axis that does not divide the dim is dropped (the dim stays
replicated along it), so one rule table serves the 8B model and the tiny test models alike.

How the jitted functions split the work (``sharded_logits_fn``; ``zaya.generate`` on ``Model.mesh`` instead places the
rows and the cache with ``batch_sharding`` / ``cache_shardings`` and lets XLA partition each step):

* Batch axes (``data``, ``fsdp``, ``expert``) are *manual*: the model runs under ``jax.shard_map`` on each batch
  shard, with the params gathered over those axes at entry (fsdp weights are sharded at rest: params, optimizer
  state and checkpoints). Without this, XLA's propagation on the unannotated model code follows the fsdp-sharded
  hidden dim of the weights instead of the batch: every device then computed the whole batch (checked in the HLO:
  dots over all B*T tokens, full logits all-reduced), and the ragged MoE's global argsort gathered every token. Per
  shard, the sort is local (the MoE is dropless without a capacity factor, so each token's output is unchanged).
* Expert parallelism: ``expert`` splits the rows like a data axis and the experts' E dim at rest. Training
  (``zaya.train.step``) keeps each device's experts in place and sends tokens to them by all-to-all
  (``zaya.model.moe_ep``), so each device multiplies only its own experts. ``sharded_logits_fn`` (inference, a
  test path) gathers the experts over ``expert`` at entry like every other weight.
* ``tensor`` stays ``AxisType.Auto`` inside: XLA's SPMD partitioner splits heads / kv / MLP columns and inserts
  the all-reduces.
* Inference here gathers the whole param tree over the batch axes once per call; training gathers one layer at a
  time inside the layer scan (ZeRO-3, ``zaya.train.step``: ``Impl.gather_layer``).

Tests: ``tests/test_sharding.py`` (8 simulated CPU devices; sharded logits and decode equal single-device).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zaya import layouts
from zaya.config import ZayaConfig
from zaya.conventions import MESH_AXES
from zaya.model.cache import Cache
from zaya.model.params import map_specs, param_specs
from zaya.model.transformer import Impl, apply

Rules = Sequence[tuple]

DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp", "expert")),  # activations, tokens, cache rows (expert: expert parallelism)
    ("embed", "fsdp"),            # hidden dim of every weight: weights sharded at rest over fsdp
    ("vocab", "tensor"),
    ("heads", "tensor"),          # query heads (q columns, o rows)
    ("kv", "tensor"),             # kv-head features (k, v_cur, v_del columns; cache kv heads)
    ("mlp", "tensor"),            # expert intermediate dim
    ("experts", "expert"),
    ("layers", None),             # the scanned layer axis is never sharded
)
"""Logical axis -> mesh axis (or tuple of mesh axes, or None). Unlisted logical axes are replicated."""


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A mesh with axes ``('data', 'fsdp', 'tensor', 'expert')`` (all ``AxisType.Auto``) over ``devices``.

    The product of the sizes must equal the number of devices (all of ``jax.devices()`` by default).
    """
    sizes = (int(data), int(fsdp), int(tensor), int(expert))
    devices = list(jax.devices() if devices is None else devices)
    if min(sizes) < 1:
        raise ValueError(f"mesh sizes must be >= 1, got {dict(zip(MESH_AXES, sizes))}")
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} slots but there are "
                         f"{len(devices)} devices; the product data*fsdp*tensor*expert must equal the device count")
    auto = getattr(jax.sharding, "AxisType", None)
    try:
        kw = {} if auto is None else {"axis_types": (auto.Auto,) * len(sizes)}
        return jax.make_mesh(sizes, MESH_AXES, devices=devices, **kw)  # sizes positional: keyword renamed in 0.11
    except (TypeError, AttributeError):  # older make_mesh (no devices= / axis_types=)
        arr = np.array(devices, dtype=object).reshape(sizes)
        try:
            return Mesh(arr, MESH_AXES, axis_types=(auto.Auto,) * len(sizes))
        except TypeError:
            return Mesh(arr, MESH_AXES)


def _rule_table(rules: Rules | None) -> dict:
    table = {}
    rules = DEFAULT_RULES if rules is None else rules
    for entry in (rules.items() if hasattr(rules, "items") else rules):  # pairs, or a mapping (ConfigDict)
        if len(entry) != 2:
            raise ValueError(f"a sharding rule is (logical_axis, mesh_axes), got {entry!r}")
        name, target = entry
        if name not in table:  # first match wins, as in flax's logical rules
            table[name] = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    return table


def axis_names(entry) -> tuple:
    """One PartitionSpec entry (None, a mesh axis name or a tuple of them) as a tuple of names."""
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def batch_split(sizes: dict, rules: Rules | None) -> tuple[tuple, int]:
    """(mesh axes, shard count) the ``batch`` rule splits rows over on a mesh of ``sizes`` (a dict of axis sizes; no
    devices needed): its axes of size > 1. A training config's batch must divide by the count (checked)."""
    spec = logical_to_spec(("batch",), rules, sizes)
    axes = axis_names(spec[0] if len(spec) else None)
    return axes, math.prod(sizes[a] for a in axes)


def logical_to_spec(axes: Sequence, rules: Rules | None, mesh, shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for a leaf with logical ``axes`` (and, if given, ``shape`` for the divisibility check) on a
    ``Mesh`` or a dict of mesh axis sizes.

    Per dim, the rule's mesh axes are kept in order if: the mesh has the axis, it has size > 1, no earlier dim of
    this spec used it, and (with ``shape``) the product of the kept sizes divides the dim.
    """
    sizes = mesh if isinstance(mesh, dict) else mesh.shape
    table = _rule_table(rules)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used, out = set(), []
    for i, name in enumerate(axes):
        kept, prod = [], 1
        for ax in (table.get(name, ()) if name is not None else ()):
            if ax not in sizes:
                raise ValueError(f"rule for {name!r} names mesh axis {ax!r}; the mesh has {tuple(sizes)}")
            n = sizes[ax]
            if n == 1 or ax in used or (shape is not None and shape[i] % (prod * n)):
                continue
            kept.append(ax)
            prod *= n
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def param_shardings(config: ZayaConfig, mesh: Mesh, rules: Rules | None = None) -> dict:
    """NamedSharding for every leaf of ``zaya.model.params.param_specs(config)`` (same tree structure)."""
    return map_specs(lambda s: NamedSharding(mesh, logical_to_spec(s[1], rules, mesh, s[0])), param_specs(config))


def shard_params(params: dict, config: ZayaConfig, mesh: Mesh, rules: Rules | None = None) -> dict:
    """Place a param tree on ``mesh`` according to the rules (``jax.device_put``; no host round-trip)."""
    return jax.device_put(params, param_shardings(config, mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules | None = None, batch: int | None = None, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] array (tokens, logits): rows over the ``batch`` rule's axes (data, fsdp, expert by
    default).

    With ``batch`` given, axes that do not divide it are dropped.
    """
    shape = None if batch is None else (batch,)
    spec = logical_to_spec(("batch",), rules, mesh, shape)
    return NamedSharding(mesh, P(*(tuple(spec) + (None,) * (ndim - len(spec)))))


def _batch_axes(mesh: Mesh, rules: Rules | None, batch: int | None):
    """The mesh axes (None, a name or a tuple) that the rows of a [batch, ...] array are split over."""
    spec = logical_to_spec(("batch",), rules, mesh, None if batch is None else (batch,))
    return spec[0] if len(spec) else None


def _per_batch_shard(fn, mesh: Mesh, dp, in_specs, out_specs):
    """``fn`` run on each batch shard (manual over the ``dp`` axes; tensor stays compiler-partitioned)."""
    if dp is None:
        return fn
    names = set(axis_names(dp))
    # check_vma=False: the model code is not varying-axis aware (its scan carries start as unvarying zeros)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=names, check_vma=False)


def mesh_impl(impl: Impl, mesh: Mesh | None) -> Impl:
    """The implementations to run on ``mesh``. The Pallas kernels are single-device custom calls that XLA's
    partitioner cannot split (it would gather a sharded cache or sharded expert weights onto every device), so on a
    multi-device mesh ``auto`` means the XLA paths: attention ``xla``, MoE ``ragged``. Explicit choices are kept."""
    if mesh is None or mesh.size == 1:
        return impl
    return dataclasses.replace(impl, attention="xla" if impl.attention == "auto" else impl.attention,
                               moe="ragged" if impl.moe == "auto" else impl.moe)


def sharded_logits_fn(config: ZayaConfig, mesh: Mesh, rules: Rules | None = None, impl: Impl = Impl(),
                      batch: int | None = None):
    """A jitted ``(params, tokens_BT) -> logits_BTV`` (full causal forward, no cache) on ``mesh``.

    Params are expected sharded as ``param_shardings`` (pass ``shard_params(...)``; other placements are moved);
    tokens and logits are split by rows (``batch_sharding``). With ``batch`` given, batch axes that do not divide
    it are left out; without it, B must divide by the product of the batch axes.
    """
    dp = _batch_axes(mesh, rules, batch)
    impl = mesh_impl(impl, mesh)

    def local(params, tokens_BT):
        B, T = tokens_BT.shape
        return apply(params, config, tokens_BT, layouts.causal(B, T), None, impl)[0]
    f = _per_batch_shard(local, mesh, dp, (P(), P(dp)), P(dp))
    return jax.jit(f, in_shardings=(param_shardings(config, mesh, rules), NamedSharding(mesh, P(dp))),
                   out_shardings=NamedSharding(mesh, P(dp)))


_CACHE_AXES = {"k": ("layers", "batch", None, "kv", None), "v": ("layers", "batch", None, "kv", None),
               "xqk": ("layers", "batch", None, None), "vd": ("layers", "batch", None, "kv"), "length": ("batch",)}


def cache_shardings(mesh: Mesh, cache: Cache, rules: Rules | None = None) -> Cache:
    """A ``Cache`` of NamedShardings for ``cache`` (arrays or ``jax.eval_shape(init_cache, ...)`` structs).

    Rows over the ``batch`` axes (data, fsdp, expert), kv heads (and the delayed-value features) over ``kv``'s axis
    (tensor) where they divide; slots, ring and the conv-state channels stay unsharded.
    """
    return Cache(**{n: NamedSharding(mesh, logical_to_spec(a, rules, mesh, getattr(cache, n).shape))
                    for n, a in _CACHE_AXES.items()})


def shard_cache(cache: Cache, mesh: Mesh, rules: Rules | None = None) -> Cache:
    """Place a decode cache on ``mesh`` (``cache_shardings``)."""
    return jax.tree.map(put_global, cache, cache_shardings(mesh, cache, rules))


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """Place a host value (the same on every process) with ``sharding``, also when the mesh spans processes: each
    process fills only its own devices' shards (``jax.device_put`` cannot place a local array on another host)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(tree):
    """numpy copies of a pytree of arrays; arrays spread over processes are gathered first (every process must call
    this for them, as for any collective)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(get, tree)

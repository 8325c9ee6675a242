"""The jitted train step: grads over microbatches (a scan), AdamW update, metrics; donated, sharded state.

  make_train_step(model_cfg, opts, optimizer, schedule, accum, impl, mesh, rules, state_sh, batch_size, loss_fn)
      -> step(state, batch) -> (state', metrics)

Mixed precision: the state holds fp32 params; the loss casts them to ``model_cfg.dtype`` (bf16 in production) with
``zaya.model.params.cast``, so the cast's VJP hands fp32 grads back to the fp32 master weights.

Grad accumulation: the (per-shard) batch [B, S] is split into ``accum`` strided microbatches (microbatch a = rows
a, a + accum, ...) and a ``lax.scan`` averages their grads and metrics, so activation memory is that of one
microbatch. With equal-sized microbatches this is one step on the concatenated batch (tests check it).

MoE balancing: after the update, the router's balancing biases move towards equal expert load
(``balance_router_bias``, aux-loss-free, rate ``optim.router_balance_rate``) from the step's expert counts.

Sharding: with a mesh whose batch axes (``data``, ``fsdp``, ``expert``) have size > 1 the grad computation runs under
``jax.shard_map`` per batch shard (XLA's propagation would otherwise follow the fsdp weight sharding instead of the
batch). ZeRO-3 when weights are sharded over a batch axis (``fsdp``, the default rules): they enter as shards, each
layer's weights are all-gathered inside the layer scan (``Impl.gather_layer``; with remat the backward gathers
again), the embedding and norms once per microbatch, and grads leave through the gather's VJP, a reduce-scatter in
fp32, so params, grads and optimizer state stay sharded (``zero3_specs``). Otherwise params enter replicated and
grads are ``pmean``-ed. Expert parallelism: when the rows are also split over ``expert`` (the default rules) and
the experts' E dim is sharded over it, each device keeps its own experts (never gathered over ``expert``) and the
MoE sends tokens to their experts' devices by all-to-all (``Impl.expert_axis``, ``zaya.model.moe_ep``); those
weights' grads, summed over the expert group by the all-to-all's transpose, are averaged like reduce-scattered ones.
Metrics are ``pmean``-ed; the optimizer update runs on the sharded state (``state_sh``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from zaya.config import ZayaConfig
from zaya.model.params import cast
from zaya.model.transformer import Impl


# XLA options for CPU smoke runs and tests (config impl.fast_compile): about half the compile time of the tiny
# models' train step on XLA:CPU, at a slower step.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_options(fast_compile: bool) -> dict:
    return {"compiler_options": FAST_COMPILE} if fast_compile else {}


def split_microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B // n, ...], microbatch a = rows a, a + n, a + 2n, ..."""
    def f(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} microbatches")
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(f, batch)


def _f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def make_grad_fn(model_cfg: ZayaConfig, opts, impl: Impl, loss_fn, accum: int = 1):
    """(params_fp32, batch, rng) -> (grads fp32, loss, metrics fp32), averaged over ``accum`` microbatches."""
    def loss(params, mb, rng):
        value, metrics = loss_fn(cast(params, model_cfg), model_cfg, mb, opts, rng, impl)
        return value, _f32(metrics)
    vg = jax.value_and_grad(loss, has_aux=True)

    def grads(params, batch, rng):
        if accum == 1:
            (value, metrics), g = vg(params, batch, jax.random.fold_in(rng, 0))
            return g, value, metrics
        mbs = split_microbatches(batch, accum)
        first = jax.tree.map(lambda x: x[0], mbs)
        _, m_shape = jax.eval_shape(loss, params, first, rng)
        zeros = lambda t: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), t)
        init = (zeros(params), jnp.zeros((), jnp.float32), zeros(m_shape))

        def body(carry, xs):
            i, mb = xs
            (value, metrics), g = vg(params, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (g, value.astype(jnp.float32), metrics)), None
        total, _ = jax.lax.scan(body, init, (jnp.arange(accum), mbs))
        g, value, metrics = jax.tree.map(lambda x: x / accum, total)
        return g, value, metrics
    return grads


def balance_router_bias(params: dict, counts_LE, rate: float) -> dict:
    """Aux-loss-free load balancing (DeepSeek-V3 style) of the router's balancing biases: each real expert's bias
    moves by ``rate`` towards the mean load (+rate if under-loaded, -rate if over-loaded; centred per layer). The
    MoD skip class (last column) is left alone. The biases only steer the top-1 choice, so they get no gradient."""
    if rate <= 0:
        return params
    load = counts_LE[:, :-1]
    upd = rate * jnp.sign(load.mean(-1, keepdims=True) - load)
    upd = upd - upd.mean(-1, keepdims=True)
    bias = params["layers"]["router"]["bias"]
    bias = bias.at[:, :-1].add(upd.astype(bias.dtype))
    layers = dict(params["layers"], router=dict(params["layers"]["router"], bias=bias))
    return dict(params, layers=layers)


def batch_axes(mesh, rules, batch_size: int):
    """Mesh axes the batch rows are split over (None, a name or a tuple), per ``zaya.sharding``'s batch rule."""
    if mesh is None or mesh.size == 1:
        return None
    from zaya import sharding
    spec = sharding.logical_to_spec(("batch",), rules, mesh, (batch_size,))
    return spec[0] if len(spec) else None


def make_train_step(model_cfg: ZayaConfig, opts, optimizer: optax.GradientTransformation, schedule, accum: int = 1,
                    impl: Impl = Impl(), mesh=None, rules=None, state_sh=None, batch_size: int | None = None,
                    loss_fn=None, donate: bool = True, balance_rate: float = 0.0, fast_compile: bool = False):
    """The jitted ``step(state, batch) -> (state', metrics)`` (state donated). ``loss_fn`` defaults to
    ``zaya.tidar.objective.loss_fn``."""
    if loss_fn is None:
        from zaya.tidar.objective import loss_fn
    dp = batch_axes(mesh, rules, batch_size) if batch_size else None
    zero3 = None
    if dp is not None:
        names = set(batch_axis_names(dp))
        zero3 = zero3_specs(state_sh.params, names) if state_sh is not None else None
    if zero3 is not None:  # weights stay sharded inside the step: gathered per use, grads reduce-scattered
        ep = expert_axis(zero3)
        gather = zero3 if ep is None else _without_expert_axis(zero3, ep)  # local experts are used in place
        gather_layer = functools.partial(_gather_tree, specs=jax.tree.map(lambda sp: P(*sp[1:]), gather["layers"],
                                                                           is_leaf=lambda x: isinstance(x, P)))
        impl = dataclasses.replace(impl, gather_layer=gather_layer, expert_axis=ep)
        base_loss = loss_fn

        def loss_fn(params, *a, **k):  # the non-layer weights (embedding, norms) gathered once per microbatch
            top = {k_: _gather_tree(v, zero3[k_]) for k_, v in params.items() if k_ != "layers"}
            return base_loss({**top, "layers": params["layers"]}, *a, **k)
    grad_fn = make_grad_fn(model_cfg, opts, impl, loss_fn, accum)
    if dp is not None:
        local = grad_fn

        def per_shard(params, batch, rng):
            rng = jax.random.fold_in(rng, jax.lax.axis_index(dp))  # a different random draw per batch shard
            g, value, metrics = local(params, batch, rng)
            value, metrics = jax.lax.pmean((value, metrics), dp)
            if zero3 is None:
                return jax.lax.pmean(g, dp), value, metrics
            return jax.tree.map(lambda x, sp: _mean_sharded_grad(x, sp, names), g, zero3,
                                is_leaf=lambda x: isinstance(x, P)), value, metrics
        pspec = P() if zero3 is None else zero3
        grad_fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(pspec, P(dp), P()), out_specs=(pspec, P(), P()),
                                axis_names=names, check_vma=False)

    def step(state, batch):
        rng, sub = jax.random.split(state.rng)
        g, value, metrics = grad_fn(state.params, batch, sub)
        updates, opt_state = optimizer.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if balance_rate > 0 and "expert_counts" in metrics:
            params = balance_router_bias(params, metrics["expert_counts"], balance_rate)
        metrics = dict(metrics, loss=value, grad_norm=optax.tree.norm(g), lr=schedule(state.step),
                       param_norm=optax.tree.norm(params))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    kw = dict(donate_argnums=(0,) if donate else (), **jit_options(fast_compile))
    if mesh is None:
        return jax.jit(step, **kw)
    bsh = NamedSharding(mesh, P(dp))
    return jax.jit(step, in_shardings=(state_sh, bsh), out_shardings=(state_sh, NamedSharding(mesh, P())), **kw)


def expert_axis(specs: dict) -> str | None:
    """The manual mesh axis the experts' E dim is sharded over (then the MoE runs expert-parallel: tokens go to
    their experts' devices by all-to-all, ``zaya.model.moe_ep``), or None (every device uses all experts)."""
    sp = specs["layers"]["experts"]["gate_up"]  # [L, E, D, 2F]
    e = sp[1] if len(sp) > 1 else None
    if e is not None and not isinstance(e, str):
        from zaya.config import ConfigError
        raise ConfigError(f"the experts are sharded over several batch axes {e}; expert parallelism runs over one "
                          "mesh axis ('expert'): change the 'experts' sharding rule")
    return e


def _without_expert_axis(specs: dict, axis: str) -> dict:
    """The ZeRO-3 gather specs with the experts' E dim left sharded over ``axis`` (each device keeps its own)."""
    def strip(sp):
        return P(*(None if i == 1 and e == axis else e for i, e in enumerate(sp)))
    experts = jax.tree.map(strip, specs["layers"]["experts"], is_leaf=lambda x: isinstance(x, P))
    return {**specs, "layers": {**specs["layers"], "experts": experts}}


def zero3_specs(param_shardings, manual: set) -> dict | None:
    """Per param, the part of its sharding over the shard_map's manual (batch) axes, e.g. P(None, 'fsdp') for a weight
    sharded over fsdp at rest; None when no param is sharded over a manual axis (nothing to gather)."""
    def manual_only(sh):
        spec = []
        for entry in sh.spec:
            axes = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a in manual)
            spec.append(axes[0] if len(axes) == 1 else (axes or None))
        return P(*spec)
    specs = jax.tree.map(manual_only, param_shardings)
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    if not any(e is not None for sp in leaves for e in sp):
        return None
    layer_specs = jax.tree.leaves(specs["layers"], is_leaf=lambda x: isinstance(x, P))
    assert all(not len(sp) or sp[0] is None for sp in layer_specs), "the stacked layer axis is never sharded"
    return specs


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _all_gather(x, axes, dim: int):
    """all_gather in the weight dtype; its VJP reduce-scatters the cotangent in fp32 (the sum of every shard's
    gradient is exact to fp32, whatever the compute dtype; XLA:CPU also cannot promote a bf16 reduce-scatter)."""
    return jax.lax.all_gather(x, axes, axis=dim, tiled=True)


def _all_gather_fwd(x, axes, dim):
    return _all_gather(x, axes, dim), None


def _all_gather_bwd(axes, dim, _, ct):  # ct has the weight dtype (that of the gathered array)
    return (jax.lax.psum_scatter(ct.astype(jnp.float32), axes, scatter_dimension=dim, tiled=True).astype(ct.dtype),)


_all_gather.defvjp(_all_gather_fwd, _all_gather_bwd)


def _gather(x, spec):
    """The full array from this device's shard: all_gather along every dim the spec shards over manual axes."""
    for dim, axes in enumerate(spec):
        if axes is not None:
            x = _all_gather(x, axes, dim)
    return x


def _gather_tree(tree, specs):
    return jax.tree.map(_gather, tree, specs, is_leaf=lambda x: isinstance(x, P))


def _mean_sharded_grad(g, spec, manual: set):
    """A grad that left the step through all_gather's VJP is already summed over the axes it is sharded on
    (reduce-scatter): divide by their size and average over the remaining batch axes."""
    scattered = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
    n = math.prod(jax.lax.axis_size(a) for a in scattered) if scattered else 1
    rest = tuple(sorted(manual - scattered))
    g = g / n
    return jax.lax.pmean(g, rest) if rest else g


def batch_axis_names(dp) -> tuple:
    """``batch_axes``' value (None, a mesh axis name or a tuple of them) as a tuple of names."""
    from zaya.sharding import axis_names
    return axis_names(dp)


def batch_block(mesh, dp, idx: tuple) -> int:
    """Which block of batch rows the device at mesh index ``idx`` holds when rows are split over the axes ``dp``
    (row-major over the listed axes, as ``PartitionSpec(dp)`` splits them); 0 without batch axes."""
    coord = dict(zip(mesh.axis_names, idx))
    return functools.reduce(lambda acc, a: acc * mesh.shape[a] + coord[a], batch_axis_names(dp), 0)


def batch_shard(mesh, dp) -> tuple[int, int]:
    """(shard_index, shard_count): the block of batch rows this process's devices hold when rows are split over the
    mesh axes ``dp`` (``batch_axes``): shard i of n holds rows [i * B/n, (i + 1) * B/n) of every global batch.

    Processes whose devices hold the same rows (e.g. they differ only along ``expert`` or ``tensor``) get the same
    shard and must load the same rows. (0, 1) without a mesh or batch axes: every process holds the whole batch.
    A process whose devices hold rows that are not one contiguous block raises ConfigError (no loader can feed it).
    """
    if mesh is None or dp is None:
        return 0, 1
    axes = batch_axis_names(dp)
    total = math.prod(mesh.shape[a] for a in axes)
    me = jax.process_index()
    held = {batch_block(mesh, dp, idx) for idx in np.ndindex(mesh.devices.shape)
            if mesh.devices[idx].process_index == me}
    lo, k = min(held), len(held)
    if sorted(held) != list(range(lo, lo + k)) or lo % k or total % k:
        from zaya.config import ConfigError
        raise ConfigError(f"process {me} holds batch shards {sorted(held)} of {total} (mesh axes {axes}): not one "
                          "aligned contiguous block, so it cannot load its rows as one slice; order the mesh "
                          "devices by process (zaya.sharding.make_mesh over jax.devices() does) or change the mesh")
    return lo // k, total // k


def put_batch(batch: dict, mesh, dp) -> dict:
    """Host batch -> global device arrays split by rows over ``dp``: each process passes the rows of its
    ``batch_shard`` (its devices' block); processes holding the same block pass the same rows."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    sh = NamedSharding(mesh, P(dp))
    n = _shard_count(mesh, dp)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, x, (x.shape[0] * n, *x.shape[1:])),
                        batch)


@functools.lru_cache(maxsize=8)
def _shard_count(mesh, dp) -> int:
    """``batch_shard``'s count, once per (mesh, batch axes): put_batch runs every step and it scans the mesh."""
    return batch_shard(mesh, dp)[1]

"""The train state (a flax.struct dataclass) and how its leaves are placed on a mesh.

Params are fp32 master weights; the loss casts them to the model's compute dtype (``zaya.model.params.cast``), so
grads, Adam moments and updates are fp32 too. ``rng`` is a raw uint32 key (checkpoints as a plain array).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from zaya.config import ZayaConfig
from zaya.model.params import abstract_params


@struct.dataclass
class TrainState:
    step: jnp.ndarray       # int32 scalar: optimizer updates applied so far
    params: dict            # fp32 master weights
    opt_state: optax.OptState
    rng: jnp.ndarray        # uint32 [2]

    def as_dict(self) -> dict:
        """The checkpointed form (a plain dict; Orbax stores it with StandardSave)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"])


def master_params(params) -> dict:
    """fp32 copy of a param tree (the optimizer's master weights)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def create(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    params = master_params(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed))


def abstract_state(cfg: ZayaConfig, optimizer: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs of the train state (no allocation)."""
    ap = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract_params(cfg))
    return jax.eval_shape(lambda p: create(p, optimizer, 0), ap)


def state_shardings(cfg: ZayaConfig, optimizer: optax.GradientTransformation, mesh, rules=None) -> TrainState:
    """NamedShardings for every leaf: params by the logical-axis rules (``zaya.sharding``), optimizer moments like
    their params, everything else (step, counts, rng) replicated."""
    repl = NamedSharding(mesh, P())
    ps = param_shardings(cfg, mesh, rules)
    ab = abstract_state(cfg, optimizer)
    opt = optax.tree_map_params(optimizer, lambda _, s: s, ab.opt_state, ps, transform_non_params=lambda _: repl,
                                is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return TrainState(step=repl, params=ps, opt_state=opt, rng=repl)


def param_shardings(cfg: ZayaConfig, mesh, rules=None):
    """``zaya.sharding.param_shardings`` when that module is present; otherwise every param replicated."""
    try:
        from zaya import sharding
    except ImportError:
        repl = NamedSharding(mesh, P())
        return jax.tree.map(lambda _: repl, abstract_params(cfg))
    return sharding.param_shardings(cfg, mesh, rules)


def with_shardings(abstract, shardings):
    """Attach shardings to a tree of ShapeDtypeStructs (restore targets)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

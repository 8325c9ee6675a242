"""Optimizer: AdamW with warmup + cosine / WSD / constant decay, global-norm clipping and weight-decay masks.

  lr_schedule(optim_cfg, total_steps) -> step -> lr        (pure, jnp; tests check the values)
  decay_mask(params, decay_embeddings) -> bool tree        (True = weight decay applies)
  frozen_mask(params) -> bool tree                         (True = never updated: the router balancing biases)
  make_optimizer(optim_cfg, total_steps, params) -> (optax.GradientTransformation, schedule)

Weight decay applies to matrices only (projections, conv taps, router MLP, experts; the embedding when
``decay_embeddings``). Norm gains, residual scales/biases, biases, the CCA temperature and the router's balancing
biases are not decayed. The balancing biases (``router/bias``, a buffer in the reference model) receive no gradient
(they only steer the argmax) and are frozen, so AdamW's decay cannot drift them either.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

# Leaf names (last path element) of the matrices that get weight decay.
DECAY_LEAVES = frozenset({"q", "k", "v_cur", "v_del", "o", "conv1_w", "conv2_w", "down_w", "fc1_w", "fc2_w", "out_w",
                          "gate_up", "down"})
SCHEDULES = ("cosine", "wsd", "constant")


def lr_schedule(o, total_steps: int):
    """The learning rate at each optimizer step (0-based), from an ``optim`` config section.

    warmup: linear, step s < warmup_steps gets lr * (s + 1) / warmup_steps (the first update is not wasted). Then
      cosine:   a half cosine from lr down to lr * min_lr_ratio, reached at the last step (total_steps - 1);
      wsd:      lr until the last ``decay_steps = round(decay_fraction * total_steps)`` steps, then ``decay_shape``
                ('linear' or 'sqrt': 1 - sqrt(t)) down to lr * min_lr_ratio at the last step;
      constant: lr.
    Decay phases use t = (s - decay_start + 1) / decay_steps in (0, 1].
    """
    peak, warm, total = float(o.lr), int(o.warmup_steps), int(total_steps)
    floor = peak * float(o.min_lr_ratio)
    kind = o.schedule
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule={kind!r}; choose one of {SCHEDULES}")
    decay_steps = max(int(round(float(o.decay_fraction) * total)), 1) if kind == "wsd" else total - warm
    decay_start = total - decay_steps if kind == "wsd" else warm
    shape = o.decay_shape

    def sched(step):
        s = jnp.asarray(step, jnp.float32)
        warm_lr = peak * jnp.minimum((s + 1.0) / max(warm, 1), 1.0)
        t = jnp.clip((s - decay_start + 1.0) / max(decay_steps, 1), 0.0, 1.0)
        if kind == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        elif kind == "wsd":
            frac = 1.0 - jnp.sqrt(t) if shape == "sqrt" else 1.0 - t
            decayed = floor + (peak - floor) * frac
        else:
            decayed = jnp.full_like(s, peak)
        return jnp.where(s < warm, warm_lr, decayed)
    return sched


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def _path_names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, decay_embeddings: bool = False):
    """True where weight decay applies (see module doc)."""
    def f(path, _):
        name = _leaf_name(path)
        return name in DECAY_LEAVES or (decay_embeddings and name == "embed")
    return jax.tree_util.tree_map_with_path(f, params)


def frozen_mask(params):
    """True for the router balancing biases (``layers/router/bias``): never changed by the optimizer."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "router" in _path_names(p) and _leaf_name(p) == "bias", params)


def make_optimizer(o, total_steps: int, params):
    """AdamW (decoupled decay scaled by the lr) after global-norm clipping; frozen leaves get zero updates."""
    sched = lr_schedule(o, total_steps)
    parts = []
    if float(o.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(o.clip_norm)))
    parts.append(optax.adamw(sched, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                             weight_decay=float(o.weight_decay), mask=decay_mask(params, bool(o.decay_embeddings))))
    parts.append(optax.masked(optax.set_to_zero(), frozen_mask(params)))
    return optax.chain(*parts), sched

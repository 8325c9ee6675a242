"""Acceptance criteria for block drafts: a registry of pure functions with one signature.

  rule(verifier_logits [B, K+1, V], draft_tokens [B, K], draft_probs [B, K, V] or None, rng, options)
      -> (n_accepted [B] in 0..K, next_token [B])

``verifier_logits[:, i]`` is the AR distribution for the position of draft i (i < K) and for the bonus position
(i = K). ``draft_probs`` is None for an argmax ("Dirac") drafter. ``options`` holds temperature / top_k / top_p and
the rule's own knobs. Formulas: docs/tidar_and_samplers.md §4. Adding a criterion is one function plus
``@register("name")``; ``get(name, mix_weight=w)`` wraps any rule in Zyphra's logit mixing
``w * z_AR + (1 - w) * z_diff`` (lossy for w < 1), with z_diff from ``options["diff_logits"]`` [B, K, V] (the
diffusion logits for each draft position: the drafting logits in the K+1 samplers, the first slot of proposal set
i in TiDAR's layout).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from zaya.decode.sampling import probs as filtered_probs

ACCEPTANCE: dict[str, Callable] = {}
LOSSLESS = {"greedy", "rejection", "strict"}  # exact w.r.t. the AR sampler (greedy: at temperature 0)


def register(name: str):
    def deco(fn):
        ACCEPTANCE[name] = fn
        return fn
    return deco


def _p(z, o):
    return filtered_probs(z, o.get("temperature", 0.0), o.get("top_k"), o.get("top_p"))


def _first_failure(acc_BK):
    """Number of leading accepted drafts."""
    return jnp.cumprod(acc_BK.astype(jnp.int32), axis=1).sum(1)


def _at(x_BK, n_B):
    return jnp.take_along_axis(x_BK, n_B[:, None], 1)[:, 0]


def _pick(p_BKV, d_BK):
    return jnp.take_along_axis(p_BKV, d_BK[..., None], -1)[..., 0]


def _sample_rows(key, p_BV):
    """One token per row from probabilities with exact zeros. log(0) is written as -inf explicitly: the old
    log(max(p, 1e-38)) hit a subnormal that XLA:CPU (jax 0.12) turns into NaN under jit, and argmax then chose it."""
    pos = p_BV > 0
    logits = jnp.where(pos, jnp.log(jnp.where(pos, p_BV, 1.0)), -jnp.inf)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@register("greedy")
def greedy(z, d, q, rng, o):
    """Accept while the draft is the verifier's argmax; the next token is the argmax at the first mismatch."""
    top = jnp.argmax(z, -1).astype(jnp.int32)  # [B, K+1]
    n = _first_failure(d == top[:, :-1])
    return n, _at(top, n)


@register("rejection")
def rejection(z, d, q, rng, o):
    """Leviathan/Chen speculative sampling: lossless for any drafter (Dirac when q is None)."""
    B, K = d.shape
    p = _p(z, o)  # [B, K+1, V]
    k_u, k_r = jax.random.split(rng)
    u = jax.random.uniform(k_u, (B, K))
    pd = _pick(p[:, :K], d)
    if q is None:
        acc = u < pd  # strict: u can be exactly 0, and a token with p == 0 must never be accepted
        resid = p[:, :K] * (1.0 - jax.nn.one_hot(d, p.shape[-1]))
    else:
        acc = u * _pick(q, d) < pd
        resid = jnp.maximum(p[:, :K] - q, 0.0)
    n = _first_failure(acc)
    mass = resid.sum(-1, keepdims=True)
    resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p[:, :K])  # p == q: rejection impossible
    dist = jnp.concatenate([resid, p[:, K:]], 1)  # at n == K: the bonus token from p
    return n, _sample_rows(k_r, _at_dist(dist, n))


def _at_dist(p_BKV, n_B):
    return jnp.take_along_axis(p_BKV, n_B[:, None, None], 1)[:, 0]


@register("strict")
def strict(z, d, q, rng, o):
    """Sample y_i ~ p_i; accept while y_i == draft_i; emit y at the first mismatch. Lossless, lower acceptance."""
    p = _p(z, o)
    y = _sample_rows(rng, p.reshape(-1, p.shape[-1])).reshape(p.shape[:2])
    n = _first_failure(y[:, :-1] == d)
    return n, _at(y, n)


@register("typical")
def typical(z, d, q, rng, o):
    """Medusa typical acceptance: p(d) > min(eps, delta * exp(-H(p))). Lossy; recovered token = argmax."""
    eps, delta = o.get("epsilon", 0.09), o.get("delta", 0.3)
    p = _p(z, o) if o.get("temperature", 0.0) > 0 else jax.nn.softmax(z.astype(jnp.float32), -1)
    K = d.shape[1]
    ent = jax.scipy.special.entr(p).sum(-1)  # 0 log 0 = 0 where top-k/top-p removed a token (p log p would be NaN)
    acc = _pick(p[:, :K], d) > jnp.minimum(eps, delta * jnp.exp(-ent[:, :K]))
    n = _first_failure(acc)
    top = jnp.argmax(z, -1).astype(jnp.int32)
    bonus = _sample_rows(rng, p[:, K]) if o.get("temperature", 0.0) > 0 else top[:, K]
    return n, jnp.where(n == K, bonus, _at(top, n))


@register("topk")
def topk(z, d, q, rng, o):
    """Relaxed match: draft in top-k of p and p(d) >= r * max p. Lossy; at a failure, sample from p."""
    k, r = o.get("k", 4), o.get("r", 0.0)
    p = _p(z, o) if o.get("temperature", 0.0) > 0 else jax.nn.softmax(z.astype(jnp.float32), -1)
    K = d.shape[1]
    kth = jax.lax.top_k(p[:, :K], k)[0][..., -1]
    pd = _pick(p[:, :K], d)
    acc = (pd >= kth) & (pd >= r * p[:, :K].max(-1))
    n = _first_failure(acc)
    nxt = _sample_rows(rng, _at_dist(p, n)) if o.get("temperature", 0.0) > 0 else _at(jnp.argmax(z, -1), n)
    return n, nxt.astype(jnp.int32)


@register("tidar_ratio")
def tidar_ratio(z, d, q, rng, o):
    """TiDAR as released: accept while p_T(d)/q(d) >= u with q = softmax of the drafting logits (T=1), no residual.

    The draft logits come from ``options["draft_logits"]``; at a failure the next token is drawn from p.
    """
    K = d.shape[1]
    p = _p(z, o)
    ql = o.get("draft_logits")
    qd = 1.0 if ql is None else _pick(jax.nn.softmax(ql.astype(jnp.float32), -1), d)
    k_u, k_r = jax.random.split(rng)
    u = jax.random.uniform(k_u, d.shape)
    n = _first_failure(_pick(p[:, :K], d) / qd >= u)
    return n, _sample_rows(k_r, _at_dist(p, n))


def mix(rule: Callable, w: float) -> Callable:
    """Logit mixing around any rule: verify against w * z_AR + (1 - w) * z_diff (bonus position: z_AR only)."""
    def mixed(z, d, q, rng, o):
        zd = o["diff_logits"].astype(jnp.float32)
        zm = jnp.concatenate([w * z[:, :-1] + (1.0 - w) * zd, z[:, -1:]], 1)
        return rule(zm, d, q, rng, o)
    mixed.__name__ = f"mix_{w}_{rule.__name__}"
    return mixed


def get(name: str, mix_weight: float | None = None) -> Callable:
    if name not in ACCEPTANCE:
        raise ValueError(f"unknown acceptance {name!r}; registered: {sorted(ACCEPTANCE)}")
    rule = ACCEPTANCE[name]
    return rule if mix_weight is None or mix_weight == 1.0 else mix(rule, mix_weight)


def needs_draft_logits(name: str, mix_weight: float | None) -> bool:
    return name == "tidar_ratio" or (mix_weight is not None and mix_weight != 1.0)

"""Acceptance criteria for block drafts: a registry of pure functions with one signature.

  rule(verifier_logits [B, N+1, V], draft_tokens [B, N], draft_probs [B, N, V] or None, rng, options)
      -> (n_accepted [B] in 0..N, next_token [B])

``verifier_logits[:, i]`` is the AR distribution for the position of draft i (i < N) and for the bonus position
(i = N). ``draft_probs`` is None for an argmax ("Dirac") drafter. ``options`` is a dict of temperature / top_k /
top_p and the rule's own knobs (declared at registration). Formulas: each rule's docstring.

Adding a criterion is one function plus ``@register("name")``. A rule that needs the drafter's logits registers
with ``needs_inputs=True`` and is called with a sixth argument, ``RuleInputs`` (draft_logits: the drafting logits of
each draft; diff_logits: the diffusion logits at each draft position). ``get(name, mix_weight=w)`` wraps any rule in
Zyphra's logit mixing ``w * z_AR + (1 - w) * z_diff`` (lossy for w < 1), with z_diff from ``inputs.diff_logits``
[B, N, V] (the drafting logits in the N+1 samplers, the first slot of proposal set i in TiDAR's layout).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from zaya.decode.sampling import probs as filtered_probs


@struct.dataclass
class RuleInputs:
    """Arrays a rule can ask for (``register(..., needs_inputs=True)``); None where the sampler has none."""
    draft_logits: jnp.ndarray | None = None  # [B, N, V] the drafting logits of each draft (q before temperature)
    diff_logits: jnp.ndarray | None = None   # [B, N, V] diffusion logits at each draft position (logit mixing)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A registered acceptance rule. Compiled decode functions are keyed on this record (its function included),
    so re-registering a name with a new function takes effect in the next ``zaya.generate`` call."""
    name: str
    fn: Callable
    needs_inputs: bool = False  # fn takes a sixth argument, RuleInputs (the samplers keep the drafting logits)
    lossless: bool = False      # exact w.r.t. the AR sampler (greedy acceptance: at temperature 0)
    options: tuple = ()         # (key, type) pairs: the knobs fn reads from its options dict

    def __call__(self, z, d, q, rng, o, inputs: RuleInputs | None = None):
        if self.needs_inputs:
            return self.fn(z, d, q, rng, o, RuleInputs() if inputs is None else inputs)
        return self.fn(z, d, q, rng, o)


ACCEPTANCE: dict[str, Rule] = {}


def register(name: str, *, needs_inputs: bool = False, lossless: bool = False, options: dict | None = None):
    """Decorator: register ``fn`` as acceptance rule ``name`` (replacing any rule of that name)."""
    def deco(fn):
        ACCEPTANCE[name] = Rule(name, fn, needs_inputs, lossless, tuple((options or {}).items()))
        return fn
    return deco


def _p(z, o):
    return filtered_probs(z, o.get("temperature", 0.0), o.get("top_k"), o.get("top_p"))


def _first_failure(acc_BN):
    """Number of leading accepted drafts."""
    return jnp.cumprod(acc_BN.astype(jnp.int32), axis=1).sum(1)


def _at(x_BN, n_B):
    return jnp.take_along_axis(x_BN, n_B[:, None], 1)[:, 0]


def _pick(p_BNV, d_BN):
    return jnp.take_along_axis(p_BNV, d_BN[..., None], -1)[..., 0]


def _sample_rows(key, p_BV):
    """One token per row from probabilities with exact zeros. log(0) is written as -inf explicitly: the old
    log(max(p, 1e-38)) hit a subnormal that XLA:CPU (jax 0.12) turns into NaN under jit, and argmax then chose it."""
    pos = p_BV > 0
    logits = jnp.where(pos, jnp.log(jnp.where(pos, p_BV, 1.0)), -jnp.inf)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@register("greedy", lossless=True)
def greedy(z, d, q, rng, o):
    """Accept while the draft is the verifier's argmax; the next token is the argmax at the first mismatch."""
    top = jnp.argmax(z, -1).astype(jnp.int32)  # [B, N+1]
    n = _first_failure(d == top[:, :-1])
    return n, _at(top, n)


@register("rejection", lossless=True)
def rejection(z, d, q, rng, o):
    """Leviathan/Chen speculative sampling: lossless for any drafter (Dirac when q is None)."""
    B, N = d.shape
    p = _p(z, o)  # [B, N+1, V]
    k_u, k_r = jax.random.split(rng)
    u = jax.random.uniform(k_u, (B, N))
    pd = _pick(p[:, :N], d)
    if q is None:
        acc = u < pd  # strict: u can be exactly 0, and a token with p == 0 must never be accepted
        resid = p[:, :N] * (1.0 - jax.nn.one_hot(d, p.shape[-1]))
    else:
        acc = u * _pick(q, d) < pd
        resid = jnp.maximum(p[:, :N] - q, 0.0)
    n = _first_failure(acc)
    mass = resid.sum(-1, keepdims=True)
    resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p[:, :N])  # p == q: rejection impossible
    dist = jnp.concatenate([resid, p[:, N:]], 1)  # at n == N: the bonus token from p
    return n, _sample_rows(k_r, _at_dist(dist, n))


def _at_dist(p_BNV, n_B):
    return jnp.take_along_axis(p_BNV, n_B[:, None, None], 1)[:, 0]


@register("strict", lossless=True)
def strict(z, d, q, rng, o):
    """Sample y_i ~ p_i; accept while y_i == draft_i; emit y at the first mismatch. Lossless, lower acceptance."""
    p = _p(z, o)
    y = _sample_rows(rng, p.reshape(-1, p.shape[-1])).reshape(p.shape[:2])
    n = _first_failure(y[:, :-1] == d)
    return n, _at(y, n)


@register("typical", options={"epsilon": float, "delta": float})
def typical(z, d, q, rng, o):
    """Medusa typical acceptance: p(d) > min(eps, delta * exp(-H(p))). Lossy; recovered token = argmax."""
    eps, delta = o.get("epsilon", 0.09), o.get("delta", 0.3)
    p = _p(z, o) if o.get("temperature", 0.0) > 0 else jax.nn.softmax(z.astype(jnp.float32), -1)
    N = d.shape[1]
    ent = jax.scipy.special.entr(p).sum(-1)  # 0 log 0 = 0 where top-k/top-p removed a token (p log p would be NaN)
    acc = _pick(p[:, :N], d) > jnp.minimum(eps, delta * jnp.exp(-ent[:, :N]))
    n = _first_failure(acc)
    top = jnp.argmax(z, -1).astype(jnp.int32)
    bonus = _sample_rows(rng, p[:, N]) if o.get("temperature", 0.0) > 0 else top[:, N]
    return n, jnp.where(n == N, bonus, _at(top, n))


@register("topk", options={"k": int, "r": float})
def topk(z, d, q, rng, o):
    """Relaxed match: draft in top-k of p and p(d) >= r * max p. Lossy; at a failure, sample from p."""
    k, r = o.get("k", 4), o.get("r", 0.0)
    p = _p(z, o) if o.get("temperature", 0.0) > 0 else jax.nn.softmax(z.astype(jnp.float32), -1)
    N = d.shape[1]
    kth = jax.lax.top_k(p[:, :N], k)[0][..., -1]
    pd = _pick(p[:, :N], d)
    acc = (pd >= kth) & (pd >= r * p[:, :N].max(-1))
    n = _first_failure(acc)
    nxt = _sample_rows(rng, _at_dist(p, n)) if o.get("temperature", 0.0) > 0 else _at(jnp.argmax(z, -1), n)
    return n, nxt.astype(jnp.int32)


@register("tidar_ratio", needs_inputs=True)
def tidar_ratio(z, d, q, rng, o, inputs: RuleInputs):
    """TiDAR as released: accept while p_T(d)/q(d) >= u with q = softmax of the drafting logits (T=1), no residual.

    The draft logits come from ``inputs.draft_logits`` (None: q = 1); at a failure the next token is drawn from p.
    """
    N = d.shape[1]
    p = _p(z, o)
    ql = inputs.draft_logits
    qd = 1.0 if ql is None else _pick(jax.nn.softmax(ql.astype(jnp.float32), -1), d)
    k_u, k_r = jax.random.split(rng)
    u = jax.random.uniform(k_u, d.shape)
    n = _first_failure(_pick(p[:, :N], d) / qd >= u)
    return n, _sample_rows(k_r, _at_dist(p, n))


@register("synthetic", options={"beta": float})
def synthetic(z, d, q, rng, o):
    """For systems measurement only, lossy by design: each draft is accepted with probability ``beta`` (default
    0.85), i.i.d., whatever the model says, so end-to-end speed is measured at a controlled acceptance with random
    weights and set beside the roofline's i.i.d. bound. The next token is the verifier's at the first rejected
    position (or the bonus): argmax at temperature 0, else sampled from the filtered distribution."""
    beta = float(o.get("beta", 0.85))
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"acceptance 'synthetic': beta must be in [0, 1] (the i.i.d. acceptance probability), "
                         f"got {beta}")
    B, N = d.shape
    k_u, k_r = jax.random.split(rng)
    n = _first_failure(jax.random.uniform(k_u, (B, N)) < beta)
    if o.get("temperature", 0.0) > 0:
        return n, _sample_rows(k_r, _at_dist(_p(z, o), n))
    return n, _at(jnp.argmax(z, -1).astype(jnp.int32), n)


def mix(rule: Rule | Callable, w: float) -> Rule:
    """Logit mixing around any rule: verify against w * z_AR + (1 - w) * z_diff (bonus position: z_AR only)."""
    rule = rule if isinstance(rule, Rule) else Rule(getattr(rule, "__name__", "rule"), rule)

    def mixed(z, d, q, rng, o, inputs):
        if inputs.diff_logits is None:
            raise ValueError(f"mix_weight={w}: logit mixing needs the diffusion logits (RuleInputs.diff_logits)")
        zd = inputs.diff_logits.astype(jnp.float32)
        zm = jnp.concatenate([w * z[:, :-1] + (1.0 - w) * zd, z[:, -1:]], 1)
        return rule(zm, d, q, rng, o, inputs)
    return Rule(f"mix_{w}_{rule.name}", mixed, needs_inputs=True, options=rule.options)


def get(name: str, mix_weight: float | None = None) -> Rule:
    """The registered rule ``name``, wrapped in logit mixing when ``mix_weight`` is given and not 1."""
    if name not in ACCEPTANCE:
        raise ValueError(f"unknown acceptance {name!r}; registered: {sorted(ACCEPTANCE)} "
                         "(add one with @zaya.decode.acceptance.register)")
    return with_mix(ACCEPTANCE[name], mix_weight)


def with_mix(rule: Rule, mix_weight: float | None) -> Rule:
    return rule if mix_weight is None or mix_weight == 1.0 else mix(rule, mix_weight)

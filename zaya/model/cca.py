"""CCA (compressed convolutional attention) projections for one layer.

Given the normed input ``a_BTD`` and the layout's conv predecessors, returns q/k (normalised, temperature-scaled,
rotated), v, and the per-token state the cache keeps: the raw concat(q, k) projection ``xqk`` and the delayed value
projection ``vd``. The two causal convolutions (kernel 2 each, zero-padded once on the left) make the conv output at
token t a function of the raw projections at t, prev1(t), prev2(t) only:

  c1(u)  = w1[0] * x[prev1(u)] + w1[1] * x[u] + b1                 (depthwise)
  out(t) = W2[0] c1(prev1(t)) + W2[1] c1(t) + b2                     (grouped, one group per head)

with x[zero] = 0; c1(prev1(t)) uses prev2(t) as prev1(prev1(t)). This equals HF's padded conv exactly, including
the first conv's bias leaking into the second at position 0.
"""
from __future__ import annotations

import jax.numpy as jnp

from zaya.config import ZayaConfig
from zaya.model.layers import linear, rope
from zaya.layouts import PREV_CACHE, Layout


def _gather_prev(x_BTX, ring_BWX, layout: Layout, dist: int, cache_len):
    """The value at the ``dist``-th conv predecessor of every token: from this chunk, from the cache ring, or 0."""
    idx = layout.prev[..., dist - 1]
    from_chunk = jnp.take_along_axis(x_BTX, jnp.maximum(idx, 0)[..., None], axis=1)
    out = jnp.where((idx >= 0)[..., None], from_chunk, 0)
    if ring_BWX is not None:
        W = ring_BWX.shape[1]
        p = layout.pos - dist
        from_ring = jnp.take_along_axis(ring_BWX, (jnp.maximum(p, 0) % W)[..., None], axis=1).astype(x_BTX.dtype)
        ok = (idx == PREV_CACHE) & (p >= 0) & (p < cache_len[:, None])
        out = jnp.where(ok[..., None], from_ring, out)
    return out


def cca_qkv(p: dict, c: ZayaConfig, a_BTD, layout: Layout, ring=None, cache_len=None):
    """p: one layer's params. ring: (xqk_BWC, vd_BWX) from the cache or None. Returns q, k, v and (xqk, vd)."""
    B, T, _ = a_BTD.shape
    H, K, d, G = c.num_q_heads, c.num_kv_heads, c.head_dim, c.q_per_kv
    q = linear(a_BTD, p["q"])
    k = linear(a_BTD, p["k"])
    xqk = jnp.concatenate([q, k], -1)  # [B, T, C] raw projections: the conv's input and the cache's conv state
    ring_x, ring_v = ring if ring is not None else (None, None)

    # q/k residual: qres[h] = (q[h] + k[h // G]) / 2, kres[j] = mean of qres over group j.
    q4 = q.reshape(B, T, K, G, d).astype(jnp.float32)
    qres = (q4 + k.reshape(B, T, K, 1, d).astype(jnp.float32)) * 0.5
    kres = qres.mean(3)

    # Both convolutions round their operands like the reference's bf16 Conv1d (inputs, weights and the depthwise
    # output in the weight dtype) and accumulate in fp32. Products of two bf16 values are exact in fp32, so fp32
    # arithmetic on the rounded operands is exactly "bf16 operands, fp32 accumulation". The grouped conv is spelled
    # as an fp32 einsum of upcast operands: XLA:CPU rejects this bf16 x bf16 -> fp32 einsum (UNIMPLEMENTED DotThunk),
    # and the fp32 spelling keeps fp32 mode bitwise unchanged.
    x1 = _gather_prev(xqk, ring_x, layout, 1, cache_len).astype(jnp.float32)
    x2 = _gather_prev(xqk, ring_x, layout, 2, cache_len).astype(jnp.float32)
    x0 = xqk.astype(jnp.float32)
    w1, b1 = p["conv1_w"].astype(jnp.float32), p["conv1_b"].astype(jnp.float32)
    rnd = lambda x: x.astype(p["conv2_w"].dtype).astype(jnp.float32)
    c1_cur = rnd(w1[0] * x1 + w1[1] * x0 + b1)
    c1_prev = rnd(w1[0] * x2 + w1[1] * x1 + b1)
    w2 = p["conv2_w"].astype(jnp.float32)
    grp = lambda x: x.reshape(B, T, H + K, d)
    conv = (jnp.einsum("btgi,gio->btgo", grp(c1_prev), w2[0]) + jnp.einsum("btgi,gio->btgo", grp(c1_cur), w2[1])
            ).reshape(B, T, -1) + p["conv2_b"].astype(jnp.float32)
    qc = conv[..., : H * d].reshape(B, T, H, d) + qres.reshape(B, T, H, d)
    kc = conv[..., H * d:].reshape(B, T, K, d) + kres

    # Values: kv-head-major flat concat of the current projection and the previous token's delayed projection.
    vd = linear(a_BTD, p["v_del"])
    vd_prev = _gather_prev(vd, ring_v, layout, 1, cache_len)
    v = jnp.concatenate([linear(a_BTD, p["v_cur"]), vd_prev.astype(vd.dtype)], -1).reshape(B, T, K, d)

    # QK L2 norm to sqrt(d) (clamped like HF 5.x), key temperature, then partial RoPE.
    eps = jnp.finfo(jnp.dtype(c.dtype)).eps
    qn = qc * (d ** 0.5 / jnp.maximum(jnp.linalg.norm(qc, axis=-1, keepdims=True), eps))
    kn = kc * (d ** 0.5 / jnp.maximum(jnp.linalg.norm(kc, axis=-1, keepdims=True), eps))
    kn = kn * p["temp"].astype(jnp.float32)[:, None]
    dt = jnp.dtype(c.dtype)
    qn = rope(qn.astype(dt), layout.pos, c.rope_theta, c.rotary_dim)
    kn = rope(kn.astype(dt), layout.pos, c.rope_theta, c.rotary_dim)
    return qn, kn, v, (xqk, vd)

"""Small shared pieces: RMSNorm, partial NeoX RoPE, ZAYA residual scaling."""
from __future__ import annotations

import jax.numpy as jnp


def rms_norm(x, w, eps):
    """HF ZayaRMSNorm: input cast to the weight dtype, normalised in fp32, cast back, times w (plain w, no 1+w)."""
    xf = x.astype(w.dtype).astype(jnp.float32)
    y = xf * jnp.reciprocal(jnp.sqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps))
    return w * y.astype(w.dtype)


def rope(x_BTNd, pos_BT, theta: float, rot: int):
    """Partial NeoX rotary embedding on the first ``rot`` dims (rotate_half within them), computed in fp32."""
    inv = theta ** (-jnp.arange(0, rot, 2, dtype=jnp.float32) / rot)
    f = pos_BT.astype(jnp.float32)[..., None] * inv  # [B, T, rot/2]
    emb = jnp.concatenate([f, f], -1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xr, xp = x_BTNd[..., :rot].astype(jnp.float32), x_BTNd[..., rot:]
    h = rot // 2
    rotated = jnp.concatenate([-xr[..., h:], xr[..., :h]], -1)
    xr = xr * cos + rotated * sin
    return jnp.concatenate([xr.astype(x_BTNd.dtype), xp], -1)


def residual_scale(out, resid, p):
    """(out + hb) * hs + (resid + rb) * rs, in fp32 (the residual stream is fp32)."""
    f = lambda n: p[n].astype(jnp.float32)
    return (out.astype(jnp.float32) + f("hb")) * f("hs") + (resid + f("rb")) * f("rs")


def linear(x, w):
    """x @ w in the weight dtype with fp32 accumulation, returned in the weight dtype."""
    return jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(w.dtype)

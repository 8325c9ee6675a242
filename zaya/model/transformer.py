"""The ZAYA1 forward pass: embed -> L x (CCA attention, top-1 MoE, residual scaling) -> tied head.

  apply(params, config, tokens_BT, layout, cache=None) -> (logits_BTV fp32, Chunk, stats)
  forward(params, config, tokens_BT, layout, cache=None, n_commit=None) -> (logits_BTV, cache')

``apply`` never writes the cache: it returns the chunk's per-layer states and ``commit`` (zaya.model.cache) appends
the accepted ones, so block samplers keep exactly the accepted tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from zaya.config import ZayaConfig
from zaya.model import attention as attn_lib
from zaya.model.cache import Cache, Chunk, commit, layer_view
from zaya.model.cca import cca_qkv
from zaya.model.layers import linear, residual_scale, rms_norm
from zaya.layouts import Layout
from zaya.model.moe import moe


@dataclasses.dataclass(frozen=True)
class Impl:
    """Implementation choices (static under jit); they never change the math."""
    attention: str = "auto"  # zaya.model.attention.IMPLS; auto: the Pallas kernel for decode on GPU, else XLA
    moe: str = "ragged"  # zaya.model.moe.EXPERT_IMPLS; models for inference default to INFERENCE.moe ("auto")
    remat: bool = False
    # with remat: layers per checkpointed group. > 1 keeps the residual stream at group boundaries only (L / g
    # saved carries instead of L) for one more forward of each group in the backward (two-level checkpointing)
    remat_group: int = 1
    # ZeRO-3 (set by zaya.train.step under shard_map): one layer's params -> the full weights of that layer,
    # called inside the layer scan so only one layer's gathered weights exist at a time (its VJP scatters grads)
    gather_layer: Callable | None = None
    # expert parallelism (set by zaya.train.step under a shard_map manual over this mesh axis): the MoE sends tokens
    # to the devices that own their experts (zaya.model.moe_ep); capacity_factor 0 = dropless
    expert_axis: str | None = None
    capacity_factor: float = 0.0
    ep_transport: str = "all_to_all"  # or "ragged": lax.ragged_all_to_all, routed rows only (dropless; GPU)


# What zaya.Model (zaya.load, decoding, benchmarks) runs unless told otherwise: MoE "auto" (on GPUs the Pallas
# grouped matmul for decode / verify steps, which reads only the routed experts; on CPU ragged, see
# moe_dispatch.auto_choice). Training keeps its config's impl (ragged).
INFERENCE = Impl(moe="auto")

def _layer(c: ZayaConfig, impl: Impl, layout: Layout, cache_len, h_BTD, prev_r, p, cache_l):
    a = rms_norm(h_BTD, p["attn_norm"], c.rms_norm_eps)
    ring = None if cache_l is None else (cache_l[2], cache_l[3])
    q, k, v, (xqk, vd) = cca_qkv(p, c, a, layout, ring, cache_len)
    ck, cv = (None, None) if cache_l is None else (cache_l[0], cache_l[1])
    o = attn_lib.attend(q, k, v, layout, ck, cv, cache_len, impl=impl.attention)
    B, T = h_BTD.shape[:2]
    o = linear(o.reshape(B, T, -1), p["o"])
    h = residual_scale(o, h_BTD, p["attn_res"])
    m = rms_norm(h, p["mlp_norm"], c.rms_norm_eps)
    y, r, stats = moe(p["router"], p["experts"], c, m, prev_r, impl.moe, impl.expert_axis, impl.capacity_factor,
                      impl.ep_transport)
    h = residual_scale(y, h, p["mlp_res"])
    return h, r, (k, v, xqk, vd), stats


def hidden(params, c: ZayaConfig, tokens_BT, layout: Layout, cache: Cache | None = None, impl: Impl = Impl()):
    """Final-normed hidden states [B, T, D], the chunk states and router stats."""
    tokens_BT = jnp.asarray(tokens_BT)
    x = params["embed"][tokens_BT]
    h = ((x + params["in_bias"]) * params["in_scale"]).astype(jnp.float32)
    B, T = tokens_BT.shape
    r0 = jnp.zeros((B, T, c.router_hidden_size), jnp.float32)
    xs_cache, cache_len = layer_view(cache)

    def body(carry, xs):
        h, r = carry
        p, cache_l = xs
        if impl.gather_layer is not None:
            p = impl.gather_layer(p)
        h, r, states, stats = _layer(c, impl, layout, cache_len, h, r, p, cache_l)
        return (h, r), (states, stats)
    xs = (params["layers"], xs_cache)
    g = impl.remat_group if impl.remat else 1
    if impl.remat:
        body = jax.checkpoint(body, prevent_cse=False)
    if g > 1:
        L = c.num_layers
        if L % g:
            raise ValueError(f"remat_group={g} must divide num_layers={L}")
        inner = body

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def body(carry, xs_g):  # one group of g layers: only its input carry is kept for the backward
            return jax.lax.scan(inner, carry, xs_g)
        xs = jax.tree.map(lambda x: x.reshape(L // g, g, *x.shape[1:]), xs)
    (h, _), (states, stats) = jax.lax.scan(body, (h, r0), xs)
    if g > 1:
        states, stats = jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), (states, stats))
    h = rms_norm(h, params["final_norm"], c.rms_norm_eps)
    return h, Chunk(*states), stats


def logits_from_hidden(params, h_BTD):
    e = params["embed"]
    return jnp.einsum("btd,vd->btv", h_BTD.astype(e.dtype), e, preferred_element_type=jnp.float32)


def apply(params, c: ZayaConfig, tokens_BT, layout: Layout, cache: Cache | None = None, impl: Impl = Impl()):
    h, chunk, stats = hidden(params, c, tokens_BT, layout, cache, impl)
    return logits_from_hidden(params, h), chunk, stats


def forward(params, c: ZayaConfig, tokens_BT, layout: Layout, cache: Cache | None = None, n_commit=None,
            impl: Impl = Impl()):
    """Logits and the cache with the first n_commit[b] tokens appended (all T by default; no cache: None)."""
    logits, chunk, _ = apply(params, c, tokens_BT, layout, cache, impl)
    if cache is None:
        return logits, None
    n = tokens_BT.shape[1] if n_commit is None else n_commit
    return logits, commit(cache, chunk, n)

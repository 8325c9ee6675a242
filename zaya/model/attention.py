"""The one attention entry point. Every caller goes through ``attend``; implementations are swappable by name.

  reference  dense mask from the layout, one softmax (tests; small T)
  chunked    flash-style online softmax over key tiles; the mask tile is computed from the layout ids, so memory
             is O(T * tile) per row instead of O(T^2) (training at long context, long prefill); without a cache its
             backward is FlashAttention's (``_flash``: recomputes each tile's scores from the saved log-sum-exp)
  pallas     decode/verify: the cached prefix through the split-K Pallas kernel (``zaya.kernels.decode_attention``,
             Triton lowering: CUDA and ROCm; interpret mode on CPU), the T new tokens with their layout mask in XLA
             (dense, or chunked when T * T is large), merged by log-sum-exp (cascade). It needs a cache: a call
             without one (training, a cache-less forward) raises -- use auto / chunked there; it never falls back
             to XLA for the cache part, and shapes past the kernel's limits (head dim, T*G rows) raise ValueError
  auto       (the default) on a GPU backend (cuda, rocm) pallas when a cache is present and T*G fits the kernel;
             otherwise reference when T * S is small, chunked when large; chosen from static shapes at trace time
  xla        auto without the kernel (zaya.generate on a multi-device mesh: the kernel is not partitioned yet)

Scores are ``q . k * d^-0.5``; q/k arrive already L2-normalised, temperature-scaled and rotated (CCA).
Dtypes (as the HF reference, which runs QK^T and PV in the model dtype with an fp32 softmax): both matmuls take
operands in the dtype of q (bf16 in bf16 mode) and accumulate in fp32; scores, softmax statistics and the running
output stay fp32. In fp32 mode every step is fp32.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from zaya.kernels import platform
from zaya.layouts import Layout, allowed, cache_allowed

_NEG = -1e30
# auto: above this many (query, key) pairs per batch row, the dense path's fp32 scores [B, H, T, S] get big
# (2^22 pairs * 8 heads * 4 B = 128 MiB per row per layer), so chunked takes over. Decode (T small, S = cache
# length) stays on the dense path up to S = 2^22 / T.
AUTO_DENSE_MAX = 1 << 22
IMPLS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        IMPLS[name] = fn
        return fn
    return deco


def attend(q_BTHd, k_BTKd, v_BTKd, layout: Layout, cache_k=None, cache_v=None, cache_len=None, impl="auto"):
    """Attention of T new queries over [cached keys (cache_k [B, S, K, d], valid below cache_len [B]) ; new keys].

    Returns [B, T, H, d] in the dtype of v. Queries that see no key (padding) return zeros.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; registered: {sorted(IMPLS)}")
    return IMPLS[impl](q_BTHd, k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len)


def _sources(k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len):
    """Key sources as (k, v, mask_fn(a, n) -> [B, T, n]): the cache (if any) and the new chunk.

    Kept separate (merged by log-sum-exp) so decoding never copies the cache into a concatenated buffer.
    """
    L = layout
    qi = lambda x: x[:, :, None]

    def chunk_mask(a, n):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, a, n, 1)[:, None, :]
        return allowed(qi(L.pos), qi(L.seg), qi(L.blk), qi(L.ctx), sl(L.pos), sl(L.seg), sl(L.blk), L.block_causal)
    out = [(k_BTKd, v_BTKd, chunk_mask)]
    if cache_k is not None:
        def cache_mask(a, n):
            slot = (a + jnp.arange(n, dtype=jnp.int32))[None, None, :]
            return cache_allowed(qi(L.ctx), qi(L.seg), slot, cache_len[:, None, None])
        out.insert(0, (cache_k, cache_v, cache_mask))
    return out


def _partial(q_BKGTd, k_BSKd, v_BSKd, m_BTS):
    """Unnormalised attention over one key set: (running max, sum of exp, weighted values), fp32.

    Both matmuls take operands in q's dtype with fp32 accumulation; the exp weights are rounded to that dtype only
    as the PV operand (their sum, the normaliser, stays fp32), like the reference's softmax(fp32).to(bf16) @ V.
    """
    dt = q_BKGTd.dtype
    s = jnp.einsum("bkgtd,bskd->bkgts", q_BKGTd, k_BSKd.astype(dt), preferred_element_type=jnp.float32)
    mask = m_BTS[:, None, None]
    s = jnp.where(mask, s, _NEG)
    m = s.max(-1)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(dt), v_BSKd.astype(dt), preferred_element_type=jnp.float32)
    return m, p.sum(-1), pv


def _merge(x, y):
    (m1, l1, a1), (m2, l2, a2) = x, y
    m = jnp.maximum(m1, m2)
    c1, c2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
    return m, l1 * c1 + l2 * c2, a1 * c1[..., None] + a2 * c2[..., None]


def _finish(state, shape, dtype):
    B, T, H, d = shape
    _, l, acc = state
    o = acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows with no visible key give 0
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, H, d).astype(dtype)


def _queries(q_BTHd, K):
    """[B, K, G, T, d] queries times d^-0.5 (scaled in fp32, then back in q's dtype: the matmul operand dtype)."""
    B, T, H, d = q_BTHd.shape
    q = (q_BTHd.reshape(B, T, K, H // K, d).astype(jnp.float32) * (d ** -0.5)).astype(q_BTHd.dtype)
    return jnp.transpose(q, (0, 2, 3, 1, 4))


@register("reference")
def _reference(q_BTHd, k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len):
    q = _queries(q_BTHd, k_BTKd.shape[2])
    state = None
    for k, v, mask in _sources(k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len):
        part = _partial(q, k, v, mask(0, k.shape[1]))
        state = part if state is None else _merge(state, part)
    return _finish(state, q_BTHd.shape, v_BTKd.dtype)


@register("chunked")
def _chunked(q_BTHd, k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len, tile: int = 512):
    q = _queries(q_BTHd, k_BTKd.shape[2])
    if cache_k is None:  # training / cache-less forward: flash-style backward (only O and the log-sum-exp kept)
        o = _flash(q, k_BTKd, v_BTKd, layout, tile)
        B, T, H, d = q_BTHd.shape
        return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, H, d).astype(v_BTKd.dtype)
    state = None
    for k, v, mask in _sources(k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len):
        part = _scan_partial(q, k, v, mask, tile)
        state = part if state is None else _merge(state, part)
    return _finish(state, q_BTHd.shape, v_BTKd.dtype)


def _tiles(k, v, tile):
    S = k.shape[1]
    n = min(tile, S)
    n_tiles = -(-S // n)
    pad = ((0, 0), (0, n_tiles * n - S), (0, 0), (0, 0))
    return jnp.pad(k, pad), jnp.pad(v, pad), n, n_tiles


def _scan_partial(q, k, v, mask, tile):
    """``_partial`` over one key set in tiles of ``tile`` keys (online softmax in a scan; the last tile padded)."""
    S = k.shape[1]
    kp, vp, n, n_tiles = _tiles(k, v, tile)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # backward keeps carries only: O(T * tile) memory
    def step(carry, i):
        a = i * n
        kt = jax.lax.dynamic_slice_in_dim(kp, a, n, 1)
        vt = jax.lax.dynamic_slice_in_dim(vp, a, n, 1)
        return _merge(carry, _partial(q, kt, vt, _tile_mask(mask, a, n, S))), None

    B, K, G, T, d = q.shape
    init = (jnp.full((B, K, G, T), _NEG, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, d), jnp.float32))
    part, _ = jax.lax.scan(step, init, jnp.arange(n_tiles))
    return part


def _flash_fwd(q, k, v, layout, tile):
    """Normalised output [B, K, G, T, d] fp32 and the log-sum-exp [B, K, G, T] of the online softmax over key
    tiles (``_scan_partial``, whose checkpointed step also keeps jax, under an outer remat, from computing every
    tile's mask ahead and keeping them all; nothing per tile is kept: the backward recomputes it)."""
    [(_, _, mask)] = _sources(k, v, layout, None, None, None)
    m, l, acc = _scan_partial(q, k, v, mask, tile)
    seen = l > 0  # rows with no visible key give 0
    o = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, layout, tile):
    return _flash_fwd(q, k, v, layout, tile)[0]


def _flash_vjp_fwd(q, k, v, layout, tile):
    o, lse = _flash_fwd(q, k, v, layout, tile)
    return o, (q, k, v, layout, o, lse)


def _flash_vjp_bwd(tile, res, do):
    """FlashAttention's backward, tile by tile over keys: p = exp(s - lse) recomputed, dV = p^T dO,
    dS = p (dO V^T - rowsum(dO o)), dQ += dS K, dK = dS^T Q; operands in q's dtype, fp32 accumulation. Memory:
    one [T, tile] score block per head, never the [T, S] scores nor a per-tile carry."""
    q, k, v, layout, o, lse = res
    [(_, _, mask)] = _sources(k, v, layout, None, None, None)
    dt, S = q.dtype, k.shape[1]
    kp, vp, n, n_tiles = _tiles(k, v, tile)
    do = do.astype(jnp.float32)
    delta = jnp.sum(do * o, -1)
    do_dt = do.astype(dt)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # as in _scan_partial
    def step(dq, i):
        kt, vt = (jax.lax.dynamic_slice_in_dim(x, i * n, n, 1).astype(dt) for x in (kp, vp))
        m = _tile_mask(mask, i * n, n, S)[:, None, None]
        s = jnp.einsum("bkgtd,bskd->bkgts", q, kt, preferred_element_type=jnp.float32)
        p = jnp.where(m, jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bkgts,bkgtd->bskd", p.astype(dt), do_dt, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgtd,bskd->bkgts", do_dt, vt, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None])).astype(dt)
        dq = dq + jnp.einsum("bkgts,bskd->bkgtd", ds, kt, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgts,bkgtd->bskd", ds, q, preferred_element_type=jnp.float32)
        return dq, (dk, dv)
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), jnp.arange(n_tiles))
    unt = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], n_tiles * n, *x.shape[3:])[:, :S]
    return dq.astype(q.dtype), unt(dk).astype(k.dtype), unt(dv).astype(v.dtype), None


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


@register("pallas")
def _pallas(q_BTHd, k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len):
    """Cascade: the cache through the split-K kernel; the new chunk with its layout mask in XLA (dense ``_partial``,
    or the chunked scan when T * T is large, e.g. a prefill); merged by log-sum-exp."""
    if cache_k is None:
        raise ValueError("attention impl 'pallas' is the decode/verify kernel over a KV cache; this call has no cache "
                         "(training or a cache-less forward): use impl 'auto', 'reference' or 'chunked'")
    from zaya.kernels.decode_attention import cache_attention
    q = _queries(q_BTHd, k_BTKd.shape[2])
    state = cache_attention(q, cache_k, cache_v, cache_len, layout.ctx, layout.seg)
    [(_, _, chunk_mask)] = _sources(k_BTKd, v_BTKd, layout, None, None, None)
    T = k_BTKd.shape[1]
    part = (_partial(q, k_BTKd, v_BTKd, chunk_mask(0, T)) if T * T <= AUTO_DENSE_MAX
            else _scan_partial(q, k_BTKd, v_BTKd, chunk_mask, 512))
    return _finish(_merge(state, part), q_BTHd.shape, v_BTKd.dtype)


def auto_choice(T: int, S: int, cached: bool = False, G: int = 1, d: int = 128) -> str:
    """The impl "auto" runs for T queries (G per kv head, head dim d) over S keys (cache slots + new keys);
    ``cached``: a KV cache is present. GPU backends run decode/verify shapes through the Pallas kernel (within its
    limits); CPU never does (interpret mode is for tests, not speed)."""
    if cached and platform.backend() in ("cuda", "rocm"):
        from zaya.kernels.decode_attention import supports
        if supports(T, G, d):
            return "pallas"
    return "reference" if T * S <= AUTO_DENSE_MAX else "chunked"


def _pick(q_BTHd, k_BTKd, cache_k, kernel: bool) -> str:
    """auto_choice from the call's static shapes; ``kernel=False``: never the Pallas kernel."""
    S = k_BTKd.shape[1] + (0 if cache_k is None else cache_k.shape[1])
    B, T, H, d = q_BTHd.shape
    return auto_choice(T, S, kernel and cache_k is not None, H // k_BTKd.shape[2], d)


@register("auto")
def _auto(q_BTHd, k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len):
    name = _pick(q_BTHd, k_BTKd, cache_k, kernel=True)  # static shapes: decided once per trace
    return IMPLS[name](q_BTHd, k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len)


@register("xla")
def _xla(q_BTHd, k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len):
    """``auto`` without the kernel: what ``zaya.generate`` runs on a multi-device mesh, where XLA's partitioner
    cannot split the kernel's custom call and would gather the whole sharded KV cache onto every device."""
    name = _pick(q_BTHd, k_BTKd, cache_k, kernel=False)
    return IMPLS[name](q_BTHd, k_BTKd, v_BTKd, layout, cache_k, cache_v, cache_len)


def _tile_mask(mask, a, n, S):
    """Mask tile for keys [a, a+n); keys past S (padding of the last tile) are masked out."""
    if S % n == 0:
        return mask(a, n)
    start = jnp.minimum(a, S - n)  # dynamic_slice would clamp; shift the tile back and realign
    m = mask(start, n)
    idx = jnp.clip(jnp.arange(n) + (a - start), 0, n - 1)
    return jnp.take(m, idx, axis=-1) & ((a + jnp.arange(n)) < S)[None, None, :]

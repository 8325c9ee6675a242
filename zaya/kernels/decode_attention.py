"""Split-K flash-decoding over the KV cache: the cached-prefix half of the verify step (attention impl ``pallas``).

What: the T new queries of each row (every decode layout: AR T=1, verify N+1, single_forward, tidar_published ...)
attend to the row's cached prefix ``cache_k/v [B, S, K, d]`` under the layout's cache rule
(``layouts.cache_allowed``: slot < cache_len[b], slot <= ctx[b, t], seg[b, t] >= 0). ``cache_attention`` returns
the unnormalised state ``(m, l, acc)`` of ``attention._partial`` ([B, K, G, T], [B, K, G, T], [B, K, G, T, d], fp32),
so ``attention._merge`` folds in the new-chunk part (T x T, any mask, XLA) by log-sum-exp: cascade attention.

How (one Triton-style source for CUDA and ROCm; ``interpret=True`` on CPU):
  grid (B, K, row tiles, splits). The Q = G*T query rows of kv head k (row r = g*T + t, the [G, T] order of
  ``attention._queries``) are packed into tiles of ``block_q`` rows (a power of two >= 16; padded rows are masked
  and dropped), so GQA heads and all T new tokens share every cache read. Split s of row b takes an equal share of
  the row's *valid* key tiles (bounds computed at run time from cache_len[b]), so a program loops only over tiles
  below cache_len: bytes read follow the valid length, not the capacity S, and ragged rows stay balanced over
  splits; S need not divide into anything. K and V tiles are read straight from the [B, S, K, d] cache (the
  BlockSpec picks row b and kv head k; no transpose or copy); a head dim that is not a power of two is padded to
  ``next_pow2(d)`` by masked loads. Per tile: scores = q k^T with operands in q's dtype and fp32 accumulation, the
  mask, an online softmax in fp32, acc += p v (p rounded to q's dtype as the PV operand, like ``_partial``). Each
  program writes its split's (m, l, acc); ``combine`` merges the splits by log-sum-exp in XLA.

Rows that see no cached key (cache_len 0, padding) give m = -1e30 (``attention._NEG``), l = 0, acc = 0, which
``_merge`` treats as empty (no NaN). fp32 operands use IEEE fp32 dots (``Precision.HIGHEST``; Triton would otherwise
use TF32), matching "in fp32 mode every step is fp32".

Limits (``ValueError`` naming the limit): head dim d <= 256 (MAX_HEAD_DIM: the fp32 accumulator tile lives in
registers); G*T <= 4096 query rows per kv head (MAX_ROWS: every 128-row tile re-reads the cache, so beyond that a
query-tiled prefill kernel is the right tool -- use impl ``auto`` or ``chunked``); block sizes powers of two >= 16.
Triton constraints respected (interpret mode does not enforce them): every loaded/stored block has a power-of-two
shape; dot tiles are >= 16 in M, N and K; no dynamic grid (the split bounds are loop bounds, not grid sizes); all
out-of-range reads are masked with an explicit ``other``; explicit compiler params (``platform.compiler_params``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from zaya.kernels import platform
from zaya.layouts import cache_allowed

NAME = "decode_attention"
MAX_HEAD_DIM = 256
MAX_ROWS = 4096
_NEG = -1e30  # = attention._NEG: the running max of a row that has seen no key


def check_shapes(T: int, G: int, d: int) -> None:
    """ValueError when the kernel cannot take queries of this shape (see the module doc's limits)."""
    platform.check_limit(d <= MAX_HEAD_DIM, NAME, f"head dim {d} > MAX_HEAD_DIM={MAX_HEAD_DIM}",
                         "Use attention impl 'auto' or 'chunked'")
    platform.check_limit(T * G <= MAX_ROWS, NAME,
                         f"T*G = {T}*{G} = {T * G} query rows per kv head > MAX_ROWS={MAX_ROWS} (the kernel is for "
                         f"decode/verify widths; long prefills re-read the cache per row tile)",
                         "Use attention impl 'auto' or 'chunked' for this call")


def supports(T: int, G: int, d: int) -> bool:
    """Whether ``check_shapes`` accepts these queries (what attention impl ``auto`` asks before choosing pallas)."""
    return d <= MAX_HEAD_DIM and T * G <= MAX_ROWS


def device_cores() -> int:
    """Streaming multiprocessors (CUDA) or compute units (ROCm) of the device; 1 in interpret mode."""
    if platform.interpret():
        return 1
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def plan(B: int, K: int, G: int, T: int, d: int, S: int, block_q: int | None = None, block_k: int | None = None,
         splits: int | None = None, num_warps: int | None = None) -> dict:
    """Block sizes, splits and warps for a call (None: the heuristics), checked against the kernel's limits.

    block_q: query rows per program, all Q = G*T rows up to 128 (64 for d > 128, so the fp32 accumulator tile
    [block_q, d] stays in registers). block_k: keys per loop step, 64 (32 for d > 128; less for tiny caches).
    splits: enough that B*K*row_tiles*splits >= ~2x the SM/CU count (long caches, small batches fill the GPU),
    keeping >= 4 key tiles per split of a full cache (short caches: the combine would cost more than it gains).
    """
    check_shapes(T, G, d)
    Q, d_pad = G * T, max(16, platform.next_pow2(d))
    wide = d_pad > 128
    block_q = block_q or min(max(16, platform.next_pow2(Q)), 64 if wide else 128)
    block_k = block_k or min(32 if wide else 64, max(16, platform.next_pow2(S)))
    for name, n in (("block_q", block_q), ("block_k", block_k)):
        platform.check_limit(n >= 16 and n == platform.next_pow2(n), NAME, f"{name}={n} is not a power of two >= 16",
                             "Triton needs power-of-two blocks and dot tiles >= 16")
    row_tiles = -(-Q // block_q)
    if splits is None:
        want = -(-2 * device_cores() // (B * K * row_tiles))
        splits = max(1, min(want, -(-S // (4 * block_k))))
    platform.check_limit(splits >= 1, NAME, f"splits={splits} < 1", "Pass splits >= 1 (or None for the default)")
    num_warps = num_warps or (8 if block_q * d_pad > 64 * 128 else 4)
    return dict(block_q=block_q, block_k=block_k, splits=splits, num_warps=num_warps, row_tiles=row_tiles,
                d_pad=d_pad)


def _kernel(len_ref, ctx_ref, seg_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, T, Q, d, block_k, splits,
            precision):
    """One program: kv head k of batch row b, query rows [i*block_q, (i+1)*block_q), split s of the valid keys."""
    block_q, d_pad = q_ref.shape
    i, s = pl.program_id(2), pl.program_id(3)
    row = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    col_ok = (jnp.arange(d_pad) < d)[None, :]
    q = pltriton.load(q_ref, mask=(row < Q)[:, None] & col_ok, other=0.0)  # [block_q, d_pad], scaled by d^-0.5
    t = row % T  # the token of each row (padded rows: any valid index; they are dropped)
    q_ctx, q_seg = ctx_ref[t][:, None], seg_ref[t][:, None]
    length = len_ref[()]

    n_tiles = pl.cdiv(length, block_k)
    per_split = pl.cdiv(n_tiles, splits)
    lo = s * per_split
    hi = jnp.minimum(lo + per_split, n_tiles)

    def body(j, carry):
        m, l, acc = carry
        slot = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        kv_mask = (slot < length)[:, None] & col_ok
        k = pltriton.load(k_ref.at[pl.ds(j * block_k, block_k), :], mask=kv_mask, other=0.0).astype(q.dtype)
        s_qk = pltriton.dot(q, k, trans_b=True, precision=precision)  # [block_q, block_k] fp32
        vis = cache_allowed(q_ctx, q_seg, slot[None, :], length)
        s_qk = jnp.where(vis, s_qk, _NEG)
        m_new = jnp.maximum(m, s_qk.max(axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(vis, jnp.exp(s_qk - m_new[:, None]), 0.0)
        v = pltriton.load(v_ref.at[pl.ds(j * block_k, block_k), :], mask=kv_mask, other=0.0).astype(q.dtype)
        pv = pltriton.dot(p.astype(q.dtype), v, precision=precision)  # [block_q, d_pad] fp32
        return m_new, l * corr + p.sum(axis=-1), acc * corr[:, None] + pv

    init = (jnp.full((block_q,), _NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, d_pad), jnp.float32))
    m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    m_ref[...] = m
    l_ref[...] = l
    acc_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "splits", "num_warps", "num_stages"))
def split_states(q_BKGTd, cache_k_BSKd, cache_v_BSKd, cache_len_B, ctx_BT, seg_BT, *, block_q=None, block_k=None,
                 splits=None, num_warps=None, num_stages=None):
    """The kernel's per-split states before ``combine``: m, l [B, K, splits, Q] and acc [B, K, splits, Q, d] fp32
    (Q = G*T, row r = g*T + t). Arguments as ``cache_attention``."""
    B, K, G, T, d = q_BKGTd.shape
    S = cache_k_BSKd.shape[1]
    cfg = plan(B, K, G, T, d, S, block_q, block_k, splits, num_warps)
    block_q, block_k, splits, row_tiles, d_pad = (cfg[n] for n in ("block_q", "block_k", "splits", "row_tiles",
                                                                   "d_pad"))
    Q = G * T
    precision = jax.lax.Precision.HIGHEST if q_BKGTd.dtype == jnp.float32 else None

    q_BKQd = q_BKGTd.reshape(B, K, Q, d)  # free: [G, T] rows are contiguous
    length_B = jnp.minimum(cache_len_B.astype(jnp.int32), S)  # a slot >= S is never read, whatever cache_len says
    kernel = functools.partial(_kernel, T=T, Q=Q, d=d, block_k=block_k, splits=splits, precision=precision)
    sq = pl.squeezed
    stats = jax.ShapeDtypeStruct((B, K, splits, row_tiles * block_q), jnp.float32)
    m, l, acc = pl.pallas_call(
        kernel,
        grid=(B, K, row_tiles, splits),
        in_specs=[
            pl.BlockSpec((sq,), lambda b, k, i, s: (b,)),  # cache_len [B] -> scalar
            pl.BlockSpec((sq, T), lambda b, k, i, s: (b, 0)),  # ctx [B, T] -> [T]
            pl.BlockSpec((sq, T), lambda b, k, i, s: (b, 0)),  # seg [B, T] -> [T]
            pl.BlockSpec((sq, sq, block_q, d_pad), lambda b, k, i, s: (b, k, i, 0)),  # q [B, K, Q, d]
            pl.BlockSpec((sq, S, sq, d_pad), lambda b, k, i, s: (b, 0, k, 0)),  # cache_k [B, S, K, d] -> [S, d]
            pl.BlockSpec((sq, S, sq, d_pad), lambda b, k, i, s: (b, 0, k, 0)),  # cache_v
        ],
        out_specs=[
            pl.BlockSpec((sq, sq, sq, block_q), lambda b, k, i, s: (b, k, s, i)),
            pl.BlockSpec((sq, sq, sq, block_q), lambda b, k, i, s: (b, k, s, i)),
            pl.BlockSpec((sq, sq, sq, block_q, d_pad), lambda b, k, i, s: (b, k, s, i, 0)),
        ],
        out_shape=[stats, stats, jax.ShapeDtypeStruct((B, K, splits, row_tiles * block_q, d_pad), jnp.float32)],
        compiler_params=platform.compiler_params(num_warps=cfg["num_warps"], num_stages=num_stages),
        interpret=platform.interpret(),
        name=NAME,
    )(length_B, ctx_BT.astype(jnp.int32), seg_BT.astype(jnp.int32), q_BKQd, cache_k_BSKd, cache_v_BSKd)
    return m[..., :Q], l[..., :Q], acc[..., :Q, :d]


def combine(m_BKsQ, l_BKsQ, acc_BKsQd):
    """Merge the splits (axis 2) by log-sum-exp: (m, l, acc) over all keys, [B, K, Q] and [B, K, Q, d]."""
    m = m_BKsQ.max(axis=2)
    c = jnp.exp(m_BKsQ - m[:, :, None])  # empty splits (m = -1e30, l = 0) weigh 0, or 1 when all are empty
    return m, (l_BKsQ * c).sum(axis=2), (acc_BKsQd * c[..., None]).sum(axis=2)


def cache_attention(q_BKGTd, cache_k_BSKd, cache_v_BSKd, cache_len_B, ctx_BT, seg_BT, **blocks):
    """Unnormalised attention of the queries over the cached prefix: (m, l, acc) like ``attention._partial``.

    q_BKGTd: queries already scaled by d^-0.5 (``attention._queries``), in the matmul operand dtype.
    cache_k/v [B, S, K, d] (any S), cache_len [B], ctx / seg [B, T] from the layout. ``blocks``: block_q, block_k,
    splits, num_warps, num_stages (None: the heuristics above). Returns m, l [B, K, G, T] and acc [B, K, G, T, d].
    """
    B, K, G, T, d = q_BKGTd.shape
    m, l, acc = combine(*split_states(q_BKGTd, cache_k_BSKd, cache_v_BSKd, cache_len_B, ctx_BT, seg_BT, **blocks))
    return m.reshape(B, K, G, T), l.reshape(B, K, G, T), acc.reshape(B, K, G, T, d)

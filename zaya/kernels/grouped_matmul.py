"""Grouped (per-expert) matmul over row tiles sorted by expert: a Pallas kernel, Triton lowering (CUDA and ROCm).

  y[tile t] = x[tile t] @ w[tile_expert[t]]      x [Z, D], w [E, D, O], tile_expert [n_tiles], y [Z, O] fp32

The rows come from ``zaya.model.moe_dispatch.tile_plan``: tokens sorted by expert, each expert's group padded with
zero rows to a multiple of U = Z / n_tiles, so every tile belongs to one expert. Tiles with expert -1 (past the used
ones: the grid is sized for the worst routing, since Triton has no dynamic grid) read no weights and store zeros.

Grid (n_tiles, O / block_n); program (t, j) loops over D in block_k chunks, reads its expert's weight tile
w[e, :, j*block_n : (j+1)*block_n] once and multiplies all U rows of the tile into an fp32 accumulator. Tiles vary
fastest in the grid, so the tiles of one expert (adjacent) run together and share that weight tile through L2:
a decode / verify step reads each routed expert's weights about once (memory-bound, as those shapes are).

Limits (Triton: power-of-two blocks, dot tiles >= 16 in M, N and K; checked with a ValueError naming the limit):
U is a power of two >= 16; D and O are multiples of 16 (blocks are the largest powers of two <= block_k / block_n
that divide them). Forward only: ``zaya.model.moe_dispatch.experts_pallas`` supplies the gradient (custom_vjp).
On CPU it runs in interpret mode (``platform.interpret()``), for tests; the numbers there are not speed.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from zaya.kernels import platform

NAME = "grouped_matmul"
TILE_MIN, TILE_MAX = 16, 64  # rows per tile: Triton's dot minimum; 64 keeps the fp32 accumulator in registers


def tile_rows(n_tokens: int, num_experts: int) -> int:
    """U: the power of two covering an expert's usual load (mean + one Poisson std, as the ``sorted`` impl), within
    [TILE_MIN, TILE_MAX]. A heuristic from the CPU study; the GPU optimum is for the GPU check to measure."""
    mean = n_tokens / num_experts
    return min(max(platform.next_pow2(math.ceil(mean + math.sqrt(mean))), TILE_MIN), TILE_MAX)


def _block(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n (0 when even 16 does not divide n)."""
    b = cap
    while b >= 16 and n % b:
        b //= 2
    return b if b >= 16 else 0


def _kernel(tile_expert_ref, x_ref, w_ref, o_ref, *, block_k: int, n_k: int, precision):
    e = tile_expert_ref[pl.program_id(0)]

    @pl.when(e >= 0)
    def _():
        def body(i, acc):
            x_blk = x_ref[:, pl.ds(i * block_k, block_k)]
            w_blk = w_ref[e, pl.ds(i * block_k, block_k), :]
            return acc + jnp.dot(x_blk, w_blk, preferred_element_type=jnp.float32, precision=precision)
        acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(e < 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def grouped_matmul(x_ZD, w_EDO, tile_expert, *, block_n: int = 64, block_k: int = 64, num_warps: int = 4,
                   num_stages: int | None = None, interpret: bool | None = None):
    """y [Z, O] fp32 = per-tile x @ w[tile_expert] (see the module docstring). Forward only.

    ``interpret`` defaults to ``platform.interpret()`` (True on CPU); False on a CPU host is only useful to lower
    for a GPU platform (``jax.export`` with platforms=["cuda"]), which checks the Triton lowering without a GPU.
    """
    interpret = platform.interpret() if interpret is None else interpret
    n_tiles = tile_expert.shape[0]
    Z, D = x_ZD.shape
    E, D_w, O = w_EDO.shape
    platform.check_limit(D == D_w and Z % n_tiles == 0, NAME, f"x {x_ZD.shape} and w {w_EDO.shape} with "
                         f"{n_tiles} tiles do not fit", "pass rows = n_tiles * U and w of shape [E, D, O]")
    U = Z // n_tiles
    platform.check_limit(U >= 16 and U == platform.next_pow2(U), NAME, f"{U} rows per tile",
                         "Triton needs a power of two >= 16 (use grouped_matmul.tile_rows)")
    bk, bn = _block(D, block_k), _block(O, block_n)
    platform.check_limit(bk > 0 and bn > 0, NAME, f"D={D}, O={O} not multiples of 16",
                         "Triton dot tiles need multiples of 16 (use the 'sorted' or 'ragged' MoE impl)")
    platform.check_limit(x_ZD.dtype == w_EDO.dtype, NAME, f"x {x_ZD.dtype} and w {w_EDO.dtype} differ",
                         "cast x to the weight dtype")
    # fp32 weights: true fp32 products (Triton's default for fp32 is TF32), as every fp32 matmul of the model
    precision = jax.lax.Precision.HIGHEST if x_ZD.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, block_k=bk, n_k=D // bk, precision=precision)
    return pl.pallas_call(
        kernel,
        grid=(n_tiles, O // bn),
        in_specs=[pl.BlockSpec((n_tiles,), lambda t, j: (0,)),
                  pl.BlockSpec((U, D), lambda t, j: (t, 0)),
                  pl.BlockSpec((E, D, bn), lambda t, j: (0, 0, j))],
        out_specs=pl.BlockSpec((U, bn), lambda t, j: (t, j)),
        out_shape=jax.ShapeDtypeStruct((Z, O), jnp.float32),
        interpret=interpret,
        compiler_params=None if interpret else platform.compiler_params(num_warps, num_stages),
        name=NAME,
    )(tile_expert.astype(jnp.int32), x_ZD, w_EDO)


def reference(x_ZD, w_EDO, tile_expert):
    """Pure-jnp reference of ``grouped_matmul`` (tests)."""
    n_tiles = tile_expert.shape[0]
    Z, D = x_ZD.shape
    x_tiles = x_ZD.reshape(n_tiles, Z // n_tiles, D)
    w_tiles = w_EDO[jnp.maximum(tile_expert, 0)]
    y_tiles = jnp.einsum("tmd,tdk->tmk", x_tiles, w_tiles, preferred_element_type=jnp.float32)
    return jnp.where((tile_expert >= 0)[:, None, None], y_tiles, 0.0).reshape(Z, w_EDO.shape[-1])

"""Routed-only expert dispatch for the MoE: each token meets only the expert it is routed to.

Why: ``jax.lax.ragged_dot`` lowers to a dense all-experts dot on XLA:CPU, so there every token pays for every
expert and a 1-token decode step reads all E experts' weights. The paths here do routed work only, on any backend:

  gather   per-token matvecs on the routed expert's gathered weights ([N, D, 2F] materialised): reads N experts'
           weights, so it suits decode steps with a handful of tokens.
  sorted   tokens sorted by expert into row tiles of M rows, each tile owned by one expert (``tile_plan``); a
           ``lax.scan`` over the tiles multiplies each tile by its expert's weights (``tile_matmul``, sliced inside
           the loop, never materialised per tile); tiles past the used ones are skipped by ``lax.cond``.
  pallas   the same tiles through the Pallas grouped-matmul kernel (``zaya.kernels.grouped_matmul``) for GPU decode
           and verify shapes; its gradient comes from ``jax.custom_vjp`` (see ``experts_pallas``).

Shape letters local to this module and the kernel (zaya.conventions gives N, M, R, K other meanings in the model):
N = B*T tokens, M rows per tile, R = n_tiles * M padded rows, K output columns (2F for the up, D for the down
matmul); per-tile arrays (length n_tiles) carry no suffix.

All have the dense reference's math (``zaya.model.moe.experts_dense``): operands in the weight dtype, fp32
accumulation, the first matmul's output rounded to the weight dtype before SwiGLU, the gate applied in fp32; the
skip class (e* == E) outputs 0 and is multiplied by no expert. ``auto_choice`` picks among these and ``ragged``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# gather: refuse inputs whose gathered weights ([B*T, D, 2F] + [B*T, F, D]) would exceed this.
GATHER_MAX_BYTES = 4 << 30
# auto on GPU: up to this many tokens (decode / verify steps) use the Pallas kernel, which is memory-bound on the
# routed experts' weights; longer inputs (prefill, training) use XLA's grouped ragged_dot.
GPU_PALLAS_MAX = 512
# sorted: rows per tile (see sorted_tile_rows; measured in experiments/results/moe_cpu.md).
SORTED_TILE_MIN, SORTED_TILE_MAX = 8, 128


def auto_choice(backend: str, n_tokens: int, num_experts: int) -> str:
    """The MoE impl ``auto`` runs for ``n_tokens`` = B*T tokens (static) on ``backend`` ('cpu', 'cuda', 'rocm').

      cpu        sorted at every size (ragged_dot is dense there; gather, which materialises the gathered
                 weights, measured no faster even at 1 token: experiments/results/moe_cpu.md)
      cuda/rocm  pallas when n_tokens <= GPU_PALLAS_MAX (decode, verify), else ragged (prefill, training)

    ``num_experts`` is part of the signature so a rule may depend on it; the current rules do not.
    """
    del num_experts
    if backend == "cpu":
        return "sorted"
    if backend in ("cuda", "rocm"):
        return "pallas" if n_tokens <= GPU_PALLAS_MAX else "ragged"
    raise ValueError(f"auto_choice: no MoE rule for backend {backend!r} (known: cpu, cuda, rocm)")


def swiglu(h, F):
    return jax.nn.silu(h[..., :F]) * h[..., F:]


def routed_tokens(m_BTD, choice_BT, gate_BT, E: int, dtype):
    """Flattened tokens: x [N, D] in the weight dtype, expert [N] in 0..E (E = skip), gate [N] fp32 (0 for skip)."""
    B, T, D = m_BTD.shape
    e_N = choice_BT.reshape(B * T).astype(jnp.int32)
    g_N = jnp.where(e_N == E, 0.0, gate_BT.reshape(B * T).astype(jnp.float32))
    return m_BTD.reshape(B * T, D).astype(dtype), e_N, g_N


# ----------------------------------------------------------------------------------------------------------------
# gather

def experts_gather(p: dict, c, m_BTD, choice_BT, gate_BT):
    """Per-token matvecs on each token's gathered expert weights (skip tokens use expert 0 with gate 0).

    Materialises B*T experts' weights, so it refuses inputs whose gathered weights exceed GATHER_MAX_BYTES.
    """
    B, T, D = m_BTD.shape
    E, F = c.num_experts, c.moe_intermediate_size
    w_up_EDK, w_down_EFD = p["gate_up"], p["down"]
    gathered = B * T * (w_up_EDK[0].size + w_down_EFD[0].size) * w_up_EDK.dtype.itemsize
    if gathered > GATHER_MAX_BYTES:
        raise ValueError(f"MoE impl gather: {B * T} tokens would gather {gathered / 2**30:.1f} GiB of expert weights "
                         f"(limit GATHER_MAX_BYTES = {GATHER_MAX_BYTES / 2**30:.0f} GiB); use 'sorted' or 'auto'")
    x_ND, e_N, g_N = routed_tokens(m_BTD, choice_BT, gate_BT, E, w_up_EDK.dtype)
    e_N = jnp.where(e_N == E, 0, e_N)
    h_NK = jnp.einsum("nd,ndk->nk", x_ND, w_up_EDK[e_N], preferred_element_type=jnp.float32).astype(w_up_EDK.dtype)
    y_ND = jnp.einsum("nf,nfd->nd", swiglu(h_NK, F), w_down_EFD[e_N], preferred_element_type=jnp.float32)
    return (y_ND * g_N[:, None]).reshape(B, T, D)


# ----------------------------------------------------------------------------------------------------------------
# sorted tiles (shared by ``sorted`` and ``pallas``)

class TilePlan(NamedTuple):
    """Where each token goes when tokens are sorted by expert into tiles of M rows (R = n_tiles * M rows).

    row_token_R     token feeding each row; N for padding rows (read as zeros)
    tile_expert   expert owning each tile; -1 for the tiles past the used ones (skipped, output unspecified)
    token_row_N     row holding each token's output; R for skip-class tokens (read as zeros)
    """
    row_token_R: jax.Array
    tile_expert: jax.Array
    token_row_N: jax.Array


def num_tiles(n_tokens: int, num_experts: int, tile_rows: int) -> int:
    """Static tile count that holds any routing: sum_e ceil(n_e / M) <= ceil(N / M) + E - 1."""
    return -(-n_tokens // tile_rows) + num_experts - 1


def sorted_tile_rows(n_tokens: int, num_experts: int) -> int:
    """M for ``sorted``: a power of two covering an expert's usual load (mean + one Poisson std, so most experts
    fit one tile and read their weights once), within [SORTED_TILE_MIN, SORTED_TILE_MAX] (few tokens: padding
    rows are nearly free next to the weight read; many: 128-row tiles are efficient matmuls, padding <= E * M)."""
    from zaya.kernels.platform import next_pow2
    mean = n_tokens / num_experts
    return min(max(next_pow2(math.ceil(mean + math.sqrt(mean))), SORTED_TILE_MIN), SORTED_TILE_MAX)


def tile_plan(e_N, num_experts: int, tile_rows: int) -> TilePlan:
    """Sort tokens by expert (stable), pad each expert's group to a multiple of ``tile_rows``; skip tokens drop out."""
    E, M = num_experts, tile_rows
    N = e_N.shape[0]
    n_tiles = num_tiles(N, E, M)
    R = n_tiles * M
    order_N = jnp.argsort(e_N, stable=True)  # sorted position -> token; skip tokens (E) sort last
    sizes_E = jnp.bincount(e_N, length=E + 1)[:E].astype(jnp.int32)
    tok_start_E = jnp.cumsum(sizes_E) - sizes_E  # first sorted position of each expert
    tiles_E = (sizes_E + M - 1) // M
    tile_end_E = jnp.cumsum(tiles_E)
    row_start_E = (tile_end_E - tiles_E) * M  # first padded row of each expert
    owner_tile = jnp.searchsorted(tile_end_E, jnp.arange(n_tiles, dtype=jnp.int32), side="right").astype(jnp.int32)
    tile_expert = jnp.where(owner_tile < E, owner_tile, -1)

    r_R = jnp.arange(R, dtype=jnp.int32)
    owner_R = owner_tile[r_R // M]
    e_R = jnp.minimum(owner_R, E - 1)
    k_R = r_R - row_start_E[e_R]  # row within the expert's padded group
    real_R = (owner_R < E) & (k_R < sizes_E[e_R])
    row_token_R = jnp.where(real_R, order_N[jnp.clip(tok_start_E[e_R] + k_R, 0, N - 1)], N)

    pos_N = jnp.zeros(N, jnp.int32).at[order_N].set(jnp.arange(N, dtype=jnp.int32))  # token -> sorted position
    e_c = jnp.minimum(e_N, E - 1)
    token_row_N = jnp.where(e_N < E, row_start_E[e_c] + pos_N - tok_start_E[e_c], R)
    return TilePlan(row_token_R.astype(jnp.int32), tile_expert, token_row_N.astype(jnp.int32))


def _tile_dot(x_MD, w_DK):
    return jnp.dot(x_MD, w_DK, preferred_element_type=jnp.float32)


def _tile_matmul_fwd_impl(x_RD, w_EDK, tile_expert):
    n_tiles = tile_expert.shape[0]
    R, D = x_RD.shape
    M, K = R // n_tiles, w_EDK.shape[-1]

    def step(_, xs):
        x_MD, e = xs
        y_MK = jax.lax.cond(e >= 0, lambda: _tile_dot(x_MD, jax.lax.dynamic_index_in_dim(w_EDK, e, 0, False)),
                            lambda: jnp.zeros((M, K), jnp.float32))
        return None, y_MK
    _, y_tiles = jax.lax.scan(step, None, (x_RD.reshape(n_tiles, M, D), tile_expert))
    return y_tiles.reshape(R, K)


@jax.custom_vjp
def tile_matmul(x_RD, w_EDK, tile_expert):
    """y[tile t] = x[tile t] @ w[tile_expert[t]] in fp32 (tiles with expert -1 give 0), one tile per scan step.

    custom_vjp because autodiff of the scan would accumulate the weight cotangent as a full [E, D, K] zeros-plus-
    update per tile; the backward here adds each tile's [D, K] into an fp32 carry in place (dynamic_update_slice).
    """
    return _tile_matmul_fwd_impl(x_RD, w_EDK, tile_expert)


def _tile_matmul_fwd(x_RD, w_EDK, tile_expert):
    return _tile_matmul_fwd_impl(x_RD, w_EDK, tile_expert), (x_RD, w_EDK, tile_expert)


def _tile_matmul_bwd(res, dy_RK):
    x_RD, w_EDK, tile_expert = res
    n_tiles = tile_expert.shape[0]
    (R, D), (E, _, K) = x_RD.shape, w_EDK.shape
    M = R // n_tiles

    def step(dw_EDK, xs):
        x_MD, dy_MK, e = xs
        e0 = jnp.maximum(e, 0)

        def used():
            _, vjp = jax.vjp(_tile_dot, x_MD, jax.lax.dynamic_index_in_dim(w_EDK, e0, 0, False))
            dx_MD, dw_DK = vjp(dy_MK)
            return dx_MD, dw_DK.astype(jnp.float32)
        dx_MD, dw_DK = jax.lax.cond(e >= 0, used, lambda: (jnp.zeros_like(x_MD), jnp.zeros((D, K), jnp.float32)))
        acc_DK = jax.lax.dynamic_index_in_dim(dw_EDK, e0, 0, False) + dw_DK
        return jax.lax.dynamic_update_index_in_dim(dw_EDK, acc_DK, e0, 0), dx_MD
    dw_EDK, dx_tiles = jax.lax.scan(step, jnp.zeros((E, D, K), jnp.float32),
                                  (x_RD.reshape(n_tiles, M, D), dy_RK.reshape(n_tiles, M, K), tile_expert))
    return dx_tiles.reshape(R, D), dw_EDK.astype(w_EDK.dtype), None


tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)


def run_tiles(matmul, p: dict, c, m_BTD, choice_BT, gate_BT, tile_rows: int):
    """The expert block over tiles: plan, gather rows, up matmul, SwiGLU, down matmul, un-permute, gate.

    ``matmul(x_RD, w_EDK, tile_expert) -> y_RK fp32`` is ``tile_matmul`` (sorted) or the Pallas kernel.
    """
    B, T, D = m_BTD.shape
    E, F = c.num_experts, c.moe_intermediate_size
    w_up_EDK, w_down_EFD = p["gate_up"], p["down"]
    x_ND, e_N, g_N = routed_tokens(m_BTD, choice_BT, gate_BT, E, w_up_EDK.dtype)
    plan = tile_plan(e_N, E, tile_rows)
    x_RD = jnp.take(x_ND, plan.row_token_R, axis=0, mode="fill", fill_value=0)
    h_RK = matmul(x_RD, w_up_EDK, plan.tile_expert).astype(w_up_EDK.dtype)
    y_RD = matmul(swiglu(h_RK, F), w_down_EFD, plan.tile_expert)
    y_ND = jnp.take(y_RD, plan.token_row_N, axis=0, mode="fill", fill_value=0)
    return (y_ND * g_N[:, None]).reshape(B, T, D)


def experts_sorted(p: dict, c, m_BTD, choice_BT, gate_BT):
    """Sorted tiles through ``tile_matmul`` (XLA; any backend). Tile rows from ``sorted_tile_rows``."""
    B, T, _ = m_BTD.shape
    M = sorted_tile_rows(B * T, c.num_experts)
    return run_tiles(tile_matmul, p, c, m_BTD, choice_BT, gate_BT, M)


# ----------------------------------------------------------------------------------------------------------------
# pallas

def experts_pallas(p: dict, c, m_BTD, choice_BT, gate_BT, backward_impl=None):
    """Sorted tiles through the Pallas grouped-matmul kernel (forward only), differentiable via jax.custom_vjp.

    The backward recomputes the block with ``backward_impl`` (default: ``ragged`` on GPU, where ragged_dot is
    grouped, ``sorted`` elsewhere) and returns that impl's gradients, which equal the dense reference's: training
    through it pays one extra XLA forward of the block (the kernel is meant for decode / verify steps).
    """
    from zaya.kernels import grouped_matmul as gmm
    from zaya.kernels.platform import backend
    if backward_impl is None:
        from zaya.model.moe import experts_ragged
        backward_impl = experts_ragged if backend() in ("cuda", "rocm") else experts_sorted
    B, T, _ = m_BTD.shape
    M = gmm.tile_rows(B * T, c.num_experts)

    @jax.custom_vjp
    def block(p, m_BTD, gate_BT, choice_BT):
        return run_tiles(gmm.grouped_matmul, p, c, m_BTD, choice_BT, gate_BT, M)

    def fwd(p, m_BTD, gate_BT, choice_BT):
        return block(p, m_BTD, gate_BT, choice_BT), (p, m_BTD, gate_BT, choice_BT)

    def bwd(res, dy_BTD):
        p, m_BTD, gate_BT, choice_BT = res
        _, vjp = jax.vjp(lambda p, m, g: backward_impl(p, c, m, choice_BT, g), p, m_BTD, gate_BT)
        return (*vjp(dy_BTD), None)
    block.defvjp(fwd, bwd)
    return block(p, m_BTD, gate_BT, choice_BT)

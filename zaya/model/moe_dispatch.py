"""Routed-only expert dispatch for the MoE: each token meets only the expert it is routed to.

Why: ``jax.lax.ragged_dot`` lowers to a dense all-experts dot on XLA:CPU, so there every token pays for every
expert and a 1-token decode step reads all E experts' weights. The paths here do routed work only, on any backend:

  gather   per-token matvecs on the routed expert's gathered weights ([A, D, 2F] materialised): reads A experts'
           weights, so it suits decode steps with a handful of tokens.
  sorted   tokens sorted by expert into row tiles of U rows, each tile owned by one expert (``tile_plan``); a
           ``lax.scan`` over the tiles multiplies each tile by its expert's weights (``tile_matmul``, sliced inside
           the loop, never materialised per tile); tiles past the used ones are skipped by ``lax.cond``.
  pallas   the same tiles through the Pallas grouped-matmul kernel (``zaya.kernels.grouped_matmul``) for GPU decode
           and verify shapes; its gradient comes from ``jax.custom_vjp`` (see ``experts_pallas``).

Shape letters (``zaya.conventions``): A = B*T routed tokens, Z = n_tiles * U expert-sorted rows (padding included),
U rows per tile, O output columns (2F for the up, D for the down matmul); per-tile arrays (length n_tiles) carry no
suffix.

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

      cpu        ragged (XLA lowers ragged_dot to a dense all-experts dot there). ``sorted`` does routed work
                 only and measured 4-40x faster on CPU (experiments/results/moe_cpu.md), but two full-suite runs
                 (this project's CI and a local run) died of SIGSEGV inside XLA:CPU while compiling or running
                 programs through it, never reproduced alone: it stays opt-in (``Impl(moe="sorted")``) on CPU
                 until that is understood. CPU is the test platform; speed is claimed on GPUs.
      cuda/rocm  pallas when n_tokens <= GPU_PALLAS_MAX (decode, verify), else ragged (prefill, training)

    ``num_experts`` is part of the signature so a rule may depend on it; the current rules do not.
    """
    del num_experts
    if backend == "cpu":
        return "ragged"
    if backend in ("cuda", "rocm"):
        return "pallas" if n_tokens <= GPU_PALLAS_MAX else "ragged"
    raise ValueError(f"auto_choice: no MoE rule for backend {backend!r} (known: cpu, cuda, rocm)")


def swiglu(h, F):
    return jax.nn.silu(h[..., :F]) * h[..., F:]


def routed_tokens(m_BTD, choice_BT, gate_BT, E: int, dtype):
    """Flattened tokens: x [A, D] in the weight dtype, expert [A] in 0..E (E = skip), gate [A] fp32 (0 for skip)."""
    B, T, D = m_BTD.shape
    e_A = choice_BT.reshape(B * T).astype(jnp.int32)
    g_A = jnp.where(e_A == E, 0.0, gate_BT.reshape(B * T).astype(jnp.float32))
    return m_BTD.reshape(B * T, D).astype(dtype), e_A, g_A


# ----------------------------------------------------------------------------------------------------------------
# gather

def experts_gather(p: dict, c, m_BTD, choice_BT, gate_BT):
    """Per-token matvecs on each token's gathered expert weights (skip tokens use expert 0 with gate 0).

    Materialises B*T experts' weights, so it refuses inputs whose gathered weights exceed GATHER_MAX_BYTES.
    """
    B, T, D = m_BTD.shape
    E, F = c.num_experts, c.moe_intermediate_size
    w_up_EDO, w_down_EFD = p["gate_up"], p["down"]
    gathered = B * T * (w_up_EDO[0].size + w_down_EFD[0].size) * w_up_EDO.dtype.itemsize
    if gathered > GATHER_MAX_BYTES:
        raise ValueError(f"MoE impl gather: {B * T} tokens would gather {gathered / 2**30:.1f} GiB of expert weights "
                         f"(limit GATHER_MAX_BYTES = {GATHER_MAX_BYTES / 2**30:.0f} GiB); use 'sorted' or 'auto'")
    x_AD, e_A, g_A = routed_tokens(m_BTD, choice_BT, gate_BT, E, w_up_EDO.dtype)
    e_A = jnp.where(e_A == E, 0, e_A)
    h_AO = jnp.einsum("nd,ndk->nk", x_AD, w_up_EDO[e_A], preferred_element_type=jnp.float32).astype(w_up_EDO.dtype)
    y_AD = jnp.einsum("nf,nfd->nd", swiglu(h_AO, F), w_down_EFD[e_A], preferred_element_type=jnp.float32)
    return (y_AD * g_A[:, None]).reshape(B, T, D)


# ----------------------------------------------------------------------------------------------------------------
# sorted tiles (shared by ``sorted`` and ``pallas``)

class TilePlan(NamedTuple):
    """Where each token goes when tokens are sorted by expert into tiles of U rows (Z = n_tiles * U rows).

    row_token_Z   token feeding each row; A for padding rows (read as zeros)
    tile_expert   expert owning each tile; -1 for the tiles past the used ones (skipped, output unspecified)
    token_row_A   row holding each token's output; Z for skip-class tokens (read as zeros)
    """
    row_token_Z: jax.Array
    tile_expert: jax.Array
    token_row_A: jax.Array


def num_tiles(n_tokens: int, num_experts: int, tile_rows: int) -> int:
    """Static tile count that holds any routing: sum_e ceil(n_e / U) <= ceil(A / U) + E - 1."""
    return -(-n_tokens // tile_rows) + num_experts - 1


def sorted_tile_rows(n_tokens: int, num_experts: int) -> int:
    """U for ``sorted``: a power of two covering an expert's usual load (mean + one Poisson std, so most experts
    fit one tile and read their weights once), within [SORTED_TILE_MIN, SORTED_TILE_MAX] (few tokens: padding
    rows are nearly free next to the weight read; many: 128-row tiles are efficient matmuls, padding <= E * U)."""
    from zaya.kernels.platform import next_pow2
    mean = n_tokens / num_experts
    return min(max(next_pow2(math.ceil(mean + math.sqrt(mean))), SORTED_TILE_MIN), SORTED_TILE_MAX)


def tile_plan(e_A, num_experts: int, tile_rows: int) -> TilePlan:
    """Sort tokens by expert (stable), pad each expert's group to a multiple of ``tile_rows``; skip tokens drop out."""
    E, U = num_experts, tile_rows
    A = e_A.shape[0]
    n_tiles = num_tiles(A, E, U)
    Z = n_tiles * U
    order_A = jnp.argsort(e_A, stable=True)  # sorted position -> token; skip tokens (E) sort last
    sizes_E = jnp.bincount(e_A, length=E + 1)[:E].astype(jnp.int32)
    tok_start_E = jnp.cumsum(sizes_E) - sizes_E  # first sorted position of each expert
    tiles_E = (sizes_E + U - 1) // U
    tile_end_E = jnp.cumsum(tiles_E)
    row_start_E = (tile_end_E - tiles_E) * U  # first padded row of each expert
    owner_tile = jnp.searchsorted(tile_end_E, jnp.arange(n_tiles, dtype=jnp.int32), side="right").astype(jnp.int32)
    tile_expert = jnp.where(owner_tile < E, owner_tile, -1)

    r_Z = jnp.arange(Z, dtype=jnp.int32)
    owner_Z = owner_tile[r_Z // U]
    e_Z = jnp.minimum(owner_Z, E - 1)
    k_Z = r_Z - row_start_E[e_Z]  # row within the expert's padded group
    real_Z = (owner_Z < E) & (k_Z < sizes_E[e_Z])
    row_token_Z = jnp.where(real_Z, order_A[jnp.clip(tok_start_E[e_Z] + k_Z, 0, A - 1)], A)

    pos_A = jnp.zeros(A, jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))  # token -> sorted position
    e_c = jnp.minimum(e_A, E - 1)
    token_row_A = jnp.where(e_A < E, row_start_E[e_c] + pos_A - tok_start_E[e_c], Z)
    return TilePlan(row_token_Z.astype(jnp.int32), tile_expert, token_row_A.astype(jnp.int32))


def _tile_dot(x_UD, w_DO):
    return jnp.dot(x_UD, w_DO, preferred_element_type=jnp.float32)


def _tile_matmul_fwd_impl(x_ZD, w_EDO, tile_expert):
    n_tiles = tile_expert.shape[0]
    Z, D = x_ZD.shape
    U, O = Z // n_tiles, w_EDO.shape[-1]

    def step(_, xs):
        x_UD, e = xs
        y_UO = jax.lax.cond(e >= 0, lambda: _tile_dot(x_UD, jax.lax.dynamic_index_in_dim(w_EDO, e, 0, False)),
                            lambda: jnp.zeros((U, O), jnp.float32))
        return None, y_UO
    _, y_tiles = jax.lax.scan(step, None, (x_ZD.reshape(n_tiles, U, D), tile_expert))
    return y_tiles.reshape(Z, O)


@jax.custom_vjp
def tile_matmul(x_ZD, w_EDO, tile_expert):
    """y[tile t] = x[tile t] @ w[tile_expert[t]] in fp32 (tiles with expert -1 give 0), one tile per scan step.

    custom_vjp because autodiff of the scan would accumulate the weight cotangent as a full [E, D, O] zeros-plus-
    update per tile; the backward here adds each tile's [D, O] into an fp32 carry in place (dynamic_update_slice).
    """
    return _tile_matmul_fwd_impl(x_ZD, w_EDO, tile_expert)


def _tile_matmul_fwd(x_ZD, w_EDO, tile_expert):
    return _tile_matmul_fwd_impl(x_ZD, w_EDO, tile_expert), (x_ZD, w_EDO, tile_expert)


def _tile_matmul_bwd(res, dy_ZO):
    x_ZD, w_EDO, tile_expert = res
    n_tiles = tile_expert.shape[0]
    (Z, D), (E, _, O) = x_ZD.shape, w_EDO.shape
    U = Z // n_tiles

    def step(dw_EDO, xs):
        x_UD, dy_UO, e = xs
        e0 = jnp.maximum(e, 0)

        def used():
            _, vjp = jax.vjp(_tile_dot, x_UD, jax.lax.dynamic_index_in_dim(w_EDO, e0, 0, False))
            dx_UD, dw_DO = vjp(dy_UO)
            return dx_UD, dw_DO.astype(jnp.float32)
        dx_UD, dw_DO = jax.lax.cond(e >= 0, used, lambda: (jnp.zeros_like(x_UD), jnp.zeros((D, O), jnp.float32)))
        acc_DO = jax.lax.dynamic_index_in_dim(dw_EDO, e0, 0, False) + dw_DO
        return jax.lax.dynamic_update_index_in_dim(dw_EDO, acc_DO, e0, 0), dx_UD
    dw_EDO, dx_tiles = jax.lax.scan(step, jnp.zeros((E, D, O), jnp.float32),
                                  (x_ZD.reshape(n_tiles, U, D), dy_ZO.reshape(n_tiles, U, O), tile_expert))
    return dx_tiles.reshape(Z, D), dw_EDO.astype(w_EDO.dtype), None


tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)


def run_tiles(matmul, p: dict, c, m_BTD, choice_BT, gate_BT, tile_rows: int):
    """The expert block over tiles: plan, gather rows, up matmul, SwiGLU, down matmul, un-permute, gate.

    ``matmul(x_ZD, w_EDO, tile_expert) -> y_ZO fp32`` is ``tile_matmul`` (sorted) or the Pallas kernel.
    """
    B, T, D = m_BTD.shape
    E, F = c.num_experts, c.moe_intermediate_size
    w_up_EDO, w_down_EFD = p["gate_up"], p["down"]
    x_AD, e_A, g_A = routed_tokens(m_BTD, choice_BT, gate_BT, E, w_up_EDO.dtype)
    plan = tile_plan(e_A, E, tile_rows)
    x_ZD = jnp.take(x_AD, plan.row_token_Z, axis=0, mode="fill", fill_value=0)
    h_ZO = matmul(x_ZD, w_up_EDO, plan.tile_expert).astype(w_up_EDO.dtype)
    y_ZD = matmul(swiglu(h_ZO, F), w_down_EFD, plan.tile_expert)
    y_AD = jnp.take(y_ZD, plan.token_row_A, axis=0, mode="fill", fill_value=0)
    return (y_AD * g_A[:, None]).reshape(B, T, D)


def experts_sorted(p: dict, c, m_BTD, choice_BT, gate_BT):
    """Sorted tiles through ``tile_matmul`` (XLA; any backend). Tile rows from ``sorted_tile_rows``."""
    B, T, _ = m_BTD.shape
    U = sorted_tile_rows(B * T, c.num_experts)
    return run_tiles(tile_matmul, p, c, m_BTD, choice_BT, gate_BT, U)


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
    U = gmm.tile_rows(B * T, c.num_experts)

    @jax.custom_vjp
    def block(p, m_BTD, gate_BT, choice_BT):
        return run_tiles(gmm.grouped_matmul, p, c, m_BTD, choice_BT, gate_BT, U)

    def fwd(p, m_BTD, gate_BT, choice_BT):
        return block(p, m_BTD, gate_BT, choice_BT), (p, m_BTD, gate_BT, choice_BT)

    def bwd(res, dy_BTD):
        p, m_BTD, gate_BT, choice_BT = res
        _, vjp = jax.vjp(lambda p, m, g: backward_impl(p, c, m, choice_BT, g), p, m_BTD, gate_BT)
        return (*vjp(dy_BTD), None)
    block.defvjp(fwd, bwd)
    return block(p, m_BTD, gate_BT, choice_BT)

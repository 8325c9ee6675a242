"""Expert parallelism: each token travels to the device that owns its expert and back (all-to-all, shard_map).

Runs inside a ``jax.shard_map`` that is manual over the mesh axis ``axis`` (``expert``). Each of that axis's n
devices holds its own rows of the batch and E_l = E / n experts: the device at position i owns experts
[i E_l, (i + 1) E_l) (the experts' E dim sharded over ``axis``, as ``zaya.sharding``'s rules place it). Per layer:

  1. dispatch  every routed token gets a slot in a send buffer [n C, D]: block d (C rows) holds the tokens for
               device d in token order; skip-class tokens (e* == E) are not sent.
  2. all_to_all over ``axis``: block s of the receive buffer holds what device s sent here (with the local expert
               id of each row; empty rows carry id E_l).
  3. local     the received rows through this device's experts only: sorted by local expert, two
               ``jax.lax.ragged_dot`` over the [E_l, ...] weights; empty rows are in no group (output 0). With
               another MoE impl chosen (``Impl.moe``, e.g. ``sorted``), that impl on the local experts instead.
  4. combine   all_to_all back; each token reads its row and multiplies it by its gate in fp32.

Capacity C: the local token count A (every token could pick the same device), so nothing is dropped: the
default. With ``capacity_factor`` f > 0, C = ceil(f A / n) rows per destination; a token whose slot is past C is
dropped (output 0: the residual stream carries it, as for the skip class) and counted (returned; the objective
logs the dropped fraction as ``moe_drop_rate``).

Math: the dense reference's (``zaya.model.moe.experts_dense``): tokens in the weight dtype, fp32 accumulation, the
up projection rounded to the weight dtype before SwiGLU, outputs back in fp32 and the gate applied at the source.
Gradients: an all_to_all's transpose is the reverse all_to_all, so a device's expert-weight gradient sums the
contributions of every token routed to its experts from all n devices (``zaya.train.step`` then treats it like a
reduce-scattered gradient: divided by n, averaged over the other batch axes).

Transport ``ragged`` (dropless only): tokens sorted by destination device and moved with
``lax.ragged_all_to_all``, which sends only the routed rows instead of n C slots (GPU / TPU; the receive buffer is
still n A rows, the worst case). XLA:CPU does not implement it, so on CPU the same call goes through
``ragged_all_to_all_emulated`` (the op's documented semantics built from ``all_to_all``): the offsets and sizes
logic is tested on CPU, the op itself needs a GPU.

Shape letters (``zaya.conventions``): A = B*T local tokens, Z = n C slots of the send / receive buffers.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from zaya.model.moe_dispatch import routed_tokens, swiglu


def capacity(n_tokens: int, n_devices: int, capacity_factor: float = 0.0) -> int:
    """Slots per destination device: all local tokens (dropless) when ``capacity_factor`` <= 0."""
    if capacity_factor <= 0:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens / n_devices)))


def dispatch_slots(e_A, E: int, n: int, C: int):
    """Per token: (row in the [n C] send buffer, or n C when not sent; kept; dropped), destination = e // (E / n).

    Tokens for one device take its slots in token order; the skip class (e == E) is not sent, and a token past
    the C slots of its destination is dropped."""
    E_l = E // n
    routed = e_A < E
    dest_A = jnp.where(routed, e_A // E_l, n)
    dest_onehot = jax.nn.one_hot(dest_A, n, dtype=jnp.int32)  # all-zero rows for skip tokens
    slot_A = jnp.sum(jnp.cumsum(dest_onehot, axis=0) * dest_onehot, axis=-1) - 1
    kept = routed & (slot_A < C)
    row_A = jnp.where(kept, dest_A * C + slot_A, n * C)
    return row_A, kept, routed & ~kept


def local_experts(w_up, w_down, F: int, x_ZD, e_Z):
    """Rows through this device's experts (``e_Z`` in 0..E_l-1; E_l = empty row, output 0); fp32 [Z, D]."""
    E_l = w_up.shape[0]
    order = jnp.argsort(e_Z, stable=True)  # empty rows last, outside every group
    sizes = jnp.bincount(e_Z, length=E_l).astype(jnp.int32)
    h = jax.lax.ragged_dot(x_ZD[order], w_up, sizes, preferred_element_type=jnp.float32).astype(w_up.dtype)
    y = jax.lax.ragged_dot(swiglu(h, F), w_down, sizes, preferred_element_type=jnp.float32)
    y = jnp.where((e_Z[order] < E_l)[:, None], y, 0.0)
    return jnp.zeros_like(y).at[order].set(y)


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """``lax.ragged_all_to_all``'s semantics from a fixed-size ``all_to_all`` (any backend; differentiable): the
    slice ``operand[input_offsets[j] : + send_sizes[j]]`` lands on device j at ``output[output_offsets[j] : ...]``.
    Each slice travels in a block of ``operand.shape[0]`` rows, so it moves n times the data: tests and CPU only."""
    del recv_sizes  # implied by the senders' send_sizes
    n, R = jax.lax.axis_size(axis_name), operand.shape[0]
    rows = jnp.arange(R)
    idx = input_offsets[:, None] + rows[None, :]  # [n, R]: the slice for each destination, padded
    blocks = jnp.take(operand, jnp.minimum(idx, R - 1), axis=0)
    got = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)  # block s: what device s sent here
    size = jax.lax.all_to_all(send_sizes, axis_name, 0, 0, tiled=True)
    at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dst = jnp.where(rows[None, :] < size[:, None], at[:, None] + rows[None, :], output.shape[0])  # out of range: drop
    return output.at[dst.reshape(-1)].set(got.reshape(n * R, *operand.shape[1:]), mode="drop")


def _ragged_transport():
    from zaya.kernels.platform import backend
    return jax.lax.ragged_all_to_all if backend() in ("cuda", "rocm") else ragged_all_to_all_emulated


def _through_local_experts(p, c, x_ZD, e_Z, local_impl):
    """Received rows (local expert ids, E_l = empty) through this device's experts: ``local_experts``, or the
    registered impl ``local_impl`` with a config of E_l experts and the empty rows as its skip class."""
    w_up, w_down = p["gate_up"], p["down"]
    if local_impl is None:
        return local_experts(w_up, w_down, c.moe_intermediate_size, x_ZD, e_Z)
    ones = jnp.ones((1, x_ZD.shape[0]), jnp.float32)
    return local_impl(p, c.replace(num_experts=w_up.shape[0]), x_ZD[None], e_Z[None], ones)[0]


def _exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis) - x


def experts_ep_ragged(p: dict, c, m_BTD, choice_BT, gate_BT, axis: str = "expert", local_impl=None):
    """``experts_ep`` moving only the routed rows (``lax.ragged_all_to_all``; dropless). Returns (y_BTD, 0)."""
    B, T, D = m_BTD.shape
    A, E = B * T, c.num_experts
    n, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    w_up = p["gate_up"]
    E_l = w_up.shape[0]
    x_AD, e_A, g_A = routed_tokens(m_BTD, choice_BT, gate_BT, E, w_up.dtype)
    dest_A = jnp.where(e_A < E, e_A // E_l, n)  # skip tokens sort last and are not sent
    order = jnp.argsort(dest_A, stable=True)
    send = jnp.bincount(dest_A, length=n).astype(jnp.int32)  # [n] rows to each device
    M = jax.lax.all_gather(send, axis)  # [n_src, n_dst]: every device's send sizes
    in_off = _exclusive_cumsum(send)
    out_off = _exclusive_cumsum(M, axis=0)[me]  # where my rows land in each receiver's buffer
    recv = M[:, me]
    a2a = functools.partial(_ragged_transport(), axis_name=axis)
    R = n * A  # worst case: every device sends all its tokens here
    x_sorted, e_sorted = x_AD[order], (e_A % E_l)[order].astype(jnp.int32)
    recv_x = a2a(x_sorted, jnp.zeros((R, D), x_AD.dtype), in_off, send, out_off, recv)
    recv_e = a2a(e_sorted, jnp.full((R,), E_l, jnp.int32), in_off, send, out_off, recv)
    y = _through_local_experts(p, c, recv_x, recv_e, local_impl)
    # back: the rows device s sent sit at [sum_{t<s} M[t, me], ...) here, and return to s's input offset for me
    back = a2a(y, jnp.zeros((A, D), jnp.float32), _exclusive_cumsum(recv), recv,
               _exclusive_cumsum(M, axis=1)[:, me], send)
    y_AD = jnp.zeros((A, D), jnp.float32).at[order].set(back) * g_A[:, None]
    return y_AD.reshape(B, T, D), jnp.zeros((), jnp.int32)


def experts_ep(p: dict, c, m_BTD, choice_BT, gate_BT, axis: str = "expert", capacity_factor: float = 0.0,
               local_impl=None):
    """(y_BTD fp32, dropped token count) for this device's rows; ``p`` holds its E / n local experts.

    ``local_impl``: a registered MoE impl (``fn(p, c, m_BTD, choice_BT, gate_BT)``) to run the received rows
    through the local experts instead of ``local_experts`` (it sees a config with E / n experts and the empty rows
    as its skip class), e.g. ``sorted`` for routed-only work on XLA:CPU."""
    B, T, D = m_BTD.shape
    A, E = B * T, c.num_experts
    n = jax.lax.axis_size(axis)
    w_up = p["gate_up"]
    E_l = w_up.shape[0]
    if E_l * n != E:
        raise ValueError(f"expert parallelism over {axis!r} ({n} devices) needs the {E} experts split evenly: this "
                         f"device holds {E_l}; shard the experts' E dim over {axis!r} (num_experts divisible by {n})")
    x_AD, e_A, g_A = routed_tokens(m_BTD, choice_BT, gate_BT, E, w_up.dtype)
    C = capacity(A, n, capacity_factor)
    row_A, kept_A, dropped_A = dispatch_slots(e_A, E, n, C)
    send_x = jnp.zeros((n * C, D), x_AD.dtype).at[row_A].set(x_AD, mode="drop")
    send_e = jnp.full((n * C,), E_l, jnp.int32).at[row_A].set(e_A % E_l, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0, tiled=True)
    y_ZD = _through_local_experts(p, c, recv_x, recv_e, local_impl)
    back = jax.lax.all_to_all(y_ZD, axis, 0, 0, tiled=True)
    y_AD = jnp.take(back, row_A, axis=0, mode="fill", fill_value=0.0)
    y_AD = y_AD * jnp.where(kept_A, g_A, 0.0)[:, None]
    return y_AD.reshape(B, T, D), dropped_A.sum()

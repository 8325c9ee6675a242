"""Expert parallelism (zaya.model.moe_ep): all-to-all dispatch under shard_map equals the single-device dropless
MoE (outputs and gradients); a capacity factor drops exactly the tokens past their destination's slots; the train
step on a data x expert mesh equals one device, and each device multiplies only its own experts."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import need_devices
from jax.sharding import PartitionSpec as P

from zaya import sharding
from zaya.config import preset
from zaya.model import moe, moe_ep

C8 = preset("tiny", num_experts=8)


def _inputs(c, B=4, T=6, seed=0, skip_every=5):
    """Expert weights, tokens, a routing that uses every expert and the skip class, gates."""
    rng = np.random.default_rng(seed)
    E, D, F = c.num_experts, c.hidden_size, c.moe_intermediate_size
    p = {"gate_up": jnp.asarray(0.3 * rng.standard_normal((E, D, 2 * F)), jnp.float32),
         "down": jnp.asarray(0.3 * rng.standard_normal((E, F, D)), jnp.float32)}
    m = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    choice = rng.integers(0, E, (B, T))
    choice.reshape(-1)[::skip_every] = E  # MoD skip tokens: output 0, never sent
    gate = jnp.asarray(rng.uniform(0.2, 1.0, (B, T)), jnp.float32)
    return p, m, jnp.asarray(choice, jnp.int32), gate


def _ep(mesh, c, capacity_factor=0.0):
    """experts_ep on ``mesh``: rows split over (data, expert), experts' E dim over expert."""
    rows = ("data", "expert")

    def f(p, m, choice, gate):
        y, dropped = moe_ep.experts_ep(p, c, m, choice, gate, "expert", capacity_factor)
        return y, jax.lax.psum(dropped, rows)
    return jax.shard_map(f, mesh=mesh, in_specs=(P("expert"), P(rows), P(rows), P(rows)), out_specs=(P(rows), P()),
                         check_vma=False)


@pytest.mark.parametrize("sizes,jit", [(dict(expert=8), True), (dict(data=2, expert=4), True),
                                       (dict(data=4, expert=2), True), (dict(data=2, expert=4), False)])
def test_outputs_and_grads_equal_dense(sizes, jit):
    need_devices(8)
    mesh = sharding.make_mesh(**sizes, devices=jax.devices()[:8])
    p, m, choice, gate = _inputs(C8, B=8)
    dense = functools.partial(moe.experts_dense, c=C8, choice_BT=choice, gate_BT=gate)
    ep = _ep(mesh, C8)
    if jit:
        ep = jax.jit(ep)
    y, dropped = ep(p, m, choice, gate)
    assert int(dropped) == 0
    np.testing.assert_allclose(y, dense(p, m_BTD=m), rtol=1e-5, atol=1e-5)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(m.shape), jnp.float32)  # a non-uniform cotangent
    g_ep = jax.grad(lambda p, m: (ep(p, m, choice, gate)[0] * w).sum(), argnums=(0, 1))(p, m)
    g_ref = jax.grad(lambda p, m: (dense(p, m_BTD=m) * w).sum(), argnums=(0, 1))(p, m)
    for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("local", ["dense", "sorted"])
def test_local_experts_through_another_impl(local):
    """The received rows through a registered impl on the local experts (skip class = empty rows) instead of the
    local ragged_dot: same outputs and grads as the dense single-device MoE."""
    need_devices(4)
    mesh = sharding.make_mesh(data=2, expert=2, devices=jax.devices()[:4])
    p, m, choice, gate = _inputs(C8, B=4)
    rows = ("data", "expert")

    def f(p, m, choice, gate):
        return moe_ep.experts_ep(p, C8, m, choice, gate, "expert", 0.0, moe.get_impl(local))[0]
    ep = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("expert"), P(rows), P(rows), P(rows)), out_specs=P(rows),
                               check_vma=False))
    dense = lambda p, m: moe.experts_dense(p, C8, m, choice, gate)
    np.testing.assert_allclose(ep(p, m, choice, gate), dense(p, m), rtol=1e-5, atol=1e-5)
    g_ep = jax.grad(lambda p: ep(p, m, choice, gate).sum())(p)
    g_ref = jax.grad(lambda p: dense(p, m).sum())(p)
    for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_factor_drops_tokens_past_their_slots():
    """With C slots per destination, the first C tokens (in row order) for each device are kept, the rest output 0
    and are counted; kept tokens equal the dense reference."""
    need_devices(4)
    mesh = sharding.make_mesh(expert=4, devices=jax.devices()[:4])
    c = preset("tiny", num_experts=4)
    p, m, choice, gate = _inputs(c, B=4, T=8, seed=3)
    choice = choice.at[:, :6].set(1)  # a hot expert: 6+ tokens per row for device 1
    y, dropped = jax.jit(_ep(mesh, c, capacity_factor=1.0))(p, m, choice, gate)
    A_local, n = 8, 4  # one row of 8 tokens per device
    C = moe_ep.capacity(A_local, n, 1.0)
    assert C == 2
    ref = np.asarray(moe.experts_dense(p, c, m, choice, gate))
    want_drop = 0
    for b in range(4):  # device b holds row b
        seen = {}
        for t in range(8):
            e = int(choice[b, t])
            if e == c.num_experts:
                np.testing.assert_array_equal(np.asarray(y[b, t]), 0.0)
                continue
            d = e  # one expert per device
            seen[d] = seen.get(d, 0) + 1
            if seen[d] > C:
                want_drop += 1
                np.testing.assert_array_equal(np.asarray(y[b, t]), 0.0)
            else:
                np.testing.assert_allclose(np.asarray(y[b, t]), ref[b, t], rtol=1e-5, atol=1e-5)
    assert want_drop > 0 and int(dropped) == want_drop


def test_dispatch_slots_fill_in_token_order():
    e = jnp.asarray([3, 0, 3, 4, 1, 3, 2], jnp.int32)  # E = 4 experts on n = 2 devices; 4 = skip
    row, kept, dropped = moe_ep.dispatch_slots(e, E=4, n=2, C=2)
    # device 1 (experts 2, 3) gets tokens 0, 2 in slots 2, 3; token 5 is past C; device 0 gets tokens 1, 4
    assert row.tolist() == [2, 0, 3, 4, 1, 4, 4]
    assert kept.tolist() == [True, True, True, False, True, False, False]
    assert dropped.tolist() == [False, False, False, False, False, True, True]


def test_uneven_expert_split_is_refused():
    need_devices(4)
    mesh = sharding.make_mesh(expert=4, devices=jax.devices()[:4])
    c = preset("tiny", num_experts=6)
    p, m, choice, gate = _inputs(c, B=4)
    p = jax.tree.map(lambda x: jnp.concatenate([x, x[:2]]), p)  # 8 rows: 2 per device, but the config says 6
    with pytest.raises(ValueError, match="split evenly"):
        _ep(mesh, c)(p, m, choice, gate)


def _ep_ragged(mesh, c):
    rows = ("data", "expert")

    def f(p, m, choice, gate):
        return moe_ep.experts_ep_ragged(p, c, m, choice, gate, "expert")[0]
    return jax.shard_map(f, mesh=mesh, in_specs=(P("expert"), P(rows), P(rows), P(rows)), out_specs=P(rows),
                         check_vma=False)


def test_ragged_transport_equals_dense():
    """Routed rows only (lax.ragged_all_to_all on GPU; its emulation here): same outputs and grads as the dense
    MoE, so the sizes and offsets of both trips are right."""
    need_devices(8)
    mesh = sharding.make_mesh(data=2, expert=4, devices=jax.devices()[:8])
    p, m, choice, gate = _inputs(C8, B=8)
    ep = jax.jit(_ep_ragged(mesh, C8))
    dense = lambda p, m: moe.experts_dense(p, C8, m, choice, gate)
    np.testing.assert_allclose(ep(p, m, choice, gate), dense(p, m), rtol=1e-5, atol=1e-5)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(m.shape), jnp.float32)
    g_ep = jax.grad(lambda p, m: (ep(p, m, choice, gate) * w).sum(), argnums=(0, 1))(p, m)
    g_ref = jax.grad(lambda p, m: (dense(p, m) * w).sum(), argnums=(0, 1))(p, m)
    for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_ragged_all_to_all_emulation_follows_the_ops_semantics():
    """Against a numpy reading of lax.ragged_all_to_all's docs: sender i's slice operand_i[in_off[j] : +size[j]]
    is written on device j at output_j[out_off_i[j] : ...]; the rest of output_j is kept."""
    need_devices(2)
    mesh = sharding.make_mesh(expert=2, devices=jax.devices()[:2])
    operand = np.arange(2 * 5, dtype=np.float32).reshape(2, 5) + 1  # device i's 5 rows
    in_off = np.array([[0, 2], [0, 1]], np.int32)
    size = np.array([[2, 3], [1, 3]], np.int32)  # device 0 sends 2 rows to itself, 3 to device 1; ...
    out_off = np.array([[0, 0], [2, 3]], np.int32)  # ... landing at these offsets of the receivers' outputs
    recv = size.T.copy()
    want = np.full((2, 6), -1.0, np.float32)
    for i in range(2):
        for j in range(2):
            want[j, out_off[i, j]:out_off[i, j] + size[i, j]] = operand[i, in_off[i, j]:in_off[i, j] + size[i, j]]

    def f(x, out, a, b, c_, d):
        return moe_ep.ragged_all_to_all_emulated(x[0], out[0], a[0], b[0], c_[0], d[0], axis_name="expert")[None]
    got = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("expert"),) * 6, out_specs=P("expert"),
                                check_vma=False))(operand, np.full((2, 6), -1.0, np.float32), in_off, size, out_off,
                                                  recv)
    np.testing.assert_array_equal(np.asarray(got), want)

"""The jitted train step: grad accumulation equals one step on the concatenated batch; a data x fsdp sharded step
equals the single-device one; bf16 compute keeps fp32 master weights."""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from conftest import need_devices

from zaya.config import ZayaConfig
from zaya.model.params import init
from zaya.tidar.objective import TidarOptions
from zaya.train import optim
from zaya.train import state as st
from zaya.train.recipe import TINY_MODEL
from zaya.train.step import jit_options, make_train_step, put_batch

CFG = ZayaConfig(**{**TINY_MODEL, "num_layers": 1})
OPTS = TidarOptions(block_size=4, mode="tidar")
O = mlc.ConfigDict(dict(lr=1e-2, warmup_steps=0, schedule="constant", min_lr_ratio=0.1, decay_fraction=0.2,
                        decay_shape="linear", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
                        decay_embeddings=False))


def _batch(B=4, S=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(5, 261, (B, S)).astype(np.int32), "doc_ids": np.zeros((B, S), np.int32),
            "loss_mask": np.ones((B, S), np.float32)}


def _state(cfg=CFG):
    params = jax.jit(lambda k: init(cfg.replace(dtype="float32"), k), **jit_options(True))(jax.random.key(0, impl="rbg"))
    tx, sched = optim.make_optimizer(O, 10, params)
    return st.create(params, tx, 0), tx, sched


def _close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.fixture(scope="module")
def reference():
    """One single-device step (accum 1) on the 4-row batch, shared by the accumulation and sharding tests."""
    s0, tx, sched = _state()
    batch = _batch()
    step = make_train_step(CFG, OPTS, tx, sched, accum=1, donate=False, fast_compile=True)
    s1, m = step(s0, jax.tree.map(jnp.asarray, batch))
    return s0, tx, sched, batch, s1, m


def test_grad_accumulation_equals_full_batch_step(reference):
    s0, tx, sched, batch, a, ma = reference
    step = make_train_step(CFG, OPTS, tx, sched, accum=2, donate=False, fast_compile=True)
    b, mb = step(s0, jax.tree.map(jnp.asarray, batch))
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    assert float(ma["grad_norm"]) == pytest.approx(float(mb["grad_norm"]), rel=1e-5)
    # Adam divides by sqrt(v): a float-rounding difference in a tiny grad can move a weight by ~1e-6 of lr=1e-2
    _close(a.params, b.params, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(ma["diff_acc_per_pos"], mb["diff_acc_per_pos"], atol=1e-6)
    np.testing.assert_allclose(ma["ar_loss"], mb["ar_loss"], rtol=1e-6)
    assert int(a.step) == int(b.step) == 1
    assert jax.tree.leaves(a.params)[0].dtype == jnp.float32
    p0 = float(jnp.abs(s0.params["layers"]["q"] - a.params["layers"]["q"]).max())
    assert p0 > 1e-3  # the step did move the weights (so the comparison above is not vacuous)


def test_sharded_step_matches_single_device(reference):
    from zaya import sharding
    need_devices(4)
    s0, tx, sched, batch, ref, mref = reference
    mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    sh = st.state_shardings(CFG, tx, mesh)
    step = make_train_step(CFG, OPTS, tx, sched, mesh=mesh, state_sh=sh, batch_size=4, fast_compile=True,
                           donate=False)  # the shared reference state may alias the placed one
    placed = jax.device_put(s0, sh)
    assert placed.params["layers"]["q"].sharding.spec[1] == "fsdp"  # weights sharded at rest
    out, m = step(placed, put_batch(batch, mesh, ("data", "fsdp")))
    assert out.params["layers"]["q"].sharding.spec[1] == "fsdp"
    assert out.opt_state[1][0].mu["layers"]["q"].sharding.spec[1] == "fsdp"  # Adam moments follow their params
    assert float(m["loss"]) == pytest.approx(float(mref["loss"]), rel=1e-5)
    _close(out.params, ref.params, rtol=1e-4, atol=2e-5)


def _collectives(jaxpr, out, depth=0):
    """(primitive name, operand shape, nesting depth) of every all_gather / reduce_scatter in a jaxpr."""
    for e in jaxpr.eqns:
        if e.primitive.name in ("all_gather", "reduce_scatter"):
            out.append((e.primitive.name, tuple(e.invars[0].aval.shape), depth))
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else [v]):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    _collectives(sub, out, depth + (e.primitive.name == "scan"))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp_gathers_one_layer_at_a_time(reference, dtype):
    """ZeRO-3: weights sharded over fsdp are all-gathered inside the layer scan (one layer's weights at a time, never
    the stacked [L, ...] tree) and their grads leave through reduce-scatter (in fp32 whatever the compute dtype)."""
    from zaya import sharding
    need_devices(4)
    s0, tx, sched, batch, _, _ = reference
    mesh = sharding.make_mesh(fsdp=4, devices=jax.devices()[:4])
    sh = st.state_shardings(CFG, tx, mesh)
    cfg = CFG.replace(dtype=dtype)
    step = make_train_step(cfg, OPTS, tx, sched, mesh=mesh, state_sh=sh, batch_size=4, donate=False)
    state = st.with_shardings(jax.eval_shape(lambda: s0), sh)
    found = _collectives(jax.make_jaxpr(step)(state, jax.tree.map(jnp.asarray, batch)).jaxpr, [])
    L = CFG.num_layers
    stacked = {tuple(x.shape) for x in jax.tree.leaves(s0.params["layers"])}
    gathers = [f for f in found if f[0] == "all_gather"]
    assert any(depth >= 1 for _, _, depth in gathers), "no all_gather inside the layer scan"
    assert not [f for f in gathers if f[1] in stacked or (f[1] and f[1][0] == L and f[2] == 0)], gathers
    assert any(f[0] == "reduce_scatter" for f in found), "grads should leave through reduce-scatter"


@pytest.mark.parametrize("other", ["data", "fsdp"])
def test_expert_parallel_step_matches_single_device(reference, other):
    """{data, fsdp}=2 x expert=2: rows split over both axes, each device keeps its 2 of the 4 experts and tokens
    travel by all-to-all (with fsdp, the experts' D dim is also gathered per layer and its grads reduce-scattered).
    The step equals one device's; the compiled program multiplies [2, D, 2F] expert weights only (never the
    [4, D, 2F] stack)."""
    from zaya import sharding
    need_devices(4)
    s0, tx, sched, batch, ref, mref = reference
    mesh = sharding.make_mesh(**{other: 2}, expert=2, devices=jax.devices()[:4])
    sh = st.state_shardings(CFG, tx, mesh)
    assert sh.params["layers"]["experts"]["gate_up"].spec[1] == "expert"
    step = make_train_step(CFG, OPTS, tx, sched, mesh=mesh, state_sh=sh, batch_size=4, fast_compile=True,
                           donate=False)
    placed, b = jax.device_put(s0, sh), put_batch(batch, mesh, (other, "expert"))
    out, m = step(placed, b)
    assert float(m["loss"]) == pytest.approx(float(mref["loss"]), rel=1e-5)
    assert float(m["moe_drop_rate"]) == 0.0  # dropless
    _close(out.params, ref.params, rtol=1e-4, atol=2e-5)
    assert out.params["layers"]["experts"]["down"].sharding.spec[1] == "expert"
    hlo = step.lower(placed, b).compile().as_text()
    E, D, F = CFG.num_experts, CFG.hidden_size, CFG.moe_intermediate_size
    assert "all-to-all" in hlo
    local, full = f"[2,{D},{2 * F}]", f"[{E},{D},{2 * F}]"
    assert local in hlo and full not in hlo.replace(f"f32[{CFG.num_layers},{E},{D},{2 * F}]", ""), \
        "expert weights should enter the matmuls as this device's [E/2, D, 2F] only"


def test_expert_parallel_capacity_factor_drops_and_logs(reference):
    """A capacity factor below 1 drops routed tokens: the step logs the dropped fraction and still trains."""
    from zaya import sharding
    from zaya.model.transformer import Impl
    need_devices(4)
    s0, tx, sched, batch, _, mref = reference
    mesh = sharding.make_mesh(data=2, expert=2, devices=jax.devices()[:4])
    sh = st.state_shardings(CFG, tx, mesh)
    step = make_train_step(CFG, OPTS, tx, sched, impl=Impl(capacity_factor=0.25), mesh=mesh, state_sh=sh,
                           batch_size=4, fast_compile=True, donate=False)
    out, m = step(jax.device_put(s0, sh), put_batch(batch, mesh, ("data", "expert")))
    assert 0.0 < float(m["moe_drop_rate"]) < 1.0
    assert np.isfinite(float(m["loss"])) and float(m["loss"]) != pytest.approx(float(mref["loss"]), rel=1e-6)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out.params))


def test_bf16_compute_keeps_fp32_master_weights():
    """The step's output state stays fp32 with a bf16 model config (shapes/dtypes only: no compile)."""
    cfg = CFG.replace(dtype="bfloat16")
    s0 = jax.eval_shape(lambda: _state_abstract())
    tx, sched = optim.make_optimizer(O, 10, s0.params)
    step = make_train_step(cfg, OPTS, tx, sched, donate=False)
    s1, m = jax.eval_shape(step, s0, jax.tree.map(jnp.asarray, _batch(B=2, S=16)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s1.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s1.opt_state) if x.ndim > 0)
    assert m["loss"].dtype == jnp.float32


def _state_abstract():
    params = init(CFG.replace(dtype="float32"), jax.random.key(0, impl="rbg"))
    tx, _ = optim.make_optimizer(O, 10, params)
    return st.create(params, tx, 0)


class _FakeMesh:
    """What batch_shard reads of a mesh: axis names, sizes, and devices that know their process."""

    def __init__(self, sizes: dict, procs):
        from types import SimpleNamespace
        self.axis_names, self.shape = tuple(sizes), dict(sizes)
        self.devices = np.array([SimpleNamespace(process_index=p) for p in procs], dtype=object).reshape(
            tuple(sizes.values()))


@pytest.mark.parametrize("sizes,procs,dp,want", [
    # 4 single-device processes, data=2 x expert=2: processes 0, 1 hold rows block 0, processes 2, 3 block 1
    (dict(data=2, expert=2), [0, 1, 2, 3], "data", [(0, 2), (0, 2), (1, 2), (1, 2)]),
    # 2 processes x 2 devices, data=4: each holds two adjacent data shards, i.e. half the batch
    (dict(data=4), [0, 0, 1, 1], "data", [(0, 2), (1, 2)]),
    # batch over (data, fsdp): 4 processes, one shard each, row-major over the listed axes
    (dict(data=2, fsdp=2), [0, 1, 2, 3], ("data", "fsdp"), [(0, 4), (1, 4), (2, 4), (3, 4)]),
    # no batch axes: every process holds every row
    (dict(tensor=2), [0, 1], None, [(0, 1), (0, 1)])])
def test_batch_shard(monkeypatch, sizes, procs, dp, want):
    from zaya.train.step import batch_shard
    mesh = _FakeMesh(sizes, procs)
    for me in sorted(set(procs)):
        monkeypatch.setattr(jax, "process_index", lambda me=me: me)
        assert batch_shard(mesh, dp) == want[me]


def test_batch_shard_refuses_scattered_rows(monkeypatch):
    from zaya.config import ConfigError
    from zaya.train.step import batch_shard
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(ConfigError, match=r"process 0 holds batch shards \[0, 2\] of 4"):
        batch_shard(_FakeMesh(dict(data=4), [0, 1, 0, 1]), "data")


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_remat_equals_per_layer_remat(group):
    """Two-level checkpointing (residual stream kept every ``group`` layers) changes memory, not math: same loss,
    metrics (per-layer expert counts in layer order) and gradients as per-layer remat."""
    from zaya.model.transformer import Impl
    from zaya.tidar.objective import loss_fn
    cfg = ZayaConfig(**{**TINY_MODEL, "num_layers": 4})
    params = jax.jit(lambda k: init(cfg, k), **jit_options(True))(jax.random.key(1, impl="rbg"))
    batch = jax.tree.map(jnp.asarray, _batch(B=2, S=16))

    def vg(impl):
        f = lambda p: loss_fn(p, cfg, batch, OPTS, jax.random.key(2, impl="rbg"), impl)
        return jax.jit(jax.value_and_grad(f, has_aux=True), **jit_options(True))(params)
    (l1, m1), g1 = vg(Impl(remat=True))
    (l2, m2), g2 = vg(Impl(remat=True, remat_group=group))
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    assert m2["expert_counts"].shape == (4, cfg.num_experts + 1)
    np.testing.assert_array_equal(m1["expert_counts"], m2["expert_counts"])
    _close(g1, g2, rtol=1e-5, atol=1e-7)


def test_remat_group_must_divide_the_layers():
    from zaya.model.transformer import Impl, hidden
    from zaya import layouts
    cfg = ZayaConfig(**{**TINY_MODEL, "num_layers": 3})
    params = jax.eval_shape(lambda: init(cfg, jax.random.key(0, impl="rbg")))
    with pytest.raises(ValueError, match="remat_group=2 must divide num_layers=3"):
        jax.eval_shape(lambda p: hidden(p, cfg, jnp.zeros((1, 8), jnp.int32), layouts.causal(1, 8),
                                        impl=Impl(remat=True, remat_group=2)), params)

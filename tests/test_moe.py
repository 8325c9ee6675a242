"""MoE: every expert impl equals the dense reference (outputs and gradients), the registry, auto's choices, router
semantics. The Pallas kernel alone: tests/test_kernels_moe.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zaya import layouts
from zaya.config import preset
from zaya.model import moe, moe_dispatch, transformer
from zaya.model.params import param_dtype, param_specs

# Each compared with "dense". "auto" runs one of these (test_default_multiplies_no_unrouted_expert checks which; on
# CPU it is ragged; test_model.py runs the default end to end), so it is not repeated here.
IMPLS = ["ragged", "gather", "sorted", "pallas"]
C6 = preset("tiny", num_experts=6)


def _np_params(c, seed, std=0.5):
    """Random params of every leaf (norms near 1, biases and scales perturbed) drawn with numpy: no jax compiles,
    which on a busy 2-core machine cost more than the tests themselves (zaya.model.params.init: ~15 s)."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        shape, _, kind = spec
        x = rng.standard_normal(shape).astype(np.float32)
        x = std * x if kind == "normal" else (1.0 if kind == "ones" else 0.0) + 0.1 * x
        return jnp.asarray(x, param_dtype(tuple(k.key for k in path), c))
    return jax.tree_util.tree_map_with_path(leaf, param_specs(c), is_leaf=lambda x: isinstance(x, tuple))


def _layer0(c, seed):
    take = lambda t: jax.tree.map(lambda a: a[0], t)
    p = _np_params(c, seed)["layers"]
    return take(p["router"]), take(p["experts"])


# ----------------------------------------------------------------------------------------------------------------
# Expert level: chosen routings (choice 0..E, E = skip) and gates, so every corner case is there by construction.

def _routing(case, E, key):
    """choice [B, T] (numpy) for a named routing case."""
    if case == "mixed":  # 33 tokens (no multiple of any tile), skip tokens, expert 2 empty, uneven groups
        c = np.array(jax.random.randint(key, (3, 11), 0, E + 1))
        c[c == 2] = 0
        c[0, :3] = E
        c[1, :7] = 1
        return c
    if case == "one_expert":
        return np.full((2, 9), 3)
    if case == "all_skip":
        return np.full((2, 3), E)
    if case == "single":
        return np.array([[4]])
    raise ValueError(case)


CASES = ["mixed", "one_expert", "all_skip", "single"]


def _inputs(c, case, dtype="float32", seed=0):
    key = jax.random.PRNGKey(seed)
    _, pe = _layer0(c.replace(dtype=dtype), seed)
    choice = jnp.asarray(_routing(case, c.num_experts, jax.random.fold_in(key, 2)), jnp.int32)
    B, T = choice.shape
    m = jax.random.normal(jax.random.fold_in(key, 3), (B, T, c.hidden_size))
    gate = jax.random.uniform(jax.random.fold_in(key, 4), (B, T), minval=0.1, maxval=1.0)
    cot = jax.random.normal(jax.random.fold_in(key, 5), (B, T, c.hidden_size))
    return pe, m, choice, gate, cot


def _value_and_grads(impl, c, pe, m, choice, gate, cot, jit=True):
    def f(pe, m, gate):
        y, vjp = jax.vjp(lambda pe, m, gate: moe.get_impl(impl)(pe, c, m, choice, gate), pe, m, gate)
        return y, vjp(cot)
    return (jax.jit(f) if jit else f)(pe, m, gate)


@functools.lru_cache(maxsize=None)
def _dense(case, dtype="float32", seed=0):
    """The dense reference's output and gradients for a case (computed once per session)."""
    return jax.tree.map(np.asarray, _value_and_grads("dense", C6, *_inputs(C6, case, dtype, seed)))


def _close(a, b, rtol, atol_scale):
    """|a - b| <= rtol |b| + atol_scale * max|b| leaf by leaf (gradients span several orders of magnitude)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol_scale * max(np.abs(y).max(), 1e-30))


@pytest.mark.parametrize("impl,case", [(i, k) for i in IMPLS[1:] for k in CASES] + [("ragged", "mixed")])
def test_impl_equals_dense_fp32(impl, case):
    """Forward and gradients w.r.t. the expert weights, the input and the gate, jitted."""
    pe, m, choice, gate, cot = _inputs(C6, case)
    want = _dense(case)
    got = _value_and_grads(impl, C6, pe, m, choice, gate, cot)
    _close(got, want, rtol=1e-5, atol_scale=1e-5)
    skip = np.asarray(choice == C6.num_experts)
    assert float(np.abs(np.asarray(got[0])[skip]).max(initial=0.0)) == 0.0  # skip tokens output exactly 0
    if case == "mixed":  # the empty expert (2) gets exactly zero weight gradients
        assert float(jnp.abs(got[1][0]["gate_up"][2]).max()) == 0.0


@pytest.mark.parametrize("impl", ["gather", "sorted", "pallas"])
def test_impl_equals_dense_eager(impl):
    """The same without jax.jit (op by op)."""
    pe, m, choice, gate, cot = _inputs(C6, "mixed")
    want = _dense("mixed")
    got = _value_and_grads(impl, C6, pe, m, choice, gate, cot, jit=False)
    _close(got, want, rtol=1e-5, atol_scale=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_impl_equals_dense_bf16(impl):
    """bf16 weights and operands (fp32 accumulation): the same rounding points as dense; only the order of the
    fp32 sums differs, so outputs and gradients agree to a bf16 tolerance."""
    pe, m, choice, gate, cot = _inputs(C6, "mixed", dtype="bfloat16", seed=2)
    assert pe["gate_up"].dtype == jnp.bfloat16
    want = _dense("mixed", "bfloat16", 2)
    got = _value_and_grads(impl, C6, pe, m, choice, gate, cot)
    assert got[1][0]["down"].dtype == jnp.bfloat16
    _close(got, want, rtol=2e-2, atol_scale=2e-2)


# ----------------------------------------------------------------------------------------------------------------
# Block level: through the router (gradients reach the router params through the gate), stats.

@functools.lru_cache(maxsize=None)
def _block(impl):
    """moe() through the router: (y, r, stats, grads w.r.t. router params, expert params, input), jitted."""
    pr, pe = _layer0(C6, 0)
    m = jax.random.normal(jax.random.PRNGKey(2), (3, 11, C6.hidden_size))
    r0 = jax.random.normal(jax.random.PRNGKey(3), (3, 11, C6.router_hidden_size))

    @jax.jit
    def run(pr, pe, m):
        f = lambda pr, pe, m: moe.moe(pr, pe, C6, m, r0, impl)
        y, r, stats = f(pr, pe, m)
        grads = jax.grad(lambda pr, pe, m: (f(pr, pe, m)[0] * m).sum(), argnums=(0, 1, 2))(pr, pe, m)
        return y, r, stats, grads
    return jax.tree.map(np.asarray, run(pr, pe, m))


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_block_equals_dense(impl):
    want, got = _block("dense"), _block(impl)
    _close(got[:2], want[:2], rtol=1e-5, atol_scale=1e-5)
    _close(got[3], want[3], rtol=1e-4, atol_scale=1e-5)
    np.testing.assert_array_equal(np.asarray(got[2]["counts"]), np.asarray(want[2]["counts"]))
    assert (np.asarray(want[2]["counts"])[: C6.num_experts] > 0).sum() >= 3  # several experts really used
    assert float(np.abs(got[3][0]["out_w"]).max()) > 0  # the router gets a gradient through the gate


def test_skip_class_outputs_zero_and_is_counted():
    c = C6
    pr, pe = _layer0(c, 4)
    pr = dict(pr, bias=jnp.zeros(c.num_experts + 1).at[-1].set(10.0))  # force the skip class
    m = jax.random.normal(jax.random.PRNGKey(5), (2, 5, c.hidden_size))
    for impl in ["dense", "auto"]:  # every impl on skip tokens: test_impl_equals_dense_fp32 (all_skip, mixed)
        y, _, stats = jax.jit(lambda m: moe.moe(pr, pe, c, m, jnp.zeros((2, 5, c.router_hidden_size)), impl))(m)
        assert float(jnp.abs(y).max()) == 0.0
        assert int(stats["counts"][-1]) == 10


def test_gate_is_unrenormalised_probability():
    c = preset("tiny")
    pr, pe = _layer0(c, 6)
    m = jax.random.normal(jax.random.PRNGKey(7), (1, 4, c.hidden_size))
    choice, gate, _, probs = moe.router(pr, c, m, jnp.zeros((1, 4, c.router_hidden_size)))
    np.testing.assert_allclose(np.asarray(gate), np.asarray(jnp.take_along_axis(probs, choice[..., None], -1)[..., 0]))
    assert float(gate.max()) < 1.0
    np.testing.assert_array_equal(np.asarray(choice), np.asarray(jnp.argmax(probs + pr["bias"], -1)))


# ----------------------------------------------------------------------------------------------------------------
# Sorted tiles: the plan never pairs a token with an expert it is not routed to.

@pytest.mark.parametrize("U", [1, 4, 16])
def test_tile_plan(U):
    E = 6
    e_A = jnp.asarray(_routing("mixed", E, jax.random.PRNGKey(0)).reshape(-1), jnp.int32)
    A = e_A.shape[0]
    plan = jax.jit(moe_dispatch.tile_plan, static_argnums=(1, 2))(e_A, E, U)
    row_token, tile_expert, token_row = (np.asarray(a) for a in plan)
    e = np.asarray(e_A)
    n_e = np.bincount(e, minlength=E + 1)[:E]
    assert len(tile_expert) == moe_dispatch.num_tiles(A, E, U) and len(row_token) == len(tile_expert) * U
    assert (tile_expert >= 0).sum() == (-(-n_e // U)).sum()  # used tiles: ceil(n_e / U) per expert, in front
    assert (tile_expert[(tile_expert >= 0).sum():] == -1).all()
    real = row_token < A
    assert real.sum() == n_e.sum()  # each routed token once; skip tokens in no row
    assert (e[row_token[real]] == np.repeat(tile_expert, U)[real]).all()  # a row's token is routed to its tile
    routed = e < E
    assert (row_token[token_row[routed]] == np.arange(A)[routed]).all() and (token_row[~routed] == len(row_token)).all()


# ----------------------------------------------------------------------------------------------------------------
# Registry and auto.

def test_register_a_new_impl_and_use_it():
    @moe.register("test_dense_twice_halved")
    def experts_halves(p, c, m_BTD, choice_BT, gate_BT):
        return 0.5 * (moe.experts_dense(p, c, m_BTD, choice_BT, gate_BT) * 2.0)
    try:
        c = preset("tiny")
        pr, pe = _layer0(c, 8)
        m = jax.random.normal(jax.random.PRNGKey(9), (2, 3, c.hidden_size))
        r0 = jnp.zeros((2, 3, c.router_hidden_size))
        run = lambda impl: jax.jit(lambda m: moe.moe(pr, pe, c, m, r0, impl)[0])(m)
        np.testing.assert_allclose(np.asarray(run("test_dense_twice_halved")), np.asarray(run("dense")), rtol=1e-6)
    finally:
        moe.EXPERT_IMPLS.pop("test_dense_twice_halved")


def test_unknown_impl_lists_the_registered():
    c = preset("tiny")
    pr, pe = _layer0(c, 8)
    with pytest.raises(ValueError, match=r"unknown MoE impl 'nope'; registered: \[.*'dense'.*'sorted'"):
        moe.moe(pr, pe, c, jnp.zeros((1, 2, c.hidden_size)), jnp.zeros((1, 2, c.router_hidden_size)), "nope")


@pytest.mark.parametrize("backend,n_tokens,want", [
    ("cpu", 1, "ragged"), ("cpu", 16, "ragged"), ("cpu", 4352, "ragged"),
    ("cuda", 1, "pallas"), ("cuda", 272, "pallas"), ("cuda", 512, "pallas"), ("cuda", 513, "ragged"),
    ("rocm", 17, "pallas"), ("rocm", 8192, "ragged")])
def test_auto_choice(backend, n_tokens, want):
    assert moe_dispatch.auto_choice(backend, n_tokens, 16) == want


def test_auto_choice_unknown_backend():
    with pytest.raises(ValueError, match="tpu"):
        moe_dispatch.auto_choice("tpu", 1, 16)


def _expert_dots(jaxpr, out):
    """Shapes of the right operands of every dot in a jaxpr, nested jaxprs (scan, cond, custom_vjp) included."""
    for e in jaxpr.eqns:
        if e.primitive.name in ("dot_general", "ragged_dot_general"):
            out.append((e.primitive.name, e.invars[1].aval.shape))
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else [v]):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    _expert_dots(sub, out)
    return out


@pytest.mark.parametrize("target", ["cuda", "rocm"])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 8), (4, 300)])
def test_default_multiplies_no_unrouted_expert(monkeypatch, target, B, T):
    """The inference default (auto, what zaya.Model runs) on a GPU backend: no dot against all E experts' weights at
    once, and no ragged_dot except where auto picks ragged on purpose (long inputs, where it is grouped). Traced
    with the backend reported as ``target`` (the Pallas call is only traced, not run). On CPU auto is ragged."""
    from zaya.api import Model
    from zaya.kernels import platform
    c = C6
    assert Model(c, {}).impl.moe == transformer.INFERENCE.moe == "auto"
    assert moe.auto_impl(B * T, c.num_experts) == "ragged"  # this CPU
    monkeypatch.setattr(platform, "backend", lambda: target)
    want = moe.auto_impl(B * T, c.num_experts)
    assert want == ("pallas" if B * T <= moe_dispatch.GPU_PALLAS_MAX else "ragged")
    pr, pe = _layer0(c, 0)
    f = lambda m: moe.moe(pr, pe, c, m, jnp.zeros((B, T, c.router_hidden_size)))[0]
    dots = _expert_dots(jax.make_jaxpr(f)(jnp.zeros((B, T, c.hidden_size))).jaxpr, [])
    full = {pe["gate_up"].shape, pe["down"].shape}
    assert not [d for d in dots if d[0] == "dot_general" and d[1] in full]
    assert want == "ragged" or not [d for d in dots if d[0] == "ragged_dot_general"]


# ----------------------------------------------------------------------------------------------------------------
# End to end: the tiny model gives the dense impl's logits with every impl.

def test_tiny_model_logits_equal_dense():
    c = preset("tiny")
    params = _np_params(c, 0, std=0.3)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 0, c.vocab_size)
    lay = layouts.causal(2, 7)
    run = lambda impl: transformer.apply(params, c, tokens, lay, impl=transformer.Impl(moe=impl))
    want, _, stats = jax.jit(lambda: run("dense"))()
    for impl in ["gather", "sorted", "pallas"]:
        got, _, s = jax.jit(lambda: run(impl))()
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4, err_msg=impl)
        np.testing.assert_array_equal(np.asarray(s["counts"]), np.asarray(stats["counts"]))

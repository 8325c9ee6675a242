"""MoE: ragged (sorted, ragged_dot) dispatch equals the dense reference; router semantics."""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import randomize
from zaya.config import preset
from zaya.model import moe
from zaya.model.params import init


def _layer0(c, key):
    p = randomize(init(c, key, std=0.5), jax.random.fold_in(key, 1), scale=1.0)
    take = lambda t: jax.tree.map(lambda a: a[0], t)
    return take(p["layers"]["router"]), take(p["layers"]["experts"])


def test_ragged_equals_dense():
    c = preset("tiny", num_experts=6)
    pr, pe = _layer0(c, jax.random.PRNGKey(0))
    m = jax.random.normal(jax.random.PRNGKey(2), (3, 11, c.hidden_size))
    r0 = jax.random.normal(jax.random.PRNGKey(3), (3, 11, c.router_hidden_size))
    y_r, r_r, s_r = moe.moe(pr, pe, c, m, r0, "ragged")
    y_d, r_d, s_d = moe.moe(pr, pe, c, m, r0, "dense")
    np.testing.assert_allclose(np.asarray(y_r), np.asarray(y_d), rtol=1e-5, atol=1e-4)
    assert (np.asarray(s_r["counts"])[: c.num_experts] > 0).sum() >= 3  # several experts really used
    g = jax.grad(lambda m: moe.moe(pr, pe, c, m, r0, "ragged")[0].sum())(m)
    gd = jax.grad(lambda m: moe.moe(pr, pe, c, m, r0, "dense")[0].sum())(m)
    np.testing.assert_allclose(np.asarray(g), np.asarray(gd), rtol=1e-4, atol=1e-3)


def test_skip_class_outputs_zero_and_is_counted():
    c = preset("tiny")
    pr, pe = _layer0(c, jax.random.PRNGKey(4))
    pr = dict(pr, bias=jnp.zeros(c.num_experts + 1).at[-1].set(10.0))  # force the skip class
    m = jax.random.normal(jax.random.PRNGKey(5), (2, 5, c.hidden_size))
    for impl in ("ragged", "dense"):
        y, _, stats = moe.moe(pr, pe, c, m, jnp.zeros((2, 5, c.router_hidden_size)), impl)
        assert float(jnp.abs(y).max()) == 0.0
        assert int(stats["counts"][-1]) == 10


def test_gate_is_unrenormalised_probability():
    c = preset("tiny")
    pr, pe = _layer0(c, jax.random.PRNGKey(6))
    m = jax.random.normal(jax.random.PRNGKey(7), (1, 4, c.hidden_size))
    choice, gate, _, probs = moe.router(pr, c, m, jnp.zeros((1, 4, c.router_hidden_size)))
    np.testing.assert_allclose(np.asarray(gate), np.asarray(jnp.take_along_axis(probs, choice[..., None], -1)[..., 0]))
    assert float(gate.max()) < 1.0
    np.testing.assert_array_equal(np.asarray(choice), np.asarray(jnp.argmax(probs + pr["bias"], -1)))

"""Acceptance rules: unit checks and exact distributions on small vocabularies (no model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zaya.decode import acceptance as A


def _setup(B=1, K=3, V=5, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    z = jax.random.normal(k1, (B, K + 1, V)) * 2
    d = jax.random.randint(k2, (B, K), 0, V)
    return z, d


def test_greedy_counts_leading_matches():
    z = jnp.log(jnp.array([[[.1, .9, 0, 0], [.8, .2, 0, 0], [0, 0, 1., 0], [0, 0, 0, 1.]]]) + 1e-9)
    n, nxt = A.get("greedy")(z, jnp.array([[1, 0, 3]]), None, jax.random.PRNGKey(0), {})
    assert int(n[0]) == 2 and int(nxt[0]) == 2  # third draft wrong: emit argmax at position 2
    n, nxt = A.get("greedy")(z, jnp.array([[1, 0, 2]]), None, jax.random.PRNGKey(0), {})
    assert int(n[0]) == 3 and int(nxt[0]) == 3  # all accepted: bonus = argmax of the last position


@pytest.mark.parametrize("q_kind", ["dirac", "sampled"])
def test_rejection_first_token_is_exactly_p(q_kind):
    """One draft position: the emitted first token (draft if accepted else the residual draw) ~ p exactly."""
    V, N = 6, 200_000
    z = jnp.log(jnp.array([[[.05, .4, .1, .2, .15, .1], [1 / 6] * 6]]))
    q = jnp.array([[[.3, .1, .3, .1, .1, .1]]])
    keys = jax.random.split(jax.random.PRNGKey(1), N)

    def one(k):
        kd, ka = jax.random.split(k)
        d = jax.random.categorical(kd, jnp.log(q[0]), -1)[None] if q_kind == "sampled" else jnp.array([[2]])
        n, nxt = A.get("rejection")(z, d, q if q_kind == "sampled" else None, ka, {"temperature": 1.0})
        return jnp.where(n[0] >= 1, d[0, 0], nxt[0])
    first = np.asarray(jax.vmap(one)(keys))
    freq = np.bincount(first, minlength=V) / N
    np.testing.assert_allclose(freq, [.05, .4, .1, .2, .15, .1], atol=4e-3)


def test_dirac_acceptance_rate_is_p_of_draft():
    z = jnp.log(jnp.array([[[.25, .75], [.5, .5]]]))
    keys = jax.random.split(jax.random.PRNGKey(2), 50_000)
    n = jax.vmap(lambda k: A.get("rejection")(z, jnp.array([[1]]), None, k, {"temperature": 1.0})[0][0])(keys)
    assert abs(float(n.mean()) - 0.75) < 0.01


def test_strict_and_typical_and_topk_shapes():
    z, d = _setup(B=4)
    for name in ("strict", "typical", "topk", "tidar_ratio", "rejection", "greedy"):
        n, nxt = A.get(name)(z, d, None, jax.random.PRNGKey(3), {"temperature": 1.0, "draft_logits": z[:, :-1]})
        assert n.shape == (4,) and nxt.shape == (4,) and int(n.max()) <= 3 and int(n.min()) >= 0


def test_mix_weight_one_is_identity_and_zero_trusts_the_drafter():
    z, _ = _setup(B=2, K=3)
    zd = jax.random.normal(jax.random.PRNGKey(4), z[:, :-1].shape) * 3
    d = jnp.argmax(zd, -1)  # drafts = drafter argmax
    o = {"diff_logits": zd}
    n0, _ = A.get("greedy", mix_weight=0.0)(z, d, None, jax.random.PRNGKey(0), o)
    assert (np.asarray(n0) == 3).all()  # w=0: the verifier is the drafter itself, everything is accepted
    assert A.get("greedy", mix_weight=1.0) is A.ACCEPTANCE["greedy"]


def test_register_a_new_criterion():
    @A.register("always_one")
    def always_one(z, d, q, rng, o):
        return jnp.minimum(jnp.ones(d.shape[0], jnp.int32), d.shape[1]), jnp.argmax(z[:, 1], -1)
    z, d = _setup(B=2)
    n, _ = A.get("always_one")(z, d, None, jax.random.PRNGKey(0), {})
    assert (np.asarray(n) == 1).all()
    del A.ACCEPTANCE["always_one"]
    with pytest.raises(ValueError, match="unknown acceptance"):
        A.get("always_one")

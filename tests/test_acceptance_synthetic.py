"""The ``synthetic`` rule (systems measurement): i.i.d. acceptance at a chosen beta, whatever the model says."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zaya
from zaya.decode import acceptance as A
from zaya.decode import samplers
from zaya.decode.options import DecodeOptions
from zaya.model.params import init


def _run(beta, B=20_000, N=4, V=7, temperature=0.0, seed=0):
    z = jax.random.normal(jax.random.PRNGKey(seed), (B, N + 1, V))
    d = jnp.zeros((B, N), jnp.int32)  # the drafts' content is ignored
    rule = A.get("synthetic")
    return z, jax.jit(lambda z, d, k: rule(z, d, None, k, {"beta": beta, "temperature": temperature}))(
        z, d, jax.random.PRNGKey(seed + 1))


@pytest.mark.parametrize("jit", [True, False])
def test_accepted_count_is_truncated_geometric(jit):
    beta, N, B = 0.7, 4, 20_000
    z = jax.random.normal(jax.random.PRNGKey(0), (B, N + 1, 7))
    fn = lambda z, k: A.get("synthetic")(z, jnp.zeros((B, N), jnp.int32), None, k, {"beta": beta})
    n, nxt = (jax.jit(fn) if jit else fn)(z, jax.random.PRNGKey(1))
    freq = np.bincount(np.asarray(n), minlength=N + 1) / B
    want = [beta ** k * (1 - beta) for k in range(N)] + [beta ** N]  # P(n = k): k accepted, then one rejected
    np.testing.assert_allclose(freq, want, atol=0.015)
    top = np.asarray(jnp.argmax(z, -1))
    np.testing.assert_array_equal(nxt, top[np.arange(B), np.asarray(n)])  # T=0: the verifier's argmax at n


def test_beta_one_accepts_everything_and_zero_nothing():
    _, (n1, _) = _run(1.0, B=64)
    _, (n0, _) = _run(0.0, B=64)
    assert (np.asarray(n1) == 4).all() and (np.asarray(n0) == 0).all()
    with pytest.raises(ValueError, match="beta must be in"):
        _run(1.5, B=4)


def test_sampled_next_token_follows_the_verifier():
    z, (n, nxt) = _run(0.0, B=4000, N=1, V=3, temperature=1.0)
    p = np.asarray(jax.nn.softmax(z[:, 0], -1)).mean(0)  # n == 0: the token at position 0
    freq = np.bincount(np.asarray(nxt), minlength=3) / 4000
    np.testing.assert_allclose(freq, p, atol=0.03)


def test_end_to_end_tokens_per_step_match_the_roofline_iid_model():
    """zaya.generate with random weights at a controlled acceptance: measured tokens per step == the sampler's
    expected_tokens_per_step(beta) (what the roofline uses), within sampling error."""
    c = zaya.preset("tiny", num_layers=1, vocab_size=64)
    model = zaya.Model(c, init(c, jax.random.PRNGKey(0)))
    beta, N = 0.7, 4
    res = zaya.generate(model, [[2, 5, 9]] * 8, sampler="two_forward", block_size=N, acceptance="synthetic",
                        beta=beta, max_new_tokens=160)
    want = samplers.get("two_forward").expected_tokens_per_step(beta, DecodeOptions.make(block_size=N))
    assert abs(res.stats["tokens_per_step"] - want) < 0.12 * want, (res.stats["tokens_per_step"], want)

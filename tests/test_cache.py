"""Cached decoding equals the full forward: prefill + single steps, ragged batches, rollback, commit of a prefix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomize
from zaya.config import preset
from zaya import layouts
from zaya.model.cache import commit, init_cache, rollback
from zaya.model.params import init
from zaya.model.transformer import Impl, apply, forward


@pytest.fixture(scope="module")
def model():
    c = preset("tiny")
    return c, randomize(init(c, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))


def _full(c, p, x):
    return apply(p, c, x, layouts.causal(*x.shape))[0]


@pytest.mark.parametrize("attn", ["reference", "chunked"])
def test_prefill_then_steps_equal_full_forward(model, attn):
    c, p = model
    impl = Impl(attention=attn)
    x = jax.random.randint(jax.random.PRNGKey(2), (2, 14), 5, c.vocab_size)
    full = _full(c, p, x)
    lens = jnp.array([5, 9])  # different prompt lengths in one batch (right padded)
    cache = init_cache(c, 2, 32)
    logits, cache = forward(p, c, x[:, :9], layouts.causal(2, 9, valid=lens), cache, n_commit=lens, impl=impl)
    for b in range(2):
        np.testing.assert_allclose(logits[b, : lens[b]], full[b, : lens[b]], atol=2e-5)
    step = jax.jit(lambda cache, tok: forward(p, c, tok, layouts.causal(2, 1, start=cache.length), cache, impl=impl))
    for _ in range(4):
        tok = jnp.take_along_axis(x, cache.length[:, None], 1)
        logit, cache = step(cache, tok)
        for b in range(2):
            np.testing.assert_allclose(logit[b, 0], full[b, int(cache.length[b]) - 1], atol=2e-5)


@pytest.mark.parametrize("window,to", [(None, 3), (8, 7)])  # full history: anywhere; ring of 8: <= 6 back
def test_rollback_and_continue(model, window, to):
    """Commit a wrong continuation, roll back to an earlier length, continue: equals the full forward."""
    c, p = model
    x = jax.random.randint(jax.random.PRNGKey(3), (1, 12), 5, c.vocab_size)
    junk = jax.random.randint(jax.random.PRNGKey(4), (1, 5), 5, c.vocab_size)
    full = _full(c, p, x)
    cache = init_cache(c, 1, 24, window=window)
    _, cache = forward(p, c, x[:, :8], layouts.causal(1, 8), cache)
    _, cache = forward(p, c, junk, layouts.causal(1, 5, start=8), cache)
    assert int(cache.length[0]) == 13
    cache = rollback(cache, to)
    logits, cache = forward(p, c, x[:, to:12], layouts.causal(1, 12 - to, start=to), cache)
    np.testing.assert_allclose(logits[0], full[0, to:12], atol=2e-5)


def test_commit_keeps_only_first_n(model):
    """A chunk of T tokens with n_commit < T: the cache equals a fresh prefill of the committed tokens."""
    c, p = model
    x = jax.random.randint(jax.random.PRNGKey(5), (2, 10), 5, c.vocab_size)
    cache = init_cache(c, 2, 16)
    _, chunk, _ = apply(p, c, x, layouts.causal(2, 10), cache)
    n = jnp.array([4, 7])
    got = commit(cache, chunk, n)
    for b in range(2):
        fresh = init_cache(c, 1, 16)
        _, fresh = forward(p, c, x[b:b + 1, : int(n[b])], layouts.causal(1, int(n[b])), fresh)
        L = int(n[b])
        np.testing.assert_array_equal(got.length[b], L)
        for name in ("k", "v"):
            np.testing.assert_allclose(getattr(got, name)[:, b, :L], getattr(fresh, name)[:, 0, :L], atol=2e-5)
            assert float(jnp.abs(getattr(got, name)[:, b, L:]).max()) == 0.0  # nothing beyond n was written
        for name in ("xqk", "vd"):
            np.testing.assert_allclose(getattr(got, name)[:, b, :L], getattr(fresh, name)[:, 0, :L], atol=1e-6)

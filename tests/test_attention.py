"""attend(): the chunked (flash-style) path equals the dense reference on every layout, with and without a cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zaya.model import attention
from zaya.model.layout import PREV_ZERO, Layout, causal, dense_mask, packed


def _qkv(key, B, T, H=4, K=2, d=8):
    k1, k2, k3 = jax.random.split(key, 3)
    return (jax.random.normal(k1, (B, T, H, d)), jax.random.normal(k2, (B, T, K, d)),
            jax.random.normal(k3, (B, T, K, d)))


def _tidar_like(S, b):
    """[clean 0..S-1 | masks 0..S-1] with blocks of b (the TiDAR training mask)."""
    pos = np.concatenate([np.arange(S), np.arange(S)])
    blk = np.concatenate([np.full(S, -1), np.arange(S) // b])
    ctx = np.concatenate([np.arange(S), (np.arange(S) // b) * b - 1])
    T = 2 * S
    return Layout(pos=jnp.asarray(pos)[None], seg=jnp.zeros((1, T), jnp.int32), blk=jnp.asarray(blk)[None],
                  ctx=jnp.asarray(ctx)[None], prev=jnp.full((1, T, 2), PREV_ZERO, jnp.int32))


def _dense_ref(q, k, v, m):
    B, T, H, d = q.shape
    K = k.shape[2]
    kk = jnp.repeat(k, H // K, 2)
    vv = jnp.repeat(v, H // K, 2)
    s = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(d)
    s = jnp.where(m[:, None], s, -jnp.inf)
    p = jnp.nan_to_num(jax.nn.softmax(s, -1))
    return jnp.einsum("bhts,bshd->bthd", p, vv)


def test_tidar_mask_matches_paper_figure():
    m = dense_mask(_tidar_like(6, 3))[0].astype(int)
    # rows: clean x0..x5 then masks M0..M5 (docs/tidar_and_samplers.md §1.2)
    assert (m[:6, :6] == np.tril(np.ones((6, 6)))).all() and m[:6, 6:].sum() == 0
    assert m[6:9, :6].sum() == 0 and (m[6:9, 6:9] == 1).all() and m[6:9, 9:].sum() == 0
    assert (m[9:, :3] == 1).all() and m[9:, 3:9].sum() == 0 and (m[9:, 9:] == 1).all()


@pytest.mark.parametrize("name", ["causal", "packed", "tidar", "padded"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_matches_dense(name, impl):
    B, T = (2, 24) if name != "tidar" else (1, 24)
    lay = {"causal": causal(B, T), "packed": packed(np.repeat([[0] * 7 + [1] * 10 + [2] * 7], B, 0)),
           "tidar": _tidar_like(12, 4), "padded": causal(B, T, valid=jnp.array([24, 13]))}[name]
    q, k, v = _qkv(jax.random.PRNGKey(0), B, T)
    ref = _dense_ref(q, k, v, jnp.asarray(dense_mask(lay)))
    fn = attention.IMPLS[impl]
    out = fn(q, k, v, lay, None, None, None) if impl == "reference" else fn(q, k, v, lay, None, None, None, tile=5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_cache_path_equals_full():
    """Queries over [cache ; chunk] equal the same queries in one full causal pass (B rows, different lengths)."""
    B, S, T = 2, 16, 3
    q, k, v = _qkv(jax.random.PRNGKey(1), B, S)
    full = _dense_ref(q, k, v, jnp.asarray(dense_mask(causal(B, S))))
    lens = jnp.array([9, 13])
    cache_k = jnp.zeros((B, 20) + k.shape[2:]).at[:, :S].set(k)
    cache_v = jnp.zeros((B, 20) + v.shape[2:]).at[:, :S].set(v)
    take = lambda x: jnp.stack([x[b, lens[b]:lens[b] + T] for b in range(B)])
    lay = causal(B, T, start=lens)
    for impl in ["reference", "chunked"]:
        out = attention.attend(take(q), take(k), take(v), lay, cache_k, cache_v, lens, impl=impl)
        np.testing.assert_allclose(np.asarray(out), np.asarray(take(full)), atol=1e-5)


def test_unknown_impl_is_an_error():
    q, k, v = _qkv(jax.random.PRNGKey(0), 1, 4)
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention.attend(q, k, v, causal(1, 4), impl="nope")

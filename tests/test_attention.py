"""attend(): the chunked (flash-style) path equals the dense reference on every layout, with and without a cache."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layout_reference import dense_mask
from zaya.layouts import PREV_ZERO, Layout, causal, packed
from zaya.model import attention


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
    # rows: clean x0..x5 then masks M0..M5, the TiDAR paper's figure: clean causal, each mask block sees the
    # clean tokens before it and itself
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


@pytest.mark.parametrize("limit,expect", [(0, "chunked"), (1 << 40, "reference")])
def test_auto_picks_by_size_and_matches_dense(monkeypatch, limit, expect):
    """auto runs chunked above AUTO_DENSE_MAX query-key pairs and reference below; both equal the dense math,
    without and with a cache (decode: T small, S = cache slots + new keys)."""
    monkeypatch.setattr(attention, "AUTO_DENSE_MAX", limit)
    calls = []
    for name in ["reference", "chunked"]:
        fn = attention.IMPLS[name]
        monkeypatch.setitem(attention.IMPLS, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    B, T = 2, 24
    lay = causal(B, T, valid=jnp.array([24, 13]))
    q, k, v = _qkv(jax.random.PRNGKey(2), B, T)
    attend = jax.jit(lambda *a: attention.attend(*a))  # default impl auto; a fresh function: the choice is traced
    out = attend(q, k, v, lay)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_dense_ref(q, k, v, jnp.asarray(dense_mask(lay)))),
                               atol=1e-5)
    lens = jnp.array([9, 13])
    full = _dense_ref(q, k, v, jnp.asarray(dense_mask(causal(B, T))))
    take = lambda x: jnp.stack([x[b, lens[b]:lens[b] + 2] for b in range(B)])
    out = attend(take(q), take(k), take(v), causal(B, 2, start=lens), k, v, lens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(take(full)), atol=1e-5)
    assert calls == [expect, expect]
    assert attention.auto_choice(2, T + 2) == expect


def test_tidar_loss_and_grad_chunked_equal_reference(monkeypatch):
    """A TiDAR training loss and its gradient (tiny model, [clean | masks] layout, two documents in a row) are the
    same with chunked attention (5-key tiles: several tiles, a padded last one, remat in the scan) as with the
    dense reference."""
    from test_layouts import np_params
    from zaya.config import preset
    from zaya.model.transformer import Impl
    from zaya.tidar.objective import TidarOptions, loss_fn
    from zaya.train.step import jit_options

    monkeypatch.setitem(attention.IMPLS, "chunked_tile5", functools.partial(attention.IMPLS["chunked"], tile=5))
    c = preset("tiny")
    p = np_params(c, seed=3)
    doc = np.array([[0] * 16, [0] * 10 + [1] * 6], np.int32)
    x = np.asarray(jax.random.randint(jax.random.PRNGKey(4), doc.shape, 5, c.vocab_size), np.int32)
    batch = {"tokens": x, "doc_ids": doc, "loss_mask": np.ones(doc.shape, np.float32)}
    opts = TidarOptions(block_size=4)

    @functools.partial(jax.jit, **jit_options(True))
    def both(p):
        vg = lambda a: jax.value_and_grad(lambda p: loss_fn(p, c, batch, opts, None, Impl(attention=a))[0])(p)
        return vg("reference"), vg("chunked_tile5")
    (l_ref, g_ref), (l_ch, g_ch) = both(p)
    np.testing.assert_allclose(float(l_ch), float(l_ref), rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_ref))
    assert scale > 0
    for a, b in zip(jax.tree.leaves(g_ch), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale)


def test_chunked_backward_keeps_no_per_tile_state():
    """Without a cache, chunked's gradient recomputes each key tile from the saved log-sum-exp (FlashAttention's
    backward): its compiled temporaries stay near one [T, tile] block per head, while differentiating the plain
    online-softmax scan keeps a [T, d] carry per tile (n_tiles of them). Same gradients."""
    B, T, H, K, d, tile = 1, 1024, 4, 2, 32, 64
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, d)), jnp.float32) for n in (H, K, K))
    lay = causal(B, T)

    def flash(q, k, v):
        return attention.IMPLS["chunked"](q, k, v, lay, None, None, None, tile=tile).sum()

    def scan(q, k, v):  # the online-softmax scan differentiated by autodiff (the cached path's code)
        qq = attention._queries(q, K)
        [(kk, vv, mask)] = attention._sources(k, v, lay, None, None, None)
        return attention._finish(attention._scan_partial(qq, kk, vv, mask, tile), q.shape, v.dtype).sum()
    grads = [jax.jit(jax.grad(f, (0, 1, 2))) for f in (flash, scan)]
    for a, b in zip(*(g(q, k, v) for g in grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    temp = [g.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes for g in grads]
    carry, block = B * H * T * d * 4, B * H * T * tile * 4  # fp32 [T, d] accumulators, [T, tile] scores
    assert temp[1] > (T // tile) * carry, temp  # the scan's residuals: a carry per tile (16 MiB here)
    assert temp[0] < 8 * block, temp  # a few score blocks (s, p, dp, ds) and O(T d) buffers: no per-tile state

    def layers(q, k, v):  # as in training: a scan over layers of a rematerialised body
        def body(h, w):
            return h + attention.IMPLS["chunked"](h * w, k, v, lay, None, None, None, tile=tile), None
        return (jax.lax.scan(jax.checkpoint(body, prevent_cse=False), q, jnp.ones(3))[0] ** 2).sum()
    hlo = jax.jit(jax.grad(layers, (0, 1, 2))).lower(q, k, v).compile().as_text()
    # not every tile's mask computed ahead and kept ([n_tiles, B, K, G, T, tile] bools: 32 GiB at 32k TiDAR)
    assert f"pred[{T // tile}," not in hlo

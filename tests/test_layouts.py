"""zaya.layouts: id-built layouts == loop-built dense references (the paper's rule for TiDAR training, the visible-token
definition for conv predecessors); train/decode consistency through the model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layout_reference import dense_mask, prev_from_mask, reference_layout
from zaya import layouts
from zaya.config import preset
from zaya.model.cache import init_cache
from zaya.model.params import _is_spec, param_dtype, param_specs
from zaya.model.transformer import Impl, apply, forward
from zaya.tidar.objective import TidarOptions, build


def np_params(c, seed=0, scale=0.3):
    """Training init then conftest.randomize's perturbation, in numpy (no per-op XLA compiles: fast on CPU)."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        shape, _, kind = spec
        x = np.zeros(shape)
        if kind == "normal":
            x = 0.02 * rng.standard_normal(shape)
        elif kind == "conv":
            x = 0.1 * rng.standard_normal(shape)
            x[:, 1] += 1.0 if len(shape) == 3 else np.eye(shape[-1])
        elif kind == "bias":
            x[..., -1] = -1.0
        elif kind == "ones":
            x = np.ones(shape)
        x = x + rng.standard_normal(shape) * scale * (np.abs(x).mean() + 0.05)
        return jnp.asarray(x, param_dtype(tuple(k.key for k in path), c))
    return jax.tree_util.tree_map_with_path(leaf, param_specs(c), is_leaf=_is_spec)


DOCS = [np.array([[0] * 5 + [1] * 9 + [2] * 2, [0] * 16]),
        np.array([[3] * 11 + [-1] * 5, [0] * 2 + [1] * 12 + [2] * 2]),
        np.array([[0] * 4 + [1] * 8 + [2] * 4, [0] * 9 + [-1] * 7])]


def _valid(lay):
    return np.asarray(lay.seg) >= 0


@pytest.mark.parametrize("block_causal", [False, True])
@pytest.mark.parametrize("b", [1, 3, 4])
def test_training_layout_matches_reference(b, block_causal):
    """training(): global blocks (default) and document-aligned blocks; mask, positions, conv predecessors."""
    for doc in DOCS:
        for aligned in (False, True):
            lay = layouts.training(doc, b, block_causal, doc_aligned=aligned)
            _, pos, m = reference_layout(doc, b, block_causal=block_causal, doc_aligned=aligned)
            np.testing.assert_array_equal(dense_mask(lay), m)
            v = _valid(lay)
            np.testing.assert_array_equal(np.asarray(lay.pos)[v], pos[v])
            np.testing.assert_array_equal(np.asarray(lay.prev)[v], prev_from_mask(lay, False)[v])


@pytest.mark.parametrize("block_causal", [False, True])
@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("aligned", [False, True])
def test_anchored_layout_matches_reference(b, block_causal, aligned):
    """Anchored K+1 blocks (row blocks with the owner rule, or document-aligned): the anchor slot stands at kb-1;
    the block sees clean <= kb-2 plus itself."""
    for doc in DOCS + [np.array([[0] * 3 + [-1] * 5 + [1] * 8, [0] * 6 + [1] * 10])]:  # padding owns a block
        lay = layouts.training_anchored(doc, b, block_causal, doc_aligned=aligned)
        slots, pos, m = reference_layout(doc, b, anchor=True, block_causal=block_causal, doc_aligned=aligned)
        np.testing.assert_array_equal(dense_mask(lay), m)
        v = _valid(lay)
        np.testing.assert_array_equal(np.asarray(lay.pos)[v], pos[v])
        # conv predecessors are 'the visible token at pos-1 / pos-2' (prev_from_mask also asserts it is unique)
        np.testing.assert_array_equal(np.asarray(lay.prev)[v], prev_from_mask(lay, False)[v])
        src = np.asarray(layouts.anchor_sources(doc, b, doc_aligned=aligned))
        for r in range(doc.shape[0]):
            want = [i - 1 if k == "anchor" else -1 for k, i in slots[r][doc.shape[1]::b + 1]]
            np.testing.assert_array_equal(src[r], want)
            idx = layouts.anchored_mask_index(doc.shape[1], b)
            assert [slots[r][j] for j in idx] == [("mask", i) for i in range(doc.shape[1])]


def test_builders_trace_under_jit():
    doc = jnp.asarray(DOCS[0])
    for f in (lambda d: layouts.training(d, 4), lambda d: layouts.training(d, 4, doc_aligned=True),
              lambda d: layouts.training_anchored(d, 4), lambda d: layouts.training_anchored(d, 4, doc_aligned=True),
              layouts.packed):
        a, b = f(doc), jax.jit(f)(doc)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_anchored_needs_whole_blocks_and_draft_anchored_is_one_block():
    with pytest.raises(ValueError, match="multiple of block"):
        layouts.training_anchored(np.zeros((1, 10), int), 4)
    lay = layouts.draft_anchored(jnp.array([5, 9]), 4)
    assert lay.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(lay.pos), [[5, 6, 7, 8, 9], [9, 10, 11, 12, 13]])
    np.testing.assert_array_equal(np.asarray(lay.ctx), [[4] * 5, [8] * 5])
    cache = layouts.PREV_CACHE
    np.testing.assert_array_equal(np.asarray(lay.prev[0, :2]), [[cache, cache], [0, cache]])


def test_packed_matches_reference():
    """packed(): the clean half of the TiDAR reference (causal per document, positions restart, padding isolated)."""
    for doc in DOCS:
        S = doc.shape[1]
        lay = layouts.packed(doc)
        _, pos, m = reference_layout(doc, 4)
        v = _valid(lay)
        np.testing.assert_array_equal(dense_mask(lay), m[:, :S, :S])
        np.testing.assert_array_equal(np.asarray(lay.pos)[v], pos[:, :S][v])
        np.testing.assert_array_equal(np.asarray(lay.prev)[v], prev_from_mask(lay, False)[v])


def _decode_reference(parts, valid_B, block_causal):
    """Dense mask of one row of a decode chunk. parts[0] = (positions of the clean tokens); parts[j > 0] =
    (positions of mask block j, number of leading clean chunk tokens it sees). Clean tokens are causal; a block
    sees its clean tokens and itself (causally with block_causal); tokens at chunk index >= valid are padding."""
    kinds = [(0, p, None) for p in parts[0]] + [(j, p, n) for j, (ps, n) in enumerate(parts[1:], 1) for p in ps]
    T = len(kinds)
    m = np.zeros((T, T), bool)
    for q, (jq, pq, nq) in enumerate(kinds):
        for k, (jk, pk, _) in enumerate(kinds):
            if q >= valid_B and jq == 0 or k >= valid_B and jk == 0:
                continue
            if jk == 0:
                m[q, k] = pk <= pq if jq == 0 else k < nq
            else:
                m[q, k] = jk == jq and (not block_causal or pk <= pq)
    return m


@pytest.mark.parametrize("block_causal", [False, True])
def test_decode_layouts_match_reference(block_causal):
    """verify, draft_block, draft_anchored, single_forward, tidar_published, prefill_block: dense mask == the
    reference, conv predecessors == the visible token at pos-1 / pos-2 (else the cache)."""
    L = jnp.array([1, 6])
    K = 3
    W = K + 1
    cases = [(layouts.verify(L, K), lambda l: [range(l, l + W)]),
             (layouts.draft_block(L, K, block_causal), lambda l: [[], (range(l, l + K), 0)]),
             (layouts.draft_anchored(L, K, block_causal), lambda l: [[], (range(l, l + W), 0)])]
    for lv in ((0,), (0, 2), tuple(range(W))):
        cases.append((layouts.single_forward(L, K, lv, block_causal),
                      lambda l, lv=lv: [range(l, l + W)] + [(range(l + j + 1, l + j + 1 + W), j + 1) for j in lv]))
    cases.append((layouts.tidar_published(L, K, block_causal),
                  lambda l: [range(l, l + K)] + [(range(l + k, l + k + K), k) for k in range(1, K + 1)]))
    for lay, parts in cases:
        for r, l in enumerate(np.asarray(L)):
            np.testing.assert_array_equal(dense_mask(lay)[r], _decode_reference(parts(l), 10 ** 6, block_causal))
        np.testing.assert_array_equal(np.asarray(lay.prev), prev_from_mask(lay, True))
    T, n = 5, np.array([2, 5])
    lay = layouts.prefill_block(jnp.asarray(n), T, W)
    for r in range(2):
        np.testing.assert_array_equal(dense_mask(lay)[r], _decode_reference([range(T), (range(n[r], n[r] + W), n[r])],
                                                                            n[r], False))
    v = _valid(lay)
    np.testing.assert_array_equal(np.asarray(lay.prev)[v], prev_from_mask(lay, False)[v])


# ---------------------------------------------------------------------------------------------------------------
# Train/decode consistency with the model (the training block == drafting after a cached prefix).

@pytest.fixture(scope="module")
def model():
    c = preset("tiny")
    return c, np_params(c)


IMPL = Impl(moe="dense")  # same math as ragged, compiles faster on CPU


@functools.partial(jax.jit, static_argnums=1)
def _apply(p, c, x, lay):
    return apply(p, c, x, lay, impl=IMPL)[0]


@functools.partial(jax.jit, static_argnums=1)
def _prefill(p, c, x, n):
    """zaya.model.forward over the whole rows, committing the first n[r] tokens (rows padded after n[r])."""
    B, T = x.shape
    return forward(p, c, x, layouts.causal(B, T, valid=n), init_cache(c, B, T + 8), n_commit=n, impl=IMPL)


@functools.partial(jax.jit, static_argnums=1)
def _draft(p, c, x, lay, cache):
    return forward(p, c, x, lay, cache, impl=IMPL)[0]


S, B_ = 16, 4


def _tokens(c):
    return jax.random.randint(jax.random.PRNGKey(7), (2, S), 5, c.vocab_size)


def test_training_blocks_equal_decode_drafting(model):
    """Non-anchored: rows 0/1 draft blocks k0/k1 (several positions, incl. block 0) after their clean prefixes."""
    c, p = model
    x = _tokens(c)
    bt = build(x, jnp.zeros((2, S), jnp.int32), None, TidarOptions(block_size=B_), c.mask_token_id)
    train = np.asarray(_apply(p, c, bt["inputs"], bt["layout"]))
    # the clean half is exactly an AR LM (a plain causal forward)
    np.testing.assert_allclose(train[:, :S], np.asarray(_prefill(p, c, x, jnp.array([S, S]))[0]), atol=2e-5)
    masks = jnp.full((2, B_), c.mask_token_id, jnp.int32)
    for k0, k1 in [(1, 3), (2, 0), (3, 2)]:
        L = np.array([k0 * B_, k1 * B_])
        cache = _prefill(p, c, x, jnp.asarray(L))[1]
        draft = np.asarray(_draft(p, c, masks, layouts.draft_block(jnp.asarray(L), B_), cache))
        for r in range(2):
            np.testing.assert_allclose(draft[r], train[r, S + L[r]:S + L[r] + B_], atol=2e-5)


def test_row_blocks_start_mid_document_like_decode_drafting(model):
    """Row blocks (the default): in a packed row, document 1 starts at index 5, so the row block at index 8 starts
    at its in-document position 3 and equals a drafting block after a cache of that document's first 3 tokens;
    decoding drafts from wherever the committed text ends, and training sees blocks at every such offset. A block
    over a document end is b masks of that document, as a drafting block near the end of an answer is."""
    c, p = model
    x = _tokens(c)
    doc = jnp.asarray([[0] * 5 + [1] * 11] * 2)
    bt = build(x, doc, None, TidarOptions(block_size=B_), c.mask_token_id)
    assert bt["layout"].pos[0, S + 8] == 3
    train = np.asarray(_apply(p, c, bt["inputs"], bt["layout"]))
    alone = jnp.concatenate([x[:, 5:], x[:, :5]], 1)  # document 1 in a row of its own
    cache = _prefill(p, c, alone, jnp.array([3, 3]))[1]
    masks = jnp.full((2, B_), c.mask_token_id, jnp.int32)
    draft = np.asarray(_draft(p, c, masks, layouts.draft_block(jnp.array([3, 3]), B_), cache))
    np.testing.assert_allclose(draft, train[:, S + 8:S + 8 + B_], atol=2e-5)
    # the block at index 4 holds document 0's last token and document 1's first three: all four masks belong to
    # document 0 (positions 4..7), exactly the b-mask drafting block after its first 4 tokens
    assert bt["diff_valid"][0, 4] == 1 and not bt["diff_valid"][0, 5:8].any()
    cache = _prefill(p, c, x, jnp.array([4, 4]))[1]
    draft = np.asarray(_draft(p, c, masks, layouts.draft_block(jnp.array([4, 4]), B_), cache))
    np.testing.assert_allclose(draft, train[:, S + 4:S + 4 + B_], atol=2e-5)


@pytest.mark.parametrize("anchor", ["token", "mask"])
def test_anchored_blocks_equal_decode_drafting(model, anchor):
    """Anchored: the training block (anchor slot included) == the drafting forward after a cache of positions
    0..kb-2: [x_{kb-1}, mask x b] (token anchor, ``draft_anchored``) or [mask x (b+1)] at the bonus position kb-1
    (mask anchor, the same layout with a mask in slot 0: the geometry of single_forward's proposals)."""
    c, p = model
    x = _tokens(c)
    bt = build(x, jnp.zeros((2, S), jnp.int32), None, TidarOptions(block_size=B_, anchor=anchor), c.mask_token_id)
    train = np.asarray(_apply(p, c, bt["inputs"], bt["layout"]))
    idx = np.asarray(bt["diff_index"])
    for k0, k1 in [(1, 3), (2, 1), (3, 2)]:
        kb = np.array([k0 * B_, k1 * B_])
        first = x[jnp.arange(2), kb - 1] if anchor == "token" else jnp.full((2,), c.mask_token_id)
        toks = jnp.concatenate([first[:, None], jnp.full((2, B_), c.mask_token_id)], 1)
        cache = _prefill(p, c, x, jnp.asarray(kb - 1))[1]
        L = jnp.asarray(kb - 1)
        draft = np.asarray(_draft(p, c, toks, layouts.draft_anchored(L, B_), cache))
        for r in range(2):
            np.testing.assert_allclose(draft[r, 1:], train[r, idx[kb[r]:kb[r] + B_]], atol=2e-5)
            np.testing.assert_allclose(draft[r, 0], train[r, idx[kb[r]] - 1], atol=2e-5)  # the anchor slot


def test_anchored_row_blocks_start_mid_document_like_decode_drafting(model):
    """Mask-anchored row blocks (the default) in a packed row where document 1 starts at index 5: the chunk of
    index 8 ([mask at position 2, masks at 3..6] of document 1) equals drafting [mask x 5] after a cache of
    document 1's first 2 tokens; the chunk of index 4 belongs to document 0 (positions 3..7, past its end: b masks
    whatever the length, as decoding near an answer's end) and equals drafting after document 0's first 3."""
    c, p = model
    x = _tokens(c)
    doc = jnp.asarray([[0] * 5 + [1] * 11] * 2)
    bt = build(x, doc, None, TidarOptions(block_size=B_, anchor="mask"), c.mask_token_id)
    train = np.asarray(_apply(p, c, bt["inputs"], bt["layout"]))
    masks = jnp.full((2, B_ + 1), c.mask_token_id, jnp.int32)
    alone = jnp.concatenate([x[:, 5:], x[:, :5]], 1)  # document 1 in a row of its own
    for g, L, row in [(2, 2, alone), (1, 3, x)]:
        cache = _prefill(p, c, row, jnp.array([L, L]))[1]
        draft = np.asarray(_draft(p, c, masks, layouts.draft_anchored(jnp.array([L, L]), B_), cache))
        chunk = S + g * (B_ + 1)
        np.testing.assert_allclose(draft, train[:, chunk:chunk + B_ + 1], atol=2e-5)
    assert not np.asarray(bt["diff_valid"])[0, 5:8].any() and np.asarray(bt["diff_valid"])[0, 4] == 1


def _verify_then_block(length_B, N: int, width: int) -> layouts.Layout:
    """A layout written outside the package, as a researcher would: ``[verify (N+1) | mask x width]`` where the
    masks draft after the whole verify chunk (the step after a full acceptance). One function, nothing else."""
    length = length_B[:, None]
    t = jnp.arange(width, dtype=jnp.int32)
    pos = length + N + 1 + t
    prev = layouts.conv_prev(pos, block_from=length + N + 1, block_at=lambda d: N + 1 + t - d, clean_from=length,
                             clean_at=lambda d: pos - d - length, cache=True)
    ctx = jnp.broadcast_to(length + N, pos.shape)  # the masks see the cache and the whole verify chunk
    masks = layouts.Layout(pos=pos, seg=jnp.zeros_like(pos), blk=jnp.zeros_like(pos), ctx=ctx, prev=prev)
    return layouts.concat(layouts.verify(length_B, N), masks)


def test_a_new_layout_is_one_builder_function(model):
    """The layout above: its mask and conv predecessors match the references, and its masks' logits equal a
    drafting forward after committing the verify chunk."""
    c, p = model
    N, W = 3, 4
    length = jnp.array([2, 5])
    lay = _verify_then_block(length, N, W)
    ref = _decode_reference([range(0, N + 1), (range(N + 1, N + 1 + W), N + 1)], 10 ** 6, False)
    np.testing.assert_array_equal(dense_mask(lay), np.stack([ref, ref]))  # positions shift per row, the mask does not
    np.testing.assert_array_equal(np.asarray(lay.prev), prev_from_mask(lay, True))
    x = _tokens(c)
    cache = _prefill(p, c, x, length)[1]
    v = jnp.stack([x[r, int(n):int(n) + N + 1] for r, n in enumerate(length)])
    masks = jnp.full((2, W), c.mask_token_id, jnp.int32)
    both = np.asarray(_draft(p, c, jnp.concatenate([v, masks], 1), lay, cache))
    _, after = forward(p, c, v, layouts.verify(length, N), cache, impl=IMPL)
    alone = np.asarray(_draft(p, c, masks, layouts.draft_block(length + N + 1, W), after))
    np.testing.assert_allclose(both[:, N + 1:], alone, atol=2e-5)


"""CCA conv state and delayed value: decode-time equivalence, and mask blocks that follow a clean prefix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomize
from layout_reference import prev_from_mask
from zaya import layouts
from zaya.config import preset
from zaya.model.cache import commit, init_cache
from zaya.model.params import init
from zaya.model.transformer import apply


@pytest.fixture(scope="module")
def model():
    c = preset("tiny")
    return c, randomize(init(c, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))


def test_prev_matches_visible_token_definition():
    """The builders' conv predecessors are 'the visible token at pos-1 / pos-2' (layout doc), incl. documents."""
    doc = np.array([[0] * 5 + [1] * 9 + [2] * 2, [0] * 16])
    lay = layouts.training(doc, block=4)
    np.testing.assert_array_equal(np.asarray(lay.prev), prev_from_mask(lay, has_cache=False))
    lay = layouts.packed(doc)
    np.testing.assert_array_equal(np.asarray(lay.prev), prev_from_mask(lay, has_cache=False))


def test_block_sees_clean_conv_state_and_leaves_clean_untouched(model):
    """Training layout [clean | masks] == decode: prefill the clean prefix, then draft the block with the cache."""
    c, p = model
    S, b = 12, 4
    x = jax.random.randint(jax.random.PRNGKey(2), (1, S), 5, c.vocab_size)
    masks = jnp.full((1, S), c.mask_token_id)
    lay = layouts.training(np.zeros((1, S), int), b)
    logits_train = apply(p, c, jnp.concatenate([x, masks], 1), lay)[0]
    clean_only = apply(p, c, x, layouts.causal(1, S))[0]
    # the clean half is exactly an AR LM: masks never alter clean tokens' states
    np.testing.assert_allclose(np.asarray(logits_train[:, :S]), np.asarray(clean_only), atol=2e-5)
    for k in range(1, S // b):
        L = k * b
        cache = init_cache(c, 1, S + b)
        _, chunk, _ = apply(p, c, x[:, :L], layouts.causal(1, L), cache)
        cache = commit(cache, chunk, L)
        draft = apply(p, c, masks[:, :b], layouts.draft_block(jnp.array([L]), b), cache)[0]
        np.testing.assert_allclose(np.asarray(draft), np.asarray(logits_train[:, S + L:S + L + b]), atol=2e-5)


def test_packed_documents_do_not_leak(model):
    """A document packed after another gives the same logits as the document alone (attention and conv state)."""
    c, p = model
    a = jax.random.randint(jax.random.PRNGKey(3), (1, 7), 5, c.vocab_size)
    d = jax.random.randint(jax.random.PRNGKey(4), (1, 9), 5, c.vocab_size)
    both = apply(p, c, jnp.concatenate([a, d], 1), layouts.packed(np.array([[0] * 7 + [1] * 9])))[0]
    alone = apply(p, c, d, layouts.causal(1, 9))[0]
    np.testing.assert_allclose(np.asarray(both[:, 7:]), np.asarray(alone), atol=2e-5)


def test_training_layout_with_documents_matches_separate_sequences(model):
    """Document masking in the TiDAR layout: each document's clean and mask logits equal its own layout's."""
    c, p = model
    S, b = 16, 4
    x = jax.random.randint(jax.random.PRNGKey(5), (1, S), 5, c.vocab_size)
    doc = np.array([[0] * 6 + [1] * 10])
    masks = jnp.full((1, S), c.mask_token_id)
    packed_logits = apply(p, c, jnp.concatenate([x, masks], 1), layouts.training(doc, b))[0]
    first = apply(p, c, jnp.concatenate([x[:, :6], masks[:, :6]], 1), layouts.training(np.zeros((1, 6), int), b))[0]
    np.testing.assert_allclose(np.asarray(packed_logits[:, :6]), np.asarray(first[:, :6]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(packed_logits[:, S:S + 4]), np.asarray(first[:, 6:10]), atol=2e-5)

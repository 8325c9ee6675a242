"""AR generation: greedy equals the full-forward argmax, per-row stopping, sampling filters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zaya
from conftest import randomize
from zaya.api import Model
from zaya.decode import sampling
from zaya.model.params import init


@pytest.fixture(scope="module")
def model():
    c = zaya.preset("tiny")
    return Model(c, randomize(init(c, jax.random.PRNGKey(0), std=0.3), jax.random.PRNGKey(1)))


def _greedy_ref(m, row, n):
    """Greedy by full forwards. One padded shape for every step (one compile): causal logits at t - 1 ignore the
    padding after it."""
    seq = np.zeros((1, len(row) + n), np.int32)
    seq[0, :len(row)] = row
    for t in range(len(row), len(row) + n):
        seq[0, t] = int(m.logits(seq)[0, t - 1].argmax())
    return seq[0, len(row):].tolist()


def test_greedy_matches_full_forward(model):
    rows = [[2, 17, 301, 45], [2, 9, 511, 128, 3, 77, 260]]
    res = zaya.generate(model, rows, max_new_tokens=8)
    assert res.tokens == [_greedy_ref(model, r, 8) for r in rows]
    # the first token comes from the prefill logits; no forward after the last token (its logits are never read)
    assert res.stats["forwards"] == 7 and res.stats["tokens"] == 16 and res.stats["tokens_per_forward"] == 1.0
    tokens, stats = res  # unpacks as (tokens, stats)
    assert stats["seconds"] > 0


def test_rows_stop_independently_on_eos(model):
    rows = [[2, 17, 301, 45], [2, 9, 511, 128, 3, 77, 260]]
    ref = [_greedy_ref(model, r, 8) for r in rows]
    eos = ref[0][2]  # row 0 hits it at step 3
    res = zaya.generate(model, rows, max_new_tokens=8, eos_id=eos)
    for got, want in zip(res.tokens, ref):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert got == want[:cut]
    # batch accounting: row 0 stops after 3 tokens while row 1 runs on. Per active row AR makes exactly one token per
    # forward; per batch row the 4 forwards row 0 rode along in are charged to it
    made = sum(map(len, res.tokens)) - 2
    assert res.stats["row_forwards"] == made and res.stats["tokens_per_forward"] == 1.0
    assert res.stats["tokens_per_forward_batch"] == made / (2 * res.stats["forwards"]) < 1.0


def test_block_sampler_charges_each_row_only_its_own_forwards(model):
    """Rows of a two_forward batch finish at different steps (row 0 hits EOS early): each row is charged the forwards
    of the steps it was active in (two per step; the first step's drafts come with the prefill), none after; the
    per-batch-row figure charges the ride-alongs too."""
    rows = [[2, 17, 301, 45], [2, 9, 511, 128, 3, 77, 260]]
    free = zaya.generate(model, rows, max_new_tokens=12, sampler="two_forward", block_size=3, trace=True)
    eos = free.tokens[0][1]  # row 0 stops at its second token; row 1 (unless it emits it too) runs on
    res = zaya.generate(model, rows, max_new_tokens=12, sampler="two_forward", block_size=3, eos_id=eos, trace=True)
    active = np.array([s["active"] for s in res.trace])  # [steps, B]
    assert active[:, 0].sum() < active[:, 1].sum()  # the rows really finish at different steps
    # row 1 is active to the end: charged every forward; row 0 only those of its own steps (at most two per step)
    F = res.stats["forwards"]
    assert F < res.stats["row_forwards"] <= F + 2 * active[:, 0].sum() < 2 * F
    made = sum(map(len, res.tokens)) - 2
    assert res.stats["tokens_per_forward"] == made / res.stats["row_forwards"]
    assert res.stats["tokens_per_forward_batch"] == made / (2 * res.stats["forwards"]) < res.stats["tokens_per_forward"]


def test_stop_sequence(model):
    row = [2, 17, 301, 45]
    ref = _greedy_ref(model, row, 8)
    res = zaya.generate(model, [row], max_new_tokens=8, stop=[ref[2:4]])
    assert res.tokens[0] == ref[:4]


def test_sampling_is_seeded_and_filtered(model):
    rows = [[2, 17, 301, 45]] * 2
    a = zaya.generate(model, rows, max_new_tokens=6, temperature=1.0, top_k=3, seed=7).tokens
    b = zaya.generate(model, rows, max_new_tokens=6, temperature=1.0, top_k=3, seed=7).tokens
    assert a == b


def test_filter_logits_top_k_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
    z = sampling.filter_logits(logits, 1.0, top_k=2)
    assert np.isfinite(np.asarray(z)).sum() == 2
    z = sampling.filter_logits(logits, 1.0, top_p=0.7)  # 0.5 < 0.7, 0.75 >= 0.7 -> keep two
    assert np.isfinite(np.asarray(z)).tolist() == [[True, True, False, False]]
    p = sampling.probs(logits, 1.0, top_p=0.7)
    np.testing.assert_allclose(np.asarray(p), [[2 / 3, 1 / 3, 0, 0]], atol=1e-6)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = jax.vmap(lambda k: sampling.sample(logits[0], k, 1.0, top_k=2))(keys)
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    assert abs(freq[0] - 2 / 3) < 0.03 and freq[2:].sum() == 0


def test_bad_prompts_are_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        zaya.generate(model, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt ids"):
        zaya.generate(model, [[10**6]], max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown sampler"):
        zaya.generate(model, [[2]], sampler="nope")


@pytest.mark.parametrize("sampler,kw", [("ar", {}), ("two_forward", dict(block_size=3))])
def test_generate_on_the_model_mesh_equals_single_device(model, sampler, kw):
    """Model.mesh set: rows split over data x fsdp, weights over tensor (8 simulated devices); same tokens and
    statistics as one device."""
    from zaya import sharding
    from zaya.api import Model
    if jax.device_count() < 8:
        pytest.fail("needs 8 (simulated) devices: conftest sets XLA_FLAGS before jax starts")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = Model(model.config, sharding.shard_params(model.params, model.config, mesh), mesh=mesh)
    rows = [[2, 17, 301, 45], [2, 9, 511, 128, 3, 77, 260], [2, 5], [2, 40, 41]]
    ref = zaya.generate(model, rows, sampler=sampler, max_new_tokens=6, **kw)
    got = zaya.generate(sharded, rows, sampler=sampler, max_new_tokens=6, trace=True, **kw)
    assert got.tokens == ref.tokens
    assert got.stats["forwards"] == ref.stats["forwards"] and got.stats["steps"] == ref.stats["steps"]
    assert len(sharded.params["embed"].sharding.device_set) == 8

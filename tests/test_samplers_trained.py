"""Greedy block decoding on a *trained* model (drafts really get accepted) is still exactly AR greedy."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zaya
from zaya.api import Model
from zaya.decode.generate import generate
from zaya.model.params import init
from zaya.tidar.objective import TidarOptions, loss_fn

BLOCK = 8
pytestmark = pytest.mark.numerics  # trains a model: its behaviour depends on the CPU's rounding


@pytest.fixture(scope="module")
def trained():
    """A 1-layer MoE trained with the TiDAR objective on noisy periodic sequences (learnable by AR and diffusion)."""
    c = zaya.preset("tiny", num_layers=1, vocab_size=32)
    params = init(c, jax.random.PRNGKey(0), std=0.1)
    opts = TidarOptions(block_size=BLOCK, alpha=1.0)
    opt = optax.adam(1e-2)
    state = opt.init(params)
    S = 64

    def batch(key):
        k1, k2 = jax.random.split(key)
        period = jax.random.randint(k1, (16, 1), 3, 7)
        start = jax.random.randint(k2, (16, 1), 0, 20)
        toks = 5 + (start + jnp.arange(S)[None] % period) % 20  # repeating cycles of 3..6 distinct tokens
        return {"tokens": toks.astype(jnp.int32), "doc_ids": jnp.zeros((16, S), jnp.int32),
                "loss_mask": jnp.ones((16, S), jnp.float32)}

    @jax.jit
    def step(params, state, key):
        (loss, _), g = jax.value_and_grad(lambda p: loss_fn(p, c, batch(key), opts, key), has_aux=True)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    key = jax.random.PRNGKey(1)
    for i in range(150):
        params, state, loss = step(params, state, jax.random.fold_in(key, i))
    return Model(c, params), float(loss)


PROMPTS = [[5, 6, 7, 5, 6, 7, 5], [10, 11, 12, 10, 11, 12, 10, 11], [15, 16, 17, 15, 16, 17]]  # cycles it learned


@pytest.fixture(scope="module")
def ref(trained):
    return generate(trained[0], PROMPTS, max_new_tokens=32).tokens


def test_trained_model_accepts_drafts_and_stays_exact(trained, ref):
    model, loss = trained
    assert loss < 1.0, f"premise: the fixture model must learn the cycles (final loss {loss:.3f} >= 1.0)"
    for kw in (dict(sampler="two_forward", block_size=3), dict(sampler="single_forward", block_size=BLOCK - 1),
               dict(sampler="single_forward", block_size=12, levels=(0, 3, 6, 9))):
        res = generate(model, PROMPTS, max_new_tokens=32, **kw)
        assert res.tokens == ref, kw
        hist = res.stats["tokens_per_step_hist"]
        # premise of the exactness check: drafts really accepted (mostly 3+ tokens a step; AR: 1)
        assert sum(hist[3:]) > sum(hist[:2]), (f"premise: the trained model should accept drafts in most steps "
                                               f"with {kw}; tokens-per-step histogram {hist}")


def _cut(row, eos, stop, budget):
    """A reference row cut at the budget, after the first EOS, or after the first completed stop sequence."""
    for i in range(min(budget, len(row))):
        if row[i] == eos or row[max(i - len(stop) + 1, 0):i + 1] == stop:
            return row[:i + 1]
    return row[:budget]


def _inside_accepted_blocks(trace, b):
    """Indices i of row b's generated tokens where a cut falls strictly inside a step's committed block: the step
    committed the block [p, p + kept) with kept >= 2, and i < p + kept - 1 (so a cut at i drops accepted tokens).
    Index 0 is the prefill's token; each step's tokens follow."""
    pos, out = 1, []
    for f in trace:
        if f["active"][b]:
            k = f["kept"][b]
            out += list(range(pos, pos + k - 1)) if k >= 2 else []
            pos += k
    return out


def _cuts_from_trace(ref, trace):
    """Choose (roles, eos, stop, budget) from this machine's own run so that one row stops on the budget, one on an
    EOS and one on a stop sequence, each strictly inside a block of accepted drafts. Trained weights (and so which
    drafts get accepted) differ in the last bits between CPUs: the premise is derived from the run, not assumed.
    The stop sequence is the row's whole output up to the cut (its first completion is there); the EOS must be a
    token the row has not generated before."""
    inside = [_inside_accepted_blocks(trace, b) for b in range(3)]
    for b in range(3):
        assert inside[b], (f"premise: row {b} never committed 2+ tokens in one step (no accepted drafts), so no cut "
                           f"can fall inside an accepted block; trace kept={[f['kept'][b] for f in trace]}")
    for rb, re_, rs in itertools.permutations(range(3)):  # rows cut by budget, EOS, stop
        for i0 in inside[rb]:
            for i1 in (i for i in inside[re_] if i < i0 and ref[re_][i] not in ref[re_][:i]):
                for i2 in (i for i in inside[rs] if i < i0):
                    eos, stop, budget = ref[re_][i1], ref[rs][:i2 + 1], i0 + 1
                    want = [_cut(r, eos, stop, budget) for r in ref]
                    lens = {rb: budget, re_: i1 + 1, rs: i2 + 1}
                    if ([len(w) for w in want] == [lens[b] for b in range(3)] and eos not in want[rs]
                            and eos not in want[rb]):
                        return (rb, re_, rs), eos, stop, budget, want
    raise AssertionError(f"premise: no (EOS, stop, budget) puts all three cuts inside accepted blocks; "
                         f"candidate cut indices per row {inside}")


@pytest.mark.parametrize("kw", [dict(sampler="two_forward", anchor="mask"), dict(sampler="single_forward")])
def test_eos_stop_and_budget_cut_inside_an_accepted_block(trained, ref, kw):
    """Real drafts through ``generate``: one row stops on an EOS, one on a stop sequence, one on the budget, each
    in a step that accepted drafts: what follows the cut is dropped (the tokens are the AR reference cut there) and
    the statistics count only the kept tokens. The cut points come from an uncut run's trace on this machine."""
    free = generate(trained[0], PROMPTS, block_size=BLOCK - 1, max_new_tokens=32, trace=True, **kw)
    assert free.tokens == ref
    roles, eos, stop, budget, want = _cuts_from_trace(ref, free.trace)
    res = generate(trained[0], PROMPTS, block_size=BLOCK - 1, max_new_tokens=budget, eos_id=eos, stop=[stop],
                   trace=True, **kw)
    assert res.tokens == want
    for b in range(3):  # the step that finished row b had accepted more drafts than it kept: cut inside the block
        f = res.trace[max(i for i, f in enumerate(res.trace) if f["active"][b])]
        assert 0 < f["kept"][b] < f["accepted"][b] + 1, (b, f)
    assert res.stats["counts"]["committed"] == sum(map(len, want)) - 3  # each row's first token: the prefill's

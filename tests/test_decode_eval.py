"""zaya.train.decode_eval: the sampler matching each trained layout, and decode figures on a byte model."""
import jax
import pytest

import zaya
from zaya.convert import checkpoint
from zaya.model.params import init
from zaya.train import decode_eval

BYTES = dict(vocab_size=264, eos_token_id=1, bos_token_id=2, pad_token_id=0, mask_token_id=4)


def test_sampler_matches_the_trained_layout():
    assert decode_eval.sampler_for({"block_size": 16}) == dict(
        sampler="single_forward", block_size=15, levels=(0,), acceptance="greedy", block_causal=False)
    assert decode_eval.sampler_for({"block_size": 16, "anchor": "mask"})["block_size"] == 16
    tf = decode_eval.sampler_for({"block_size": 8, "anchor": "token", "block_causal": True})
    assert tf == dict(sampler="two_forward", block_size=8, anchor="token", acceptance="greedy", block_causal=True)
    with pytest.raises(ValueError, match="anchor"):
        decode_eval.sampler_for({"block_size": 8, "anchor": "left"})


def test_task_prompts_come_from_the_held_out_split_of_each_set():
    short, long = decode_eval.task_prompts("short", 4), decode_eval.task_prompts("long", 4)
    assert all(p[0] == 2 for p in short + long)            # BOS first
    assert max(map(len, long)) > max(map(len, short))        # long tasks: long prompts (copy/reverse/sort of 20+)


def test_decode_tasks_is_lossless_and_counts_per_active_row(tmp_path):
    c = zaya.preset("tiny", num_layers=1, **BYTES)
    checkpoint.save(str(tmp_path / "m"), init(c, jax.random.PRNGKey(0), std=0.3), c)
    r = decode_eval.decode_tasks(str(tmp_path / "m"), {"block_size": 4}, num_prompts=2, task_sets=("short",),
                                 batch=2)
    assert set(r) == {"tpf_short", "same_as_ar_short", "acc_short"}
    assert r["same_as_ar_short"] == 1.0                      # greedy + lossless = AR's tokens, random weights or not
    assert 1.0 <= r["tpf_short"] <= 4.0 and len(r["acc_short"]) == 3   # K = 3 drafts: at most K + 1 per forward
    with pytest.raises(ValueError, match="byte-tokenizer"):
        decode_eval.decode_tasks(zaya.api.Model(zaya.preset("tiny", vocab_size=64),
                                                init(zaya.preset("tiny", vocab_size=64), jax.random.PRNGKey(0))),
                                 {"block_size": 4}, num_prompts=1)

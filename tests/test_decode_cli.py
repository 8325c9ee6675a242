"""``zaya generate`` in-process: ids and text prompts, the printed stats, the EOS default, the sampler knobs, and
clear errors (exit code 2) for bad flags. Generated ids are compared with ``zaya.generate`` for the same settings
(same options -> the same compiled executables, so each comparison compiles once)."""
import inspect
import os
import re
import shutil

import numpy as np
import pytest
from conftest import bpe_tokenizer

import zaya
from zaya import cli as zaya_cli
from zaya.convert import checkpoint as ckpt
from zaya.decode import acceptance
from zaya.decode import cli
from zaya.decode import generate as gen_mod
from zaya.decode.options import DecodeOptions
from zaya.model.params import map_specs, param_specs

N = 8  # max new tokens everywhere: one padded prompt shape and one budget, so the runs share compiles
PROMPTS = [[2, 17, 301, 45], [2, 9]]


def argv(model, *flags, prompts=PROMPTS):
    out = [model, "--max-new-tokens", str(N)]
    for p in prompts:
        out += ["--prompt", ",".join(map(str, p))]
    return out + list(flags)


def random_params(c, seed=0):
    """zaya.model.init's recipe (std 0.3) plus conftest.randomize's perturbation, in numpy: no compile, and a model
    whose greedy continuations vary (the fixture's small weights repeat one token)."""
    rng = np.random.default_rng(seed)

    def one(spec):
        shape, _, kind = spec
        x = np.zeros(shape, np.float32)
        if kind == "normal":
            x = 0.3 * rng.standard_normal(shape, np.float32)
        elif kind == "conv":  # near-identity newest tap, as init
            x = 0.1 * rng.standard_normal(shape, np.float32)
            x[:, 1] += 1.0 if len(shape) == 3 else np.eye(shape[-1], dtype=np.float32)
        elif kind == "bias":
            x[..., -1] = -1.0
        elif kind == "ones":
            x[:] = 1.0
        return x + rng.standard_normal(shape, np.float32) * 0.3 * (np.abs(x).mean() + 0.05)
    return map_specs(one, param_specs(c))


def add_tokenizer(folder):
    """A small BPE tokenizer.json (BOS = id 2, as the config) in ``folder``."""
    return bpe_tokenizer(os.path.join(folder, "tokenizer.json"),
                         ["the cat sat on the mat", "hello world, hello there"] * 20)


SF = ("--sampler", "single_forward", "--block-size", "4", "--levels", "0,2,4")
SF_KW = dict(sampler="single_forward", acceptance="greedy", block_size=4, levels=(0, 2, 4))  # = the CLI's options


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    """Two zaya folders of one random tiny model: ``plain`` (eos 106, never emitted here) and ``eos``, whose config
    eos_token_id is the token greedy decoding of PROMPTS[0] first emits at step i >= 2; ``free``: the greedy ids
    without EOS (single_forward with greedy acceptance, which is lossless). Compile budget: every test below runs
    either single_forward without EOS on ``plain`` or AR with the config's EOS on ``eos`` (two compiled sets)."""
    d = tmp_path_factory.mktemp("gen")
    c = zaya.preset("tiny")
    params = random_params(c)
    ckpt.save(str(d / "plain"), params, c)
    free = zaya.generate(zaya.load(str(d / "plain")), PROMPTS, max_new_tokens=N, **SF_KW).tokens
    i = next(i for i in range(2, N) if free[0][i] not in free[0][:i])
    ckpt.save(str(d / "eos"), params, c.replace(eos_token_id=free[0][i]))
    for name in ("plain", "eos"):
        shutil.copytree(d / name, d / f"{name}_tok")
        add_tokenizer(d / f"{name}_tok")
    return dict(plain=str(d / "plain"), eos=str(d / "eos"), plain_tok=str(d / "plain_tok"),
                eos_tok=str(d / "eos_tok"), free=free, i=i, t=free[0][i])


def cut(row, eos):
    """Reference: a row ends right after its first EOS."""
    return row[: row.index(eos) + 1] if eos in row else row


def test_single_forward_ids_prompt_matches_api_and_prints_stats(m, capsys):
    res = cli.main(argv(m["plain"], "--no-eos", *SF))
    assert res.tokens == m["free"] and [len(r) for r in res.tokens] == [N, N]
    out = capsys.readouterr().out
    assert f"prompt {PROMPTS[0]} -> {m['free'][0]}" in out and f"prompt {PROMPTS[1]} -> {m['free'][1]}" in out
    s = res.stats
    assert s["tokens"] == 2 * N and f"[single_forward] {s['tokens']} tokens in " in out
    assert f"{s['forwards']} forwards, {s['tokens_per_forward']:.2f} tokens/forward/row" in out
    assert f"useful slots {s['useful_slot_fraction']:.3f}, acceptance per position " in out


def test_ar_stops_on_the_config_eos_by_default(m, capsys):
    """No --eos-id: row 0 stops at the config's EOS (kept) at step i; the ids are zaya.generate's for eos_id = t
    and AR's greedy ids are the (lossless) single_forward ones cut there."""
    res = cli.main(argv(m["eos"]))
    ref = zaya.generate(zaya.load(m["eos"]), PROMPTS, max_new_tokens=N, eos_id=m["t"])
    assert res.tokens == ref.tokens == [cut(r, m["t"]) for r in m["free"]]
    assert len(res.tokens[0]) == m["i"] + 1 < N + 1 and res.tokens[0][-1] == m["t"]
    s, out = res.stats, capsys.readouterr().out
    assert f"[ar] {s['tokens']} tokens in " in out and s["tokens"] == sum(map(len, ref.tokens))
    assert f"prompt {PROMPTS[0]} -> {ref.tokens[0]}" in out


@pytest.mark.parametrize("sampler", ["ar", "single_forward"])
def test_text_prompt(m, sampler, capsys):
    """Text prompts go through tokenizer.json with BOS prepended; the output is decoded (same compiles as above)."""
    folder = m["eos_tok"] if sampler == "ar" else m["plain_tok"]
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    texts = ["hello world", "the cat sat"]
    flags = ["--max-new-tokens", str(N)] + [x for t in texts for x in ("--prompt", t)]
    res = cli.main([folder, *flags, *(("--no-eos", *SF) if sampler != "ar" else ())])
    ids = [[2] + tok.encode(t).ids for t in texts]
    assert all(len(r) < 16 for r in ids)  # one padded prompt shape with the id tests
    kw = SF_KW if sampler != "ar" else dict(eos_id=m["t"])
    ref = zaya.generate(zaya.load(folder), ids, max_new_tokens=N, **kw)
    assert res.tokens == ref.tokens
    out = capsys.readouterr().out
    assert f"prompt {ids[1]} -> {tok.decode(ref.tokens[1])}" in out


def test_flags_map_to_generate_kwargs(m, monkeypatch):
    """Cheap (no decoding): what each flag becomes, through main(argv) and through the top-level `zaya` parser."""
    model_dir, tok_dir = m["plain"], m["plain_tok"]
    calls = []
    monkeypatch.setattr(zaya, "generate", lambda model, **kw: calls.append(kw) or gen_mod.Result(
        [[] for _ in kw["prompt_ids"]], {"sampler": "x", "tokens": 0, "seconds": 1.0, "tokens_per_s": 0.0,
                                         "forwards": 0, "tokens_per_forward": 0.0}))
    cli.main(argv(model_dir, "--stop", "5,6", "--stop", "7", "--sampler", "two_forward",
                  "--acceptance", "topk", "--rule-option", "k=3", "--rule-option", "r=0.5", "--block-size", "2"))
    kw = calls.pop()
    assert kw["eos_id"] == 106 and kw["stop"] == [[5, 6], [7]] and kw["prompt_ids"] == PROMPTS
    assert (kw["k"], kw["r"], kw["block_size"], kw["acceptance"]) == (3, 0.5, 2, "topk")
    assert not {"mix_weight", "anchor", "draft_temperature"} & set(kw)  # not given: the sampler's defaults
    cli.main(argv(model_dir, "--sampler", "two_forward", "--acceptance", "typical", "--rule-option", "epsilon=0.2",
                  "--draft-temperature", "0.7", "--mix-weight", "0.5", "--anchor", "mask", "--eos-id", "7"))
    kw = calls.pop()
    assert (kw["epsilon"], kw["draft_temperature"], kw["mix_weight"], kw["anchor"], kw["eos_id"]) == \
        (0.2, 0.7, 0.5, "mask", 7)
    # every keyword is one zaya.generate or the block samplers read (generate passes unknown ones on silently)
    known = set(inspect.signature(gen_mod.generate).parameters) | set(DecodeOptions.__dataclass_fields__) | \
        {"epsilon", "delta", "k", "r"}
    assert set(kw) <= known, set(kw) - known
    # top-level parser: EOS default, BOS prompt; the console entry returns exit status 0, never the result
    assert zaya_cli.main(["generate", model_dir, "--max-new-tokens", "3"]) == 0
    kw = calls.pop()
    assert (kw["eos_id"], kw["prompt_ids"], kw["max_new_tokens"], kw["stop"]) == (106, [[2]], 3, None)
    zaya_cli.main(["generate", model_dir, "--sampler", "two_forward", "--mix-weight", "0.5", "--anchor", "mask"])
    kw = calls.pop()  # the top-level `zaya generate` has every flag of zaya.decode.cli
    assert (kw["mix_weight"], kw["anchor"]) == (0.5, "mask")
    for off in (["--no-eos"], ["--eos-id", "-1"]):
        cli.main(argv(m["eos"], *off))
        assert calls.pop()["eos_id"] is None
    zaya_cli.main(["generate", m["eos"], "--eos-id", "-1"])
    assert calls.pop()["eos_id"] is None
    cli.main(argv(m["eos"]))
    assert calls.pop()["eos_id"] == m["t"]
    cli.main([tok_dir, "--prompt", "the cat", "--stop", "the mat"])  # text stop: no BOS
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    kw = calls.pop()
    assert kw["stop"] == [tok.encode("the mat").ids] and kw["prompt_ids"] == [[2] + tok.encode("the cat").ids]


def test_rule_options_cover_the_acceptance_rules():
    """RULE_OPTIONS lists exactly the knobs each registered rule reads from its options (no drift)."""
    shared = {"temperature", "top_k", "top_p", "draft_logits", "diff_logits"}
    for name, rule in acceptance.ACCEPTANCE.items():
        keys = set(re.findall(r'o\.get\("(\w+)"', inspect.getsource(rule.fn))) - shared
        assert keys == set(cli.RULE_OPTIONS.get(name, {})), name


BAD = [
    (["--sampler", "beam"], "choose one of"),
    (["--sampler", "two_forward", "--acceptance", "nope"], "--acceptance 'nope'"),
    (["--sampler", "two_forward", "--acceptance", "typical", "--rule-option", "k=2"],
     "'k' is not an option of acceptance 'typical'; its options are epsilon, delta"),
    (["--sampler", "two_forward", "--rule-option", "k=2"], "acceptance 'greedy'; it has no options"),
    (["--sampler", "two_forward", "--acceptance", "topk", "--rule-option", "k"], "KEY=VALUE"),
    (["--sampler", "two_forward", "--acceptance", "topk", "--rule-option", "k=two"], "not a valid int"),
    (["--sampler", "two_forward", "--acceptance", "topk", "--rule-option", "k=0"], "must be >= 1"),
    (["--mix-weight", "0.5"], "only apply to the block samplers"),
    (["--sampler", "two_forward", "--mix-weight", "1.5"], "--mix-weight 1.5: must be in [0, 1]"),
    (["--sampler", "two_forward", "--anchor", "left"], "invalid choice: 'left'"),
    (["--sampler", "two_forward", "--draft-temperature", "-1"], "--draft-temperature -1.0: must be >= 0"),
    (["--sampler", "two_forward", "--block-size", "0"], "--block-size 0"),
    (["--sampler", "two_forward", "--levels", "0,2"], "only applies to --sampler single_forward"),
    (["--sampler", "single_forward", "--block-size", "4", "--levels", "1,2"], "--levels '1,2'"),
    (["--sampler", "single_forward", "--block-size", "4", "--levels", "0,8"], "--levels '0,8'"),
    (["--eos-id", "512"], "--eos-id 512: must be in [0, 512) or -1"),
    (["--eos-id", "x"], "invalid int value"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--temperature", "-0.5"], "--temperature -0.5"),
    (["--top-k", "0"], "--top-k 0"),
    (["--top-p", "1.5"], "--top-p 1.5"),
    (["--prompt", "2,512"], "--prompt id 512 is outside the model's vocabulary [0, 512)"),
    (["--prompt", "once upon"], "needs a tokenizer.json"),
    (["--stop", "the end"], "needs a tokenizer.json"),
    (["--stop", "600"], "--stop id 600"),
]


@pytest.mark.parametrize("flags,msg", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_flags_exit_2_with_a_clear_message(m, capsys, flags, msg):
    with pytest.raises(SystemExit) as e:
        cli.main([m["plain"], *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "zaya generate: error:" in err and msg in err, err

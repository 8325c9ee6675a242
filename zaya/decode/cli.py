"""``zaya generate``: decode prompts from a checkpoint (or random weights of a preset) and report speed.

``add_arguments`` declares every flag (for the top-level ``zaya`` parser and ``main(argv)``); ``main`` checks the
values against the model and the registries and turns bad input into an argparse error (exit code 2).
"""
from __future__ import annotations

import argparse

import jax

import zaya
from zaya.api import Model
from zaya.decode.acceptance import ACCEPTANCE
from zaya.model.params import init

# Acceptance-rule knobs, as the rules declare them at registration (acceptance.register(..., options=...)):
# name -> {key: type}.
RULE_OPTIONS = {name: dict(rule.options) for name, rule in ACCEPTANCE.items() if rule.options}
BLOCK_ONLY = ("draft_temperature", "mix_weight", "anchor", "rule_option", "levels")  # flags of the block samplers


def add_arguments(g: argparse.ArgumentParser):
    g.add_argument("model", help="checkpoint folder (HF or zaya) or preset:NAME for random weights")
    g.add_argument("--prompt", action="append", default=None,
                   help="repeatable, one row each: ids '2,17,301' or text (needs tokenizer.json; BOS is prepended)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sampler", default="ar", help="ar | two_forward | single_forward | tidar")
    g.add_argument("--acceptance", default="greedy",
                   help="block samplers' acceptance rule: greedy | rejection | strict | typical | topk | tidar_ratio")
    g.add_argument("--block-size", type=int, default=16, help="drafts per block (block samplers)")
    g.add_argument("--levels", default=None, help="single_forward proposal levels, e.g. 0,4,7,11 (default: dense)")
    g.add_argument("--temperature", type=float, default=0.0, help="verifier / AR sampling temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eos-id", type=int, default=None,
                   help="rows stop after this id (default: the model config's eos_token_id; -1: never)")
    g.add_argument("--no-eos", action="store_true", help="never stop on EOS (same as --eos-id -1)")
    g.add_argument("--stop", action="append", default=None,
                   help="stop sequence, repeatable: ids '13,10' or text (tokenized without BOS; needs "
                        "tokenizer.json); a row stops right after it")
    g.add_argument("--draft-temperature", type=float, default=None,
                   help="block samplers: sample drafts at this temperature (default 0: argmax drafts)")
    g.add_argument("--mix-weight", type=float, default=None,
                   help="block samplers: verify against w*z_AR + (1-w)*z_diff, w in [0, 1] (lossy below 1)")
    g.add_argument("--anchor", choices=["token", "mask"], default=None,
                   help="two_forward draft block: token = [a', mask x K] (default), mask = [mask x (K+1)]")
    g.add_argument("--rule-option", action="append", default=None, metavar="KEY=VALUE",
                   help="acceptance-rule option, repeatable: " +
                        "; ".join(f"{r}: {', '.join(o)}" for r, o in RULE_OPTIONS.items()))
    g.add_argument("--dtype", default="float32")
    g.add_argument("--loop", choices=["host", "device"], default="host",
                   help="host: Python loop with a live progress bar; device: every step in one lax.while_loop")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zaya generate", description="decode from a prompt")
    add_arguments(p)
    return p


def load_model(spec: str, dtype: str = "float32") -> Model:
    """A checkpoint folder, or ``preset:NAME`` for random weights of a preset (smoke tests, benchmarks)."""
    if spec.startswith("preset:"):
        c = zaya.preset(spec.split(":", 1)[1], dtype=dtype)
        return Model(c, init(c, jax.random.PRNGKey(0), std=0.3))
    return zaya.load(spec, dtype=dtype)


def _ids(text: str) -> list[int] | None:
    t = text.strip()
    parts = t.split(",")
    return [int(p) for p in parts] if t and all(p.strip().isdigit() for p in parts) else None


def _tokenizer(model):
    if model.tokenizer is None:
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(model.tokenizer)


def parse_prompt(text: str, model, tok=None) -> list[int]:
    ids = _ids(text)
    if ids is not None:
        return ids
    tok = tok or _tokenizer(model)
    if tok is None:
        raise ValueError(f"text prompt {text!r} needs a tokenizer.json in the checkpoint; pass ids like 2,17,301")
    ids = tok.encode(text).ids
    return ids if ids and ids[0] == model.config.bos_token_id else [model.config.bos_token_id] + ids


def parse_stop(text: str, tok) -> list[int]:
    ids = _ids(text)
    if ids is not None:
        return ids
    if tok is None:
        raise ValueError(f"text stop sequence {text!r} needs a tokenizer.json in the checkpoint; pass ids like 13,10")
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ValueError(f"stop sequence {text!r} tokenizes to nothing")
    return ids


def rule_options(items: list[str] | None, acceptance: str) -> dict:
    """['epsilon=0.1', ...] -> {'epsilon': 0.1}, typed by the rule's registered options; unknown keys and bad values
    are errors."""
    known = dict(ACCEPTANCE[acceptance].options) if acceptance in ACCEPTANCE else {}
    out = {}
    for it in items or []:
        key, eq, val = it.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"--rule-option {it!r}: expected KEY=VALUE")
        if key not in known:
            have = f"its options are {', '.join(known)}" if known else "it has no options"
            raise ValueError(f"--rule-option {key!r} is not an option of acceptance {acceptance!r}; {have}")
        try:
            out[key] = known[key](val)
        except ValueError:
            raise ValueError(f"--rule-option {key}={val!r}: not a valid {known[key].__name__}") from None
    if "k" in out and out["k"] < 1:
        raise ValueError(f"--rule-option k={out['k']}: must be >= 1")
    return out


def check(a, model) -> dict:
    """Everything zaya.generate needs from the flags, checked against the model and registries. ValueError if bad."""
    from zaya.decode.samplers import SAMPLERS
    c = model.config
    if a.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {a.sampler!r}: choose one of {', '.join(sorted(SAMPLERS))}")
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens}: must be >= 1")
    for name, v in (("temperature", a.temperature), ("draft-temperature", a.draft_temperature)):
        if v is not None and v < 0:
            raise ValueError(f"--{name} {v}: must be >= 0")
    if a.top_k is not None and a.top_k < 1:
        raise ValueError(f"--top-k {a.top_k}: must be >= 1")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise ValueError(f"--top-p {a.top_p}: must be in (0, 1]")
    eos = None if a.no_eos or a.eos_id == -1 else (c.eos_token_id if a.eos_id is None else a.eos_id)
    if eos is not None and not 0 <= eos < c.vocab_size:
        raise ValueError(f"--eos-id {eos}: must be in [0, {c.vocab_size}) or -1 (never stop on EOS)")
    tok = _tokenizer(model) if any(_ids(s) is None for s in (a.prompt or []) + (a.stop or [])) else None
    prompts = [parse_prompt(p, model, tok) for p in (a.prompt or [str(c.bos_token_id)])]
    stop = [parse_stop(s, tok) for s in a.stop or []] or None
    for what, rows in (("prompt", prompts), ("stop", stop or [])):
        bad = [t for r in rows for t in r if not 0 <= t < c.vocab_size]
        if bad:
            raise ValueError(f"--{what} id {bad[0]} is outside the model's vocabulary [0, {c.vocab_size})")
    kw = dict(sampler=a.sampler, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
              top_p=a.top_p, seed=a.seed, eos_id=eos, stop=stop)
    if a.sampler == "ar":
        given = [f"--{k.replace('_', '-')}" for k in BLOCK_ONLY if getattr(a, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to the block samplers, not --sampler ar")
        return dict(kw, prompt_ids=prompts)
    if a.acceptance not in ACCEPTANCE:
        raise ValueError(f"--acceptance {a.acceptance!r}: choose one of {', '.join(sorted(ACCEPTANCE))}")
    if a.block_size < 1:
        raise ValueError(f"--block-size {a.block_size}: must be >= 1")
    if a.mix_weight is not None and not 0 <= a.mix_weight <= 1:
        raise ValueError(f"--mix-weight {a.mix_weight}: must be in [0, 1]")
    kw.update(acceptance=a.acceptance, block_size=a.block_size, **rule_options(a.rule_option, a.acceptance))
    # flags not given stay out: the samplers' defaults apply, and the options (a jit cache key) equal a plain
    # zaya.generate call's
    kw.update({k: getattr(a, k) for k in ("draft_temperature", "mix_weight", "anchor") if getattr(a, k) is not None})
    if a.levels:
        if a.sampler != "single_forward":
            raise ValueError("--levels only applies to --sampler single_forward")
        lv = _ids(a.levels)
        if lv is None or lv[0] != 0 or any(x >= y for x, y in zip(lv, lv[1:])) or lv[-1] > a.block_size:
            raise ValueError(f"--levels {a.levels!r}: increasing ids from 0 up to the block size {a.block_size}, "
                             f"like 0,4,7,11")
        kw["levels"] = tuple(lv)
    return dict(kw, prompt_ids=prompts)


def main(a=None):
    """``a``: an argv list for ``zaya generate`` (None: sys.argv), or a Namespace from the top-level parser (which
    declares the same flags through ``add_arguments``)."""
    parser = build_parser()
    if a is None or isinstance(a, (list, tuple)):
        a = parser.parse_args(a)
    model = load_model(a.model, a.dtype)
    try:
        kw = check(a, model)
    except ValueError as e:
        parser.error(str(e))
    res = zaya.generate(model, progress=True, loop=a.loop, **kw)
    dec = _tokenizer(model)
    for p, out in zip(kw["prompt_ids"], res.tokens):
        print(f"prompt {p} ->", dec.decode(out) if dec else out)
    s = res.stats
    print(f"[{s['sampler']}] {s['tokens']} tokens in {s['seconds']:.3f}s = {s['tokens_per_s']:.1f} tok/s, "
          f"{s['forwards']} forwards, {s['tokens_per_forward']:.2f} tokens/forward/row")
    if "acceptance_per_position" in s:
        print(f"  {s['tokens_per_step']:.2f} tokens/step, useful slots {s['useful_slot_fraction']:.3f}, "
              f"acceptance per position " + " ".join(f"{x:.2f}" for x in s["acceptance_per_position"]))
    return res

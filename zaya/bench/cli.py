"""``zaya bench {forward,decode,convert,samplers,all}``: dispatch to the benchmark modules.

  forward   full-forward tokens/s and the forward-cost ratio t(T)/t(1) (zaya.bench.forward)
  decode    AR decode ms/token via zaya.generate (zaya.bench.decode)
  convert   `zaya convert` throughput and peak memory on a synthetic checkpoint (zaya.bench.convert)
  samplers  block samplers vs AR side by side (zaya.bench.samplers)
  attention the Pallas verify-attention kernel vs XLA at ZAYA1-8B geometry (zaya.bench.attention)
  moe       the expert-matmul implementations at ZAYA1-8B geometry (zaya.bench.moe)
  system    AR steps at long context and block samplers end to end at a controlled (synthetic) acceptance, in the
            device loop, beside the roofline (zaya.bench.system; ZAYA1-8B geometry on an accelerator)
  memory    per-device bytes of a run's train step from the compiled program, no allocation (zaya.bench.memory;
            ``zaya bench memory --config FILE:variant --mesh fsdp=8``)
  all       everything above but memory, then the roofline model's predicted-vs-measured table (zaya.bench.roofline)

``--preset`` (repeatable) picks the random-weight presets (default tiny and small-100m; samplers: tiny). For
``samplers`` a ``--preset`` value that is a folder, ``--model PATH`` (when the parser has it) or $ZAYA_BENCH_MODEL
selects a checkpoint (e.g. the demo's converted model) instead of random weights. Every benchmark prints Markdown
tables headed by the machine and, with ``--out DIR``, writes them there with CSV/JSON and figures.
``forward --vs-transformers`` / ``decode --vs-transformers``: zaya against transformers' PyTorch ZAYA on one random
~40M-parameter checkpoint, times and ratios from one run (zaya.bench.vs_transformers).
"""
from __future__ import annotations

import os

DEFAULT_PRESETS = ("tiny", "small-100m")


def _split(presets):
    """(random-weight presets, checkpoint folders) from the --preset values."""
    presets = list(presets or [])
    return [p for p in presets if not os.path.isdir(p)], [p for p in presets if os.path.isdir(p)]


def _model_paths(a, folders):
    paths = list(folders)
    for p in (getattr(a, "model", None), os.environ.get("ZAYA_BENCH_MODEL")):
        if p and p not in paths:
            paths.append(p)
    return paths


def _vs_transformers(a, what):
    from zaya.bench import vs_transformers
    return vs_transformers.run((what,), a.out, a.quick)


def run_forward(a):
    if getattr(a, "vs_transformers", False):
        return _vs_transformers(a, "forward")
    from zaya.bench import forward
    names, _ = _split(a.preset)
    return forward.run(tuple(names) or DEFAULT_PRESETS, a.out, a.quick)


def run_decode(a):
    if getattr(a, "vs_transformers", False):
        return _vs_transformers(a, "decode")
    from zaya.bench import decode
    names, _ = _split(a.preset)
    return decode.run(tuple(names) or DEFAULT_PRESETS, a.out, a.quick)


def run_convert(a):
    from zaya.bench import convert
    from zaya.bench.common import machine_markdown
    print(machine_markdown())
    return convert.run(getattr(a, "size_gb", 1.0), a.out, a.quick)


def run_samplers(a):
    from zaya.bench import samplers
    names, folders = _split(a.preset)
    targets = [dict(model_path=p) for p in _model_paths(a, folders)] + [dict(preset=n) for n in names]
    targets = targets or [dict(preset="tiny")]
    out = []
    for i, t in enumerate(targets):
        sub = a.out
        if a.out and len(targets) > 1:
            sub = os.path.join(a.out, t.get("preset") or f"model{i}_{os.path.basename(t['model_path'].rstrip('/'))}")
        out += samplers.run(out=sub, quick=a.quick, loop=getattr(a, "loop", "host"),
                            task_set=getattr(a, "task_set", "short"), **t)
    return out


def run_attention(a):
    from zaya.bench import attention
    return attention.run(a.out, a.quick)


def run_moe(a):
    from zaya.bench import moe
    return moe.run(a.out, a.quick)


def run_system(a):
    from zaya.bench import system
    names, _ = _split(a.preset)
    return system.run(names[0] if names else None, a.out, a.quick)


def run_all(a):
    from zaya.bench import roofline
    res = {"forward": run_forward(a), "decode": run_decode(a), "samplers": run_samplers(a),
           "convert": run_convert(a)}
    fwd = os.path.join(a.out, "forward.json") if a.out else None
    if fwd and os.path.exists(fwd):
        res["roofline"] = roofline.run(a.out, fwd, quick=a.quick)
    else:
        hw = roofline.measure_cpu()
        rows = roofline.cpu_comparison(res["forward"]["ratio"], hw)
        from zaya.bench.common import md_table
        print(md_table(rows, ["preset", "T", "measured_ratio", "pure_ratio", "fit_ratio", "ideal_ratio"],
                       "forward-cost ratio: predicted vs measured"))
        res["roofline"] = rows
    return res


COMMANDS = {"forward": run_forward, "decode": run_decode, "convert": run_convert, "samplers": run_samplers,
            "attention": run_attention, "moe": run_moe, "system": run_system, "all": run_all}


def main(a):
    if a.what not in COMMANDS:
        raise SystemExit(f"zaya bench: unknown benchmark {a.what!r}; choose one of {sorted(COMMANDS)}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    if not getattr(a, "compile_cache", True):
        return COMMANDS[a.what](a)
    from zaya.bench.common import compile_cache
    with compile_cache():  # compile time is never timed; the cache only saves wall time on reruns
        return COMMANDS[a.what](a)

"""The ``zaya`` command line: convert, export, generate, bench, train, demo, data.

Every subcommand imports its module lazily so ``zaya --help`` is fast.
"""
from __future__ import annotations

import argparse
import sys


def _convert(a):
    from zaya.convert.cli import convert
    convert(a.src, a.dst, dtype=a.dtype, overwrite=a.overwrite)


def _export(a):
    from zaya.convert.cli import export
    export(a.src, a.dst, overwrite=a.overwrite, max_shard_gb=a.max_shard_gb)


def _generate(a):
    from zaya.decode.cli import main
    return main(a)


def _bench(a):
    from zaya.bench.cli import main
    main(a)


def _train(a, rest):
    from zaya.train.cli import main
    return main(a, rest)


def _demo(a):
    from zaya.demo import main
    return main(a)


def _data(a):
    from zaya.data.cli import main
    return main(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zaya", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="HF safetensors checkpoint (native or legacy) -> zaya Orbax checkpoint")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=_convert)

    e = sub.add_parser("export", help="zaya checkpoint -> native-layout HF safetensors (transformers/vLLM/SGLang)")
    e.add_argument("src")
    e.add_argument("dst")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--max-shard-gb", type=float, default=5.0)
    e.set_defaults(fn=_export)

    g = sub.add_parser("generate", help="decode from a prompt")
    from zaya.decode.cli import add_arguments  # the flags live next to their checks
    add_arguments(g)
    g.set_defaults(fn=_generate)

    b = sub.add_parser("bench", help="benchmarks: forward, decode, convert, samplers, attention, moe, system, memory")
    b.add_argument("what", choices=["forward", "decode", "convert", "samplers", "attention", "moe", "system", "memory",
                                    "all"])
    b.add_argument("--preset", action="append", default=None, help="model presets (default: tiny and small-100m)")
    b.add_argument("--out", default=None, help="write the table (Markdown) and figures here")
    b.add_argument("--size-gb", type=float, default=1.0, help="convert: synthetic checkpoint size")
    b.add_argument("--quick", action="store_true", help="fewer repetitions (smoke runs)")
    b.add_argument("--loop", choices=["host", "device"], default="host",
                   help="samplers: decode loop of every sampler, AR included (zaya.generate's loop)")
    b.add_argument("--task-set", choices=["short", "long"], default="short",
                   help="samplers: task prompts with short (1-8 tokens) or long (20-100 tokens) answers")
    b.add_argument("--vs-transformers", action="store_true",
                   help="forward/decode: against transformers' PyTorch ZAYA on the same random checkpoint (CPU, fp32)")
    b.add_argument("--config", default=None, help="memory: experiments/X.py:variant (with --config.k=v overrides)")
    b.add_argument("--mesh", default=None, help="memory: mesh sizes, e.g. fsdp=8 or data=2,fsdp=4,expert=8")
    b.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="do not use jax's persistent compilation cache ($ZAYA_BENCH_CACHE, default /tmp/zaya_bench_xla_cache)")
    b.set_defaults(fn=_bench)

    t = sub.add_parser("train", help="train from an ml-collections config (AR pretraining or TiDAR conversion)")
    t.add_argument("--config", required=True, help="experiments/X.py[:variant]")
    t.add_argument("--workdir", required=True)
    t.add_argument("--dry-run", action="store_true",
                   help="print each process's devices, mesh coordinates and batch rows, then exit (launch check)")
    t.set_defaults(fn=None)

    d = sub.add_parser("demo", help="pretrain a tiny MoE, convert it with TiDAR, evaluate, decode (CPU, minutes)")
    d.add_argument("--out", default="zaya_demo")
    d.add_argument("--quick", action="store_true", help="a much shorter run (tests)")
    d.set_defaults(fn=_demo)

    s = sub.add_parser("data", help="prepare a corpus as token shards for streaming training; verify them")
    from zaya.data.cli import add_arguments as data_arguments
    data_arguments(s)
    s.set_defaults(fn=_data)
    return p


def run(argv=None):
    """Runs one subcommand and returns what it returns (a summary, a decode result; for Python callers and tests)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "train":
        return _train(args, rest)
    if args.cmd == "bench" and args.what == "memory":  # config overrides (--config.k=v) follow the flags
        from zaya.bench.memory import main as memory
        return memory(args, rest, argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.fn(args)


def main(argv=None) -> int:
    """The console entry point: exit status 0 on success (errors exit through SystemExit with their own status).
    A subcommand's result never becomes the status: ``sys.exit(dict)`` would print it and exit 1."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of streaming data vs corpus size: ``zaya data prepare`` and training reads from its shards.

For each size a synthetic JSONL corpus (random words from a fixed vocabulary, documents of 100 B - 2 KB) is written
to a scratch folder, prepared with the byte tokenizer (``zaya.data.shards.prepare``) in one subprocess, and read in
another: ``make_train_iter(source='shards:DIR')`` and ``batches`` batches of ``batch_size`` x ``seq_len`` rows in the
shuffled order (random access across the whole corpus). Each subprocess's peak RSS is its own ``ru_maxrss`` (read
through the launcher of :mod:`zaya.bench.convert`), beside a baseline subprocess that only imports the pipeline.
``in_memory_mb`` sizes also run the in-memory path (``source='jsonl:...'``: read, tokenize and pack everything) for
contrast, and a third child reads as many random rows by slicing the token files memory-mapped (``np.load(...,
mmap_mode='r')``), the design :mod:`zaya.data.shard_source` does not use (it shows why). Scratch files are deleted
afterwards.

CPU only:  python -m zaya.bench.data_stream --sizes-mb 10,1000 --in-memory-mb 10 [--out DIR] [--scratch /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from zaya.bench.convert import _run_child

MiB = 2**20

_IMPORTS = "import json, resource, time; from zaya.data import pipeline; from zaya.data.tokenizer import ByteTokenizer"
_PREPARE = ("import json, time; from zaya.data import shards; t = time.perf_counter(); "
            "m = shards.prepare({src!r}, {out!r}, 'bytes', shard_tokens={shard_tokens}, progress=False); "
            "print(json.dumps({{'seconds': time.perf_counter() - t, 'train': m['splits']['train']['tokens'], "
            "'val': m['splits']['val']['tokens'], 'shards': len(m['splits']['train']['shards'])}}))")
_READ = (_IMPORTS + "; t = time.perf_counter(); "
         "it = pipeline.make_train_iter({{'source': {source!r}}}, ByteTokenizer(), {seq_len}, {batch_size}, seed=0); "
         "t_open = time.perf_counter() - t; s = 0.0\n"
         "for _ in range({batches}): s += float(next(it)['loss_mask'].sum())\n"
         "print(json.dumps({{'open_s': t_open, 'read_s': time.perf_counter() - t - t_open, 'trained_tokens': s}}))")

# The design alternative: the same number of random rows read by slicing memory-mapped token files.
_NUMPY = "import glob, json, os; import numpy as np"
_MMAP = (_NUMPY + "; arrs = [np.load(f, mmap_mode='r') for f in sorted(glob.glob(os.path.join({dir!r}, "
         "'train-*.tokens.npy')))]; starts = np.cumsum([0] + [len(a) for a in arrs]); s = 0\n"
         "for k in np.random.default_rng(0).integers(0, starts[-1] // {seq_len}, {rows}):\n"
         "    lo = int(k) * {seq_len}; i = int(np.searchsorted(starts, lo, side='right')) - 1; "
         "s += int(arrs[i][lo - starts[i]:lo - starts[i] + {seq_len}].sum())\n"
         "print(json.dumps({{'sum': s}}))")


def make_corpus(path: str, size_mb: float, seed: int = 0) -> int:
    """Write a JSONL corpus of about ``size_mb`` MiB (``{"text": ...}`` per line); returns the document count."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, int(n))) for n in rng.integers(2, 10, 5000)]
    sentences = [" ".join(rng.choice(words, int(n))) + "." for n in rng.integers(4, 30, 20000)]
    target, written, n = int(size_mb * MiB), 0, 0
    with open(path, "w") as f:
        while written < target:
            picks = rng.integers(0, len(sentences), (4096, 12))
            counts = rng.integers(1, 12, 4096)
            lines = [f'{{"text": "doc {n + i}: {" ".join(sentences[j] for j in picks[i, :counts[i]])}"}}\n'
                     for i in range(4096)]
            block = "".join(lines)
            f.write(block)
            written += len(block)
            n += len(lines)
    return n


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run(sizes_mb=(10, 1000), in_memory_mb=(10,), scratch: str | None = None, seq_len: int = 1024,
        batch_size: int = 8, batches: int = 200, shard_tokens: int | None = None, out: str | None = None) -> list[dict]:
    from zaya.bench.common import machine_markdown, md_table, write_outputs
    from zaya.data.shards import DEFAULT_SHARD_TOKENS, sha256_file
    shard_tokens = shard_tokens or DEFAULT_SHARD_TOKENS
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    _, base_rss, _ = _run_child(_IMPORTS, env)
    _, numpy_rss, _ = _run_child(_NUMPY, env)
    rows = []
    work = tempfile.mkdtemp(prefix="zaya-data-bench-", dir=scratch)
    try:
        for size in sorted(set(sizes_mb) | set(in_memory_mb)):
            src, shard_dir = os.path.join(work, f"corpus{size}.jsonl"), os.path.join(work, f"shards{size}")
            t = time.perf_counter()
            docs = make_corpus(src, size)
            r = {"corpus_mb": os.path.getsize(src) / MiB, "docs": docs, "generate_s": time.perf_counter() - t,
                 "baseline_rss_mb": base_rss}
            read = dict(seq_len=seq_len, batch_size=batch_size, batches=batches)
            if size in sizes_mb:
                wall, rss, stdout = _run_child(_PREPARE.format(src=f"jsonl:{src}", out=shard_dir,
                                                               shard_tokens=shard_tokens), env)
                p = json.loads(stdout.strip().splitlines()[-1])
                t = time.perf_counter()
                for name in os.listdir(shard_dir):
                    sha256_file(os.path.join(shard_dir, name))
                r.update(prepare_s=p["seconds"], prepare_rss_mb=rss, tokens=p["train"] + p["val"],
                         shards=p["shards"], shards_mb=_du(shard_dir) / MiB, sha256_s=time.perf_counter() - t)
                wall, rss, stdout = _run_child(_READ.format(source=f"shards:{shard_dir}", **read), env)
                q = json.loads(stdout.strip().splitlines()[-1])
                r.update(stream_read_rss_mb=rss, stream_open_s=q["open_s"], stream_read_s=q["read_s"])
                _, rss, _ = _run_child(_MMAP.format(dir=shard_dir, seq_len=seq_len, rows=batches * batch_size), env)
                r.update(mmap_read_rss_mb=rss, numpy_baseline_rss_mb=numpy_rss)
                shutil.rmtree(shard_dir)
            if size in in_memory_mb:
                wall, rss, stdout = _run_child(_READ.format(source=f"jsonl:{src}", **read), env)
                q = json.loads(stdout.strip().splitlines()[-1])
                r.update(memory_read_rss_mb=rss, memory_open_s=q["open_s"], memory_read_s=q["read_s"])
            os.remove(src)
            rows.append(r)
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cols = [("corpus_mb", "corpus MiB", ".0f"), ("docs", "documents"), ("tokens", "tokens"),
            ("prepare_s", "prepare s", ".1f"), ("prepare_rss_mb", "prepare peak RSS MiB", ".0f"),
            ("shards_mb", "shards MiB", ".0f"), ("sha256_s", "sha256 of shards s", ".1f"),
            ("stream_read_rss_mb", "shards: read peak RSS MiB", ".0f"), ("stream_open_s", "open s", ".2f"),
            ("stream_read_s", "read s", ".1f"), ("mmap_read_rss_mb", "same rows via np.memmap: peak RSS MiB", ".0f"),
            ("memory_read_rss_mb", "in-memory: read peak RSS MiB", ".0f"),
            ("memory_open_s", "in-memory: build s", ".1f")]
    md = (machine_markdown() + f"- baseline RSS (import zaya.data.pipeline, grain, numpy): {base_rss:.0f} MiB\n"
          f"- memmap contrast: a process that only imports numpy: {numpy_rss:.0f} MiB\n"
          f"- reading: {batches} batches of {batch_size} x {seq_len} tokens, shuffled rows\n\n"
          + md_table(rows, cols, "streaming data: peak RSS vs corpus size"))
    print(md)
    write_outputs(out, "data_stream", md, {"rows": rows}, {"": rows})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", default="10,1000", help="corpus sizes (MiB) prepared and read as shards")
    p.add_argument("--in-memory-mb", default="10", help="sizes also read by the in-memory path ('' for none)")
    p.add_argument("--scratch", default=None, help="folder for the corpora and shards (default: the temp dir)")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    sizes = [float(x) for x in a.sizes_mb.split(",") if x]
    mem = [float(x) for x in a.in_memory_mb.split(",") if x]
    return run(sizes, mem, a.scratch, batches=a.batches, out=a.out)


if __name__ == "__main__":
    main()

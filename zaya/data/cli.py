"""``zaya data prepare SOURCE OUT_DIR [...]`` and ``zaya data verify DIR``: token shards for streaming training.

``prepare`` tokenizes a text/JSONL corpus once into ``OUT_DIR`` (:func:`zaya.data.shards.prepare`); a training
config then reads it with ``--config.data.source=shards:OUT_DIR``. ``verify`` checks a prepared folder completely
(checksums included; :func:`zaya.data.shard_source.verify`). Bad input prints one line and exits with status 2,
leaving no output behind.
"""
from __future__ import annotations

import sys


def add_arguments(p) -> None:
    from zaya.data.shards import DEFAULT_SHARD_TOKENS
    sub = p.add_subparsers(dest="data_cmd", required=True)
    pr = sub.add_parser("prepare", help="tokenize a corpus once into token shards (data.source='shards:OUT_DIR')")
    pr.add_argument("source", help="'text:<glob>', 'jsonl:<path or glob>' or 'shakespeare'")
    pr.add_argument("out_dir")
    pr.add_argument("--tokenizer", default="bytes",
                    help="'bytes' or a tokenizer.json (or its folder); training must use the same one")
    pr.add_argument("--jsonl-fields", default="text", help="'text' (any one field) or 'prompt,response'")
    pr.add_argument("--text-split", default="file", choices=["file", "blank_line"],
                    help="text files: one document per file, or per blank-line-separated block")
    pr.add_argument("--sft", action="store_true", help="no loss on prompts (JSONL prompt,response)")
    pr.add_argument("--val-fraction", type=float, default=0.05, help="documents held out (hash of each document)")
    pr.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (about)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    v = sub.add_parser("verify", help="check a prepared folder: files, checksums, offsets (and --tokenizer)")
    v.add_argument("dir")
    v.add_argument("--tokenizer", default=None, help="also check that the shards were made with this tokenizer")


def _summary(splits: dict) -> str:
    def shards(d):
        return len(d["shards"]) if isinstance(d["shards"], list) else d["shards"]
    return ", ".join(f"{s} {d['tokens']:,} tokens in {d['docs']:,} documents ({shards(d)} shards)"
                     for s, d in splits.items())


def main(a) -> dict:
    from zaya.data.sources import DataError
    from zaya.data.tokenizer import TokenizerError, load_tokenizer
    try:
        if a.data_cmd == "prepare":
            from zaya.data.shards import prepare
            m = prepare(a.source, a.out_dir, a.tokenizer, jsonl_fields=a.jsonl_fields, text_split=a.text_split,
                        sft=a.sft, val_fraction=a.val_fraction, shard_tokens=a.shard_tokens, overwrite=a.overwrite)
            print(f"prepared {a.out_dir} in {m['seconds']:.1f} s: {_summary(m['splits'])}")
            return m
        from zaya.data.shard_source import verify
        res = verify(a.dir, load_tokenizer(a.tokenizer) if a.tokenizer else None)
        print(f"ok {a.dir}: {_summary(res)}")
        return res
    except (DataError, TokenizerError, FileNotFoundError) as e:
        msg = " ".join(str(e).split())
        print(f"zaya data {a.data_cmd}: {type(e).__name__}: {msg}", file=sys.stderr)
        raise SystemExit(2) from None

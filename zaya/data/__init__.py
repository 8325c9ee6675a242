"""Data: tokenizers, document sources (embedded Shakespeare, text, JSONL), generated tasks, the grain pipeline, and
token shards prepared once for corpora of any size (``zaya data prepare``: :mod:`zaya.data.shards`, read by
:mod:`zaya.data.shard_source`).

Heavy imports (grain) load lazily: ``from zaya.data import make_train_iter`` pulls in the pipeline on first use.
"""
from zaya.data.sources import DataError, Document, EmptyCorpusError, jsonl, load_documents, shakespeare, text_files
from zaya.data.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, TokenizerError, check_vocab,
                                 load_tokenizer)

_LAZY = {"make_train_iter", "make_eval_batches", "make_train_dataset", "default_config", "load_corpus",
         "DataIterator"}


def __getattr__(name):
    if name in _LAZY:
        from zaya.data import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'zaya.data' has no attribute {name!r}")


__all__ = ["ByteTokenizer", "DataError", "Document", "EmptyCorpusError", "HFTokenizer", "Tokenizer",
           "TokenizerError", "check_vocab", "jsonl", "load_documents", "load_tokenizer", "shakespeare", "text_files",
           *sorted(_LAZY)]

"""The grain input pipeline: documents -> tokens -> packed rows -> per-epoch shuffle -> process shard -> batches.

Batches are ``{'tokens': int32 [b, S], 'doc_ids': int32 [b, S], 'loss_mask': float32 [b, S]}`` (see
:mod:`zaya.data.packing` for the meaning of ``doc_ids`` and ``loss_mask``), where ``b = batch_size //
shard_count`` is this process's part of the global batch: shard i holds rows [i * b, (i + 1) * b) of every global
batch of ``batch_size`` rows, the block its devices hold in the global array (``zaya.train.step.batch_shard`` derives
(i, shard_count) from the mesh; processes whose devices hold the same rows load the same shard).

Determinism: the corpus and its train/val split do not depend on the seed (the split hashes each document, see
:func:`zaya.data.sources.heldout`); the seed picks the document order for packing and the row order of each epoch.
The train iterator is a ``grain.DatasetIterator``: ``get_state()`` is a small JSON-able dict, ``set_state`` on a
fresh iterator built with the same arguments resumes exactly (grain's orbax checkpoint handlers work with it).

Corpora are tokenized and packed eagerly in memory (fine up to a few hundred million tokens). Larger ones are
tokenized once by ``zaya data prepare`` (:mod:`zaya.data.shards`) and read with ``source='shards:<dir>'``: rows are
then cut from the memory-mapped token stream by random access (:class:`zaya.data.shard_source.ShardRows`), with the
same shuffle, repeat, batching, process sharding and resumable state, and a fingerprint taken from the manifest.
"""
from __future__ import annotations

import math

import grain
import numpy as np

from zaya.data import packing, shard_source, sources, tasks
from zaya.data.sources import DataError, Document
from zaya.data.tokenizer import Tokenizer

DEFAULTS = dict(
    source="shakespeare",  # 'shakespeare' | 'tasks' | 'text:<glob>' | 'jsonl:<path or glob>' | 'shards:<dir>'
    sft=False,  # no loss on prompts (jsonl prompt/response, tasks)
    jsonl_fields="text",  # 'text' or 'prompt,response' (a tuple works too)
    text_split="file",  # text files: 'file' (one doc per file) or 'blank_line'
    shakespeare_unit="scene",  # 'scene' or 'play'
    val_fraction=0.05,  # fraction of documents held out (hash of the document; at least one if > 0)
    tasks_fraction=0.0,  # fraction of training tokens that are generated task examples (mixed into the corpus)
    task_kinds=",".join(tasks.KINDS),  # comma-separated (a tuple works too)
    num_tasks=20000,  # examples generated for source='tasks'
    tasks_seed=0,  # the generated task set (independent of the shuffle seed)
    distill_from="",  # a model folder whose greedy continuations replace the train split's responses (prompts needed)
    # (self-distillation, zaya.data.distill); 'init': the run's init_from
    task_max_len=8,  # longest string of the copy/reverse/sort/brackets tasks (zaya.data.tasks.generate max_len)
    num_epochs=None,  # None: repeat forever
    packing_bins=16,  # open rows for first-fit packing
    num_threads=2,  # grain read threads
    prefetch=8,  # grain prefetch buffer (batches' rows)
)


def default_config():
    """The defaults as an ``ml_collections.ConfigDict`` (``num_epochs`` is an int placeholder, None = forever)."""
    import ml_collections
    from ml_collections.config_dict import placeholder
    return ml_collections.ConfigDict({**DEFAULTS, "num_epochs": placeholder(int)})


def _names(v) -> tuple[str, ...]:
    return tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else tuple(v)


def _cfg(data_cfg) -> dict:
    d = dict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else (data_cfg or {}))
    unknown = sorted(set(d) - set(DEFAULTS))
    if unknown:
        raise DataError(f"unknown data config field(s) {unknown}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **d}
    out["jsonl_fields"], out["task_kinds"] = _names(out["jsonl_fields"]), _names(out["task_kinds"])
    if not 0 <= out["val_fraction"] < 1:
        raise DataError(f"val_fraction={out['val_fraction']} must be in [0, 1)")
    if not 0 <= out["tasks_fraction"] < 1:
        raise DataError(f"tasks_fraction={out['tasks_fraction']} must be in [0, 1)")
    if out["num_epochs"] is not None and int(out["num_epochs"]) <= 0:
        raise DataError(f"num_epochs={out['num_epochs']} must be positive or None (forever)")
    return out


def _shard(shard_options, batch_size: int) -> tuple[int, int]:
    """(shard index, shard count), checked against the global ``batch_size`` each shard takes an equal block of."""
    so = shard_options if shard_options is not None else grain.sharding.ShardByJaxProcess()
    i, n = int(so.shard_index), int(so.shard_count)
    if not 0 <= i < n:
        raise DataError(f"shard_index={i} not in [0, shard_count={n})")
    if batch_size % n:
        raise DataError(f"batch_size={batch_size} (global) must be a multiple of the data shard count {n} "
                        "(processes whose devices hold different batch rows)")
    return i, n


def _split(docs: list[Document], val_fraction: float, split: str) -> list[Document]:
    if split == "all":
        return docs
    if split not in ("train", "val"):
        raise DataError(f"split={split!r}; use 'train', 'val' or 'all'")
    u = np.array([sources.split_value(d.key) for d in docs])
    val = u < val_fraction
    if val_fraction > 0 and not val.any() and len(docs) > 1:
        val[np.argmin(u)] = True  # a tiny corpus still gets a validation document
    keep = val if split == "val" else ~val
    out = [d for d, k in zip(docs, keep) if k]
    if not out:
        raise sources.EmptyCorpusError(f"the {split} split is empty ({len(docs)} documents, val_fraction="
                                       f"{val_fraction}); add data or change val_fraction")
    return out


def tokenize(docs: list[Document], tokenizer: Tokenizer, sft: bool) -> packing.TokenizedDocs:
    """Each document as ``[bos] + prompt + text + [eos]``; bos (and the prompt, when ``sft``) carry no loss."""
    enc = getattr(tokenizer, "encode_batch", None) or (lambda ts: [tokenizer.encode(t) for t in ts])
    texts = [np.asarray(a, np.int32) for a in enc([d.text for d in docs])]
    has_prompt = [i for i, d in enumerate(docs) if d.prompt]
    prompts = dict(zip(has_prompt, (np.asarray(a, np.int32) for a in enc([docs[i].prompt for i in has_prompt]))))
    bos, eos = np.array([tokenizer.bos_id], np.int32), np.array([tokenizer.eos_id], np.int32)
    empty = np.zeros(0, np.int32)
    arrays, n_masked = [], []
    for i, t in enumerate(texts):
        p = prompts.get(i, empty)
        arrays.append(np.concatenate([bos, p, t, eos]))
        n_masked.append(1 + (len(p) if sft else 0))
    return packing.TokenizedDocs.build(arrays, n_masked)


def load_corpus(data_cfg, tokenizer: Tokenizer, split: str = "train") -> packing.TokenizedDocs:
    """The tokenized documents of one split (corpus plus mixed-in task examples), in a seed-independent order."""
    c = _cfg(data_cfg)
    if shard_source.is_shards(c["source"]):
        raise DataError(f"load_corpus reads documents into memory; source {c['source']!r} (prepared shards) is read "
                        "by make_train_dataset / make_eval_batches")
    if c["source"] == "tasks":
        docs = [tasks.as_document(t) for t in tasks.generate(int(c["num_tasks"]), c["tasks_seed"], c["task_kinds"],
                                                                max_len=int(c["task_max_len"]))]
    else:
        docs = sources.load_documents(c["source"], jsonl_fields=c["jsonl_fields"], text_split=c["text_split"],
                                      shakespeare_unit=c["shakespeare_unit"])
    docs = _split(docs, c["val_fraction"], split)
    if c["distill_from"] and split == "train":
        if not any(d.prompt for d in docs):
            raise DataError(f"data.distill_from needs prompt/response documents to continue (source 'tasks', or "
                            f"'jsonl:...' with jsonl_fields=prompt,response); {c['source']!r} has no prompts")
        if c["distill_from"] == "init":
            raise DataError("data.distill_from='init' is resolved by the trainer (the run's init_from); pass a model "
                            "folder when building the data yourself")
        from zaya.data import distill
        docs = distill.continuations(docs, c["distill_from"], tokenizer)
    tok = tokenize(docs, tokenizer, c["sft"])
    f = c["tasks_fraction"]
    if f > 0 and c["source"] != "tasks":
        want = f / (1 - f) * len(tok.tokens)  # task tokens so that they are a fraction f of the mixture
        probe = tokenize([tasks.as_document(t) for t in tasks.generate(256, c["tasks_seed"], c["task_kinds"],
                                                                  max_len=int(c["task_max_len"]))],
                         tokenizer, c["sft"])
        n = int(math.ceil(1.2 * want / max(1.0, len(probe.tokens) / 256))) + 1
        ex = tasks.generate(n, c["tasks_seed"], c["task_kinds"], split=None if split == "all" else split,
                            val_fraction=c["val_fraction"], max_len=int(c["task_max_len"]))
        task_tok = tokenize([tasks.as_document(t) for t in ex], tokenizer, c["sft"])
        k = int(np.searchsorted(task_tok.offsets, want)) + 1  # first k examples reach `want` tokens
        k = min(k, len(ex))
        docs_all = ([tok.tokens[tok.offsets[i]:tok.offsets[i + 1]] for i in range(len(tok))]
                    + [task_tok.tokens[task_tok.offsets[i]:task_tok.offsets[i + 1]] for i in range(k)])
        tok = packing.TokenizedDocs.build(docs_all, np.concatenate([tok.n_masked, task_tok.n_masked[:k]]))
    return tok


def _shard_rows(c: dict, tokenizer: Tokenizer, seq_len: int, split: str) -> shard_source.ShardRows:
    return shard_source.open_rows(c, tokenizer, seq_len, split, _cfg({}))


def _seed32(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])


class DataIterator(grain.DatasetIterator):
    """grain's prefetching iterator plus a fingerprint of the pipeline in its state, so a state saved from a
    different corpus, seed, batch, sequence length or shard layout is refused instead of silently misapplied
    (drop the ``'fingerprint'`` key from a state to skip the check)."""

    def __init__(self, parent: grain.DatasetIterator, fingerprint: str, num_batches: int | None):
        super().__init__(parent)
        self.fingerprint, self.num_batches = fingerprint, num_batches

    def __next__(self) -> dict:
        return next(self._parent)

    def get_state(self) -> dict:
        return {**self._parent.get_state(), "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        fp = state.pop("fingerprint", self.fingerprint)
        if fp != self.fingerprint:
            raise DataError(f"data iterator state is from a different pipeline (fingerprint {fp}, this one "
                            f"{self.fingerprint}): corpus, tokenizer, seed, seq_len, batch_size or data shard count "
                            "changed since it was saved")
        self._parent.set_state(state)


def make_train_dataset(data_cfg, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int,
                       split: str = "train", shard_options=None):
    """(grain.MapDataset of this shard's batches, fingerprint). See :func:`make_train_iter`."""
    c = _cfg(data_cfg)
    i, n = _shard(shard_options, batch_size)
    if shard_source.is_shards(c["source"]):
        rows = _shard_rows(c, tokenizer, seq_len, split)
        data_fp = f"shards-{rows.fingerprint()}"
    else:
        docs = load_corpus(c, tokenizer, split)
        order = np.random.Generator(np.random.PCG64(_seed32(seed, 1))).permutation(len(docs))
        pk = packing.plan(docs, seq_len, order, max_open=int(c["packing_bins"]))
        rows = packing.PackedRows(docs, pk, tokenizer.pad_id)
        data_fp = f"{docs.fingerprint()}-{pk.fingerprint()}"
    ds = grain.MapDataset.source(rows).shuffle(seed=_seed32(seed, 2))  # a fresh permutation every epoch
    epochs = None if c["num_epochs"] is None else int(c["num_epochs"])
    ds = ds.repeat(epochs)
    if epochs is not None:
        usable = (len(ds) // batch_size) * batch_size  # every shard gets the same number of full batches
        if usable == 0:
            raise DataError(f"{len(rows)} packed rows x {epochs} epoch(s) cannot fill one batch of {batch_size}; "
                            "lower batch_size or seq_len, or raise num_epochs")
        ds = ds[:usable]
    # global batch g = blocks g*n .. g*n + n-1 of batch_size // n rows; shard i takes block i of each
    ds = ds.batch(batch_size // n, drop_remainder=True)[i::n]
    # no shard index: the iterator state (batches consumed) is the same on every shard, so the one copy a
    # multi-process checkpoint keeps (process 0's) restores every process
    fp = f"{data_fp}-{seed}-{batch_size}-{n}shards-{epochs}"
    return ds, fp


def make_train_iter(data_cfg, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int,
                    split: str = "train", *, shard_options=None) -> DataIterator:
    """An endless (``num_epochs=None``) or finite iterator of this process's batches of the ``split`` documents.

    ``batch_size`` is the global batch; shard i of ``shard_count`` gets its contiguous block of
    ``batch_size // shard_count`` rows of each global batch. ``shard_options``: a
    ``grain.sharding.ShardOptions(shard_index, shard_count)``; default ``ShardByJaxProcess()``
    (``jax.process_index()`` of ``jax.process_count()``).
    """
    c = _cfg(data_cfg)
    ds, fp = make_train_dataset(c, tokenizer, seq_len, batch_size, seed, split, shard_options)
    read = grain.ReadOptions(num_threads=int(c["num_threads"]), prefetch_buffer_size=int(c["prefetch"]))
    num = None if c["num_epochs"] is None else len(ds)
    return DataIterator(iter(ds.to_iter_dataset(read)), fp, num)


def make_eval_batches(data_cfg, tokenizer: Tokenizer, seq_len: int, batch_size: int, split: str = "val", *,
                      max_batches: int | None = None, shard_options=None) -> list[dict]:
    """Every row of the ``split`` documents once, in a fixed order, as a finite list of this process's batches.

    The last global batch is filled with all-padding rows (``loss_mask`` 0), so no data is dropped and all
    shards get the same number of batches.
    """
    c = _cfg(data_cfg)
    i, n = _shard(shard_options, batch_size)
    if shard_source.is_shards(c["source"]):
        rows = _shard_rows(c, tokenizer, seq_len, split)
    else:
        docs = load_corpus(c, tokenizer, split)
        rows = packing.PackedRows(docs, packing.plan(docs, seq_len, max_open=int(c["packing_bins"])),
                                  tokenizer.pad_id)
    num_batches = -(-len(rows) // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, int(max_batches))
    out = []
    for b in range(num_batches):
        idx = range(b * batch_size + i * (batch_size // n), b * batch_size + (i + 1) * (batch_size // n))
        items = [rows[r] if r < len(rows) else rows.empty_row() for r in idx]
        out.append({k: np.stack([it[k] for it in items]) for k in ("tokens", "doc_ids", "loss_mask")})
    return out

"""zaya.data.shards / shard_source: prepared token shards read by random access (fast, tiny corpora, CPU only)."""
import io
import json
import os
import re

import grain
import numpy as np
import pytest
from conftest import bpe_tokenizer

from zaya import cli
from zaya.data import pipeline, shard_source, shards, sources
from zaya.data.packing import PackedRows, PackPlan
from zaya.data.sources import DataError, EmptyCorpusError
from zaya.data.tokenizer import ByteTokenizer, load_tokenizer

BYTES = ByteTokenizer()
KEYS = ("tokens", "doc_ids", "loss_mask")


def shard(i, n):
    return grain.sharding.ShardOptions(shard_index=i, shard_count=n)


def rows_of(batches):
    return [tuple(r) for b in batches for r in b["tokens"].tolist()]


def leftovers(tmp_path, name="out"):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(name))


@pytest.fixture
def text_corpus(tmp_path):
    """80 blank-line separated documents in two files, some longer than the 16-token rows used below."""
    rng = np.random.default_rng(0)
    words = ["thee", "thou", "art", "dost", "hark", "anon", "prithee", "é", "→"]
    docs = [f"doc{i}: " + " ".join(rng.choice(words, int(rng.integers(1, 12)))) for i in range(80)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n\n".join(docs[:50]) + "\n", encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_text("\n \n".join(docs[50:]) + "\n", encoding="utf-8")
    return {"source": f"text:{tmp_path / 'in' / '*.txt'}", "text_split": "blank_line", "val_fraction": 0.1}


@pytest.fixture
def sft_corpus(tmp_path):
    path = tmp_path / "sft.jsonl"
    recs = [{"prompt": f"Q{i}: what is {i}+{i}?", "response": f" {2 * i}" * (1 + i % 4)} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return {"source": f"jsonl:{path}", "jsonl_fields": ("prompt", "response"), "sft": True, "val_fraction": 0.1}


def prepare(cfg, out, **kw):
    opts = {k: cfg[k] for k in ("jsonl_fields", "text_split", "sft", "val_fraction") if k in cfg}
    return shards.prepare(cfg["source"], str(out), "bytes", progress=False, **{**opts, **kw})


def split_arrays(out, split):
    """(tokens, offsets, n_masked) of each shard of ``split``, opened as the manifest lists them (np.load, mmap)."""
    m = json.loads((out / "manifest.json").read_text())
    return [tuple(np.load(out / s["files"][k]["file"], mmap_mode="r") for k in ("tokens", "offsets", "n_masked"))
            for s in m["splits"][split]["shards"]]


def reference_rows(td, S, pad_id):
    """The stream rows built with packing.PackedRows: row k's pieces are the documents' parts in [k*S, (k+1)*S)."""
    row_ptr, pieces, doc, lo, hi = [0], [], [], [], []
    total = int(td.offsets[-1])
    for k in range(-(-total // S)):
        a, b = k * S, min((k + 1) * S, total)
        for d in range(len(td)):
            s, e = int(td.offsets[d]), int(td.offsets[d + 1])
            if s < b and e > a:
                pieces.append(len(doc))
                doc.append(d)
                lo.append(max(a, s) - s)
                hi.append(min(b, e) - s)
        row_ptr.append(len(pieces))
    plan = PackPlan(S, *(np.asarray(x, np.int64) for x in (row_ptr, pieces, doc, lo, hi)))
    rows = PackedRows(td, plan, pad_id)
    return [rows[r] for r in range(len(rows))]


# ------------------------------------------------------------------------------------------------ streaming reader

def test_streaming_reader_matches_the_loaders(text_corpus, sft_corpus, tmp_path):
    for cfg in (text_corpus, dict(text_corpus, text_split="file"), sft_corpus):
        kw = dict(jsonl_fields=cfg.get("jsonl_fields", "text"), text_split=cfg.get("text_split", "file"))
        assert list(sources.iter_documents(cfg["source"], **kw)) == sources.load_documents(cfg["source"], **kw)
    rng = np.random.default_rng(1)
    for _ in range(300):  # blank-line splitting in chunks equals splitting the whole text
        text = "".join(rng.choice(list("a \t\n\n"), int(rng.integers(0, 40))))
        for chunk in (1, 2, 3, 7):
            assert list(sources._split_blank_lines(io.StringIO(text), chunk)) == re.split(r"\n[ \t]*\n", text)


# ------------------------------------------------------------------------------------------------ rows and split

@pytest.mark.parametrize("which", ["text", "sft"])
def test_rows_equal_the_in_memory_documents(which, text_corpus, sft_corpus, tmp_path, monkeypatch):
    cfg = text_corpus if which == "text" else sft_corpus
    m = prepare(cfg, tmp_path / "out", shard_tokens=70)
    default_block = shard_source.BLOCK
    assert m["token_dtype"] == "uint16" and m["tokenizer"]["name"] == "bytes"
    for split in ("train", "val"):
        td = pipeline.load_corpus(cfg, BYTES, split)
        assert m["splits"][split]["docs"] == len(td) and m["splits"][split]["tokens"] == len(td.tokens)
        # the shards hold the split's documents in order: same tokens, boundaries and masked prefixes
        arrays = split_arrays(tmp_path / "out", split)
        np.testing.assert_array_equal(np.concatenate([t for t, _, _ in arrays]), td.tokens)
        np.testing.assert_array_equal(np.concatenate([n for _, _, n in arrays]), td.n_masked)
        starts = np.cumsum([0] + [len(t) for t, _, _ in arrays])
        np.testing.assert_array_equal(np.unique(np.concatenate([o + s for (_, o, _), s in zip(arrays, starts)])),
                                      td.offsets)
        for S, block in ((16, default_block), (5, 3)):  # block 3: many blocks of the offsets index per shard
            monkeypatch.setattr(shard_source, "BLOCK", block)
            rows = shard_source.ShardRows(str(tmp_path / "out"), split, S, BYTES.pad_id)
            assert len(rows) == -(-len(td.tokens) // S)
            if split == "train":  # documents cross rows, rows cross shards
                assert len(arrays) > 3 and any(s % S for s in starts[1:-1])
                assert (np.diff(td.offsets) > S).any()
            ref = reference_rows(td, S, BYTES.pad_id)
            for k in range(len(rows)):
                got = rows[k]
                for key in KEYS:
                    assert got[key].dtype == ref[k][key].dtype
                    np.testing.assert_array_equal(got[key], ref[k][key], err_msg=f"{split} S={S} row {k} {key}")
    if which == "sft":  # the prompt carries no loss
        row = shard_source.ShardRows(str(tmp_path / "out"), "train", 64, BYTES.pad_id)[0]
        seg0 = row["doc_ids"] == 0
        assert BYTES.decode(row["tokens"][seg0 & (row["loss_mask"] > 0)], skip_special=False).startswith(" 0<eos>")


def test_split_fallback_and_all(tmp_path):
    """A corpus with no document under val_fraction still holds one out, the same one as the in-memory split."""
    (tmp_path / "c.txt").write_text("alpha\n\nbeta beta\n\ngamma\n")
    cfg = {"source": f"text:{tmp_path / 'c.txt'}", "text_split": "blank_line", "val_fraction": 1e-6}
    m = prepare(cfg, tmp_path / "out")
    assert m["splits"]["val"]["docs"] == 1 and m["splits"]["train"]["docs"] == 2
    for split in ("train", "val"):
        tokens = np.concatenate([t for t, _, _ in split_arrays(tmp_path / "out", split)])
        np.testing.assert_array_equal(tokens, pipeline.load_corpus(cfg, BYTES, split).tokens)
    rows = shard_source.ShardRows(str(tmp_path / "out"), "all", 8, BYTES.pad_id)
    assert rows.num_tokens == m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    m0 = prepare(cfg, tmp_path / "out0", val_fraction=0.0)
    assert m0["splits"]["val"] == {"tokens": 0, "docs": 0, "shards": []}
    with pytest.raises(EmptyCorpusError, match="val split of .* is empty"):
        pipeline.make_eval_batches({"source": f"shards:{tmp_path / 'out0'}", "val_fraction": 0.0}, BYTES, 8, 2)


# ------------------------------------------------------------------------------------------------ the pipeline

def shards_cfg(cfg, out, **kw):
    return {"source": f"shards:{out}", "val_fraction": cfg["val_fraction"], "sft": cfg.get("sft", False), **kw}


def test_train_iter_resume_and_fingerprint(text_corpus, tmp_path):
    prepare(text_corpus, tmp_path / "out", shard_tokens=100)
    cfg = shards_cfg(text_corpus, tmp_path / "out")
    it = pipeline.make_train_iter(cfg, BYTES, 16, 4, seed=0, shard_options=shard(1, 2))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    fresh = pipeline.make_train_iter(cfg, BYTES, 16, 4, seed=0, shard_options=shard(1, 2))
    fresh.set_state(state)
    for e, g in zip(expected, [next(fresh) for _ in range(5)]):
        for k in KEYS:
            np.testing.assert_array_equal(e[k], g[k])
    ds, fp = pipeline.make_train_dataset(cfg, BYTES, 16, 4, 0, shard_options=shard(1, 2))
    assert fp == state["fingerprint"] and fp.startswith("shards-")
    prepare(text_corpus, tmp_path / "other", shard_tokens=100, val_fraction=0.2)  # another corpus split
    for other in (pipeline.make_train_iter(shards_cfg(text_corpus, tmp_path / "other", val_fraction=0.2), BYTES, 16,
                                           4, seed=0, shard_options=shard(1, 2)),
                  pipeline.make_train_iter(cfg, BYTES, 32, 4, seed=0, shard_options=shard(1, 2))):
        with pytest.raises(DataError, match="different pipeline"):
            other.set_state(state)


def test_process_shards_split_the_global_batch(text_corpus, tmp_path):
    prepare(text_corpus, tmp_path / "out", shard_tokens=100)
    one = shards_cfg(text_corpus, tmp_path / "out", num_epochs=1)
    whole = list(pipeline.make_train_iter(one, BYTES, 16, 4, 7, shard_options=shard(0, 1)))
    parts = [list(pipeline.make_train_iter(one, BYTES, 16, 4, 7, shard_options=shard(i, 2))) for i in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) > 5
    for step, g in enumerate(whole):
        assert rows_of([parts[0][step]]) + rows_of([parts[1][step]]) == rows_of([g])
    r0, r1 = rows_of(parts[0]), rows_of(parts[1])
    assert not set(r0) & set(r1)
    rows = shard_source.ShardRows(str(tmp_path / "out"), "train", 16, BYTES.pad_id)
    every = {tuple(rows[k]["tokens"].tolist()) for k in range(len(rows))}
    assert len(set(r0 + r1)) == len(r0 + r1) == len(rows) // 4 * 4 and set(r0 + r1) <= every  # one epoch


def test_eval_batches_cover_the_split_once(text_corpus, tmp_path):
    prepare(text_corpus, tmp_path / "out", shard_tokens=100)
    cfg = shards_cfg(text_corpus, tmp_path / "out")
    ev = pipeline.make_eval_batches(cfg, BYTES, 16, 4)
    val = pipeline.load_corpus(text_corpus, BYTES, "val")
    got = np.concatenate([b["tokens"][b["doc_ids"] >= 0] for b in ev])
    np.testing.assert_array_equal(got, val.tokens)
    parts = [pipeline.make_eval_batches(cfg, BYTES, 16, 4, shard_options=shard(i, 2)) for i in range(2)]
    for b in range(len(ev)):
        assert rows_of([parts[0][b]]) + rows_of([parts[1][b]]) == rows_of([ev[b]])


def test_config_conflicts(text_corpus, tmp_path):
    prepare(text_corpus, tmp_path / "out")
    cfg = shards_cfg(text_corpus, tmp_path / "out")
    with pytest.raises(DataError, match=r"data.sft=True but .* prepared with sft=False"):
        pipeline.make_train_iter(dict(cfg, sft=True), BYTES, 16, 4, 0)
    with pytest.raises(DataError, match="tasks_fraction"):
        pipeline.make_train_iter(dict(cfg, tasks_fraction=0.2), BYTES, 16, 4, 0)
    with pytest.raises(DataError, match="load_corpus reads documents into memory"):
        pipeline.load_corpus(cfg, BYTES)
    pipeline.make_train_iter({"source": cfg["source"]}, BYTES, 16, 4, 0)  # defaults never conflict


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_input_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"document {i} " * 5}) for i in range(40)) + "\n")
    bad_line = tmp_path / "zbad.jsonl"
    bad_line.write_text('{"text": "fine"}\n{"text": "broken\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    cases = [
        (f"jsonl:{tmp_path / 'missing.jsonl'}", {}, "missing.jsonl' not found"),
        (f"text:{tmp_path / 'nothing*.txt'}", {}, "no text files match"),
        (f"text:{tmp_path / 'latin1.txt'}", {}, r"latin1\.txt: not UTF-8"),
        (f"jsonl:{tmp_path / '*.jsonl'}", {}, r"zbad\.jsonl:2: malformed JSON"),  # after good.jsonl's shards
        (f"jsonl:{good}", {"jsonl_fields": "body"}, r"good\.jsonl:1: missing field 'body'"),
        (f"jsonl:{tmp_path / 'empty.jsonl'}", {}, "yielded no documents"),
        ("tasks", {}, "cannot prepare source 'tasks'"),
    ]
    for source, kw, match in cases:
        with pytest.raises(DataError, match=match):
            shards.prepare(source, str(tmp_path / "out"), shard_tokens=50, progress=False, **kw)
        assert leftovers(tmp_path) == [], source
    real_open = open

    def unreadable(path, *a, **k):
        if str(path) == str(good):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(sources, "open", unreadable, raising=False)
    with pytest.raises(DataError, match=r"good\.jsonl: cannot read \(Permission denied\)"):
        shards.prepare(f"jsonl:{good}", str(tmp_path / "out"), progress=False)
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    with pytest.raises(EmptyCorpusError):  # an interrupted run (any exception) cleans up as well
        shards.prepare(f"jsonl:{tmp_path / 'empty.jsonl'}", str(tmp_path / "out"), progress=False)
    assert leftovers(tmp_path) == []


def test_existing_output_and_overwrite(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "four"}\n{"text": "five"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "six"}\nnot json\n')
    out = tmp_path / "out"
    first = shards.prepare(f"jsonl:{tmp_path / 'a.jsonl'}", str(out), progress=False)
    with pytest.raises(DataError, match="exists and is not empty; pass --overwrite"):
        shards.prepare(f"jsonl:{tmp_path / 'b.jsonl'}", str(out), progress=False)
    with pytest.raises(DataError, match="malformed JSON"):  # a failed overwrite keeps the previous output
        shards.prepare(f"jsonl:{tmp_path / 'bad.jsonl'}", str(out), overwrite=True, progress=False)
    assert shard_source.read_manifest(str(out)) == first and leftovers(tmp_path) == ["out"]
    second = shards.prepare(f"jsonl:{tmp_path / 'b.jsonl'}", str(out), overwrite=True, progress=False)
    assert shard_source.read_manifest(str(out)) == second and second["documents"] == 2
    assert leftovers(tmp_path) == ["out"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="holds no manifest.json: --overwrite only replaces"):
        shards.prepare(f"jsonl:{tmp_path / 'b.jsonl'}", str(tmp_path / "mine"), overwrite=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty_dir").mkdir()  # an existing empty folder is fine
    shards.prepare(f"jsonl:{tmp_path / 'b.jsonl'}", str(tmp_path / "empty_dir"), progress=False)


@pytest.fixture
def prepared(tmp_path):
    (tmp_path / "c.txt").write_text("\n\n".join(f"to be or not to be, line {i}" for i in range(30)) + "\n")
    cfg = {"source": f"text:{tmp_path / 'c.txt'}", "text_split": "blank_line", "val_fraction": 0.1}
    prepare(cfg, tmp_path / "out", shard_tokens=200)
    return cfg, tmp_path / "out"


def open_train(out, tok=BYTES):
    return pipeline.make_train_iter({"source": f"shards:{out}", "val_fraction": 0.1}, tok, 16, 2, 0)


def test_shards_made_with_another_tokenizer(prepared, tmp_path):
    cfg, out = prepared
    tok_path = tmp_path / "tok" / "tokenizer.json"
    tok_path.parent.mkdir()
    bpe_tokenizer(tok_path, ["to be or not to be, line 1"] * 20)
    bpe = load_tokenizer(str(tok_path))
    with pytest.raises(DataError, match=r"with tokenizer 'bytes' .* training uses tokenizer '.*tokenizer\.json'"):
        open_train(out, bpe)
    # one shard swapped for the same-named shard of a folder made with another tokenizer
    shards.prepare(cfg["source"], str(tmp_path / "bpe"), str(tok_path), text_split="blank_line",
                   val_fraction=0.1, shard_tokens=200, progress=False)
    os.replace(tmp_path / "bpe" / "train-00000.tokens.npy", out / "train-00000.tokens.npy")
    with pytest.raises(DataError, match=r"train-00000\.tokens\.npy does not match manifest\.json"):
        open_train(out)


def test_damaged_shards_and_manifest(prepared, tmp_path):
    _, out = prepared
    open_train(out)
    verified = shard_source.verify(str(out), BYTES)
    assert verified["train"]["docs"] + verified["val"]["docs"] == 30
    path = out / "train-00001.tokens.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # truncated
    with pytest.raises(DataError, match=r"train-00001\.tokens\.npy is truncated"):
        open_train(out)
    path.write_bytes(data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])  # same size, one bit flipped
    open_train(out)  # opening does not read the data ...
    with pytest.raises(DataError, match=r"train-00001\.tokens\.npy: sha256 differs"):
        shard_source.verify(str(out))  # ... verify does
    path.write_bytes(data)
    m = json.loads((out / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["tokens"] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"train-00000\.tokens\.npy does not match manifest\.json"):
        open_train(out)
    m["splits"]["train"]["shards"][0]["tokens"] -= 1
    m["splits"]["train"]["shards"][0]["files"]["offsets"]["bytes"] += 8
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"train-00000\.offsets\.npy has \d+ bytes, manifest\.json says"):
        open_train(out)
    m["splits"]["train"]["shards"][0]["files"]["offsets"]["bytes"] -= 8
    (out / "manifest.json").write_text(json.dumps(m))
    os.remove(out / "val-00000.n_masked.npy")
    with pytest.raises(DataError, match=r"val-00000\.n_masked\.npy is missing"):
        shard_source.verify(str(out))
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        open_train(out)
    os.remove(out / "manifest.json")
    with pytest.raises(DataError, match="holds no manifest.json"):
        open_train(out)
    with pytest.raises(DataError, match="token shard folder .* not found"):
        open_train(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ command line

def test_cli_prepare_verify_and_errors(tmp_path, capsys):
    src = tmp_path / "sft.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": f"Q{i}", "response": f"A{i}"}) for i in range(20)) + "\n")
    out = tmp_path / "out"
    m = cli.run(["data", "prepare", f"jsonl:{src}", str(out), "--jsonl-fields", "prompt,response", "--sft",
                 "--val-fraction", "0.2", "--shard-tokens", "40"])
    assert m["sft"] and m["jsonl_fields"] == ["prompt", "response"] and len(m["splits"]["train"]["shards"]) > 1
    assert capsys.readouterr().out.startswith(f"prepared {out}")
    verified = cli.run(["data", "verify", str(out), "--tokenizer", "bytes"])
    assert verified["train"]["docs"] == m["splits"]["train"]["docs"]
    for argv, match in [(["data", "prepare", f"jsonl:{src}", str(out)], "exists and is not empty"),
                        (["data", "prepare", f"jsonl:{tmp_path / 'nope.jsonl'}", str(tmp_path / "o2")], "not found"),
                        (["data", "verify", str(tmp_path / "o2")], "not found")]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"zaya data {argv[1]}: DataError: ") and match in err
    assert leftovers(tmp_path) == ["out"]

"""zaya.data: tokenizers, sources, tasks, packing and the grain pipeline (fast, deterministic, CPU only)."""
import json

import grain
import numpy as np
import pytest
from conftest import bpe_tokenizer

from zaya.data import pipeline, tasks
from zaya.data.packing import PackedRows, TokenizedDocs, plan
from zaya.data.sources import DataError, Document, EmptyCorpusError, jsonl, load_documents, shakespeare, text_files
from zaya.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, check_vocab, load_tokenizer

BYTES = ByteTokenizer()


def shard(i, n):
    return grain.sharding.ShardOptions(shard_index=i, shard_count=n)


def rows_of(batches):
    return [tuple(r) for b in batches for r in b["tokens"].tolist()]


@pytest.fixture
def corpus(tmp_path):
    """60 distinct documents of varied length (some longer than the 32-token rows used below)."""
    rng = np.random.default_rng(0)
    words = ["thee", "thou", "art", "dost", "hark", "anon", "prithee", "wherefore", "é", "ü", "→"]
    docs = [f"doc{i}: " + " ".join(rng.choice(words, int(rng.integers(1, 20)))) for i in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return {"source": f"text:{path}", "text_split": "blank_line", "val_fraction": 0.1}, docs


@pytest.fixture
def sft_jsonl(tmp_path):
    path = tmp_path / "sft.jsonl"
    recs = [{"prompt": f"Q{i}: what is {i}+{i}?", "response": f" {2 * i}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return {"source": f"jsonl:{path}", "jsonl_fields": ("prompt", "response"), "sft": True, "val_fraction": 0.0}


# ------------------------------------------------------------------------------------------------ tokenizers

@pytest.mark.parametrize("text", ["", "hello world", "héllo wörld → 漢字 🎭\n\ttabs", "\x00\x01 nulls"])
def test_byte_tokenizer_round_trip(text):
    ids = BYTES.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(5 <= i < 261 for i in ids)
    assert BYTES.decode(ids) == text
    assert BYTES.decode([BYTES.bos_id] + ids + [BYTES.eos_id, BYTES.pad_id]) == text


def test_byte_tokenizer_layout():
    t = load_tokenizer("bytes")
    assert (t.vocab_size, t.pad_id, t.eos_id, t.bos_id, t.mask_id) == (261, 0, 1, 2, 4)
    assert t.encode("A") == [ord("A") + 5]
    assert t.decode([2, 70, 1], skip_special=False) == "<bos>A<eos>"
    assert t.decode([70, 400, 70]) == "A\ufffdA"  # an id past the vocab (bigger model vocab) does not crash
    assert [a.tolist() for a in t.encode_batch(["ab", "", "é"])] == [t.encode("ab"), [], t.encode("é")]


def test_byte_tokenizer_json_encodes_and_decodes_as_the_byte_tokenizer(tmp_path):
    """The tokenizer.json a byte-tokenizer model folder carries: same ids for any text (all 256 byte values,
    multi-byte UTF-8, whitespace runs), same special ids, same decoding (specials skipped)."""
    from zaya.data.tokenizer import tokenizer_file
    path = tokenizer_file("bytes", str(tmp_path))
    assert path == str(tmp_path / "tokenizer.json")
    t = load_tokenizer(path)
    assert isinstance(t, HFTokenizer) and t.vocab_size == BYTES.vocab_size == 261
    assert (t.pad_id, t.eos_id, t.bos_id, t.mask_id) == (BYTES.pad_id, BYTES.eos_id, BYTES.bos_id, BYTES.mask_id)
    rng = np.random.default_rng(0)
    every_byte = bytes(range(256)).decode("latin-1")
    texts = ["12+35=", "  two  spaces\n\n\ttab ", "héllo wörld → 漢字 🎭", every_byte,
             "".join(chr(c) for c in rng.integers(0, 0x3000, 300))]
    for text in texts:
        assert t.encode(text) == BYTES.encode(text), text
        assert t.decode(BYTES.encode(text)) == text
    assert t.decode([BYTES.bos_id, *BYTES.encode("ab"), BYTES.eos_id, BYTES.pad_id]) == "ab"
    assert t.encode("a<mask>") == [BYTES.encode("a")[0], BYTES.mask_id]  # a literal special string: its id (HF)
    with open(path) as f:  # a plain tokenizers file: the `zaya generate` CLI reads it with tokenizers directly
        assert json.load(f)["model"]["type"] == "BPE"
    assert tokenizer_file(str(tmp_path), str(tmp_path / "x")) == path  # a folder holding one
    assert tokenizer_file(str(tmp_path / "none.json"), str(tmp_path)) is None


@pytest.fixture
def hf_tokenizer_json(tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    bpe_tokenizer(path, ["to be or not to be", "that is the question", "whether tis nobler"] * 5)
    return path


def test_hf_tokenizer(hf_tokenizer_json):
    t = load_tokenizer(str(hf_tokenizer_json))
    assert isinstance(t, HFTokenizer)
    assert (t.pad_id, t.eos_id, t.bos_id, t.mask_id) == (0, 1, 2, 4)
    text = "to be or not, that is the question"
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert t.bos_id not in ids and t.eos_id not in ids  # encode adds no special tokens
    assert [a.tolist() for a in t.encode_batch([text, "be"])] == [ids, t.encode("be")]
    assert load_tokenizer(str(hf_tokenizer_json.parent)).vocab_size == t.vocab_size  # folder works too
    check_vocab(t, t.vocab_size)
    (hf_tokenizer_json.parent / "c.txt").write_text("to be or not to be\n\nthat is the question\n")
    td = pipeline.load_corpus({"source": f"text:{hf_tokenizer_json.parent / 'c.txt'}", "text_split": "blank_line",
                               "val_fraction": 0.0}, t)
    assert len(td) == 2 and td.tokens[td.offsets[1]] == t.bos_id and td.tokens[td.offsets[2] - 1] == t.eos_id
    assert t.decode(td.tokens[td.offsets[1]:td.offsets[2]]) == "that is the question"
    # tokenizer_config.json next to the file names the special tokens
    (hf_tokenizer_json.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<unk>"}))
    assert load_tokenizer(str(hf_tokenizer_json)).eos_id == 3
    assert load_tokenizer(str(hf_tokenizer_json), eos="<mask>").eos_id == 4
    with pytest.raises(TokenizerError, match="not in the vocab"):
        load_tokenizer(str(hf_tokenizer_json), bos="<nope>")
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        load_tokenizer(str(hf_tokenizer_json.parent / "missing.json"))


def test_vocab_mismatch():
    from zaya.config import preset
    check_vocab(BYTES, 261)
    check_vocab(BYTES, preset("tiny"))  # 512 >= 261: a padded model vocab is fine
    with pytest.raises(TokenizerError, match=r"261 ids but the model's vocab_size is 256"):
        check_vocab(BYTES, 256)
    with pytest.raises(TokenizerError, match="vocab_size"):
        check_vocab(BYTES, preset("tiny", vocab_size=128))


# ------------------------------------------------------------------------------------------------ sources

def test_shakespeare_corpus():
    scenes = shakespeare()
    assert len(scenes) > 700 and all(s.strip() for s in scenes)
    hamlet = "\n".join(s for s in scenes if s.startswith("Hamlet\n"))
    assert "To be, or not to be: that is the question:" in hamlet
    assert "HAMLET:" in hamlet and "ACT III" in hamlet
    joined = "".join(scenes)
    assert "**" not in joined and "\\[" not in joined and "_Enter" not in joined  # markdown removed
    plays = shakespeare("play")
    assert len(plays) == 38 and sum(map(len, plays)) >= sum(map(len, scenes))
    assert shakespeare() == scenes  # deterministic order
    assert [d.text for d in load_documents("shakespeare")] == scenes


def test_default_config_pipeline():
    cfg = pipeline.default_config()
    assert cfg.source == "shakespeare"
    it = pipeline.make_train_iter(cfg, BYTES, 128, 2, seed=0)
    b = next(it)
    check_row_invariants(b, BYTES.bos_id)
    assert b["loss_mask"].sum() > 200
    ev = pipeline.make_eval_batches(cfg, BYTES, 128, 2, max_batches=3)
    assert len(ev) == 3 and all(e["tokens"].shape == (2, 128) for e in ev)


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.txt").write_text("third\n")
    assert [d.text for d in text_files(str(tmp_path / "*.txt"))] == ["first doc\n\nsecond doc", "third"]
    assert [d.text for d in text_files(str(tmp_path / "*.txt"), split="blank_line")] == [
        "first doc", "second doc", "third"]
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "x"}\n\n{"text": "y", "other": 1}\n')
    assert jsonl(str(p)) == [Document("x"), Document("y")]
    p.write_text('{"q": "2+2?", "a": "4"}\n')
    assert jsonl(str(p), ("q", "a")) == [Document(text="4", prompt="2+2?")]


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text files match"):
        text_files(str(tmp_path / "nothing*.txt"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        jsonl(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(EmptyCorpusError, match="no documents"):
        text_files(str(tmp_path / "empty.txt"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(EmptyCorpusError):
        jsonl(str(tmp_path / "empty.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        jsonl(str(bad))
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'text'"):
        jsonl(str(bad))
    bad.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected a JSON object"):
        jsonl(str(bad))
    with pytest.raises(DataError, match="data source"):
        load_documents("csv:x")
    with pytest.raises(DataError, match="unknown data config field"):
        pipeline.make_train_iter({"sorce": "shakespeare"}, BYTES, 32, 2, 0)
    with pytest.raises(EmptyCorpusError):  # the pipeline surfaces the same error
        pipeline.make_train_iter({"source": f"text:{tmp_path / 'empty.txt'}"}, BYTES, 32, 2, 0)


# ------------------------------------------------------------------------------------------------ tasks

def test_tasks_deterministic_and_scored():
    a, b = tasks.generate(300, seed=1), tasks.generate(300, seed=1)
    assert a == b and a != tasks.generate(300, seed=2)
    assert tasks.generate(100, seed=1) == a[:100]
    assert {t["kind"] for t in a} == set(tasks.KINDS)
    for t in a:
        p, ans = t["prompt"], t["answer"]
        assert p.endswith("=") and p.isascii()
        body = p[:-1].split(":", 1)[-1]
        expect = {"add": lambda: str(eval(body)), "mul": lambda: str(eval(body)), "copy": lambda: body,
                  "reverse": lambda: body[::-1], "sort": lambda: "".join(sorted(body)),
                  "brackets": lambda: "yes" if tasks.is_balanced(body) else "no"}[t["kind"]]()
        assert ans == expect, t
        assert tasks.score(t, ans + "\n") and tasks.score(t, ans + "\nmore text")
        assert not tasks.score(t, ans) and not tasks.score(t, ans + "x\n") and not tasks.score(t, " " + ans + "\n")
    t = {"kind": "add", "prompt": "12+35=", "answer": "47"}
    assert tasks.score(t, "47\n") and not tasks.score(t, "48\n") and not tasks.score(t, "470\n")
    assert tasks.accuracy([t, t], ["47\n", "4\n"]) == 0.5
    assert tasks.is_balanced("([])()") and not tasks.is_balanced("([)]") and not tasks.is_balanced("((")
    assert {t["answer"] for t in a if t["kind"] == "brackets"} == {"yes", "no"}


def test_long_tasks_have_long_checked_answers():
    """The long-answer kinds (issue 11): answers of LONG_MIN..LONG_MAX characters, each recomputed here from the
    prompt alone; deterministic; held out like the short kinds."""
    a = tasks.generate(400, seed=3, kinds=tasks.LONG_KINDS)
    assert a == tasks.generate(400, seed=3, kinds=tasks.LONG_KINDS)
    assert {t["kind"] for t in a} == set(tasks.LONG_KINDS)
    for t in a:
        p, ans = t["prompt"], t["answer"]
        assert p.endswith("=") and p.isascii() and tasks.LONG_MIN <= len(ans) <= tasks.LONG_MAX, t
        body = p[:-1].split(":", 1)[-1]
        k = t["kind"]
        if k == "add_chain":
            terms, steps = [int(x) for x in body.split("+")], ans.split(";")
            assert len(steps) == len(terms) - 1 and 5 <= len(terms) <= 10
            running = terms[0]
            for x, step in zip(terms[1:], steps):
                assert step == f"{running}+{x}={running + x}"
                running += x
            assert steps[-1].endswith(f"={sum(terms)}")
        elif k == "brackets_close":
            assert set(ans) <= set(")]") and len(ans) >= tasks.LONG_MIN
            assert tasks.is_balanced(body + ans) and not tasks.is_balanced(body + ans[:-1])
        else:
            expect = {"copy_long": body, "reverse_long": body[::-1], "sort_long": "".join(sorted(body))}[k]
            assert ans == expect
        assert tasks.score(t, ans + "\n") and not tasks.score(t, ans[:-1] + "\n")
    val = tasks.generate(50, seed=0, kinds=tasks.LONG_KINDS, split="val", val_fraction=0.2)
    train = tasks.generate(300, seed=0, kinds=tasks.LONG_KINDS, split="train", val_fraction=0.2)
    assert not {t["prompt"] for t in val} & {t["prompt"] for t in train}
    mixed = tasks.generate(200, seed=0, kinds=("add", "copy_long"))
    assert {t["kind"] for t in mixed} == {"add", "copy_long"}
    assert tasks.kinds_of("short") == tasks.KINDS and tasks.kinds_of("long") == tasks.LONG_KINDS
    with pytest.raises(DataError, match="task set 'medium'"):
        tasks.kinds_of("medium")


def test_task_splits_disjoint():
    val = tasks.generate(200, seed=0, split="val", val_fraction=0.1)
    train = tasks.generate(2000, seed=5, split="train", val_fraction=0.1)
    assert not {t["prompt"] for t in val} & {t["prompt"] for t in train}
    with pytest.raises(DataError, match="unknown|not known"):
        tasks.generate(3, kinds=("add", "divide"))


# ------------------------------------------------------------------------------------------------ packing

def check_row_invariants(b, bos_id):
    """Packing invariants for a batch (dict of [B, S] arrays)."""
    toks, ids, mask = b["tokens"], b["doc_ids"], b["loss_mask"]
    assert toks.dtype == np.int32 and ids.dtype == np.int32 and mask.dtype == np.float32
    for t, d, m in zip(toks, ids, mask):
        real = d >= 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()  # padding only at the end
        assert (t[n:] == BYTES.pad_id).all() and (m[n:] == 0).all()
        if n:
            assert d[0] == 0 and (np.diff(d[:n]) >= 0).all() and (np.diff(d[:n]) <= 1).all()  # contiguous 0, 1, ...
        starts = np.flatnonzero(np.diff(np.concatenate([[-2], d[:n]])) != 0)
        assert (m[starts] == 0).all()  # a segment's first token has no loss
        trained = np.flatnonzero(m > 0)
        assert (trained > 0).all() and (d[trained - 1] == d[trained]).all()  # target has context in its segment
        assert ((t[:n] == bos_id) <= np.isin(np.arange(n), starts)).all()  # bos only at a segment start


def test_packing_plan_long_docs_and_masks():
    rng = np.random.default_rng(0)
    lens = [3, 40, 7, 16, 1, 33, 5, 16, 2]  # some longer than S=16
    docs = [np.concatenate([[2], rng.integers(5, 261, n - 1)]).astype(np.int32) for n in lens]
    td = TokenizedDocs.build(docs, n_masked=[1] * len(docs))
    pk = plan(td, 16, max_open=4)
    rows = PackedRows(td, pk, pad_id=0)
    batch = {k: np.stack([rows[r][k] for r in range(len(rows))]) for k in ("tokens", "doc_ids", "loss_mask")}
    check_row_invariants(batch, 2)
    # every token of every document appears exactly once, in order within each document
    got = {}
    for p in range(len(pk.doc)):
        got.setdefault(int(pk.doc[p]), []).append((int(pk.lo[p]), int(pk.hi[p])))
    for d, n in enumerate(lens):
        spans = sorted(got[d])
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(hi - lo <= 16 for lo, hi in spans)
    assert int((batch["doc_ids"] >= 0).sum()) == sum(lens)
    assert sum(len(r) for r in batch["tokens"]) == 16 * len(rows)


def test_pipeline_batches_and_bos(corpus):
    cfg, docs = corpus
    it = pipeline.make_train_iter(cfg, BYTES, 32, 4, seed=0)
    for _ in range(5):
        b = next(it)
        assert b["tokens"].shape == (4, 32)
        check_row_invariants(b, BYTES.bos_id)
    # the per-document layout: bos + text + eos, with loss on everything but bos
    td = pipeline.load_corpus(dict(cfg, val_fraction=0.0), BYTES, "train")
    first = td.tokens[td.offsets[0]:td.offsets[1]]
    assert first[0] == BYTES.bos_id and first[-1] == BYTES.eos_id and BYTES.decode(first) == docs[0]


def test_sft_prompt_masked(sft_jsonl):
    td = pipeline.load_corpus(sft_jsonl, BYTES, "train")
    doc0 = td.tokens[td.offsets[0]:td.offsets[1]]
    assert BYTES.decode(doc0) == "Q0: what is 0+0? 0" and td.n_masked[0] == 1 + len("Q0: what is 0+0?")
    it = pipeline.make_train_iter(sft_jsonl, BYTES, 64, 4, seed=0)
    b = next(it)
    check_row_invariants(b, BYTES.bos_id)
    for t, d, m in zip(b["tokens"], b["doc_ids"], b["loss_mask"]):
        for seg in range(d.max() + 1):
            text = BYTES.decode(t[d == seg][m[d == seg] > 0], skip_special=False)
            assert text.startswith(" ") and text.endswith("<eos>") and "?" not in text  # response only
    comma = pipeline.default_config()  # ConfigDict form: field names as one comma-separated string
    comma.update(dict(sft_jsonl, jsonl_fields="prompt, response"))
    assert (pipeline.load_corpus(comma, BYTES).tokens == td.tokens).all()
    plain = pipeline.load_corpus(dict(sft_jsonl, sft=False), BYTES, "train")
    assert (plain.n_masked == 1).all()  # without sft the prompt is trained on too


def test_tasks_source_and_mix(corpus):
    cfg, _ = corpus
    b = next(pipeline.make_train_iter({"source": "tasks", "sft": True, "num_tasks": 500}, BYTES, 64, 4, 0))
    check_row_invariants(b, BYTES.bos_id)
    txt = BYTES.decode(b["tokens"][0])
    assert "=" in txt and "\n" in txt
    base = pipeline.load_corpus(cfg, BYTES)
    mixed = pipeline.load_corpus(dict(cfg, tasks_fraction=0.25), BYTES)
    extra = len(mixed.tokens) - len(base.tokens)
    assert 0.2 < extra / len(mixed.tokens) < 0.3
    # task_max_len reaches the generator: the longest document grows with it
    longest = lambda n: max(np.diff(pipeline.load_corpus({"source": "tasks", "num_tasks": 300, "task_max_len": n},
                                                         BYTES).offsets))
    assert longest(8) <= 2 + len("reverse:") + 8 + 1 + 8 + 1 + 1 < longest(24)


# ------------------------------------------------------------------------------------ determinism, sharding, state

def test_deterministic_shuffle(corpus):
    cfg, _ = corpus

    def take(seed, n=6):
        it = pipeline.make_train_iter(cfg, BYTES, 32, 4, seed)
        return rows_of([next(it) for _ in range(n)])

    assert take(0) == take(0)
    assert take(0) != take(1)
    # num_epochs=1 visits every packed row exactly once, in a seed-dependent order
    one = dict(cfg, num_epochs=1)
    it0, it1 = pipeline.make_train_iter(one, BYTES, 32, 1, 0), pipeline.make_train_iter(one, BYTES, 32, 1, 1)
    r0, r1 = rows_of(list(it0)), rows_of(list(it1))
    assert len(r0) == it0.num_batches
    assert r0 != r1


def test_epochs_reshuffle(corpus):
    cfg, _ = corpus
    ds, _ = pipeline.make_train_dataset(dict(cfg, num_epochs=2), BYTES, 32, 1, 0)
    rows = rows_of([ds[i] for i in range(len(ds))])
    n = len(rows) // 2
    assert sorted(rows[:n]) == sorted(rows[n:]) and rows[:n] != rows[n:]


def test_process_sharding(corpus):
    cfg, _ = corpus
    one = dict(cfg, num_epochs=1)
    whole = list(pipeline.make_train_iter(one, BYTES, 32, 4, 7, shard_options=shard(0, 1)))
    parts = [list(pipeline.make_train_iter(one, BYTES, 32, 4, 7, shard_options=shard(i, 2))) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    assert all(b["tokens"].shape == (2, 32) for p in parts for b in p)
    for step, g in enumerate(whole):  # each step: shard i holds block i of the global batch (its devices' rows)
        a, b = rows_of([parts[0][step]]), rows_of([parts[1][step]])
        assert a + b == rows_of([g])
    r0, r1 = rows_of(parts[0]), rows_of(parts[1])
    assert len(set(r0)) == len(r0) and not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(rows_of(whole))
    with pytest.raises(DataError, match="multiple of the data shard count"):
        pipeline.make_train_iter(cfg, BYTES, 32, 3, 0, shard_options=shard(0, 2))


def test_default_sharding_is_jax_process(corpus):
    import jax
    cfg, _ = corpus
    assert (jax.process_index(), jax.process_count()) == (0, 1)
    a = rows_of([next(pipeline.make_train_iter(cfg, BYTES, 32, 4, 3))])
    b = rows_of([next(pipeline.make_train_iter(cfg, BYTES, 32, 4, 3, shard_options=shard(0, 1)))])
    assert a == b


def test_iterator_state_resume(corpus):
    cfg, _ = corpus
    it = pipeline.make_train_iter(cfg, BYTES, 32, 4, seed=0, shard_options=shard(1, 2))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able (grain's orbax handler writes it as JSON)
    expected = [next(it) for _ in range(4)]
    fresh = pipeline.make_train_iter(cfg, BYTES, 32, 4, seed=0, shard_options=shard(1, 2))
    fresh.set_state(state)
    got = [next(fresh) for _ in range(4)]
    for e, g in zip(expected, got):
        for k in e:
            np.testing.assert_array_equal(e[k], g[k])
    other = pipeline.make_train_iter(cfg, BYTES, 32, 4, seed=1, shard_options=shard(1, 2))
    with pytest.raises(DataError, match="different pipeline"):
        other.set_state(state)
    # a multi-process checkpoint keeps one data state (process 0's): it resumes every shard
    shard0 = pipeline.make_train_iter(cfg, BYTES, 32, 4, seed=0, shard_options=shard(0, 2))
    for _ in range(3):
        next(shard0)
    fresh = pipeline.make_train_iter(cfg, BYTES, 32, 4, seed=0, shard_options=shard(1, 2))
    fresh.set_state(json.loads(json.dumps(shard0.get_state())))
    np.testing.assert_array_equal(next(fresh)["tokens"], expected[0]["tokens"])
    with pytest.raises(DataError, match="different pipeline"):  # another shard count is another pipeline
        pipeline.make_train_iter(cfg, BYTES, 32, 4, seed=0, shard_options=shard(0, 1)).set_state(state)
    assert isinstance(it, grain.DatasetIterator)


def test_eval_batches(corpus):
    cfg, docs = corpus
    ev = pipeline.make_eval_batches(cfg, BYTES, 32, 4)
    assert ev and all(b["tokens"].shape == (4, 32) for b in ev)
    for b in ev:
        check_row_invariants(b, BYTES.bos_id)
    val_text = "".join(BYTES.decode(b["tokens"][b["doc_ids"] >= 0]) for b in ev)
    train_text = "".join(BYTES.decode(b["tokens"][b["doc_ids"] >= 0])
                         for b in pipeline.make_eval_batches(cfg, BYTES, 32, 4, split="train"))
    val_docs = [d for d in docs if d in val_text]
    assert 1 <= len(val_docs) < len(docs) // 2
    assert not any(d in train_text for d in val_docs)  # held-out documents are not trained on
    assert rows_of(ev) == rows_of(pipeline.make_eval_batches(cfg, BYTES, 32, 4))  # fixed order
    parts = [pipeline.make_eval_batches(cfg, BYTES, 32, 4, shard_options=shard(i, 2)) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(ev)
    for b in range(len(ev)):  # shard i: block i of every global batch
        assert rows_of([parts[0][b]]) + rows_of([parts[1][b]]) == rows_of([ev[b]])
    assert len(pipeline.make_eval_batches(cfg, BYTES, 32, 4, split="train", max_batches=2)) == 2

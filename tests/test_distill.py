"""zaya.data.distill: a model's greedy continuations replace the answers (self-distillation targets)."""
import jax
import pytest

import zaya
from zaya.convert import checkpoint
from zaya.data import distill, pipeline, tasks
from zaya.data.sources import DataError, Document
from zaya.data.tokenizer import ByteTokenizer
from zaya.model.params import init

BYTES = dict(vocab_size=264, eos_token_id=1, bos_token_id=2, pad_token_id=0, mask_token_id=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    c = zaya.preset("tiny", num_layers=1, **BYTES)
    d = str(tmp_path_factory.mktemp("distill") / "m")
    checkpoint.save(d, init(c, jax.random.PRNGKey(1), std=0.3), c)
    return d


def test_continuations_are_the_models_greedy_tokens(model_dir):
    tok = ByteTokenizer()
    docs = [tasks.as_document(t) for t in tasks.generate(4, seed=3)] + [Document(text="no prompt here")]
    out = distill.continuations(docs, model_dir, tok, batch=2)
    assert [d.prompt for d in out] == [d.prompt for d in docs] and out[-1] == docs[-1]
    budget = 32   # every answer here is short: (longest + 8) rounded up to a multiple of 32
    ref = zaya.generate(zaya.load(model_dir), [[tok.bos_id] + tok.encode(d.prompt) for d in docs[:4]],
                        max_new_tokens=budget, eos_id=tok.eos_id)   # one batch, host loop
    for o, ids in zip(out[:4], ref.tokens):
        ids = list(ids)
        ids = ids[:-1] if ids and ids[-1] == tok.eos_id else ids
        assert o.text == tok.decode(ids)    # batching by length and the device loop change nothing (greedy, fp32)
    with pytest.raises(DataError, match="not a model folder"):
        distill.continuations(docs, model_dir + "_missing", tok)


def test_pipeline_distills_only_the_train_split_of_tasks(model_dir):
    tok = ByteTokenizer()
    cfg = dict(source="tasks", sft=True, num_tasks=6, distill_from=model_dir)
    plain = pipeline.load_corpus(dict(cfg, distill_from=""), tok, "train")
    dist = pipeline.load_corpus(cfg, tok, "train")
    assert len(plain) == len(dist) and plain.fingerprint() != dist.fingerprint()
    assert (pipeline.load_corpus(cfg, tok, "val").fingerprint()
            == pipeline.load_corpus(dict(cfg, distill_from=""), tok, "val").fingerprint())
    with pytest.raises(DataError, match="has no prompts"):
        pipeline.load_corpus(dict(cfg, source="shakespeare"), tok, "train")
    with pytest.raises(DataError, match="resolved by the trainer"):
        pipeline.load_corpus(dict(cfg, distill_from="init"), tok, "train")


def test_trainer_resolves_init(tmp_path, model_dir):
    from zaya.config import ConfigError
    from zaya.train import configs, loop
    c = configs.base()
    c.data.update(source="tasks", distill_from="init")
    with pytest.raises(ConfigError, match="init_from"):
        loop.train_data(c)
    c.init_from = model_dir
    assert loop.train_data(c)["distill_from"] == model_dir and c.data.distill_from == "init"

"""Experiment configs and start-up checks: overrides, typos, full variants, and inputs that must fail at start
(tokenizer/vocab mismatch, empty corpus, a checkpoint from another model config). Nothing here compiles a model."""
import os

import jax
import numpy as np
import pytest

from zaya.config import ConfigError
from zaya.data.sources import DataError
from zaya.data.tokenizer import TokenizerError
from zaya.train import configs, recipe
from zaya.train import state as st
from zaya.train.checkpoint import CheckpointMismatchError, Checkpoints, make_meta

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXP = {n: os.path.join(ROOT, "experiments", n + ".py") for n in
       ("pretrain_ar", "tidar_convert", "context_extend", "diffusion_sft")}


def _tiny(name="pretrain_ar", *ov):
    return configs.load(EXP[name] + ":tiny", ["num_steps=4", "optim.warmup_steps=1", *ov])


def test_overrides_are_typed():
    c = _tiny("pretrain_ar", "optim.lr=1e-3", "log.progress=false", "model.rope_theta=2e4", "tidar.block_size=8",
              "tidar.position_gamma=0.9", "data.source=tasks")
    assert c.optim.lr == 1e-3 and c.log.progress is False and c.model.rope_theta == 2e4
    assert c.tidar.block_size == 8 and c.tidar.position_gamma == 0.9 and c.data.source == "tasks"
    assert configs.tidar_options(c).block_size == 8


def test_config_typo_fails_clearly():
    with pytest.raises(configs.ConfigOverrideError, match=r"no field 'optim.lrr'.*Did you mean optim.lr"):
        _tiny("pretrain_ar", "optim.lrr=1")
    with pytest.raises(configs.ConfigOverrideError, match="no field 'modle'"):
        _tiny("pretrain_ar", "modle.num_layers=2")
    with pytest.raises(configs.ConfigOverrideError, match="num_steps"):
        _tiny("pretrain_ar", "num_steps=many")
    with pytest.raises(configs.ConfigOverrideError, match="bool"):
        _tiny("pretrain_ar", "log.progress=maybe")
    with pytest.raises(configs.ConfigOverrideError, match="is a section"):
        _tiny("pretrain_ar", "optim=1")


def test_cli_reports_typo_and_exits(tmp_path, capsys):
    from zaya.cli import main
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", EXP["pretrain_ar"] + ":tiny", "--workdir", str(tmp_path / "w"),
              "--config.optim.lrr=1"])
    assert e.value.code == 2
    assert "Did you mean optim.lr" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")


def test_command_line_overrides_go_through_config_flags():
    """``zaya train``'s arguments: ``--config.k=v`` and ``--config.k v`` (absl syntax), typed by the field; a bool
    takes ``=``; anything that is not an override is refused."""
    c = configs.load(EXP["pretrain_ar"] + ":tiny", argv=["--config.optim.lr", "1e-4", "--config.log.progress=false",
                                                          "--config.sharding_rules=(('batch', 'data'),)",
                                                          "--config.tidar.position_gamma=0.5"])
    assert c.optim.lr == 1e-4 and c.log.progress is False and c.sharding_rules == (("batch", "data"),)
    assert c.tidar.position_gamma == 0.5 and configs.tidar_options(c).position_gamma == 0.5
    assert configs.load(EXP["pretrain_ar"] + ":tiny").tidar.position_gamma is None  # placeholder: None by default
    with pytest.raises(configs.ConfigOverrideError, match="unrecognized argument '--lr=1'"):
        configs.load(EXP["pretrain_ar"] + ":tiny", argv=["--lr=1"])
    with pytest.raises(configs.ConfigOverrideError, match="unrecognized argument 'false'.*bools take ="):
        configs.load(EXP["pretrain_ar"] + ":tiny", argv=["--config.log.progress", "false"])
    with pytest.raises(configs.ConfigOverrideError, match="num_steps=many"):
        configs.load(EXP["pretrain_ar"] + ":tiny", argv=["--config.num_steps", "many"])


def test_invalid_values_fail_validation():
    with pytest.raises(ConfigError, match="grad_accum"):
        _tiny("pretrain_ar", "grad_accum=3")
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        _tiny("pretrain_ar", "seq_len=4096")
    with pytest.raises(ConfigError, match="config.tidar"):
        _tiny("pretrain_ar", "tidar.masking=sometimes")
    with pytest.raises(ConfigError, match="config.model"):
        _tiny("pretrain_ar", "model.num_kv_heads=3")
    with pytest.raises(ConfigError, match="remat_group=3 must be >= 1 and divide num_layers=2"):
        _tiny("pretrain_ar", "impl.remat_group=3")
    with pytest.raises(ConfigError, match="capacity_factor"):
        _tiny("pretrain_ar", "impl.capacity_factor=-1.0")
    with pytest.raises(ConfigError, match="ep_transport='ragged' moves every routed token"):
        _tiny("pretrain_ar", "impl.ep_transport=ragged", "impl.capacity_factor=1.25")
    with pytest.raises(ConfigError, match="ep_transport='carrier_pigeon'"):
        _tiny("pretrain_ar", "impl.ep_transport=carrier_pigeon")
    with pytest.raises(ConfigError, match="set config.impl.remat=true"):
        _tiny("pretrain_ar", "impl.remat_group=2")
    with pytest.raises(ConfigError, match=r"eval.batch_size=2 must divide by data\*expert=4"):
        _tiny("pretrain_ar", "mesh.data=2", "mesh.expert=2", "mesh.num_devices=4", "eval.batch_size=2")


def test_continuing_phases_require_init_from():
    for name in ("tidar_convert", "context_extend", "diffusion_sft"):
        with pytest.raises(ConfigError, match="init_from"):
            _tiny(name)
        assert _tiny(name, "init_from=/somewhere").require_init


@pytest.mark.parametrize("name", sorted(EXP))
def test_full_variants_build_valid_configs(name):
    c = configs.load(EXP[name] + ":full")
    mc = configs.model_from(c)
    assert mc.hidden_size == 2048 and mc.num_experts == 16 and mc.dtype == "bfloat16"
    sizes = configs.mesh_sizes(c, recipe.FULL_DEVICES)
    assert np.prod(list(sizes.values())) == 512
    assert c.batch_size % (sizes["data"] * sizes["fsdp"] * c.grad_accum) == 0
    assert c.batch_size * c.seq_len == recipe.FULL_TOKENS_PER_STEP
    assert c.tidar.ce_chunk == 4096 and c.impl.remat  # the memory settings the recorded figures assume
    tokens = c.num_steps * c.batch_size * c.seq_len
    if name == "tidar_convert":
        assert c.seq_len == 32768 and c.tidar.block_size == 16 and c.tidar.mode == "tidar"
        assert 600e9 <= tokens < 600e9 + c.batch_size * c.seq_len
    if name == "context_extend":
        assert c.seq_len == 131072 and mc.rope_theta == 5e6 and mc.max_position_embeddings == 131072
        assert 500e9 <= tokens < 500e9 + c.batch_size * c.seq_len
    if name == "diffusion_sft":
        assert c.tidar.prompt_masking and c.data.sft
    with pytest.raises(ValueError, match="variant"):
        configs.load(EXP[name] + ":huge")


def _run(tmp_path, *ov, name="pretrain_ar"):
    from zaya.train.loop import Run
    return Run(_tiny(name, "data.tasks_fraction=0.0", *ov), str(tmp_path / "w"))


def test_tokenizer_vocab_mismatch_fails_at_start(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size is 200"):
        _run(tmp_path, "model.vocab_size=200")
    with pytest.raises((TokenizerError, ConfigError), match="mask"):
        _run(tmp_path, "model.mask_token_id=7", "tidar.mode=tidar")


def test_empty_corpus_fails_at_start(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="no documents"):
        _run(tmp_path, f"data.source=text:{empty}")
    with pytest.raises(FileNotFoundError, match="no text files"):
        _run(tmp_path, f"data.source=text:{tmp_path}/missing*.txt")


def test_resume_refuses_checkpoint_from_another_model_config(tmp_path):
    run = _run(tmp_path)
    # one writer per directory: the run's own manager (its tmp-folder cleanup runs on a background thread) is closed
    # before this test writes a checkpoint there, or the cleanup can race the save ("Directory not empty")
    run.ckpt.close()
    ab = st.abstract_state(run.model_cfg, run.optimizer)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), ab.as_dict())
    ck = Checkpoints(os.path.join(run.workdir, "checkpoints"))
    ck.save(2, zeros, {"x": 1}, make_meta(run.model_cfg, ab.opt_state, 2))
    ck.close()
    other = _run(tmp_path, "model.num_layers=3")
    with pytest.raises(CheckpointMismatchError, match="num_layers: checkpoint 2 vs config 3"):
        other.initial_state()
    noclip = _run(tmp_path, "optim.clip_norm=0")  # same model, different optimizer chain
    with pytest.raises(CheckpointMismatchError, match="optimizer state of a different structure"):
        noclip.initial_state()


def test_init_from_must_match_model_shapes(tmp_path):
    from zaya.convert import checkpoint as zc
    from zaya.train.loop import load_init
    small = configs.model_from(_tiny("pretrain_ar", "model.num_layers=1"))
    zeros = jax.tree.map(lambda s: np.zeros(s, np.float32), __import__("zaya.model.params", fromlist=["x"])
                         .param_shapes(small), is_leaf=lambda x: isinstance(x, tuple))
    zc.save(str(tmp_path / "m"), zeros, small)
    with pytest.raises(ConfigError, match="num_layers"):
        load_init(str(tmp_path / "m"), configs.model_from(_tiny()))
    with pytest.raises(ConfigError, match="not a folder"):
        load_init(str(tmp_path / "nope"), small)


def test_init_from_a_zaya_convert_output(tmp_path, fixtures_dir):
    """A `zaya convert` folder of an HF checkpoint starts a run like any model folder: the train state holds its
    weights (fp32 masters), at step 0; a model config of another shape is refused."""
    import zaya
    from zaya.convert.hf_config import from_hf_config
    from zaya.convert.cli import convert
    from zaya.train.loop import Run
    src = os.path.join(fixtures_dir, "native")
    convert(src, str(tmp_path / "conv"))
    hf = from_hf_config(os.path.join(src, "config.json"))
    ov = [f"model.{k}={v}" for k, v in hf.to_dict().items() if k != "dtype"]
    cfg = _tiny("tidar_convert", "data.tasks_fraction=0.0", f"init_from={tmp_path / 'conv'}", *ov)
    run = Run(cfg, str(tmp_path / "w"))
    state, start = run.initial_state()
    ref = zaya.load(str(tmp_path / "conv"), dtype="float32").params
    assert start == 0 and int(state.step) == 0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match="another shape"):
        Run(_tiny("tidar_convert", "data.tasks_fraction=0.0", f"init_from={tmp_path / 'conv'}"),
            str(tmp_path / "w2")).initial_state()


def test_ablate_cli_reports_a_config_error_in_one_line_and_exits_2(tmp_path, capsys):
    from zaya.train import ablate
    with pytest.raises(SystemExit) as e:
        ablate.main(["--config", EXP["tidar_convert"] + ":tiny", "--sweep", "tidar.alpha=0.5,1,2",
                     "--workdir", str(tmp_path / "abl")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ConfigError" in err and "--config.init_from=" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "abl")
    with pytest.raises(SystemExit) as e:  # a typo in an override given as --config.x=y, before any run
        ablate.main(["--config", EXP["tidar_convert"] + ":tiny", "--sweep", "tidar.alpha=1,2", "--workdir",
                     str(tmp_path / "abl"), "--config.init_from=/x", "--config.tidar.alpah=1"])
    assert e.value.code == 2 and "Did you mean tidar.alpha" in capsys.readouterr().err

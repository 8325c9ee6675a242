"""`zaya convert` / `zaya export` on bad inputs: a clear message naming the problem, and no output folder (nor
temporary siblings)."""
import json
import os
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file

import zaya
from convert_helpers import (assert_no_output, convert_fails, copy_fixture, edit_config, logits_err, rewrite,
                             shard_fixture, write_raw_safetensors)
from zaya.convert import cli
from zaya.convert.hf import load_hf
from zaya.convert.safetensors_io import INDEX, SINGLE, CheckpointError


def _first(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


def test_missing_tensor(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    rewrite(src, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.qk_norm.temp"})
    convert_fails(src, tmp_path / "out", "missing tensor", "model.layers.1.self_attn.qk_norm.temp")
    assert_no_output(tmp_path / "out")


def test_missing_legacy_expert(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "legacy", tmp_path / "src")
    name = "model.layers.3.zaya_block.experts.local_experts.2.linear_fc1.weight"
    rewrite(src, lambda t: {k: v for k, v in t.items() if k != name})
    convert_fails(src, tmp_path / "out", "missing tensor", name, "legacy layout")
    assert_no_output(tmp_path / "out")


def test_unexpected_tensor(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    rewrite(src, lambda t: {**t, "model.layers.0.mlp.shared_expert.weight": np.zeros((4, 4), np.float32)})
    convert_fails(src, tmp_path / "out", "unexpected tensor", "model.layers.0.mlp.shared_expert.weight")
    assert_no_output(tmp_path / "out")


def test_extra_layer_is_unexpected(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    rewrite(src, lambda t: {**t, "model.layers.3.input_layernorm.weight": np.ones(64, np.float32)})
    convert_fails(src, tmp_path / "out", "unexpected tensor", "model.layers.3.input_layernorm.weight")
    assert_no_output(tmp_path / "out")


def test_wrong_shape(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    name = "model.layers.2.self_attn.qkv_proj.k_proj.weight"
    rewrite(src, lambda t: {**t, name: np.zeros((16, 64), np.float32)})
    msg = convert_fails(src, tmp_path / "out", name, "[16, 64]", "[32, 64]")
    assert "expected" in msg
    assert_no_output(tmp_path / "out")


def test_wrong_shape_from_config(fixtures_dir, tmp_path):
    """A config that disagrees with the tensors (here: head_dim) is reported as a shape error."""
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    edit_config(src, head_dim=8)
    convert_fails(src, tmp_path / "out", "shape", "expected")
    assert_no_output(tmp_path / "out")


def test_unknown_model_type(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    edit_config(src, model_type="llama")
    convert_fails(src, tmp_path / "out", "model_type", "llama")
    assert_no_output(tmp_path / "out")


def test_refused_config_field(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    edit_config(src, num_experts_per_tok=2)
    convert_fails(src, tmp_path / "out", "num_experts_per_tok")
    assert_no_output(tmp_path / "out")


def test_layout_mismatch(fixtures_dir, tmp_path):
    """Native config with legacy tensors (and the reverse): the layout problem is named."""
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    shutil.copyfile(os.path.join(fixtures_dir, "legacy", SINGLE), os.path.join(src, SINGLE))
    convert_fails(src, tmp_path / "out", "native layout")
    src2 = copy_fixture(fixtures_dir, "legacy", tmp_path / "src2")
    shutil.copyfile(os.path.join(fixtures_dir, "native", SINGLE), os.path.join(src2, SINGLE))
    convert_fails(src2, tmp_path / "out", "legacy layout")
    assert_no_output(tmp_path / "out")


def test_unknown_layout(fixtures_dir, tmp_path):
    """Tensor names of some other model family under a zaya config."""
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    rewrite(src, lambda t: {k.replace("model.layers.", "transformer.h."): v for k, v in t.items()})
    convert_fails(src, tmp_path / "out", "are not ZAYA1 native-layout names", "transformer.h.", "missing",
                  "unexpected")
    assert_no_output(tmp_path / "out")


def test_no_config(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    os.remove(os.path.join(src, "config.json"))
    convert_fails(src, tmp_path / "out", "config.json")
    assert_no_output(tmp_path / "out")


def test_invalid_config_json(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    with open(os.path.join(src, "config.json"), "w") as f:
        f.write('{"model_type": "zaya", ')
    convert_fails(src, tmp_path / "out", "config.json", "JSON")
    assert_no_output(tmp_path / "out")


def test_no_weights(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    os.remove(os.path.join(src, SINGLE))
    convert_fails(src, tmp_path / "out", SINGLE, INDEX)
    assert_no_output(tmp_path / "out")


def test_src_not_a_folder(tmp_path):
    convert_fails(tmp_path / "nope", tmp_path / "out", "not a folder")
    assert_no_output(tmp_path / "out")


def test_truncated_safetensors(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    p = os.path.join(src, SINGLE)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 1000)
    convert_fails(src, tmp_path / "out", "truncated", SINGLE)
    assert_no_output(tmp_path / "out")


def test_truncated_to_nothing(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    with open(os.path.join(src, SINGLE), "r+b") as f:
        f.truncate(3)
    convert_fails(src, tmp_path / "out", "truncated", SINGLE)
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("how", ["garbage_json", "huge_length", "not_object", "bad_entry", "bad_offsets"])
def test_corrupt_header(fixtures_dir, tmp_path, how):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    p = os.path.join(src, SINGLE)
    raw = open(p, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    if how == "garbage_json":
        h = b"{not json" + b" " * (n - 9)
    elif how == "huge_length":
        h = None
        data = struct.pack("<Q", 2**40) + raw[8:]
    elif how == "not_object":
        h = b"[1, 2, 3]"
    elif how == "bad_entry":
        header["model.norm.weight"] = {"dtype": "F32"}
        h = json.dumps(header).encode()
    else:
        header["model.norm.weight"]["data_offsets"] = [0, 3]
        h = json.dumps(header).encode()
    if h is not None:
        data = struct.pack("<Q", len(h)) + h + body
    with open(p, "wb") as f:
        f.write(data)
    convert_fails(src, tmp_path / "out", SINGLE)
    msg = convert_fails(src, tmp_path / "out")
    assert ("corrupt" in msg or "bytes" in msg), msg
    assert_no_output(tmp_path / "out")


def test_missing_shard(fixtures_dir, tmp_path):
    sh = shard_fixture(os.path.join(fixtures_dir, "native"), tmp_path / "sharded", 100_000)
    victim = sorted(f for f in os.listdir(sh) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(sh, victim))
    convert_fails(sh, tmp_path / "out", "missing shard", victim)
    assert_no_output(tmp_path / "out")


def test_index_disagrees_with_shards(fixtures_dir, tmp_path):
    sh = shard_fixture(os.path.join(fixtures_dir, "native"), tmp_path / "sharded", 100_000)
    p = os.path.join(sh, INDEX)
    idx = json.load(open(p))
    idx["weight_map"]["model.layers.9.input_layernorm.weight"] = next(iter(idx["weight_map"].values()))
    json.dump(idx, open(p, "w"))
    convert_fails(sh, tmp_path / "out", "model.layers.9.input_layernorm.weight")
    assert_no_output(tmp_path / "out")


def test_corrupt_index(fixtures_dir, tmp_path):
    sh = shard_fixture(os.path.join(fixtures_dir, "native"), tmp_path / "sharded", 100_000)
    with open(os.path.join(sh, INDEX), "w") as f:
        f.write("{")
    convert_fails(sh, tmp_path / "out", INDEX)
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("dt", ["I8", "F8_E4M3", "U8", "I64"])
def test_unsupported_dtype(fixtures_dir, tmp_path, dt):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    t = load_file(os.path.join(src, SINGLE))
    name = "model.layers.0.mlp.experts.down_proj"
    size = {"I8": 1, "F8_E4M3": 1, "U8": 1, "I64": 8}[dt]
    entries = [(k, {np.dtype(np.float32): "F32"}[v.dtype], v.shape, v.tobytes()) for k, v in t.items() if k != name]
    entries.append((name, dt, t[name].shape, bytes(t[name].size * size)))
    write_raw_safetensors(os.path.join(src, SINGLE), entries)
    convert_fails(src, tmp_path / "out", dt, name, "unsupported dtype")
    assert_no_output(tmp_path / "out")


def test_existing_output_needs_overwrite(fixtures_dir, tmp_path):
    src = os.path.join(fixtures_dir, "native")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    convert_fails(src, dst, "already exists", "--overwrite")
    assert sorted(os.listdir(dst)) == ["keep.txt"]           # untouched
    cli.convert(src, str(dst), overwrite=True)
    assert sorted(os.listdir(dst)) == ["params", "zaya_config.json"]   # replaced, not merged
    assert logits_err(str(dst), src) < 1e-4
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out.")]


def test_failed_overwrite_keeps_old_output(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    edit_config(src, model_type="llama")
    convert_fails(src, dst, "model_type", overwrite=True)
    assert sorted(os.listdir(dst)) == ["keep.txt"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out.")]


def test_export_needs_overwrite(fixtures_dir, tmp_path):
    dst = tmp_path / "hf"
    dst.mkdir()
    with pytest.raises(SystemExit, match="already exists"):
        cli.export(os.path.join(fixtures_dir, "native"), str(dst))
    cli.export(os.path.join(fixtures_dir, "native"), str(dst), overwrite=True)
    assert SINGLE in os.listdir(dst)


def test_export_bad_source(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    edit_config(src, model_type="llama")
    with pytest.raises(SystemExit, match="model_type"):
        cli.export(src, str(tmp_path / "hf"))
    assert_no_output(tmp_path / "hf")


def test_lm_head_tied_accepted(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    rewrite(src, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].copy()})
    cli.convert(src, str(tmp_path / "out"))
    assert logits_err(str(tmp_path / "out"), src) < 1e-4


def test_lm_head_tied_accepted_legacy(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "legacy", tmp_path / "src")
    rewrite(src, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].copy()})
    cfg, params = load_hf(src, progress=False)
    assert cfg.num_layers == 3


def test_lm_head_untied_refused(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    rewrite(src, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] * 1.5})
    convert_fails(src, tmp_path / "out", "lm_head.weight", "tied")
    assert_no_output(tmp_path / "out")


def test_lm_head_wrong_shape_refused(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    rewrite(src, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"][:100]})
    convert_fails(src, tmp_path / "out", "lm_head.weight")
    assert_no_output(tmp_path / "out")


def test_untied_config_refused(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    edit_config(src, tie_word_embeddings=False)
    convert_fails(src, tmp_path / "out", "tie_word_embeddings")
    assert_no_output(tmp_path / "out")


def test_checkpoint_error_from_load_hf(fixtures_dir, tmp_path):
    """The library call raises CheckpointError (a ValueError), the CLI turns it into a one-line exit."""
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    rewrite(src, lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_hf(src, progress=False)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        zaya.load(src)


def test_empty_checkpoint(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    write_raw_safetensors(os.path.join(src, SINGLE), [])
    convert_fails(src, tmp_path / "out", "missing tensor")
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.pop("dtype")
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    convert_fails(src, tmp_path / "out", "no tensors")
    assert_no_output(tmp_path / "out")

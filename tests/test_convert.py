"""`zaya convert` / `zaya export`: fixture parity, bitwise round trips, shards, dtypes, the benchmark's checkpoint,
tokenizers and meshes (bad inputs: test_convert_errors.py)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import need_devices
from safetensors.numpy import load_file

import zaya
from convert_helpers import (BF16, BIAS, assert_no_output, convert_fails, copy_fixture, edit_config, logits_err,
                             rewrite, shard_fixture, stored_dtypes, tensors, to_bf16)
from zaya.convert import cli
from zaya.convert.hf import export_hf, load_hf
from zaya.convert.safetensors_io import INDEX, SINGLE


# ----------------------------------------------------------------------------------------------------------------
# (a) Fixture parity through `zaya convert`.

@pytest.mark.parametrize("layout", ["native", "legacy"])
def test_convert_fixture_parity(fixtures_dir, tmp_path, layout):
    src = os.path.join(fixtures_dir, layout)
    dst = tmp_path / "out"
    cli.convert(src, str(dst))
    assert sorted(os.listdir(dst)) == ["params", "zaya_config.json"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    cfg = zaya.load(str(dst)).config
    assert cfg == zaya.from_hf_config(os.path.join(src, "config.json"), dtype="float32")
    assert logits_err(str(dst), src) < 1e-4


@pytest.mark.parametrize("layout", ["native", "converted"])
def test_loaded_weights_live_on_the_device(fixtures_dir, tmp_path, layout):
    """Host (numpy) weights would be uploaded again by every jitted call, i.e. once per decode step."""
    src = os.path.join(fixtures_dir, "native")
    if layout == "converted":
        cli.convert(src, str(tmp_path / "out"))
        src = str(tmp_path / "out")
    leaves = jax.tree.leaves(zaya.load(src).params)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    m = zaya.Model(zaya.load(src).config, jax.tree.map(np.asarray, zaya.load(src).params))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(m.params))


def test_convert_subprocess(fixtures_dir, tmp_path):
    src = os.path.join(fixtures_dir, "legacy")
    dst = tmp_path / "legacy_zaya"
    exe = shutil.which("zaya")
    cmd = [exe] if exe else [sys.executable, "-m", "zaya.cli"]
    r = subprocess.run(cmd + ["convert", src, str(dst)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    assert logits_err(str(dst), src) < 1e-4
    # A failing run: exit status 1, one clear line on stderr, no traceback.
    r = subprocess.run(cmd + ["convert", str(tmp_path / "nope"), str(tmp_path / "out2")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "not a folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert_no_output(tmp_path / "out2")


def test_output_folder_permissions(fixtures_dir, tmp_path):
    """The atomic temp folder must not leak its private 0700 mode into the final output."""
    dst = tmp_path / "out"
    cli.convert(os.path.join(fixtures_dir, "native"), str(dst))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(dst).st_mode & 0o777 == 0o777 & ~umask


# ----------------------------------------------------------------------------------------------------------------
# (b) Round trips: native -> zaya -> native is bitwise; legacy -> native keeps the logits.

def assert_same_checkpoint(a, b):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, (k, ta[k].dtype, tb[k].dtype)
        assert ta[k].shape == tb[k].shape, k
        assert ta[k].tobytes() == tb[k].tobytes(), k


def test_native_round_trip_bitwise(fixtures_dir, tmp_path):
    src = os.path.join(fixtures_dir, "native")
    cli.convert(src, str(tmp_path / "z"))
    cli.export(str(tmp_path / "z"), str(tmp_path / "hf"))
    assert_same_checkpoint(src, str(tmp_path / "hf"))
    # The exported config reads back to the same model.
    assert zaya.from_hf_config(str(tmp_path / "hf" / "config.json")) == zaya.from_hf_config(
        os.path.join(src, "config.json"))
    assert logits_err(str(tmp_path / "hf"), src) < 1e-4


def test_native_round_trip_bitwise_bf16(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "bf16")
    to_bf16(src)  # balancing biases stay fp32, like the reference buffer
    cli.convert(src, str(tmp_path / "z"))
    d = stored_dtypes(str(tmp_path / "z"))
    assert d["layers/router/bias"] == np.float32
    assert all(v == BF16 for k, v in d.items() if k != "layers/router/bias")
    cli.export(str(tmp_path / "z"), str(tmp_path / "hf"))
    assert_same_checkpoint(src, str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_bf16_biases_come_back_fp32(fixtures_dir, tmp_path):
    """A bf16 checkpoint whose balancing biases were also cast to bf16: values kept exactly, stored as fp32."""
    src = copy_fixture(fixtures_dir, "native", tmp_path / "bf16")
    to_bf16(src, keep_bias_fp32=False)
    cli.convert(src, str(tmp_path / "z"))
    cli.export(str(tmp_path / "z"), str(tmp_path / "hf"))
    a, b = tensors(src), tensors(str(tmp_path / "hf"))
    for k in a:
        if k.endswith(BIAS):
            assert b[k].dtype == np.float32 and np.array_equal(a[k].astype(np.float32), b[k])
        else:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def test_export_hf_direct_round_trip(fixtures_dir, tmp_path):
    """export_hf(load_hf(x)) == x without going through Orbax."""
    src = os.path.join(fixtures_dir, "native")
    cfg, params = load_hf(src, progress=False)
    os.makedirs(tmp_path / "hf")
    export_hf(params, cfg, str(tmp_path / "hf"), progress=False)
    assert_same_checkpoint(src, str(tmp_path / "hf"))


def test_legacy_to_native(fixtures_dir, tmp_path):
    src = os.path.join(fixtures_dir, "legacy")
    cli.export(src, str(tmp_path / "hf"))  # HF legacy folder -> native HF folder in one step
    names = set(tensors(str(tmp_path / "hf")))
    assert "model.norm.weight" in names and not any("zaya_block" in n or "res_scale." in n[:16] for n in names)
    assert logits_err(str(tmp_path / "hf"), src) < 1e-4
    # and through a zaya folder
    cli.convert(src, str(tmp_path / "z"))
    cli.export(str(tmp_path / "z"), str(tmp_path / "hf2"))
    assert_same_checkpoint(str(tmp_path / "hf"), str(tmp_path / "hf2"))


# ----------------------------------------------------------------------------------------------------------------
# (c) Sharded checkpoints.

@pytest.mark.parametrize("layout", ["native", "legacy"])
def test_sharded_input(fixtures_dir, tmp_path, layout):
    src = os.path.join(fixtures_dir, layout)
    sh = shard_fixture(src, tmp_path / "sharded", 100_000)
    shards = [f for f in os.listdir(sh) if f.endswith(".safetensors")]
    assert len(shards) >= 5 and os.path.exists(os.path.join(sh, INDEX)) and SINGLE not in shards
    assert logits_err(sh, src) < 1e-4          # zaya.load straight from the HF folder
    cli.convert(sh, str(tmp_path / "z"))
    assert logits_err(str(tmp_path / "z"), src) < 1e-4


def test_sharded_export(fixtures_dir, tmp_path):
    src = os.path.join(fixtures_dir, "native")
    cli.convert(src, str(tmp_path / "z"))
    cli.export(str(tmp_path / "z"), str(tmp_path / "hf"), max_shard_gb=150_000 / 2**30)
    files = sorted(os.listdir(tmp_path / "hf"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 4 and INDEX in files
    for f in shards:  # no shard above the limit unless it holds a single bigger tensor
        t = load_file(str(tmp_path / "hf" / f))
        assert len(t) == 1 or sum(v.nbytes for v in t.values()) <= 150_000
    with open(tmp_path / "hf" / INDEX) as f:
        idx = json.load(f)
    assert set(idx["weight_map"].values()) == set(shards)
    assert idx["metadata"]["total_size"] == sum(v.nbytes for v in tensors(src).values())
    assert_same_checkpoint(src, str(tmp_path / "hf"))


# ----------------------------------------------------------------------------------------------------------------
# (d) Input dtypes and --dtype.

@pytest.mark.parametrize("stored", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("target", ["auto", "float32", "bfloat16", "float16"])
def test_dtypes(fixtures_dir, tmp_path, stored, target):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    np_dt = {"float32": np.float32, "bfloat16": BF16, "float16": np.float16}[stored]
    rewrite(src, lambda t: {k: v if k.endswith(BIAS) else v.astype(np_dt) for k, v in t.items()})
    edit_config(src, dtype=stored)
    cfg, params = load_hf(src, target, progress=False)
    want = stored if target == "auto" else target
    assert cfg.dtype == want
    assert params["layers"]["router"]["bias"].dtype == np.float32
    assert params["embed"].dtype == np.dtype({"float32": np.float32, "bfloat16": BF16, "float16": np.float16}[want])
    if target == "auto":  # convert once per stored dtype; the stored dtypes in the zaya folder follow --dtype
        cli.convert(src, str(tmp_path / "z"), dtype=target)
        d = stored_dtypes(str(tmp_path / "z"))
        assert d.pop("layers/router/bias") == np.float32
        assert {str(v) for v in d.values()} == {want}


def test_auto_dtype_from_tensors_when_config_has_none(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    rewrite(src, lambda t: {k: v.astype(BF16) for k, v in t.items()})
    p = os.path.join(src, "config.json")
    cfg = json.load(open(p))
    cfg.pop("dtype")
    json.dump(cfg, open(p, "w"))
    c, params = load_hf(src, "auto", progress=False)
    assert c.dtype == "bfloat16" and params["layers"]["router"]["bias"].dtype == np.float32


def test_bf16_logits_close(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    to_bf16(src)
    cli.convert(src, str(tmp_path / "z"), dtype="float32")
    ids = np.load(os.path.join(src, "input_ids.npy"))
    ref = np.load(os.path.join(src, "logits.npy"))
    out = zaya.load(str(tmp_path / "z")).logits(ids)
    # bf16-rounded weights, fp32 compute: close to the fp32 reference, not equal.
    assert np.abs(out - ref).max() < 0.1 * ref.std()


def test_bad_dtype_flag(fixtures_dir, tmp_path):
    convert_fails(os.path.join(fixtures_dir, "native"), tmp_path / "z", "int8", dtype="int8")
    assert_no_output(tmp_path / "z")


# ----------------------------------------------------------------------------------------------------------------
# The convert benchmark's building blocks (the benchmark itself runs for minutes; see zaya/bench/convert.py).

def test_bench_synthetic_checkpoint_loads(tmp_path):
    from zaya.bench.convert import bench_config, hf_items, write_synthetic
    cfg = bench_config(0.001).replace(vocab_size=256, hidden_size=64, head_dim=16, moe_intermediate_size=32,
                                      router_hidden_size=16, num_experts=4, num_layers=2)
    info = write_synthetic(cfg, str(tmp_path / "hf"), max_shard_bytes=100_000)
    assert info["num_files"] > 1 and info["num_tensors"] == len(hf_items(cfg))
    c, params = load_hf(str(tmp_path / "hf"), progress=False)
    assert c.replace(dtype="bfloat16") == cfg.replace(router_norm_eps=cfg.rms_norm_eps)
    assert params["embed"].dtype == BF16 and params["layers"]["router"]["bias"].dtype == np.float32
    assert bench_config(1.0).num_params() * 2 >= 2**30


def test_bench_child_rss_not_inflated_by_parent():
    """The benchmark measures a child's own peak RSS, not the parent's RSS inherited at fork."""
    from zaya.bench.convert import _run_child
    ballast = np.ones(600 * 2**20, np.uint8)  # make this (parent) process big
    _, small, _ = _run_child("pass")
    _, big, out = _run_child("import numpy as np; a = np.ones(300 * 2**20, np.uint8); print(a.sum() > 0)")
    assert out.strip() == "True"
    assert small < 200, small
    assert 300 < big < 300 + 200, big
    del ballast


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer travels with the checkpoint; a converted folder loads onto a mesh.

def word_tokenizer(path, n):
    """A tokenizers-library file with n ids (a word-level vocabulary: nothing to train)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_tokenizer_copied_by_convert_and_export(fixtures_dir, tmp_path):
    from tokenizers import Tokenizer
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    tok = word_tokenizer(os.path.join(src, "tokenizer.json"), 300)
    cli.convert(src, str(tmp_path / "z"))
    copy = os.path.join(tmp_path, "z", "tokenizer.json")
    assert open(copy, "rb").read() == open(tok, "rb").read()
    assert Tokenizer.from_file(copy).encode("w5 w299 w7").ids == [5, 299, 7]
    assert zaya.load(str(tmp_path / "z")).tokenizer == copy
    cli.export(str(tmp_path / "z"), str(tmp_path / "hf"))
    assert open(os.path.join(tmp_path, "hf", "tokenizer.json"), "rb").read() == open(tok, "rb").read()
    cli.export(os.path.join(fixtures_dir, "native"), str(tmp_path / "hf2"))  # none to copy: none written
    assert "tokenizer.json" not in os.listdir(tmp_path / "hf2")


def test_tokenizer_larger_than_the_vocab_refused(fixtures_dir, tmp_path):
    src = copy_fixture(fixtures_dir, "native", tmp_path / "src")
    word_tokenizer(os.path.join(src, "tokenizer.json"), 513)  # the fixture's vocab_size is 512
    convert_fails(src, tmp_path / "out", "513 tokens", "vocab_size 512")
    assert_no_output(tmp_path / "out")
    with open(os.path.join(src, "tokenizer.json"), "w") as f:
        f.write("{not json")
    convert_fails(src, tmp_path / "out", "tokenizer.json", "not a valid tokenizers file")
    assert_no_output(tmp_path / "out")


def test_load_converted_with_mesh(fixtures_dir, tmp_path):
    """zaya.load(convert output, mesh=...) restores straight onto the mesh (fsdp/tensor/expert), the params carry
    the rules' shardings (also after a dtype cast on load), and the sharded logits equal single-device ones."""
    from zaya import sharding
    need_devices(8)
    src = os.path.join(fixtures_dir, "native")
    cli.convert(src, str(tmp_path / "f32"))
    cli.convert(src, str(tmp_path / "bf16"), dtype="bfloat16")
    mesh = sharding.make_mesh(fsdp=2, tensor=2, expert=2)
    for folder in ("f32", "bf16"):  # bf16 on disk, fp32 on load: cast after the sharded restore
        m = zaya.load(str(tmp_path / folder), mesh=mesh)
        want = sharding.param_shardings(m.config, mesh)
        for x, s in zip(jax.tree.leaves(m.params), jax.tree.leaves(want)):
            assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)
        assert m.params["layers"]["experts"]["gate_up"].dtype == np.float32
    q = m.params["layers"]["q"]
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.size < q.size  # really split
    ids = np.load(os.path.join(src, "input_ids.npy"))
    ids = np.concatenate([ids, ids[:, ::-1]], 0)  # the batch splits over fsdp
    single = zaya.load(str(tmp_path / "f32"))
    ref = np.concatenate([single.logits(ids[:1]), single.logits(ids[1:])], 0)  # logits_err's compiled shape
    np.testing.assert_allclose(zaya.load(str(tmp_path / "f32"), mesh=mesh).logits(ids), ref, atol=1e-5)
    np.testing.assert_allclose(ref[:1], np.load(os.path.join(src, "logits.npy")), atol=1e-4)

"""`zaya convert` / `zaya export`: fixture parity, bitwise round trips, shards, dtypes, and clear atomic errors."""
import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import ml_dtypes  # noqa: F401  (bf16 for safetensors.numpy)
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import zaya
from zaya.convert import cli
from zaya.convert.hf import export_hf, load_hf
from zaya.convert.safetensors_io import INDEX, SINGLE, CheckpointError, scan_checkpoint, write_sharded

BF16 = np.dtype(ml_dtypes.bfloat16)
BIAS = "mlp.gate.balancing_biases"


# ----------------------------------------------------------------------------------------------------------------
# Helpers.

def copy_fixture(fixtures_dir, layout, dst):
    """A writable copy of a fixture folder (the shared fixtures are read-only)."""
    shutil.copytree(os.path.join(fixtures_dir, layout), dst, copy_function=shutil.copyfile)
    return str(dst)


def tensors(folder):
    """All tensors of a checkpoint folder (single file or shards) as a name -> numpy dict."""
    out = {}
    for info in scan_checkpoint(folder).values():
        out.update({k: v for k, v in load_file(info.file).items() if k == info.name})
    return out


def rewrite(folder, fn):
    """Apply fn(dict name->array) -> dict to a single-file checkpoint in place."""
    path = os.path.join(folder, SINGLE)
    t = fn(load_file(path))
    os.remove(path)
    save_file(t, path, metadata={"format": "pt"})


def edit_config(folder, **changes):
    p = os.path.join(folder, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f, indent=2)


def write_raw_safetensors(path, entries):
    """Write a safetensors file by hand: entries = [(name, dtype_str, shape, raw bytes)] (dtypes numpy can't hold)."""
    header, blobs, off = {}, [], 0
    for name, dt, shape, raw in entries:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def logits_err(model_dir, fixture):
    ids = np.load(os.path.join(fixture, "input_ids.npy"))
    ref = np.load(os.path.join(fixture, "logits.npy"))
    return float(np.abs(zaya.load(model_dir).logits(ids) - ref).max())


def stored_dtypes(zaya_dir):
    """leaf name -> dtype of a zaya (Orbax) folder, from its metadata (no restore)."""
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata(os.path.join(zaya_dir, "params")).item_metadata.tree
    out = {}

    def walk(t, prefix):
        for k, v in t.items():
            if isinstance(v, dict):
                walk(v, prefix + k + "/")
            else:
                out[prefix + k] = np.dtype(v.dtype)
    walk(meta, "")
    return out


def assert_no_output(dst):
    """The destination does not exist and no temporary/old siblings were left behind."""
    dst = os.path.abspath(str(dst))
    assert not os.path.exists(dst), f"{dst} exists after a failed run"
    base = os.path.basename(dst)
    left = [f for f in os.listdir(os.path.dirname(dst)) if f.startswith(f".{base}.tmp-") or f.startswith(f".{base}.old-")]
    assert not left, f"partial output left behind: {left}"


def convert_fails(src, dst, *needles, **kw):
    """Run cli.convert, expect a clean SystemExit whose message contains every needle, and no output."""
    with pytest.raises(SystemExit) as ei:
        cli.convert(str(src), str(dst), **kw)
    msg = str(ei.value.code)
    assert msg.startswith("zaya convert:"), msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def to_bf16(folder, keep_bias_fp32=True):
    def fn(t):
        return {k: (v if (keep_bias_fp32 and k.endswith(BIAS)) else v.astype(BF16)) for k, v in t.items()}
    rewrite(folder, fn)
    edit_config(folder, dtype="bfloat16")


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

def shard_fixture(src, dst, max_shard_bytes):
    os.makedirs(dst)
    t = load_file(os.path.join(src, SINGLE))
    items = [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in t.items()]
    write_sharded(items, str(dst), max_shard_bytes)
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    return str(dst)


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
# (e) Bad inputs: a clear message naming the problem, and no output folder (nor temp siblings).

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
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices: conftest sets XLA_FLAGS before jax starts")
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

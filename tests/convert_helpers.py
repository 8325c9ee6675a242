"""Helpers shared by the converter tests (test_convert.py, test_convert_errors.py): fixture copies, checkpoint
edits, raw safetensors writing, and the checks that a failed run left no output."""
import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import zaya
from zaya.convert import cli
from zaya.convert.safetensors_io import SINGLE, scan_checkpoint, write_sharded

BF16 = np.dtype(ml_dtypes.bfloat16)  # also registers bf16 for safetensors.numpy
BIAS = "mlp.gate.balancing_biases"


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


def shard_fixture(src, dst, max_shard_bytes):
    os.makedirs(dst)
    t = load_file(os.path.join(src, SINGLE))
    items = [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in t.items()]
    write_sharded(items, str(dst), max_shard_bytes)
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    return str(dst)

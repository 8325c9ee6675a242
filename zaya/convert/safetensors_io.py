"""Streaming safetensors access for checkpoints of any size, without torch.

Reading parses the (tiny) JSON header ourselves and reads each tensor with one positioned file read, so host memory
holds one tensor at a time and no mmap keeps the whole file resident (the ``safetensors`` library maps the whole
file, which makes peak RSS grow with the checkpoint). bf16 comes from ``ml_dtypes``. Writing uses the
``safetensors`` library one shard at a time. Every malformed input raises ``CheckpointError`` naming the file.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F64": np.dtype(np.float64)}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint we cannot read or write; the message names the file/tensor and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    name: str
    dtype: str
    shape: tuple
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}; zaya reads "
                                  f"{sorted(DTYPES)} (dequantize FP8/int checkpoints first)")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if b - a != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} spans {b - a} bytes but shape {list(shape)} {dtype} "
                                  f"needs {nbytes}")
        if base + b > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {base + b}, file has {size} "
                                  "bytes (re-download the file)")
        out[name] = TensorInfo(path, name, dtype, shape, base + a, nbytes)
    return out


def read_tensor(info: TensorInfo, out: np.ndarray | None = None) -> np.ndarray:
    """One tensor, read with a single positioned read.

    out: optional C-contiguous array with at least ``info.nbytes`` bytes to read into (a reusable scratch buffer, or
    the final destination when no conversion is needed); the result is then a view of it. Reusing one buffer saves
    allocating (and page-faulting) fresh memory for every tensor."""
    dt = DTYPES[info.dtype]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        if out is None:
            buf = f.read(info.nbytes)
            n = len(buf)
        else:
            if not out.flags.c_contiguous or out.nbytes < info.nbytes:
                raise ValueError("read_tensor: out must be C-contiguous and large enough")
            buf = out.reshape(-1).view(np.uint8)[:info.nbytes]
            n = f.readinto(memoryview(buf))
    if n != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading {info.name!r}")
    return np.frombuffer(buf, dt).reshape(info.shape)


def scan_checkpoint(folder: str) -> dict[str, TensorInfo]:
    """All tensors of an HF checkpoint folder: one ``model.safetensors`` or shards listed in the index."""
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        if missing:
            raise CheckpointError(f"{folder}: missing shard file(s) {missing} listed in {INDEX}")
        out = {}
        for fn in files:
            for name, info in read_header(os.path.join(folder, fn)).items():
                if name in out:
                    raise CheckpointError(f"{folder}: tensor {name!r} appears in two shards")
                out[name] = info
        listed = {k for k, v in weight_map.items()}
        if listed != set(out):
            raise CheckpointError(f"{folder}: index and shards disagree on tensors "
                                  f"{sorted(listed ^ set(out))[:5]}")
        return out
    single = os.path.join(folder, SINGLE)
    if os.path.exists(single):
        return read_header(single)
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    hint = f" (found {found} but no {INDEX})" if found else ""
    raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX}{hint}")


def write_sharded(tensors, folder: str, max_shard_bytes: int, metadata: dict | None = None, progress=None):
    """Write (name, shape, dtype, make_array) items as one file or shards + index. make_array is called lazily."""
    items = list(tensors)
    shards, cur, size = [], [], 0
    for it in items:
        nbytes = int(np.prod(it[1], dtype=np.int64)) * np.dtype(it[2]).itemsize
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += nbytes
    shards.append(cur)
    from safetensors.numpy import save_file
    meta = {"format": "pt", **(metadata or {})}
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fn = SINGLE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for name, shape, dtype, make in shard:
            a = np.ascontiguousarray(make())
            assert a.shape == tuple(shape) and a.dtype == np.dtype(dtype), (name, a.shape, a.dtype)
            arrays[name] = a
            weight_map[name] = fn
            total += a.nbytes
            if progress:
                progress(a.nbytes)
        save_file(arrays, os.path.join(folder, fn), metadata=meta)
        del arrays
    if len(shards) > 1:
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return weight_map


def dtype_name(dt) -> str:
    return _NAMES[np.dtype(dt)]

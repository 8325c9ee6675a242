"""Benchmark `zaya convert` on a synthetic native-layout HF checkpoint: throughput and peak host memory.

The checkpoint (random bf16 weights, >= ``size_gb`` GiB) is written shard by shard with the exporter's writer, so
the writing process never holds the whole model. The conversion runs in a SUBPROCESS, and its peak RSS is read from
``os.wait4`` (that child's own ``ru_maxrss``), next to a baseline child that only imports zaya and jax.

CPU only:  python -m zaya.bench.convert [--size-gb 1] [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

MiB = 2**20
GiB = 2**30


def bench_config(size_gb: float):
    """A ZAYA1-shaped config (hidden 1024, 16 experts, vocab 32768) with enough layers for >= size_gb GiB in bf16."""
    from zaya.config import ZayaConfig
    base = dict(vocab_size=32768, hidden_size=1024, num_q_heads=8, num_kv_heads=2, head_dim=128, num_experts=16,
                moe_intermediate_size=1024, router_hidden_size=128, max_position_embeddings=4096, dtype="bfloat16")
    one = ZayaConfig(num_layers=1, **base).num_params()
    two = ZayaConfig(num_layers=2, **base).num_params()
    per_layer, fixed = two - one, 2 * one - two
    layers = max(1, int(np.ceil((size_gb * GiB / 2 - fixed) / per_layer)))
    return ZayaConfig(num_layers=layers, **base)


def hf_items(cfg, seed: int = 0):
    """(name, shape, dtype, make) for every native tensor; make() draws that tensor only when it is written."""
    import ml_dtypes

    from zaya.convert import names as N
    from zaya.model.params import param_specs

    specs = param_specs(cfg)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    items = []
    for k, name in enumerate(N.native_names(cfg)):
        t = N.native_target(name)
        spec = specs
        for p in t.leaf:
            spec = spec[p]
        shape = spec[0] if t.layer is None else spec[0][1:]
        shape = tuple(N.hf_shape(shape, t.kind, cfg))
        dtype = np.dtype(np.float32) if name.endswith("balancing_biases") else bf16

        def make(shape=shape, dtype=dtype, k=k):
            rng = np.random.default_rng([seed, k])
            return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        items.append((name, shape, dtype, make))
    return items


def write_synthetic(cfg, folder: str, max_shard_bytes: int = 512 * MiB) -> dict:
    """Write a native-layout HF checkpoint of random weights; returns sizes (bytes)."""
    from zaya.convert.hf_config import to_hf_config
    from zaya.convert.safetensors_io import write_sharded

    os.makedirs(folder, exist_ok=True)
    items = hf_items(cfg)
    write_sharded(items, folder, max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg), f, indent=2)
    sizes = [int(np.prod(s)) * d.itemsize for _, s, d, _ in items]
    from zaya.model.params import abstract_params
    import jax
    zaya_leaves = [int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract_params(cfg))]
    return {"model_bytes": sum(sizes), "largest_hf_tensor": max(sizes), "largest_zaya_leaf": max(zaya_leaves),
            "num_tensors": len(items), "num_files": len([f for f in os.listdir(folder) if f.endswith(".safetensors")])}


# Runs argv[2:] and writes that child's own peak RSS (KiB) and exit status to the file argv[1]. Measuring through this
# small launcher matters: on Linux an exec'd child's ru_maxrss starts at its parent's RSS at fork time, so a child
# forked straight from this (big) benchmark process would report at least the benchmark's own RSS.
_LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, st, ru = os.wait4(p.pid, 0); "
             "open(sys.argv[1], 'w').write(f'{ru.ru_maxrss} {os.waitstatus_to_exitcode(st)}')")


def _run_child(code: str, env=None) -> tuple[float, float, str]:
    """Run ``python -c code``; (wall seconds, peak RSS MiB of that child alone, its stdout).

    The child's output goes to files (a pipe could fill up and block it)."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe, \
            tempfile.NamedTemporaryFile("r", suffix=".rusage") as fr:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _LAUNCHER, fr.name, sys.executable, "-c", code], stdout=fo, stderr=fe,
                       env=env, check=True)
        wall = time.perf_counter() - t0
        maxrss_kib, status = (int(v) for v in open(fr.name).read().split())
        fo.seek(0)
        fe.seek(0)
        stdout, stderr = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    if status:
        raise RuntimeError(f"child failed ({status}):\n{stdout}\n{stderr[-3000:]}")
    return wall, maxrss_kib / 1024, stdout  # Linux: ru_maxrss in KiB


_BASELINE = "import jax, jax.numpy as jnp, zaya, zaya.convert.cli; jnp.zeros(1).block_until_ready()"
_CONVERT = ("import jax, jax.numpy as jnp, zaya, zaya.convert.cli; jnp.zeros(1).block_until_ready(); import time; "
            "t = time.perf_counter(); zaya.convert.cli.convert({src!r}, {dst!r}); "
            "print('CONVERT_SECONDS', time.perf_counter() - t)")


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run(size_gb: float = 1.0, out: str | None = None, quick: bool = False) -> dict:
    """Write a >= size_gb GiB synthetic checkpoint, time `zaya convert` of it in a subprocess, report memory.

    quick: one convert run instead of the best of two (the table reports the best run)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    tmp = tempfile.mkdtemp(prefix="zaya_bench_convert_", dir="/tmp")
    try:
        cfg = bench_config(size_gb)
        src, dst = os.path.join(tmp, "hf"), os.path.join(tmp, "zaya")
        t0 = time.perf_counter()
        info = write_synthetic(cfg, src)
        write_s = time.perf_counter() - t0
        base_wall, base_rss, _ = _run_child(_BASELINE, env)
        runs = []
        for _ in range(1 if quick else 2):
            shutil.rmtree(dst, ignore_errors=True)
            wall, peak, stdout = _run_child(_CONVERT.format(src=src, dst=dst), env)
            conv_s = float(next(l.split()[1] for l in stdout.splitlines() if l.startswith("CONVERT_SECONDS")))
            runs.append((conv_s, wall, peak))
        conv_s, wall, peak = min(runs)
        model_mb = info["model_bytes"] / MiB
        res = {
            "config": f"L={cfg.num_layers} D={cfg.hidden_size} E={cfg.num_experts} F={cfg.moe_intermediate_size} "
                      f"V={cfg.vocab_size} bf16",
            "num_params": cfg.num_params(),
            "model_mb": model_mb,
            "num_tensors": info["num_tensors"], "num_shards": info["num_files"],
            "largest_hf_tensor_mb": info["largest_hf_tensor"] / MiB,
            "largest_zaya_leaf_mb": info["largest_zaya_leaf"] / MiB,
            "output_mb": _du(dst) / MiB,
            "write_s": write_s,
            "convert_s": conv_s, "convert_wall_s": wall,
            "mb_per_s": model_mb / conv_s, "mb_per_s_wall": model_mb / wall,
            "peak_rss_mb": peak, "baseline_rss_mb": base_rss, "baseline_wall_s": base_wall,
            "peak_over_baseline_mb": peak - base_rss,
            "ratio_to_2x_model": peak / (2 * model_mb),
            "ratio_over_baseline_to_model": (peak - base_rss) / model_mb,
            "runs": len(runs),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = markdown(res)
    print(table)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "convert.md"), "w") as f:
            f.write(machine_description() + "\n" + table + "\n")
    return res


def markdown(r: dict) -> str:
    rows = [
        ("synthetic checkpoint", f"{r['config']}, {r['num_params'] / 1e6:.0f}M params, {r['num_tensors']} tensors "
                                 f"in {r['num_shards']} shard(s)"),
        ("model size (bf16 safetensors)", f"{r['model_mb']:.0f} MiB"),
        ("largest HF tensor / largest zaya leaf", f"{r['largest_hf_tensor_mb']:.0f} MiB / "
                                                  f"{r['largest_zaya_leaf_mb']:.0f} MiB"),
        ("output size (Orbax folder)", f"{r['output_mb']:.0f} MiB"),
        ("convert time (in-process / whole subprocess)", f"{r['convert_s']:.1f} s / {r['convert_wall_s']:.1f} s"),
        ("throughput (in-process / whole subprocess)", f"{r['mb_per_s']:.0f} MiB/s / {r['mb_per_s_wall']:.0f} MiB/s"),
        ("peak RSS of `zaya convert`", f"{r['peak_rss_mb']:.0f} MiB"),
        ("baseline RSS (import zaya + jax)", f"{r['baseline_rss_mb']:.0f} MiB"),
        ("peak RSS - baseline", f"{r['peak_over_baseline_mb']:.0f} MiB = "
                                f"{r['ratio_over_baseline_to_model']:.2f} x model"),
        ("peak RSS / naive bound (2 x model)", f"{r['ratio_to_2x_model']:.2f}"),
    ]
    lines = ["| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def machine_description() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = "unknown"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(l.split()[1] for l in f if l.startswith("MemTotal")))
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    import jax
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"- machine: {cpu}, {os.cpu_count()} cores, {ram} RAM (load average 1/5/15 min at start: {load})\n"
            f"- python {platform.python_version()}, jax {jax.__version__}, {platform.platform()}\n"
            f"- date: {datetime.date.today().isoformat()}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    print(machine_description())
    run(a.size_gb, a.out, a.quick)


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmarks: the machine description, timing, random models, tables and output files.

Benchmarks print figures; they are not timed tests. Every table is preceded by the machine it ran on (CPU model or
GPU name, core count, jax version and backend) because numbers without the machine are meaningless.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np


# --------------------------------------------------------------------------------------------------------------
# Machine.

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(l.split()[1] for l in f if l.startswith("MemTotal")))
        return kb / 2**20
    except (OSError, StopIteration, ValueError):
        return None


def machine() -> dict:
    """CPU model, cores, RAM, load, jax version, backend and device names (the GPU's, where there is one)."""
    import jax
    devs = jax.devices()
    backend = jax.default_backend()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu": _cpu_model(), "cores": cores, "ram_gib": _ram_gib(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "backend": backend, "devices": f"{len(devs)} x {devs[0].device_kind}",
        "jax": jax.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.date.today().isoformat(),
    }


def machine_markdown(m: dict | None = None) -> str:
    m = m or machine()
    ram = f", {m['ram_gib']:.1f} GiB RAM" if m.get("ram_gib") else ""
    dev = "" if m["backend"] == "cpu" else f"; accelerator: {m['devices']}"
    load = " / ".join(f"{x:.1f}" for x in m["load_avg"])
    return (f"- machine: {m['cpu']}, {m['cores']} cores{ram}{dev} (load average 1/5/15 min at start: {load})\n"
            f"- jax {m['jax']} (backend: {m['backend']}, devices: {m['devices']}), python {m['python']}, "
            f"{m['platform']}\n"
            f"- date: {m['date']}\n")


_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def compile_cache(path: str | None = None):
    """Use jax's persistent compilation cache inside the ``with`` block (default: $ZAYA_BENCH_CACHE or
    /tmp/zaya_bench_xla_cache); the previous jax.config values are restored on exit, so a benchmark called from a
    notebook or a test leaves the process's compilation settings as it found them.

    Benchmarks exclude compile time anyway; the cache only saves wall time across configurations that share a
    function (e.g. the samplers' prefill) and across runs. It never changes the executable that runs.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    path = path or os.environ.get("ZAYA_BENCH_CACHE", "/tmp/zaya_bench_xla_cache")
    os.makedirs(path, exist_ok=True)
    before = {k: getattr(jax.config, k) for k in _CACHE_OPTIONS}
    for k, v in zip(_CACHE_OPTIONS, (path, 0.5, 0)):
        jax.config.update(k, v)
    cc.reset_cache()  # jax opens its cache once per process: make it re-read the settings, here and on exit
    try:
        yield path
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        cc.reset_cache()


def bench_dtype() -> str:
    """float32 on CPU (no fast bf16 matmuls there), bfloat16 on accelerators."""
    import jax
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# --------------------------------------------------------------------------------------------------------------
# Models.

def random_model(preset: str = "tiny", dtype: str | None = None, seed: int = 0, std: float = 0.02):
    """A zaya.Model with random weights (zaya.model.params.init) of a preset, in the bench dtype."""
    import jax

    import zaya
    from zaya.api import Model
    from zaya.model.params import init
    c = zaya.preset(preset, dtype=dtype or bench_dtype())
    return Model(c, init(c, jax.random.PRNGKey(seed), std=std))


def config_summary(c) -> str:
    return (f"L={c.num_layers} D={c.hidden_size} H={c.num_q_heads}/{c.num_kv_heads}x{c.head_dim} "
            f"E={c.num_experts} F={c.moe_intermediate_size} V={c.vocab_size} {c.dtype}, "
            f"{c.num_params() / 1e6:.1f}M params")


# --------------------------------------------------------------------------------------------------------------
# Timing.

def time_compiled(fn, *args, repeats: int = 5, warmup: int = 1, min_seconds: float = 0.0) -> dict:
    """Median wall time of ``fn(*args)`` (a jitted or compiled function), compile and warm-up excluded.

    Each call is followed by block_until_ready. With ``min_seconds`` more repeats are run until their total passes
    it (short calls get more samples). Returns {median, min, max, repeats, times}.
    """
    import jax
    for _ in range(max(warmup, 1)):  # the first call compiles (for a plain jitted fn); never timed
        jax.block_until_ready(fn(*args))
    times = []
    total = 0.0
    while len(times) < repeats or (total < min_seconds and len(times) < 50 * max(repeats, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": len(times),
            "times": times}


def time_interleaved(calls: list, repeats: int = 5, min_seconds: float = 0.0, max_rounds: int = 300) -> list[dict]:
    """Like ``time_compiled`` for several (fn, args) at once, timed round-robin (one call of each per round), so
    that load from other processes hits every candidate alike; medians per candidate. Warm-up calls excluded."""
    import jax
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in calls]
    total, rounds = 0.0, 0
    while rounds < repeats or (total < min_seconds and rounds < max_rounds):
        for i, (fn, args) in enumerate(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            dt = time.perf_counter() - t0
            times[i].append(dt)
            total += dt
        rounds += 1
    return [{"median": statistics.median(t), "min": min(t), "max": max(t), "repeats": len(t), "times": t}
            for t in times]


# --------------------------------------------------------------------------------------------------------------
# Tables and files.

def _fmt(v, spec=None) -> str:
    if v is None:
        return "—"
    if spec:
        try:
            return format(v, spec)
        except (TypeError, ValueError):
            return str(v)
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        a = abs(float(v))
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def md_table(rows: list[dict], cols: list, title: str | None = None) -> str:
    """Markdown table. cols: key, or (key, header), or (key, header, format spec)."""
    spec = [(c, c, None) if isinstance(c, str) else (c[0], c[1], c[2] if len(c) > 2 else None) for c in cols]
    lines = []
    if title:
        lines += [f"#### {title}", ""]
    lines.append("| " + " | ".join(h for _, h, _ in spec) + " |")
    lines.append("|" + "---|" * len(spec))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in spec) + " |")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def write_csv(path: str, rows: list[dict]):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(_jsonable(v)) if isinstance(v, (list, tuple, dict)) else v
                        for k, v in r.items()})


def write_outputs(out: str | None, name: str, markdown: str, data: dict, csv_rows: dict | None = None) -> list[str]:
    """Write ``name``.md (machine + tables), ``name``.json and one CSV per entry of csv_rows into ``out``."""
    if not out:
        return []
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{name}.md"), os.path.join(out, f"{name}.json")]
    with open(paths[0], "w") as f:
        f.write(markdown.rstrip() + "\n")
    with open(paths[1], "w") as f:
        json.dump(_jsonable(data), f, indent=1)
    for key, rows in (csv_rows or {}).items():
        p = os.path.join(out, f"{name}_{key}.csv" if key else f"{name}.csv")
        write_csv(p, rows)
        paths.append(p)
    return paths


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (None when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None

"""``zaya bench memory --config FILE:variant [--mesh data=..,fsdp=..,tensor=..,expert=..] [--config.k=v ...]``.

Per-device memory of a training step without running it: the run's train step (``zaya.train.step``, the same
function ``zaya train`` jits, with its state and batch shardings) is lowered on abstract inputs
(``jax.ShapeDtypeStruct`` with shardings: nothing is allocated) and compiled for the mesh; the compiled executable's
``memory_analysis()`` gives, per device, the bytes of its arguments (train state + batch), outputs, the outputs that
alias donated arguments, and temporaries (activations, gathered weights, gradients, collectives' buffers).
peak ~= arguments + outputs - aliased + temporaries.

On a CPU host the mesh is made of simulated devices: when jax has fewer devices than the mesh needs, the command
re-runs itself with ``--xla_force_host_platform_device_count`` set. XLA:CPU's buffer assignment stands in for the
GPU compiler's here (same program, different fusion and scheduling): figures are estimates, labelled with the
backend that made them; on a GPU node the same command measures the GPU compiler's.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

GIB = 2**30
FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def parse_mesh(text: str | None) -> dict:
    """``"data=2,fsdp=4"`` -> {'data': 2, 'fsdp': 4} (other axes 1)."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in ("data", "fsdp", "tensor", "expert") or not v.strip().isdigit():
            raise SystemExit(f"zaya bench memory: --mesh {text!r}: use axis=size pairs over data, fsdp, tensor, "
                             "expert, e.g. --mesh fsdp=8")
        out[k.strip()] = int(v)
    return out


def load_config(spec: str, mesh: dict, overrides: list[str]):
    """The config with ``mesh`` applied as overrides (validated with them); a bad config exits with one line."""
    from zaya.config import ConfigError
    from zaya.train import configs
    if mesh:
        sizes = {**dict(data=1, fsdp=1, tensor=1, expert=1), **mesh, "num_devices": math.prod(mesh.values())}
        overrides = [f"--config.mesh.{k}={v}" for k, v in sizes.items()] + list(overrides)
    try:
        return configs.load(spec, argv=list(overrides))
    except ConfigError as e:
        print(f"zaya bench memory: ConfigError: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def ensure_devices(n: int, argv: list[str]) -> None:
    """Re-run this command with n simulated CPU devices when jax has fewer (it can only be set before jax starts)."""
    import jax
    if jax.device_count() >= n:
        return
    if jax.default_backend() != "cpu":
        raise SystemExit(f"zaya bench memory: the mesh needs {n} devices, this {jax.default_backend()} host has "
                         f"{jax.device_count()}; run on CPU (simulated devices) or choose a smaller --mesh")
    if os.environ.get("_ZAYA_MEMORY_REEXEC"):
        raise SystemExit(f"zaya bench memory: asked XLA for {n} CPU devices and got {jax.device_count()}")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={n}"]),
               JAX_PLATFORMS="cpu", _ZAYA_MEMORY_REEXEC="1")
    sys.stdout.flush()
    os.execvpe(sys.executable, [sys.executable, "-m", "zaya.cli", *argv], env)


def analyse(cfg) -> dict:
    """Lower and compile the run's train step (``zaya.train.loop.step_setup``, as ``zaya train`` builds it) on
    abstract inputs; per-device bytes and compile seconds. ``cfg`` is validated (``configs.load`` does it)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from zaya.train import state as st
    from zaya.train.loop import step_setup
    from zaya.train.step import batch_axis_names

    s = step_setup(cfg)
    state = st.with_shardings(st.abstract_state(s.model_cfg, s.optimizer), s.state_sh)
    bsh = NamedSharding(s.mesh, P(s.dp))
    B, S = cfg.batch_size, cfg.seq_len
    batch = {"tokens": jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=bsh),
             "doc_ids": jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=bsh),
             "loss_mask": jax.ShapeDtypeStruct((B, S), jnp.float32, sharding=bsh)}
    shards = math.prod(s.mesh.shape[a] for a in batch_axis_names(s.dp))
    t0 = time.perf_counter()
    compiled = s.step_fn.lower(state, batch).compile()
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    got = {f: int(getattr(ma, f"{f}_size_in_bytes", 0) or 0) for f in FIELDS}
    got["peak"] = got["argument"] + got["output"] - got["alias"] + got["temp"]
    return {"bytes_per_device": got, "compile_s": seconds, "mesh": dict(s.mesh.shape), "devices": int(s.mesh.size),
            "backend": jax.default_backend(), "batch_size": B, "seq_len": S, "grad_accum": int(cfg.grad_accum),
            "rows_per_device_per_microbatch": B // int(cfg.grad_accum) // shards,
            "num_params": int(s.model_cfg.num_params()), "remat": bool(cfg.impl.remat), "moe": cfg.impl.moe,
            "remat_group": int(cfg.impl.remat_group), "expert_parallel": _expert_parallel(s),
            "capacity_factor": float(cfg.impl.capacity_factor), "attention": cfg.impl.attention,
            "dtype": s.model_cfg.dtype}


def _expert_parallel(s) -> bool:
    """Whether the run's train step sends tokens to their experts' devices (``zaya.train.step.expert_axis``)."""
    from zaya.train.step import batch_axis_names, expert_axis, zero3_specs
    names = set(batch_axis_names(s.dp))
    specs = zero3_specs(s.state_sh.params, names) if names else None
    return specs is not None and expert_axis(specs) is not None


def report(spec: str, res: dict) -> str:
    from zaya.bench.common import machine_markdown
    b = res["bytes_per_device"]
    rows = "\n".join(f"| {f} | {b[f] / 2**20:.1f} | {b[f] / GIB:.2f} |" for f in (*FIELDS, "peak"))
    return (f"{machine_markdown()}\n\n#### Train-step memory per device: `{spec}` on mesh {res['mesh']} "
            f"({res['backend']} compiler, {res['devices']} devices)\n\n"
            f"{res['num_params'] / 1e9:.2f}B params ({res['dtype']}, fp32 master weights and Adam), batch "
            f"{res['batch_size']} x {res['seq_len']}, grad_accum {res['grad_accum']} "
            f"({res['rows_per_device_per_microbatch']} row(s) per device per microbatch), remat {res['remat']} "
            f"(groups of {res['remat_group']}), moe {res['moe']}"
            + (f", expert-parallel ({'dropless' if not res['capacity_factor'] else 'capacity factor ' + str(res['capacity_factor'])})"
               if res["expert_parallel"] else "")
            + f", attention {res['attention']}; compiled in {res['compile_s']:.0f} s.\n\n"
            f"| bytes per device | MiB | GiB |\n|---|---|---|\n{rows}\n\npeak = argument + output - alias + temp (the "
            f"compiled program's buffer assignment; {res['backend']} compiler).")


def main(a, overrides: list[str], argv: list[str]) -> dict:
    if not a.config:
        raise SystemExit("zaya bench memory: --config FILE:variant is required "
                         "(e.g. experiments/tidar_convert.py:full)")
    mesh = parse_mesh(a.mesh)
    cfg = load_config(a.config, mesh, overrides)
    n = int(cfg.mesh.num_devices) or math.prod(v for v in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                                                           cfg.mesh.expert) if v > 0)
    ensure_devices(n, argv)
    res = analyse(cfg)
    res["config"] = a.config
    text = report(a.config, res)
    print(text, flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        tmp = os.path.join(a.out, ".memory.json.tmp")
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, os.path.join(a.out, "memory.json"))  # no half-written JSON
        with open(os.path.join(a.out, "memory.md"), "w") as f:
            f.write(text + "\n")
    return res

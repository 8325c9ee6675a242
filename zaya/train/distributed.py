"""Joining a multi-process job (``jax.distributed``) and describing where each process's devices and rows sit.

Launch layouts (``launch/README.md``):
  one process per GPU    SLURM ``--ntasks-per-node=<GPUs>``: process ``SLURM_LOCALID`` sees GPU ``SLURM_LOCALID``
  one process per node   SLURM ``--ntasks-per-node=1``: the process sees every GPU of its node. jax's own SLURM
                         detection would restrict it to GPU ``SLURM_LOCALID`` = 0, so ``local_device_ids`` here
                         passes all of them
  k GPUs per process     any tasks-per-node dividing the GPU count: process ``SLURM_LOCALID`` gets the block
                         ``[LOCALID * k, (LOCALID + 1) * k)``
Without SLURM: ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (any launcher), or Open MPI
(jax detects it). ``JAX_LOCAL_DEVICE_IDS`` (jax's own variable) overrides the device choice everywhere.

``zaya train ... --dry-run`` joins the job, builds the run's mesh and prints, per process, its devices, their mesh
coordinates and the batch rows it will load (``describe``), then exits without compiling anything.
"""
from __future__ import annotations

import math
import os
import re
from typing import Mapping

HEARTBEAT_ENV, HEARTBEAT_S = "ZAYA_HEARTBEAT_TIMEOUT_S", 30


def _int(env: Mapping[str, str], key: str) -> int | None:
    """A count from a SLURM variable: "8", "8(x64)" (tasks per node: the first number), "h100:8" (GPUs: the last)."""
    nums = re.findall(r"\d+", env.get(key, ""))
    return int(nums[-1] if key == "SLURM_GPUS_PER_NODE" else nums[0]) if nums else None


def local_gpu_count(env: Mapping[str, str]) -> int | None:
    """GPUs of this node given to the job: SLURM's counts, else the visible-device list; None when unknown."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if _int(env, key):
            return _int(env, key)
    for key in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        if env.get(key):
            return len(env[key].split(","))
    return None


def local_device_ids(env: Mapping[str, str] = os.environ) -> list[int] | None:
    """The GPUs this process should own under SLURM (see the module doc); None: leave it to jax (not SLURM,
    ``JAX_LOCAL_DEVICE_IDS`` set, or the GPU count unknown). ValueError when tasks per node do not divide the GPUs."""
    if "JAX_LOCAL_DEVICE_IDS" in env or "SLURM_LOCALID" not in env:
        return None
    tasks = _int(env, "SLURM_NTASKS_PER_NODE") or _int(env, "SLURM_TASKS_PER_NODE")
    gpus = local_gpu_count(env)
    if not tasks or not gpus:
        return None
    if gpus % tasks:
        raise ValueError(f"SLURM gives {tasks} tasks per node and {gpus} GPUs per node: use one task per GPU "
                         f"(--ntasks-per-node={gpus}), one per node (--ntasks-per-node=1), or a divisor of {gpus}")
    k, local = gpus // tasks, int(env["SLURM_LOCALID"])
    return list(range(local * k, (local + 1) * k))


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is part of a multi-process job (single-process runs skip ``jax.distributed``)."""
    return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "JAX_COORDINATOR_ADDRESS" in env or env.get("ZAYA_DISTRIBUTED") == "1")


def maybe_initialize(env: Mapping[str, str] = os.environ) -> bool:
    """``jax.distributed.initialize`` for a multi-process job (see the module doc); returns whether it ran.

    A dead peer (kill -9, a lost node) is detected by missed heartbeats (``ZAYA_HEARTBEAT_TIMEOUT_S``, default 30 s):
    the survivors then exit with an error that names it, instead of waiting in a collective."""
    if not wanted(env):
        return False
    import jax
    kw = dict(initialization_timeout=900, heartbeat_timeout_seconds=int(env.get(HEARTBEAT_ENV, HEARTBEAT_S)),
              local_device_ids=local_device_ids(env))
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]), **kw)
    else:
        jax.distributed.initialize(**kw)
    return True


def describe(mesh, dp, batch_size: int) -> str:
    """One line per local device of this process: device, its mesh coordinates, and the batch rows it holds; then
    the rows this process loads (``zaya.train.step.batch_shard``)."""
    import jax
    import numpy as np

    from zaya.train.step import batch_axis_names, batch_block, batch_shard
    me = jax.process_index()
    lines = [f"process {me}/{jax.process_count()}: {len(jax.local_devices())} local devices, mesh "
             f"{dict(mesh.shape)}, batch axes {dp}"]
    rows = batch_size // math.prod(mesh.shape[a] for a in batch_axis_names(dp))  # rows per batch block
    for idx in np.ndindex(mesh.devices.shape):
        d = mesh.devices[idx]
        if d.process_index == me:
            s, coord = batch_block(mesh, dp, idx), dict(zip(mesh.axis_names, idx))
            lines.append(f"  device {d.id} ({d.platform}) -> mesh {coord} -> rows [{s * rows}, {(s + 1) * rows})")
    i, n = batch_shard(mesh, dp)
    lines.append(f"  loads rows [{i * batch_size // n}, {(i + 1) * batch_size // n}) of each global batch of "
                 f"{batch_size} (data shard {i} of {n})")
    return "\n".join(lines)

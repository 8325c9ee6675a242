"""Run ``zaya`` as N local processes joined by ``jax.distributed`` (127.0.0.1, CPU collectives): the CI stand-in for
a multi-host GPU cluster. Each process sees ``devices`` simulated CPU devices."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(process_id: int, num_processes: int, devices: int, port: int | None) -> dict:
    """The environment of one process: its device count (replacing the test run's), and the coordinator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    isa = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_cpu_max_isa")]
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT,  # this checkout's zaya
               XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *isa]))
    if port is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                   JAX_PROCESS_ID=str(process_id))
    return env


def slurm_env(process_id: int, num_processes: int, tasks_per_node: int, gpus_per_node: int, port: int) -> dict:
    """What SLURM sets for one task of a one-node job step (node 127.0.0.1); jax finds the coordinator from it."""
    return dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS=str(num_processes),
                SLURM_PROCID=str(process_id), SLURM_LOCALID=str(process_id % tasks_per_node),
                SLURM_NTASKS_PER_NODE=str(tasks_per_node), SLURM_GPUS_ON_NODE=str(gpus_per_node),
                SLURM_STEP_NUM_NODES="1", JAX_COORDINATOR_PORT=str(port))


def start(args: list[str], num_processes: int, devices: int, logdir: str, slurm: bool = False,
          heartbeat_s: int | None = None) -> list[subprocess.Popen]:
    """Start ``python -m zaya.cli *args`` (or ``python script.py *args``) as ``num_processes`` processes (no coordinator when 1); logs in logdir.
    ``slurm``: the processes find each other from simulated SLURM variables instead of JAX_COORDINATOR_ADDRESS;
    ``heartbeat_s``: how soon a dead peer is noticed (``ZAYA_HEARTBEAT_TIMEOUT_S``)."""
    port = free_port() if num_processes > 1 else None
    procs = []
    for i in range(num_processes):
        log = open(os.path.join(logdir, f"process{i}.log"), "w")
        env = env_for(i, num_processes, devices, None if slurm else port)
        if slurm:
            env.update(slurm_env(i, num_processes, num_processes, num_processes, port))
        if heartbeat_s:
            env["ZAYA_HEARTBEAT_TIMEOUT_S"] = str(heartbeat_s)
        cmd = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", "zaya.cli", *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, env=env))
        procs[-1].log_path = log.name
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; kills every process still running after ``timeout`` seconds (then -9)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def logs(procs) -> str:
    return "\n".join(f"--- {p.log_path}\n{open(p.log_path).read()[-3000:]}" for p in procs)


def run(args: list[str], num_processes: int, devices: int, logdir: str, timeout: float = 300,
        slurm: bool = False) -> list[str]:
    """Run to completion; AssertionError with every process's log tail unless all exit 0. Returns the logs."""
    procs = start(args, num_processes, devices, logdir, slurm)
    codes = wait(procs, timeout)
    assert codes == [0] * num_processes, f"exit codes {codes}\n{logs(procs)}"
    return [open(p.log_path).read() for p in procs]

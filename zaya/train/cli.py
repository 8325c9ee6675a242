"""``zaya train --config experiments/X.py:variant --workdir DIR [--config.a.b=value ...]``.

Loads the config file, applies the overrides (``ml_collections.config_flags``: typed, locked, a typo fails with the
closest field names), validates it and runs ``zaya.train.loop.train``. Running it again on the same workdir resumes
from the latest checkpoint.
Start-up errors (config, tokenizer/vocab, data, checkpoint mismatch) print one clear line and exit with status 2.
"""
from __future__ import annotations

import logging
import sys


def startup_errors() -> tuple:
    from zaya.config import ConfigError
    from zaya.convert.safetensors_io import CheckpointError
    from zaya.data.sources import DataError
    from zaya.data.tokenizer import TokenizerError
    from zaya.train.checkpoint import CheckpointMismatchError
    return ConfigError, DataError, TokenizerError, CheckpointMismatchError, CheckpointError, FileNotFoundError


HEARTBEAT_ENV, HEARTBEAT_S = "ZAYA_HEARTBEAT_TIMEOUT_S", 30


def maybe_init_distributed():
    """Multi-host runs: one process per host (or GPU) under SLURM / Open MPI / Kubernetes, or with
    ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` set. Single-process runs skip it."""
    import os
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    ompi = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    if not (slurm or ompi or explicit or os.environ.get("ZAYA_DISTRIBUTED") == "1"):
        return
    import jax
    # a dead peer (kill -9, node lost) is detected by missed heartbeats; the survivors then exit with an error
    # naming it instead of waiting in a collective (jax's default: 100 s)
    kw = dict(initialization_timeout=900, heartbeat_timeout_seconds=int(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_S)))
    if explicit:
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]), **kw)
    else:
        jax.distributed.initialize(**kw)


def main(args, rest) -> dict:
    from zaya.train import configs
    from zaya.train.loop import train
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    maybe_init_distributed()
    try:
        cfg = configs.load(args.config, argv=list(rest))
        summary = train(cfg, args.workdir)
    except startup_errors() as e:
        print(f"zaya train: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    tps = summary.get("tokens_per_s")
    print(f"done: {summary['steps']} steps, final loss {summary['final'].get('loss', float('nan')):.4f}, "
          f"{tps or 0:.0f} tokens/s -> {summary['workdir']}")
    return summary

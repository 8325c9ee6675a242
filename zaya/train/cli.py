"""``zaya train --config experiments/X.py:variant --workdir DIR [--dry-run] [--config.a.b=value ...]``.

Loads the config file, applies the overrides (``ml_collections.config_flags``: typed, locked, a typo fails with the
closest field names), validates it and runs ``zaya.train.loop.train``. Running it again on the same workdir resumes
from the latest checkpoint. ``--dry-run`` joins the (multi-process) job, builds the mesh and prints each process's
devices, their mesh coordinates and the batch rows it loads (``zaya.train.distributed.describe``), then exits.
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


def dry_run(cfg) -> dict:
    """Print where this process's devices sit in the run's mesh and which batch rows it loads; train nothing."""
    from zaya.train.distributed import describe
    from zaya.train.loop import step_setup
    s = step_setup(cfg)
    print(describe(s.mesh, s.dp, cfg.batch_size), flush=True)
    return {"mesh": dict(s.mesh.shape), "batch_axes": s.dp}


def main(args, rest) -> dict:
    from zaya.train import configs
    from zaya.train.loop import train
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from zaya.train.distributed import maybe_initialize
    maybe_initialize()
    try:
        cfg = configs.load(args.config, argv=list(rest))
        if getattr(args, "dry_run", False):
            return dry_run(cfg)
        summary = train(cfg, args.workdir)
    except startup_errors() as e:
        print(f"zaya train: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    tps = summary.get("tokens_per_s")
    print(f"done: {summary['steps']} steps, final loss {summary['final'].get('loss', float('nan')):.4f}, "
          f"{tps or 0:.0f} tokens/s -> {summary['workdir']}")
    return summary

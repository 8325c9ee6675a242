"""Ablation runner: one experiment config, a grid (or list) of override sets, one comparison table and plots.

  python -m zaya.train.ablate --config experiments/tidar_convert.py:tiny --workdir DIR \
      --sweep 'tidar.alpha=0.5,1,2' --sweep 'tidar.block_size=4,8' [--config.init_from=runs/a/model ...]
  python -m zaya.train.ablate --config ... --workdir DIR --run 'tidar.alpha=0.5 tidar.block_size=4' --run '...'

``--sweep`` axes form a Cartesian grid; ``--run`` gives explicit override sets (space separated ``key=value``);
``--set key=value`` and ``--config.key=value`` apply to every run. Each run trains in DIR/<name> (so rerunning
resumes or skips finished runs), then DIR/ablation.md, DIR/ablation.csv and DIR/ablation_<metric>.png compare them.
A bad config or override prints one line (what is wrong, how to fix it) and exits with status 2 before any run.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import sys

from zaya.train import configs, plots

COLUMNS = ("loss", "ar_loss", "diff_loss", "eval_loss", "eval_ar_loss", "eval_diff_loss", "eval_diff_acc",
           "eval_diff_acc_pos0", "skip_rate", "tokens_per_s")


def grid(sweeps: list[str]) -> list[list[tuple[str, str]]]:
    """``['a=1,2', 'b=x,y']`` -> the 4 override sets of the Cartesian product (values split on commas)."""
    axes = []
    for s in sweeps:
        if "=" not in s:
            raise configs.ConfigOverrideError(f"--sweep {s!r}: expected key=v1,v2,...")
        k, vals = s.split("=", 1)
        axes.append([(k.strip(), v.strip()) for v in _split_values(vals)])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _split_values(vals: str) -> list[str]:
    """Split on commas outside brackets/quotes (so tuple values like (1,2) survive)."""
    out, depth, cur, quote = [], 0, "", None
    for ch in vals:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return [v for v in out if v.strip()]


def parse_run(text: str) -> list[tuple[str, str]]:
    pairs = []
    for tok in text.split():
        if "=" not in tok:
            raise configs.ConfigOverrideError(f"--run {text!r}: {tok!r} is not key=value")
        k, v = tok.split("=", 1)
        pairs.append((k.removeprefix("--config."), v))
    return pairs


def run_name(overrides: list[tuple[str, str]]) -> str:
    if not overrides:
        return "base"
    name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in overrides)
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", name)[:120]


def row_of(name: str, overrides, summary: dict) -> dict:
    f, ev = summary.get("final", {}), summary.get("eval", {}) or {}
    acc = ev.get("diff_acc_per_pos")
    row = {"run": name, **{k: v for k, v in overrides},
           "loss": f.get("loss"), "ar_loss": f.get("ar_loss"), "diff_loss": f.get("diff_loss"),
           "eval_loss": ev.get("loss"), "eval_ar_loss": ev.get("ar_loss"), "eval_diff_loss": ev.get("diff_loss"),
           "eval_diff_acc": (sum(acc) / len(acc)) if acc else ev.get("diff_acc"),
           "eval_diff_acc_pos0": acc[0] if acc else None, "skip_rate": f.get("skip_rate_mean"),
           "tokens_per_s": summary.get("tokens_per_s"), "eval_diff_acc_per_pos": acc}
    return row


def write_table(rows: list[dict], out_dir: str) -> tuple[str, str]:
    keys = ["run"] + sorted({k for r in rows for k in r if k not in COLUMNS and k != "run"}) + list(COLUMNS)
    keys = [k for k in keys if any(r.get(k) is not None for r in rows) and not any(isinstance(r.get(k), list)
                                                                                    for r in rows)]
    csv_path, md_path = os.path.join(out_dir, "ablation.csv"), os.path.join(out_dir, "ablation.md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md_path, csv_path


def ablate(spec: str, workdir: str, sets: list[list[tuple[str, str]]], common=(), train_fn=None,
           argv=()) -> list[dict]:
    """Train every override set (configs checked before the first run starts) and write the comparison.
    ``common`` (key, value) pairs and ``argv`` (``--config.a.b=v`` arguments) apply to every run."""
    from zaya.train.loop import train
    train_fn = train_fn or train
    runs = []
    for ov in sets:
        cfg = configs.load(spec, list(common) + list(ov), argv)  # fail on a bad override before any training
        runs.append((run_name(ov), ov, cfg))
    names = [r[0] for r in runs]
    if len(set(names)) != len(names):
        raise configs.ConfigOverrideError(f"duplicate runs {names}")
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for name, ov, cfg in runs:
        summary = train_fn(cfg, os.path.join(workdir, name))
        rows.append(row_of(name, ov, summary))
    write_table(rows, workdir)
    wd = {n: os.path.join(workdir, n) for n in names}
    for key in ("loss", "diff_loss", "ar_loss"):
        plots.compare_runs(wd, os.path.join(workdir, f"ablation_{key}.png"), key)
    plots.compare_vectors({r["run"]: r["eval_diff_acc_per_pos"] for r in rows if r.get("eval_diff_acc_per_pos")},
                          os.path.join(workdir, "ablation_diff_acc_per_pos.png"))
    with open(os.path.join(workdir, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m zaya.train.ablate", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiments/X.py[:variant]")
    p.add_argument("--workdir", required=True)
    p.add_argument("--sweep", action="append", default=[], help="key=v1,v2,... (grid axis; repeatable)")
    p.add_argument("--run", action="append", default=[], help="'k1=v1 k2=v2' one explicit run (repeatable)")
    p.add_argument("--set", action="append", default=[], help="key=value applied to every run (repeatable)")
    a, rest = p.parse_known_args(argv)  # rest: --config.a.b=v overrides for every run, as `zaya train`'s
    if a.sweep and a.run:
        p.error("use either --sweep (grid) or --run (explicit sets), not both")
    from zaya.train.cli import startup_errors
    try:
        sets = [parse_run(r) for r in a.run] if a.run else grid(a.sweep)
        common = [tuple(s.removeprefix("--config.").split("=", 1)) for s in a.set]
        rows = ablate(a.config, a.workdir, sets, common, argv=rest)
    except startup_errors() as e:  # one line saying what to change, no traceback (as `zaya train`)
        print(f"{p.prog}: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    with open(os.path.join(a.workdir, "ablation.md")) as f:
        print(f.read())
    return rows


if __name__ == "__main__":
    main()

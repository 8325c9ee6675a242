"""Ablation runner: one experiment config, a grid (or list) of override sets, one comparison table and plots.

  python -m zaya.train.ablate --config experiments/tidar_convert.py:tiny --workdir DIR \
      --sweep 'tidar.alpha=0.5,1,2' --sweep 'tidar.block_size=4,8' [--config.init_from=runs/a/model ...]
  python -m zaya.train.ablate --config ... --workdir DIR --run 'tidar.alpha=0.5 tidar.block_size=4' --run '...'

``--sweep`` axes form a Cartesian grid; ``--run`` gives explicit override sets (space separated ``key=value``);
``--set key=value`` and ``--config.key=value`` apply to every run. Each run trains in DIR/<name> (so rerunning
resumes or skips finished runs), then DIR/ablation.md, DIR/ablation.csv and DIR/ablation_<metric>.png compare them.
A bad config or override prints one line (what is wrong, how to fix it) and exits with status 2 before any run.

Beyond the training metrics a sweep can report what the objective costs and buys:

  --control 'tidar.mode=ar'   trains this override set once per seed (DIR/control, DIR/control_seed=S) and adds
                              ``ar_vs_control``: each run's held-out AR loss relative to it (+0.01 = 1% worse), the
                              equal-compute comparison
  --then experiments/diffusion_sft.py:demo
                              a second phase per run, started from the run's model (DIR/<name>/then). ``then.KEY=V``
                              overrides go to it alone; ``tidar.*`` and ``seed`` go to both phases (the decoded model
                              must be trained with the layout it decodes with); the rest to the first phase only
  --decode N                  decode N held-out short-answer and N long-answer task prompts with the final model
                              (greedy, lossless, the sampler matching the trained layout: zaya.train.decode_eval) and
                              add ``tpf_short``, ``tpf_long`` (tokens per decode forward per active row) and
                              ``same_as_ar_*``

Every row also has ``wall_s`` (its phases and decoding). Runs that differ only in ``seed`` are summarised again as
mean +- std in DIR/ablation.md.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import statistics
import sys
import time

from zaya.train import configs, plots

COLUMNS = ("loss", "ar_loss", "diff_loss", "eval_loss", "eval_ar_loss", "ar_vs_control", "eval_diff_loss",
           "eval_diff_acc", "eval_diff_acc_pos0", "then_diff_acc", "then_diff_acc_pos0", "tpf_short", "tpf_long",
           "same_as_ar_short", "same_as_ar_long", "skip_rate", "tokens_per_s", "wall_s")
SEED_COLUMNS = ("eval_ar_loss", "ar_vs_control", "eval_diff_acc", "then_diff_acc", "tpf_short", "tpf_long")
BOTH_PHASES = ("tidar.", "seed")   # override keys (prefixes) applied to the first phase and to --then


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


def split_overrides(overrides) -> tuple[list, list]:
    """(first phase, --then phase) overrides: ``then.K=V`` -> second only (as ``K=V``); ``tidar.*`` and ``seed`` ->
    both; the rest -> first only."""
    first, then = [], []
    for k, v in overrides:
        if k.startswith("then."):
            then.append((k[len("then."):], v))
        else:
            first.append((k, v))
            if k.startswith(BOTH_PHASES):
                then.append((k, v))
    return first, then


def _acc_mean(ev: dict):
    acc = ev.get("diff_acc_per_pos")
    return ((sum(acc) / len(acc)) if acc else ev.get("diff_acc")), (acc[0] if acc else None)


def run_name(overrides: list[tuple[str, str]]) -> str:
    if not overrides:
        return "base"
    name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in overrides)
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", name)[:120]


def row_of(name: str, overrides, summary: dict, then: dict | None = None) -> dict:
    f, ev = summary.get("final", {}), summary.get("eval", {}) or {}
    acc = ev.get("diff_acc_per_pos")
    mean, pos0 = _acc_mean(ev)
    row = {"run": name, **{k: v for k, v in overrides},
           "loss": f.get("loss"), "ar_loss": f.get("ar_loss"), "diff_loss": f.get("diff_loss"),
           "eval_loss": ev.get("loss"), "eval_ar_loss": ev.get("ar_loss"), "eval_diff_loss": ev.get("diff_loss"),
           "eval_diff_acc": mean, "eval_diff_acc_pos0": pos0, "skip_rate": f.get("skip_rate_mean"),
           "tokens_per_s": summary.get("tokens_per_s"), "eval_diff_acc_per_pos": acc}
    if then is not None:
        tev = then.get("eval", {}) or {}
        row["then_diff_acc"], row["then_diff_acc_pos0"] = _acc_mean(tev)
        row["then_diff_acc_per_pos"] = tev.get("diff_acc_per_pos")
    return row


def seed_summary(rows: list[dict]) -> list[dict]:
    """Rows that differ only in ``seed`` (at least two): one row each with mean and std of SEED_COLUMNS."""
    groups: dict = {}
    for r in rows:
        key = tuple(sorted((k, str(v)) for k, v in r.items() if k not in COLUMNS and k not in ("run", "seed")
                           and not isinstance(v, list)))
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        if len({r.get("seed") for r in rs}) < 2:
            continue
        s = {"runs": len(rs), "overrides": " ".join(f"{k}={v}" for k, v in key) or "(base)"}
        for c in SEED_COLUMNS:
            xs = [r[c] for r in rs if r.get(c) is not None]
            if xs:
                s[c] = (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
        out.append(s)
    return out


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
    seeds = seed_summary(rows)
    if seeds:
        cols = [c for c in SEED_COLUMNS if any(c in s for s in seeds)]
        lines += ["", "Across seeds (mean +- std):", "", "| overrides | runs | " + " | ".join(cols) + " |",
                  "|" + "---|" * (len(cols) + 2)]
        lines += [f"| {s['overrides']} | {s['runs']} | " + " | ".join(
            f"{s[c][0]:.4g} +- {s[c][1]:.2g}" if c in s else "-" for c in cols) + " |" for s in seeds]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md_path, csv_path


def _then_cfg(then: str, common, ov, argv, init_from: str):
    _, then_ov = split_overrides(list(common) + list(ov))
    return configs.load(then, then_ov + [("init_from", init_from)],
                        [a for a in argv if a.startswith(tuple(f"--config.{p}" for p in BOTH_PHASES))])


def ablate(spec: str, workdir: str, sets: list[list[tuple[str, str]]], common=(), train_fn=None,
           argv=(), control=None, then: str | None = None, decode: int = 0, decode_fn=None) -> list[dict]:
    """Train every override set (configs checked before the first run starts) and write the comparison.
    ``common`` (key, value) pairs and ``argv`` (``--config.a.b=v`` arguments) apply to every run; ``control``
    (override pairs), ``then`` (a second phase's config spec) and ``decode`` (prompts per task set) as the CLI's
    ``--control``, ``--then`` and ``--decode``."""
    from zaya.train.loop import train
    train_fn = train_fn or train
    if decode_fn is None:
        from zaya.train.decode_eval import decode_tasks as decode_fn
    runs = []
    for ov in sets:
        first, _ = split_overrides(list(common) + list(ov))
        cfg = configs.load(spec, first, argv)  # fail on a bad override before any training
        if then:
            _then_cfg(then, common, ov, argv, "/checked/later")
        runs.append((run_name(ov), ov, cfg))
    names = [r[0] for r in runs]
    if len(set(names)) != len(names):
        raise configs.ConfigOverrideError(f"duplicate runs {names}")
    controls = {}
    if control:
        for seed in sorted({str(cfg.seed) for _, _, cfg in runs}):
            first, _ = split_overrides(list(common) + list(control) + [("seed", seed)])
            controls[seed] = configs.load(spec, first, argv)
    os.makedirs(workdir, exist_ok=True)
    control_loss = {}
    for seed, cfg in controls.items():
        name = "control" if seed == "0" else f"control_seed={seed}"
        control_loss[seed] = (_train_or_reuse(train_fn, cfg, os.path.join(workdir, name)).get("eval") or {}).get(
            "ar_loss")
    rows = []
    for name, ov, cfg in runs:
        t0 = time.perf_counter()
        wd = os.path.join(workdir, name)
        summary = _train_or_reuse(train_fn, cfg, wd)
        then_summary, final, last = None, os.path.join(wd, "model"), cfg
        if then:
            last = _then_cfg(then, common, ov, argv, final)
            then_summary = _train_or_reuse(train_fn, last, os.path.join(wd, "then"))
            final = os.path.join(wd, "then", "model")
        row = row_of(name, ov, summary, then_summary)
        base = control_loss.get(str(cfg.seed))
        if base and row.get("eval_ar_loss") is not None:
            row["ar_vs_control"] = row["eval_ar_loss"] / base - 1
        if decode:
            row.update(_decoded(wd, final, dict(last.tidar), decode, decode_fn))
        row["wall_s"] = _wall(wd, time.perf_counter() - t0,
                              reused=summary.get("reused") and (not then or then_summary.get("reused")))
        rows.append(row)
    write_table(rows, workdir)
    wd = {n: os.path.join(workdir, n) for n in names}
    for key in ("loss", "diff_loss", "ar_loss"):
        plots.compare_runs(wd, os.path.join(workdir, f"ablation_{key}.png"), key)
    plots.compare_vectors({r["run"]: r["eval_diff_acc_per_pos"] for r in rows if r.get("eval_diff_acc_per_pos")},
                          os.path.join(workdir, "ablation_diff_acc_per_pos.png"))
    plots.compare_vectors({r["run"]: r["then_diff_acc_per_pos"] for r in rows if r.get("then_diff_acc_per_pos")},
                          os.path.join(workdir, "ablation_then_diff_acc_per_pos.png"),
                          ylabel="eval diffusion accuracy (--then phase)")
    if any(r.get("tpf_long") is not None for r in rows):
        plots.tradeoff(rows, os.path.join(workdir, "ablation_tradeoff.png"))
    with open(os.path.join(workdir, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def _train_or_reuse(train_fn, cfg, wd: str) -> dict:
    """A run whose workdir already holds a finished run of this very config (its config.json and a summary.json at
    ``num_steps``) is not started again: its summary is reused (a rerun of a sweep, e.g. to add rows, costs nothing
    for the finished ones). A workdir holding a run of another config is refused (resuming it would silently mix two
    configs in one row); anything else trains, or resumes from the workdir's latest checkpoint."""
    from zaya.train.loop import _jsonable_cfg
    want = _jsonable_cfg(cfg)
    try:
        with open(os.path.join(wd, "config.json")) as f:
            have = f.read()
    except OSError:
        return train_fn(cfg, wd)
    if have != want:
        from zaya.train.resume import config_diff
        diff = config_diff(json.loads(have), json.loads(want))
        raise configs.ConfigError(f"{wd} holds a run of another config ({'; '.join(diff[:6])}); delete that folder "
                                  "or give the sweep another --workdir")
    try:
        with open(os.path.join(wd, "summary.json")) as f:
            summary = json.load(f)
        if summary.get("steps") == cfg.num_steps and os.path.isdir(os.path.join(wd, "model")):
            return dict(summary, reused=True)
    except (OSError, ValueError):
        pass
    return train_fn(cfg, wd)


def _wall(run_dir: str, seconds: float, reused: bool) -> float | None:
    """A row's wall time (its phases and decoding), kept in RUN/wall.json: a rerun that reuses finished phases reports
    the time they took when they ran (None if that was never recorded), not the time it took to reuse them."""
    from zaya.fileio import atomic_write_text
    path = os.path.join(run_dir, "wall.json")
    if reused:
        try:
            with open(path) as f:
                return json.load(f)["wall_s"]
        except (OSError, ValueError, KeyError):
            return None
    atomic_write_text(path, json.dumps({"wall_s": seconds}))
    return seconds


def _decoded(run_dir: str, model_dir: str, tidar: dict, n: int, decode_fn) -> dict:
    """decode_fn's figures, kept in RUN/decode.json (a rerun of the sweep reuses them for the same n and model)."""
    from zaya.fileio import atomic_write_text
    path = os.path.join(run_dir, "decode.json")
    stamp = {"num_prompts": n, "model_mtime": os.path.getmtime(model_dir)}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("stamp") == stamp:
            return old["figures"]
    figures = decode_fn(model_dir, tidar, n)
    atomic_write_text(path, json.dumps({"stamp": stamp, "figures": figures}, indent=2))
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m zaya.train.ablate", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiments/X.py[:variant]")
    p.add_argument("--workdir", required=True)
    p.add_argument("--sweep", action="append", default=[], help="key=v1,v2,... (grid axis; repeatable)")
    p.add_argument("--run", action="append", default=[], help="'k1=v1 k2=v2' one explicit run (repeatable)")
    p.add_argument("--set", action="append", default=[], help="key=value applied to every run (repeatable)")
    p.add_argument("--control", default=None, help="'k1=v1 ...' the equal-compute control (e.g. 'tidar.mode=ar')")
    p.add_argument("--then", default=None, help="experiments/Y.py[:variant]: a second phase from each run's model")
    p.add_argument("--decode", type=int, default=0, metavar="N",
                   help="decode N held-out short and N long task prompts with each final model (greedy, lossless)")
    a, rest = p.parse_known_args(argv)  # rest: --config.a.b=v overrides for every run, as `zaya train`'s
    if a.sweep and a.run:
        p.error("use either --sweep (grid) or --run (explicit sets), not both")
    from zaya.train.cli import startup_errors
    try:
        sets = [parse_run(r) for r in a.run] if a.run else grid(a.sweep)
        common = [tuple(s.removeprefix("--config.").split("=", 1)) for s in a.set]
        control = parse_run(a.control) if a.control else None
        rows = ablate(a.config, a.workdir, sets, common, argv=rest, control=control, then=a.then, decode=a.decode)
    except startup_errors() as e:  # one line saying what to change, no traceback (as `zaya train`)
        print(f"{p.prog}: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    with open(os.path.join(a.workdir, "ablation.md")) as f:
        print(f.read())
    return rows


if __name__ == "__main__":
    main()

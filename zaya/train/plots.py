"""Plots written at the end of a run (matplotlib, Agg): loss curves, per-position diffusion accuracy, expert usage.

  training_plots(workdir) -> list of written paths (WORKDIR/plots/*.png)
  compare_runs(runs, out_png, key) -> curves of several runs on one axis (ablations)
"""
from __future__ import annotations

import os

import numpy as np

from zaya.train.logs import read_jsonl

LOSS_KEYS = ("loss", "ar_loss", "diff_loss")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (None, None)


def _vector_mean(rows, key, last_frac: float = 0.2):
    vals = [r[key] for r in rows if isinstance(r.get(key), list)]
    if not vals:
        return None
    k = max(1, int(len(vals) * last_frac))
    return np.mean(np.asarray(vals[-k:], np.float64), 0)


def training_plots(workdir: str) -> list[str]:
    plt = _plt()
    train, ev = read_jsonl(os.path.join(workdir, "metrics.jsonl")), read_jsonl(os.path.join(workdir, "eval.jsonl"))
    out_dir = os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for rows, tag, style in ((train, "train", "-"), (ev, "eval", "o--")):
        for k in LOSS_KEYS:
            x, y = _series(rows, k)
            if x is not None:
                ax.plot(x, y, style, label=f"{tag} {k}", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    if ax.lines:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    written.append(_save(fig, plt, os.path.join(out_dir, "loss.png")))

    acc_t, acc_e = _vector_mean(train, "diff_acc_per_pos"), _vector_mean(ev, "diff_acc_per_pos", 1e-9)
    if acc_t is not None or acc_e is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for acc, lab in ((acc_t, "train (last 20% of steps)"), (acc_e, "eval (last)")):
            if acc is not None:
                ax.plot(np.arange(len(acc)), acc, "o-", label=lab)
        ax.set_xlabel("position in block")
        ax.set_ylabel("diffusion top-1 accuracy")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, plt, os.path.join(out_dir, "diff_acc_per_pos.png")))

    usage_key = next((k for k in ("expert_counts", "expert_usage", "counts") if train and isinstance(train[-1].get(k), list)), None)
    if usage_key:
        c = np.asarray(train[-1][usage_key], np.float64)
        c = c[None] if c.ndim == 1 else c
        frac = c / np.maximum(c.sum(-1, keepdims=True), 1e-9)
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(frac)))
        im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xlabel("expert (last column: MoD skip)")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="fraction of tokens")
        written.append(_save(fig, plt, os.path.join(out_dir, "expert_usage.png")))
    return written


def compare_runs(runs: dict, out_png: str, key: str = "loss", source: str = "metrics.jsonl") -> str:
    """``runs``: name -> workdir. One curve per run of ``key`` from each run's JSONL."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, wd in runs.items():
        x, y = _series(read_jsonl(os.path.join(wd, source)), key)
        if x is not None:
            ax.plot(x, y, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, plt, out_png)


def compare_vectors(vectors: dict, out_png: str, xlabel: str = "position in block",
                    ylabel: str = "eval diffusion accuracy") -> str | None:
    """``vectors``: name -> list (e.g. per-position diffusion accuracy of each run), one line each."""
    if not vectors:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in vectors.items():
        ax.plot(np.arange(len(v)), v, "o-", label=name, ms=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, plt, out_png)


def _save(fig, plt, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tradeoff(rows: list[dict], out_png: str) -> str:
    """Ablation rows: what each costs (AR loss vs the control, or the held-out AR loss without one) against what it
    buys (tokens per decode forward on short and long tasks), one point per run and task set."""
    plt = _plt()
    key = "ar_vs_control" if any(r.get("ar_vs_control") is not None for r in rows) else "eval_ar_loss"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ts, marker in (("short", "o"), ("long", "s")):
        pts = [(r[key], r[f"tpf_{ts}"], r["run"]) for r in rows
               if r.get(key) is not None and r.get(f"tpf_{ts}") is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{ts} tasks")
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("AR loss vs equal-compute control (fraction)" if key == "ar_vs_control" else "eval AR loss")
    ax.set_ylabel("tokens per decode forward (greedy, lossless)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, out_png)

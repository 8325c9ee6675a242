"""``zaya demo``: the whole recipe on a laptop-sized model, CPU only, in minutes.

  1. AR-pretrain a tiny ZAYA-architecture MoE on the embedded Shakespeare corpus + generated tasks (bytes)
  2. convert it with the TiDAR objective (clean causal half + mask blocks of 16, AR weight alpha = 3); as a control,
     continue the base with the AR loss alone for the same steps and schedule (equal compute)
  3. diffusion SFT on generated tasks with short and long answers (prompt-masked TiDAR objective)
  4. self-distillation: the SFT model trained on its own greedy continuations of the task prompts
  5. evaluate: AR validation loss of base vs converted vs control, per-position diffusion accuracy, task exact match
  6. decode held-out short- and long-answer tasks with the AR baseline and the block samplers (greedy, lossless),
     side by side

Everything lands in ``--out``: checkpoints, TensorBoard logs, metrics, plots and ``summary.md`` (also printed).
The decoding block is 16 mask tokens, matching the training blocks: one anchor mask at the bonus position and
K = 15 drafts (Zyphra's K+1 layout), so block samplers and training see the same geometry.
"""
from __future__ import annotations

import json
import os
import time

from zaya.train import recipe

BLOCK = recipe.DEMO_BLOCK  # training block = decode block (anchor mask + K drafts)


def configs(quick: bool, out: str = "zaya_demo"):
    """(pretrain, convert, sft, distill, control) configs:
    ``experiments/{pretrain_ar,tidar_convert,diffusion_sft,self_distill}.py:demo`` (``demo_quick``: ``quick``, every
    phase shrunk for tests), each phase starting from the previous one's model in ``out``.

    control: the conversion's config with the AR loss alone (``tidar.mode=ar``), started from the base: the base
    trained on for as many steps as the conversion, same data and schedule, so "no degradation" is not credited to
    the extra steps."""
    from zaya.train.configs import load
    variant = "demo_quick" if quick else "demo"
    at = lambda phase: [f"init_from={os.path.join(out, phase, 'model')}"]
    a = load(recipe.experiment("pretrain_ar", variant))
    b = load(recipe.experiment("tidar_convert", variant), at("base"))
    c = load(recipe.experiment("diffusion_sft", variant), at("tidar"))
    d = load(recipe.experiment("self_distill", variant), at("sft"))
    ctl = load(recipe.experiment("tidar_convert", variant), at("base") + ["tidar.mode=ar"])
    return a, b, c, d, ctl


def _phase(cfg, workdir: str) -> dict:
    """Train (or resume, or reuse the finished) phase in ``workdir``. A folder left by another version of the demo
    (another config, or trained from a since-retrained previous phase) is moved aside to ``workdir.stale-N``, never
    deleted, and the phase trains afresh. What may differ on a rerun: how it is logged, checkpointed and laid out
    (``resume.PHASE_RESUMABLE``), not the experiment nor its length."""
    from zaya.train import resume
    from zaya.train.loop import train
    why = resume.stale(cfg, workdir)
    if why:
        moved = resume.move_aside(workdir)
        more = f" and {len(why) - 1} more" if len(why) > 1 else ""
        print(f"[demo]     {workdir} holds a run of another demo version ({why[0]}{more}): moved to {moved}",
              flush=True)
    return train(cfg, workdir)


def main(args):
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    quick = bool(getattr(args, "quick", False))
    cfg_a, cfg_b, cfg_c, cfg_d, cfg_ctl = configs(quick, out)
    t0 = time.perf_counter()
    print(f"[demo] 1/6 AR pretraining ({cfg_a.num_steps} steps) -> {out}/base", flush=True)
    sa = _phase(cfg_a, os.path.join(out, "base"))
    print(f"[demo] 2/6 TiDAR conversion ({cfg_b.num_steps} steps, alpha {cfg_b.tidar.alpha:g}) -> {out}/tidar",
          flush=True)
    sb = _phase(cfg_b, os.path.join(out, "tidar"))
    print(f"[demo]     control: AR continuation of the base, same {cfg_ctl.num_steps} steps -> {out}/base_ar_cont",
          flush=True)
    _phase(cfg_ctl, os.path.join(out, "base_ar_cont"))
    print(f"[demo] 3/6 diffusion SFT on short and long tasks ({cfg_c.num_steps} steps) -> {out}/sft", flush=True)
    sc = _phase(cfg_c, os.path.join(out, "sft"))
    print(f"[demo] 4/6 self-distillation on the SFT model's own continuations ({cfg_d.num_steps} steps) -> "
          f"{out}/distill", flush=True)
    sd = _phase(cfg_d, os.path.join(out, "distill"))
    t_train = time.perf_counter() - t0

    print("[demo] 5/6 evaluation", flush=True)
    from zaya.train import evaluate
    n_tasks = 16 if quick else 64
    ev = evaluate.evaluate(os.path.join(out, "tidar", "model"), os.path.join(out, "base", "model"), data_cfg=cfg_b.data,
                           seq_len=cfg_b.seq_len, tidar={"block_size": BLOCK}, num_tasks=n_tasks, max_new_tokens=24)
    ev["control"] = evaluate.evaluate(os.path.join(out, "base_ar_cont", "model"), data_cfg=cfg_b.data,
                                      seq_len=cfg_b.seq_len, tidar={"block_size": BLOCK}, num_tasks=n_tasks,
                                      max_new_tokens=24)["model"]
    for key, phase, cfg in (("sft", "sft", cfg_c), ("distill", "distill", cfg_d)):
        # held-out tasks with their reference answers (the distilled model trained on its own continuations)
        data = dict(cfg.data.to_dict(), distill_from="")
        ev[key] = evaluate.evaluate(os.path.join(out, phase, "model"), data_cfg=data, seq_len=cfg.seq_len,
                                    tidar={"block_size": BLOCK, "prompt_masking": True}, num_tasks=n_tasks,
                                    max_new_tokens=24)["model"]

    print("[demo] 6/6 block samplers vs AR on held-out short and long tasks", flush=True)
    from zaya.bench import samplers as bench_samplers
    from zaya.train import decode_eval
    K = BLOCK - 1
    tf = dict(sampler="two_forward", block_size=K, anchor="mask", acceptance="greedy")
    sf = dict(sampler="single_forward", block_size=K, levels=(0,), acceptance="greedy")
    # Zyphra's single forward also pre-drafts for other acceptance levels: proposals at 0, 4, 7, 11 accepted drafts
    # (80 query tokens per row instead of 32) keep the next block's drafts conditioned on what was just accepted
    sfl = dict(sf, levels=(0, 4, 7, 11))
    # The host loop (one dispatch and sync per step, zaya.generate's default) and the device loop (one
    # lax.while_loop): per-step host overhead is paid ~3x more often by AR, so the two loops rank samplers differently.
    # (Dense levels, the slowest rows on a CPU, are in experiments/results/samplers_cpu.md.)
    # Short answers (1-8 tokens) in both loops; long answers (20-100 tokens) in the device loop, where the wall
    # clock is not dominated by per-step host overhead.
    grids = [("short", "host", [dict(tf, batch=1), dict(sf, batch=1), dict(tf, batch=8), dict(sf, batch=8)]),
             ("short", "device", [dict(tf, batch=1), dict(sf, batch=1), dict(sfl, batch=1), dict(sf, batch=8)]),
             ("long", "device", [dict(tf, batch=1), dict(sf, batch=1), dict(sfl, batch=1), dict(sf, batch=8)])]
    rows = []
    for task_set, loop, grid in grids:
        name = "samplers" + ("" if loop == "host" else "_device") + ("" if task_set == "short" else "_long")
        rows += bench_samplers.run(model_path=os.path.join(out, "distill", "model"), out=os.path.join(out, name),
                                   grid=grid[:2] if quick else grid, prompts="tasks", task_set=task_set,
                                   max_new_tokens=decode_eval.MAX_NEW[task_set], num_prompts=8 if quick else 32,
                                   repeats=1 if quick else 2, loop=loop)
    md = summary(sa, sb, ev, rows, t_train, time.perf_counter() - t0, sc, sd)
    print(md, flush=True)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(record(sa, sb, sc, ev, rows, sd), f, indent=2, default=str)
    check(rows)
    return {"eval": ev, "samplers": rows}


def record(sa, sb, sc, ev, rows, sd=None) -> dict:
    """summary.json: every phase's summary, the evaluations and the sampler rows as measured, plus the figures a
    sweep compares: ``decode`` (one entry per decode row: sampler, batch, loop, task_set, tokens_per_forward per
    active row, same_as_ar) and ``convert.ar_loss_vs_control`` (the converted model's AR validation loss relative to
    the equal-compute AR control, a fraction: +0.038 is 3.8% worse)."""
    m, ctl = ev.get("model", {}), ev.get("control", {})
    vs_ctl = (m["ar_loss"] - ctl["ar_loss"]) / ctl["ar_loss"] if "ar_loss" in m and ctl.get("ar_loss") else None
    decode = [{"sampler": r.get("sampler"), "config": r.get("config"), "batch": r.get("batch"),
               "loop": r.get("loop", "host"), "task_set": r.get("task_set", "short"),
               "tokens_per_forward": r.get("tokens_per_forward"),
               "same_as_ar": r.get("equal_ar")} for r in rows]
    return {"pretrain": sa, "convert": dict(sb, ar_loss_vs_control=vs_ctl), "sft": sc, "distill": sd, "eval": ev,
            "samplers": rows, "decode": decode}


def check(rows) -> None:
    """The demo's own claims, asserted on whichever machine runs it (after the results are written): every row
    decodes greedily with a lossless rule, so each must give exactly AR's tokens."""
    bad = [f"{r['config']} (batch {r['batch']}, {r.get('loop', 'host')} loop, {r.get('task_set', 'short')} tasks)"
           for r in rows
           if r.get("equal_ar") is not True]
    if bad:
        raise SystemExit("zaya demo: greedy block decoding must reproduce AR's tokens, but these rows differ: "
                         + "; ".join(bad) + " (see summary.md and samplers*/ in the output folder)")


def _first(r) -> float:
    acc = r.get("diff_acc_per_pos") or [float("nan")]
    return float(acc[0])


METRICS = [("AR validation loss", "ar_loss", ".4f"), ("task exact match (greedy AR)", "task_em", ".3f"),
           ("diffusion loss", "diff_loss", ".4f"), ("first-slot agrees with AR", "first_slot_agree", ".3f"),
           ("AR top-1 accuracy (next token)", "ar_acc", ".3f"),
           ("diffusion accuracy, first block position", "first", ".3f"),
           # the same targets x_kb, blocks with context only: the AR prediction from x_<kb vs the block's first mask
           ("first block position, blocks with context: AR top-1", "ar_acc_first_ctx", ".3f"),
           ("first block position, blocks with context: diffusion", "diff_acc_first_ctx", ".3f"),
           ]  # (label, eval key, format)


def summary(sa, sb, ev, rows, t_train, t_total, sc=None, sd=None) -> str:
    m, b, f, ctl = ev["model"], ev.get("base", {}), ev.get("sft", {}), ev.get("control", {})
    dd = ev.get("distill", {})
    nan = float("nan")
    rel = (m["ar_loss"] - b["ar_loss"]) / b["ar_loss"] * 100 if b else nan
    rel_ctl = (m["ar_loss"] - ctl["ar_loss"]) / ctl["ar_loss"] * 100 if ctl else nan
    sft_steps = (f", diffusion SFT {sc['steps']} steps" if sc else "") + (
        f", self-distillation {sd['steps']} steps" if sd else "")
    lines = ["# zaya demo", "",
             f"Training: pretrain {sa['steps']} steps, convert {sb['steps']} steps{sft_steps}, "
             f"{sa.get('tokens_per_s') or 0:.0f} / {sb.get('tokens_per_s') or 0:.0f} tokens/s; "
             f"wall {t_train:.0f}s (total {t_total:.0f}s) on {sa['device']}.", "",
             "AR base and TiDAR-converted on the pretraining mixture's held-out split (Shakespeare + tasks); the SFT "
             "and self-distilled models on held-out short and long tasks with their reference answers (task exact "
             "match: short tasks).", "",
             "| | AR base | TiDAR-converted | + diffusion SFT (tasks) | + self-distillation |", "|---|---|---|---|---|"]
    for label, key, fmt in METRICS:
        cells = [_first(r) if key == "first" else r.get(key, nan) for r in (b, m, f, dd)]
        text = [format(x, fmt) for x in cells]
        if key == "ar_loss":
            text[1] += f" ({rel:+.2f}%)"
        lines.append(f"| {label} | " + " | ".join(text) + " |")
    lines += ["",
              "Diffusion accuracy per block position, converted: " +
              ", ".join(f"{x:.2f}" for x in m.get("diff_acc_per_pos", [])) +
              "; after SFT (tasks): " + ", ".join(f"{x:.2f}" for x in f.get("diff_acc_per_pos", [])) +
              "; self-distilled: " + ", ".join(f"{x:.2f}" for x in dd.get("diff_acc_per_pos", [])), "",
              f"Equal-compute control (the base trained {sb['steps']} more steps with the AR loss alone): AR "
              f"validation loss {ctl.get('ar_loss', nan):.4f}; the converted model is {rel_ctl:+.2f}% against it "
              f"({rel:+.2f}% against the base).", "",
              "Block samplers vs AR on held-out tasks (self-distilled model, greedy, rows stop at EOS; short answers "
              "1-8 tokens, long 20-100; tokens/forward: tokens the "
              "decode forwards produced per forward, the first token of each row coming from the prefill logits for "
              "every sampler, so AR = 1.00; TF = 2 forwards per step; decode loop: "
              "host = one dispatch and sync per step, device = one lax.while_loop, both for AR and the sampler; "
              "bound: the speedup if every block were fully accepted; tokens/forward: generated tokens per forward "
              "per active row, i.e. a row is charged only the forwards that ran while it was still generating, so "
              "rows of a batch that finish early are not charged the batch's later forwards):", "",
              "| tasks | sampler | batch | decode loop | tokens/forward | tokens/step | acceptance d1..d4 | "
              "speedup vs AR (wall) | bound: perfect drafts | same tokens as AR |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = " ".join(f"{x:.2f}" for x in (r.get("acceptance_per_position") or [])[:4])
        bound = f"{r['speedup_oracle']:.2f}x" if r.get("speedup_oracle") else "n/a"
        lines.append(f"| {r.get('task_set', 'short')} | {r['config']} | {r['batch']} | {r.get('loop', 'host')} | "
                     f"{r.get('tokens_per_forward', nan):.2f} | "
                     f"{r.get('tokens_per_step', nan):.2f} | {acc} | {r.get('speedup', nan):.2f}x | "
                     f"{bound} | {r.get('equal_ar')} |")
    return "\n".join(lines) + "\n"

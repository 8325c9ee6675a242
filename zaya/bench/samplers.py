"""``zaya bench samplers``: block samplers against AR on the same model and prompts, side by side.

Sweep: sampler (two_forward "TF", single_forward "SF" with dense or sparse proposal levels, TiDAR's published
layout) x acceptance rule x block size x proposal levels x batch. For every configuration:

- tokens per forward (mean) and per step (mean and histogram), acceptance per draft position, useful-slot fraction
  (committed tokens / query tokens computed), all from ``zaya.generate``'s stats;
- WALL-CLOCK speedup over ``sampler='ar'`` on the same model, prompts, batch and token budget, measured in the same
  process, interleaved (ar, config, ar, config, ...), medians; compile excluded (``generate`` compiles before its
  timers); the persistent XLA cache (``common.compile_cache``, on for the CLI) saves recompiling across runs;
- whether the generated tokens equal AR's (the greedy lossless check; temperature 0). TiDAR's published layout has
  no bonus token (its block's first token comes from the diffusion slot), so it is not expected to equal AR.

Model: a checkpoint folder (``model_path``; e.g. the demo's converted model) or, as a fallback, the random ``tiny``
preset. Acceptance numbers from random weights are MEANINGLESS (the drafter was never trained); only the cost side
(forwards, query tokens, wall time per step) says anything then. Prompts: the generated task set
(``zaya.data.tasks``) encoded with the byte tokenizer when the model's vocabulary is the byte vocabulary (261); random
ids otherwise. Every configuration decodes the same prompt set (batched by its batch size). With task prompts rows
stop at EOS, the end of the answer (the greedy lossless samplers commit exactly AR's tokens, so both do the same
work); with random prompts every row decodes the full budget.
"""
from __future__ import annotations

import os
import statistics

import numpy as np

from zaya.bench import common

BYTE_VOCAB = 261


def sparse_levels(N: int) -> tuple[int, ...]:
    """Zyphra's best AMD levels (0, 4, 7, 11) at K=16, scaled to other block sizes."""
    return tuple(sorted({0} | {min(N, max(1, round(N * f))) for f in (0.25, 0.44, 0.69)}))


def default_grid(quick: bool = False, block_sizes=None, batches=None, acceptances=None,
                 anchor: str | None = None) -> list[dict]:
    """The configurations run by default (sized for a few minutes on CPU with the tiny model).

    - block-size sweep at batch 1, greedy: TF, SF sparse, SF dense, TiDAR for each block size;
    - acceptance sweep at the largest block size, batch 1: TF and SF sparse with each extra rule;
    - batch sweep at the largest block size, greedy: TF, SF sparse, TiDAR for each extra batch.

    ``anchor`` ('token' or 'mask') sets the two-forward drafting block's first slot (a model converted with
    all-mask blocks drafts with anchor='mask').
    """
    grid = _grid(quick, block_sizes, batches, acceptances)
    if anchor is not None:
        for c in grid:
            if c["sampler"] == "two_forward":
                c["anchor"] = anchor
    return grid


def _grid(quick, block_sizes, batches, acceptances) -> list[dict]:
    if quick:
        N = (block_sizes or (4,))[0]
        return [dict(sampler="two_forward", block_size=N, levels=None, acceptance="greedy", batch=b)
                for b in (batches or (1,))] + \
               [dict(sampler="single_forward", block_size=N, levels=sparse_levels(N), acceptance="greedy",
                     batch=(batches or (1,))[0]),
                dict(sampler="tidar", block_size=N, levels=None, acceptance="greedy", batch=(batches or (1,))[0])]
    block_sizes = tuple(block_sizes or (4, 8, 16))
    batches = tuple(batches or (1, 8))
    acceptances = tuple(acceptances or ("greedy", "typical", "topk"))
    Nmax, b0 = max(block_sizes), batches[0]
    grid = []
    for N in block_sizes:
        grid += [dict(sampler="two_forward", block_size=N, levels=None, acceptance="greedy", batch=b0),
                 dict(sampler="single_forward", block_size=N, levels=sparse_levels(N), acceptance="greedy", batch=b0),
                 dict(sampler="single_forward", block_size=N, levels=None, acceptance="greedy", batch=b0),
                 dict(sampler="tidar", block_size=N, levels=None, acceptance="greedy", batch=b0)]
    for acc in acceptances:
        if acc == "greedy":
            continue
        for s, lv in (("two_forward", None), ("single_forward", sparse_levels(Nmax))):
            grid.append(dict(sampler=s, block_size=Nmax, levels=lv, acceptance=acc, batch=b0))
    for b in batches[1:]:
        for s, lv in (("two_forward", None), ("single_forward", sparse_levels(Nmax)), ("tidar", None)):
            grid.append(dict(sampler=s, block_size=Nmax, levels=lv, acceptance="greedy", batch=b))
    return grid


def _sampler_options(cfg: dict):
    """(the registered sampler, its DecodeOptions) of one grid configuration."""
    from zaya.decode import samplers as registry
    smp = registry.get(cfg["sampler"])
    return smp, smp.options(**_opts(cfg))


def label(cfg: dict) -> str:
    """The configuration's name in the tables (the registered sampler's ``label``), e.g. 'TF K=16'."""
    smp, o = _sampler_options(cfg)
    return smp.describe(o)[0]


def layout_name(cfg: dict) -> str:
    """The layout's name in the plots (the registered sampler's ``layout``), e.g. 'SF sparse'."""
    smp, o = _sampler_options(cfg)
    return smp.describe(o)[1]


# --------------------------------------------------------------------------------------------------------------
# Model and prompts.

def load_model(model_path: str | None = None, preset: str = "tiny", dtype: str | None = None, seed: int = 0):
    """(model, description). A folder is loaded with zaya.load; otherwise random weights of ``preset``."""
    if model_path:
        import zaya
        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"{model_path}: not a checkpoint folder")
        m = zaya.load(model_path, dtype=dtype or common.bench_dtype())
        return m, f"checkpoint {model_path} ({common.config_summary(m.config)})"
    m = common.random_model(preset, dtype, seed=seed, std=0.3)
    return m, (f"RANDOM weights, preset {preset} ({common.config_summary(m.config)}); acceptance is meaningless "
               "for random weights, only the cost side (forwards, query tokens, time per step) is informative")


def make_prompts(cfg, n: int, source: str = "auto", seed: int = 0, length: int = 32,
                 task_max_len: int = 8, task_set: str = "short") -> tuple[list[list[int]], str]:
    """n prompts: 'tasks' (byte-encoded generated tasks of the held-out 'val' split, BOS first, from ``task_set``:
    'short' answers of 1-8 tokens or 'long' ones of 20-100, ``zaya.data.tasks.TASK_SETS``), 'random' ids, or
    'auto' (tasks when the vocab is the byte tokenizer's 261 ids, possibly padded: 261 <= vocab < 325)."""
    if source == "auto":
        source = "tasks" if BYTE_VOCAB <= cfg.vocab_size < BYTE_VOCAB + 64 else "random"
    if source == "tasks":
        from zaya.data import tasks
        from zaya.data.tokenizer import ByteTokenizer
        tok = ByteTokenizer()
        items = tasks.generate(n, seed=seed, kinds=tasks.kinds_of(task_set), split="val", max_len=task_max_len)
        what = f"strings up to {task_max_len}" if task_set == "short" else "answers of 20-100 tokens"
        return ([[tok.bos_id] + tok.encode(t["prompt"]) for t in items],
                f"{n} generated {task_set} tasks (held-out split, seed {seed}, {what}), bytes")
    rng = np.random.default_rng(seed)
    hi = min(cfg.vocab_size, 1 << 30)
    return ([[cfg.bos_token_id] + rng.integers(5, hi, length - 1).tolist() for _ in range(n)],
            f"{n} random-id prompts of {length} tokens (seed {seed})")


# --------------------------------------------------------------------------------------------------------------
# One configuration against AR.

def _opts(cfg: dict) -> dict:
    o = dict(block_size=cfg.get("block_size"), acceptance=cfg.get("acceptance", "greedy"))
    if cfg.get("levels") is not None:
        o["levels"] = tuple(cfg["levels"])
    for k in ("mix_weight", "anchor", "draft_temperature", "block_causal"):
        if cfg.get(k) is not None:
            o[k] = cfg[k]
    return o


def pooled(results) -> dict:
    """One stats dict for several ``zaya.generate`` results (consecutive batches of one prompt set): sums of tokens,
    forwards, steps and seconds; acceptance and tokens/step pooled from the raw counts."""
    st = [r.stats for r in results]
    tok, rows = sum(s["tokens"] for s in st), sum(len(r.tokens) for r in results)
    out = {"tokens": tok, "rows": rows, "forwards": sum(s["forwards"] for s in st),
           "steps": sum(s["steps"] for s in st),
           "seconds": sum(s["seconds"] for s in st), "prefill_seconds": sum(s["prefill_seconds"] for s in st),
           "row_forwards": sum(s["row_forwards"] for s in st)}
    made = tok - sum(s["prefill_tokens"] for s in st)  # tokens the decode forwards produced
    out.update(tokens_per_forward=made / max(out["row_forwards"], 1),  # per forward per active row
               tokens_per_forward_batch=made / max(sum(s["forwards"] * len(r.tokens) for s, r in zip(st, results)), 1))
    if all("counts" in s for s in st):
        c = [s["counts"] for s in st]
        reached = np.sum([x["reached"] for x in c], 0)
        accepted = np.sum([x["accepted"] for x in c], 0)
        committed, row_steps = sum(x["committed"] for x in c), sum(x["row_steps"] for x in c)
        q = st[0]["query_tokens_per_step"]
        out.update(tokens_per_step=committed / max(row_steps, 1),
                   tokens_per_step_hist=np.sum([s["tokens_per_step_hist"] for s in st], 0).tolist(),
                   acceptance_per_position=(accepted / np.maximum(reached, 1)).tolist(),
                   acceptance_reached=reached.tolist(), query_tokens_per_step=q,
                   useful_slot_fraction=committed / max(row_steps * q, 1))
    return out


def oracle_steps(results, per_step: int, first_free: int = 1) -> int:
    """The fewest sampler steps that could produce these outputs: perfect drafts commit ``per_step`` tokens per row
    and step, ``first_free`` tokens per row come with the prefill, and a batch steps until its longest row is done."""
    return sum(max((-(-max(len(t) - first_free, 0) // per_step) for t in r.tokens), default=0) for r in results)


def set_pad(prompts, multiple: int = 16) -> int:
    """The padded prompt length shared by every batch of ``prompts``: the longest, rounded up to ``multiple``."""
    return -(-max(map(len, prompts)) // multiple) * multiple


def compare(model, prompts, cfg: dict, max_new_tokens: int, repeats: int = 3, temperature: float = 0.0,
            ar_cache: dict | None = None, eos_id: int | None = None, loop: str = "host") -> dict:
    """Run ``cfg`` and AR over all ``prompts`` in batches of ``cfg['batch']`` rows, interleaved ``repeats`` times
    after one warm-up each; pooled stats and medians of the summed decode seconds. Every batch is padded to the
    longest prompt of the set (rounded up to 16), so one compiled prefill and loop serve them all: prompts of
    20-120 tokens would otherwise compile a program per 16-token length bucket, for every sampler."""
    import zaya
    B = cfg["batch"]
    batches = [prompts[i:i + B] for i in range(0, len(prompts), B)]
    pad_to = set_pad(prompts)

    def gen(sampler, **o):
        return [zaya.generate(model, p, sampler=sampler, max_new_tokens=max_new_tokens, temperature=temperature,
                              eos_id=eos_id, loop=loop, pad_to=pad_to, **o) for p in batches]
    key = (len(prompts), B, max_new_tokens, temperature, eos_id, loop)
    ar_cache = {} if ar_cache is None else ar_cache
    if key not in ar_cache:
        ar_cache[key] = gen("ar")  # warm-up/compile and the reference tokens
    ar_ref = ar_cache[key]
    res = gen(cfg["sampler"], **_opts(cfg))  # warm-up/compile
    ar_s, ar_pre, s_s, s_pre = [], [], [], []
    for _ in range(repeats):
        a = pooled(gen("ar"))
        r = pooled(gen(cfg["sampler"], **_opts(cfg)))
        ar_s.append(a["seconds"])
        ar_pre.append(a["prefill_seconds"])
        s_s.append(r["seconds"])
        s_pre.append(r["prefill_seconds"])
    st, ar_st = pooled(res), pooled(ar_ref)
    equal_rows = [a == b for x, y in zip(ar_ref, res) for a, b in zip(x.tokens, y.tokens)]
    sec, ar_sec = statistics.median(s_s), statistics.median(ar_s)
    step_s, ar_step_s = sec / max(st["steps"], 1), ar_sec / max(ar_st["steps"], 1)
    # With perfect drafts (every block fully accepted), at this layout's measured cost per step: how much of the gap
    # to AR is drafting quality and how much is the step's cost on this machine.
    smp, o = _sampler_options(cfg)
    perfect = None if smp.perfect_tokens_per_step is None else smp.perfect_tokens_per_step(o)
    best = None if perfect is None else oracle_steps(res, perfect)
    e2e, ar_e2e = statistics.median(np.add(s_s, s_pre)), statistics.median(np.add(ar_s, ar_pre))
    return {
        "config": label(cfg), "layout": layout_name(cfg), "sampler": cfg["sampler"], "block_size": cfg["block_size"],
        "levels": None if cfg.get("levels") is None else ",".join(map(str, cfg["levels"])),
        "acceptance": cfg.get("acceptance", "greedy") + ("" if cfg.get("mix_weight") is None
                                                         else f"+mix{cfg['mix_weight']}"),
        "batch": B, "prompts": len(prompts), "max_new_tokens": max_new_tokens, "temperature": temperature,
        "loop": loop,
        "tokens": st["tokens"], "forwards": st["forwards"], "steps": st["steps"],
        "tokens_per_forward": st["tokens_per_forward"], "tokens_per_forward_batch": st["tokens_per_forward_batch"],
        "tokens_per_step": st.get("tokens_per_step"),
        "tokens_per_step_hist": st.get("tokens_per_step_hist"),
        "acceptance_per_position": st.get("acceptance_per_position"),
        "acceptance_reached": st.get("acceptance_reached"),
        "useful_slot_fraction": st.get("useful_slot_fraction"),
        "query_tokens_per_step": st.get("query_tokens_per_step"),
        "seconds": sec, "ar_seconds": ar_sec, "ms_per_step": 1e3 * step_s,
        "ar_ms_per_step": 1e3 * ar_step_s,
        "tokens_per_s": st["tokens"] / sec, "ar_tokens_per_s": ar_st["tokens"] / ar_sec,
        "speedup": ar_sec / sec, "speedup_e2e": ar_e2e / e2e, "oracle_steps": best,
        "speedup_oracle": None if not best else ar_sec / (step_s * best),
        # tokens/step at which this layout's step would match AR's time per token on this machine
        "breakeven_tokens_per_step": step_s / ar_step_s,
        "equal_ar": all(equal_rows), "rows_equal_ar": float(np.mean(equal_rows)),
        "seconds_all": s_s, "ar_seconds_all": ar_s, "repeats": repeats,
    }


# --------------------------------------------------------------------------------------------------------------
# The sweep.

COLUMNS = ["config", "acceptance", "batch", ("tokens_per_forward", "tok/fwd", ".2f"),
           ("tokens_per_step", "tok/step", ".2f"), ("useful_slot_fraction", "useful slots", ".3f"),
           ("query_tokens_per_step", "query tok/step/row"), ("ms_per_step", "ms/step", ".2f"),
           ("ar_ms_per_step", "AR ms/step", ".2f"), ("breakeven_tokens_per_step", "break-even tok/step", ".1f"),
           ("speedup", "speedup (decode)", ".2f"), ("speedup_oracle", "bound: perfect drafts", ".2f"),
           ("speedup_e2e", "speedup (+prefill)", ".2f"), ("equal_ar", "= AR")]


def run(model_path: str | None = None, out: str | None = None, quick: bool = False, grid: list[dict] | None = None,
        block_sizes=None, batches=None, acceptances=None, prompts: str = "auto", max_new_tokens: int | None = None,
        repeats: int | None = None, preset: str = "tiny", dtype: str | None = None, seed: int = 0,
        temperature: float = 0.0, compile_cache: bool | str = False, prompt_len: int = 32,
        anchor: str | None = None, num_prompts: int | None = None, eos_stop: bool | None = None,
        task_max_len: int = 8, loop: str = "host", task_set: str = "short") -> list[dict]:
    """Run the sweep; print the table, write samplers.md/.csv/.json and figures into ``out``; return the rows.

    Every configuration decodes the same ``num_prompts`` prompts (default: the largest batch) in batches of its
    ``batch``. ``eos_stop`` (default: on for task prompts) ends a row at EOS, i.e. at the end of the task's answer;
    off, every row decodes the full budget. ``loop``: zaya.generate's decode loop for every sampler, AR included
    ("host": one dispatch and sync per step; "device": one lax.while_loop, no per-step host overhead).
    ``task_set``: with task prompts, 'short' or 'long' answers (each row records it)."""
    if compile_cache:  # scoped to this run (the CLI scopes it to the whole command)
        with common.compile_cache(None if compile_cache is True else compile_cache):
            return run(**{**locals(), "compile_cache": False})
    grid = grid or default_grid(quick, block_sizes, batches, acceptances, anchor)
    max_new_tokens = max_new_tokens or (12 if quick else 64)
    repeats = repeats or (1 if quick else 3)
    m = common.machine()
    model, model_desc = load_model(model_path, preset, dtype, seed)
    n = max([c["batch"] for c in grid] + [num_prompts or 0])
    all_prompts, prompt_desc = make_prompts(model.config, n, prompts, seed, prompt_len, task_max_len, task_set)
    if eos_stop is None:
        eos_stop = "tasks" in prompt_desc
    eos_id = model.config.eos_token_id if eos_stop else None
    rows, ar_cache = [], {}
    for i, cfg in enumerate(grid):
        print(f"[bench samplers] {i + 1}/{len(grid)} {label(cfg)} {cfg.get('acceptance', 'greedy')} "
              f"batch {cfg['batch']}", flush=True)
        rows.append(compare(model, all_prompts, cfg, max_new_tokens, repeats, temperature, ar_cache, eos_id, loop))
        rows[-1]["task_set"] = task_set if "tasks" in prompt_desc else None
    md = markdown(rows, m, model_desc, prompt_desc, max_new_tokens, repeats, temperature, eos_id, loop)
    print(md, flush=True)
    if out:
        meta = {"machine": m, "model": model_desc, "prompts": prompt_desc, "max_new_tokens": max_new_tokens,
                "repeats": repeats, "temperature": temperature, "loop": loop}
        common.write_outputs(out, "samplers", md, {**meta, "rows": rows},
                             {"": [{k: v for k, v in r.items() if not k.endswith("_all")} for r in rows]})
        plot(rows, out)
    return rows


def markdown(rows, m, model_desc, prompt_desc, max_new_tokens, repeats, temperature, eos_id=None,
             loop: str = "host") -> str:
    acc_rows = [dict(config=r["config"], acceptance=r["acceptance"], batch=r["batch"],
                     per_position=" ".join(f"{p:.2f}" for p in (r["acceptance_per_position"] or [])),
                     hist=" ".join(map(str, r["tokens_per_step_hist"] or []))) for r in rows]
    return "\n".join([
        "## Block samplers vs AR (side by side, same model, prompts and batch)", "",
        common.machine_markdown(m),
        f"- model: {model_desc}", f"- prompts: {prompt_desc}",
        f"- at most {max_new_tokens} new tokens per row, temperature {temperature}, "
        + ("no EOS stop" if eos_id is None else f"rows stop at EOS (id {eos_id}): the end of each answer")
        + f"; decode loop: {loop} (" + ("one lax.while_loop per generate call" if loop == "device" else
                                         "Python, one dispatch and host sync per step") + ")"
        + f"; every config decodes all prompts in batches of its batch size; medians of {repeats} interleaved runs "
        "(AR, config) after a warm-up; compile excluded", "",
        common.md_table(rows, COLUMNS), "",
        "tok/fwd: committed tokens per forward per active row (every forward after the prefill, charged only to "
        "the rows still generating when it ran; mask-anchored samplers draft their first block in the prefill "
        "forward); tok/step: per sampler step "
        "(TF = 2 forwards); useful slots: committed tokens / query tokens computed; break-even tok/step: ms/step / AR "
        "ms/step, the tokens per step this layout needs to match AR on this machine; speedup (decode): AR decode-loop "
        "seconds / config decode-loop seconds; bound: the decode speedup if every block were fully accepted (the "
        "fewest steps that produce the same outputs, at this layout's measured ms/step); (+prefill) adds the prefill "
        "and the samplers' initial drafting "
        "forward; = AR: every row's tokens equal AR's (greedy lossless check).", "",
        common.md_table(acc_rows, ["config", "acceptance", "batch", ("per_position", "acceptance per draft position"),
                                   ("hist", "tokens/step histogram (0,1,2,..)")],
                        "acceptance per position and tokens-per-step histograms"),
    ])


def _bound(ax, xs, rows, color):
    """The perfect-draft bound of the same rows, dashed in the line's colour (where the layout has one)."""
    ys = [r.get("speedup_oracle") for r in rows]
    if any(y is not None for y in ys):
        ax.plot(xs, [np.nan if y is None else y for y in ys], "x--", color=color, alpha=0.6, lw=1, ms=4)


def plot(rows, out, min_reached: int = 5):
    plt = common.pyplot()
    if plt is None or not rows:
        return
    # 1. acceptance per position (and tokens/step histogram) for the configs at the largest block size.
    Kmax = max(r["block_size"] for r in rows)
    sel = [r for r in rows if r["block_size"] == Kmax and r["acceptance_per_position"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in sel:
        name = f"{r['config']} {r['acceptance']} B={r['batch']}"
        h = np.asarray(r["tokens_per_step_hist"], float)  # steps committing c = accepted + 1 tokens
        acc = np.asarray(r["acceptance_per_position"], float)
        reached = np.array([h[k:].sum() for k in range(1, len(acc) + 1)])  # steps that verified draft k
        a1.plot(np.arange(1, len(acc) + 1), np.where(reached >= min_reached, acc, np.nan), "o-", ms=3, label=name)
        a2.plot(range(len(h)), np.where(h > 0, h / max(h.sum(), 1), np.nan), "o-", ms=3, label=name)
    a1.set_xlabel(f"draft position k (shown where >= {min_reached} steps reached it)")
    a1.set_ylabel("P(accept k | first k-1 accepted)")
    a2.set_yscale("log")
    a1.set_ylim(-0.02, 1.02)
    a1.set_xlim(0.5, Kmax + 0.5)
    a1.set_title(f"acceptance per position (K={Kmax})")
    a2.set_xlabel("tokens committed per step")
    a2.set_ylabel("fraction of steps")
    a2.set_title("tokens per step")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "samplers_acceptance.png"), dpi=120)
    plt.close(fig)
    # 2. speedup against block size (batch = smallest, greedy) and 3. against batch (largest K, greedy).
    b0 = min(r["batch"] for r in rows)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for lay in dict.fromkeys(r["layout"] for r in rows):
        rr = sorted((r for r in rows if r["layout"] == lay and r["batch"] == b0 and r["acceptance"] == "greedy"),
                    key=lambda r: r["block_size"])
        if rr:
            ln = a1.plot([r["block_size"] for r in rr], [r["speedup"] for r in rr], "o-", label=lay)[0]
            _bound(a1, [r["block_size"] for r in rr], rr, ln.get_color())
        rr = sorted((r for r in rows if r["layout"] == lay and r["block_size"] == Kmax and r["acceptance"] == "greedy"),
                    key=lambda r: r["batch"])
        if rr:
            ln = a2.plot([r["batch"] for r in rr], [r["speedup"] for r in rr], "o-", label=lay)[0]
            _bound(a2, [r["batch"] for r in rr], rr, ln.get_color())
    for a, xl, t in ((a1, "block size K", f"speedup vs block size (batch {b0}, greedy)"),
                     (a2, "batch", f"speedup vs batch (K={Kmax}, greedy)")):
        a.axhline(1.0, color="k", lw=0.8, ls=":")
        a.set_xscale("log", base=2)
        a.set_xlabel(xl)
        a.set_ylabel("wall-clock speedup over AR (dashed: perfect drafts)")
        a.set_title(t)
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "samplers_speedup.png"), dpi=120)
    plt.close(fig)

"""The roofline report: predicted-vs-measured forward costs on this CPU, the ZAYA1-8B speedup tables, the knee
table, the sensitivity table and the speedup-vs-batch plot, from the pure model in ``zaya.bench.roofline_model``.

Formulas, hardware sources and the ZAYA1-8B tables: experiments/results/roofline.md.
CLI: python -m zaya.bench.roofline [--out DIR] [--forward-json forward.json] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from zaya.bench.roofline_model import (GPU_OVERHEAD, HARDWARE, Hardware, fit_efficiency, fits, forward_cost,
                                       knee_tokens, step_cost)


def measure_cpu(size_mb: int = 256, matmul: int = 1024, repeats: int = 5) -> Hardware:
    """This machine as a Hardware: DRAM bandwidth from a numpy copy (read + write bytes), fp32 FLOP/s from a jitted
    matmul (best of sizes matmul and 2*matmul), overhead from an empty jitted call. Medians of repeats."""
    import jax
    import jax.numpy as jnp

    n = size_mb * 2**20 // 8
    src = np.ones(n, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    bw = 2 * src.nbytes / float(np.median(ts))
    best = 0.0
    for m in (matmul, 2 * matmul):
        a = jnp.ones((m, m), jnp.float32)
        f = jax.jit(lambda x, y: x @ y)
        f(a, a).block_until_ready()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, a).block_until_ready()
            ts.append(time.perf_counter() - t0)
        best = max(best, 2 * m**3 / float(np.median(ts)))
    g = jax.jit(lambda x: x + 1)
    x = jnp.ones((8,), jnp.float32)
    g(x).block_until_ready()
    ts = []
    for _ in range(50):
        t0 = time.perf_counter()
        g(x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    from zaya.bench.common import _cpu_model
    return Hardware(f"CPU {_cpu_model()} (measured)", bw, best, None, float(np.median(ts)),
                    f"measured: numpy copy {size_mb} MiB (2x bytes / time), jitted fp32 matmul {matmul}/{2 * matmul}")


# --------------------------------------------------------------------------------------------------------------
# Tables.

def knee_table(hardware=("H100", "H200", "MI300X", "MI355X"), batches=(1, 16, 64), contexts=(4096, 32768, 131072)):
    """ZAYA1-8B bf16: query tokens per row at which one forward turns compute-bound."""
    from zaya.config import preset
    c = preset("zaya1-8b", dtype="bfloat16")
    rows = []
    for hn in hardware:
        hw = HARDWARE[hn]
        r = {"hw": hn, "ridge": hw.ridge}
        for L in contexts:
            for B in batches:
                r[f"{L // 1024}k B={B}"] = knee_tokens(c, hw, L, batch=B)
        rows.append(r)
    return rows


LAYOUTS_8B = [("TF K=16", "two_forward", None), ("SF 0,4,7,11", "single_forward", (0, 4, 7, 11)),
              ("SF dense", "single_forward", None), ("TiDAR b=16", "tidar", None)]


def zaya8b_table(hardware=("H100", "H200", "MI300X", "MI355X"), batches=(1, 4, 16, 64, 256),
                 contexts=(4096, 32768, 131072), beta: float = 0.85, K: int = 16, overhead: float | None = None,
                 layouts=LAYOUTS_8B) -> list[dict]:
    from zaya.config import preset
    c = preset("zaya1-8b", dtype="bfloat16")
    rows = []
    for hn in hardware:
        hw = HARDWARE[hn] if overhead is None else dataclasses.replace(HARDWARE[hn], overhead=overhead)
        for L in contexts:
            for B in batches:
                ar = forward_cost(c, hw, B, 1, L)
                r = {"hw": hn, "context": L, "batch": B, "fits": fits(c, hw, B, L),
                     "ar_ms": 1e3 * ar["seconds"], "ar_bound": ar["bound"], "ar_tok_s": B / ar["seconds"]}
                for name, s, lv in layouts:
                    st = step_cost(c, hw, s, B, L, K, lv, beta)
                    r[name] = st["speedup"]
                    r[name + " ratio"] = st["cost_ratio"]
                    r[name + " bound"] = st["bound"]
                rows.append(r)
    return rows


def zaya8b_markdown(rows, layouts=LAYOUTS_8B) -> str:
    head = ["accel", "context", "B", "AR ms/step", "AR bound"] + [f"{n} (ratio)" for n, _, _ in layouts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = "" if r["fits"] else " †"
        cells = [r["hw"], f"{r['context'] // 1024}k", f"{r['batch']}{mark}", f"{r['ar_ms']:.2f}", r["ar_bound"]]
        for n, _, _ in layouts:
            b = "c" if "compute" in r[n + " bound"] else "m"
            cells.append(f"**{r[n]:.2f}**× ({r[n + ' ratio']:.1f}, {b})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sensitivity(hw_name: str = "MI355X", batch: int = 16, context: int = 131072, betas=(0.7, 0.8, 0.85, 0.9, 0.95),
                overheads=(0.0, GPU_OVERHEAD, 1e-3), layouts=LAYOUTS_8B) -> list[dict]:
    """ZAYA1-8B speedup bounds at one point for several acceptance rates and fixed overheads."""
    from zaya.config import preset
    c = preset("zaya1-8b", dtype="bfloat16")
    rows = []
    for ovh in overheads:
        hw = dataclasses.replace(HARDWARE[hw_name], overhead=ovh)
        for beta in betas:
            r = {"hw": hw_name, "context": context, "batch": batch, "overhead_ms": 1e3 * ovh, "beta": beta}
            for name, smp, lv in layouts:
                st = step_cost(c, hw, smp, batch, context, 16, lv, beta)
                r[name] = st["speedup"]
                r[name + " tok/step"] = st["tokens_per_step"]
            rows.append(r)
    return rows


def cpu_comparison(forward_rows: list[dict], hw: Hardware, moe: str = "dense",
                   materialized_scores: bool = True) -> list[dict]:
    """Predicted vs measured forward-cost ratios (rows from zaya.bench.forward.cost_ratio, with a 'preset' key).

    Bytes and FLOPs 'as implemented' (defaults: CPU): every expert on every token (moe='dense': jax lowers
    ragged_dot densely on CPU; use moe='distinct' for accelerators), the reference attention over every allocated
    cache slot with its scores in memory. Three predictions:
      pure_ratio    the roofline at this machine's measured peaks (copy bandwidth, large-matmul FLOP/s, empty-call
                    overhead);
      fit_ratio     the same max() roofline with bandwidth, FLOP/s and overhead fitted to the preset's measured
                    times (fit_* columns: the efficiencies XLA:CPU reaches on these shapes);
      ideal_ratio   ideal kernels at the measured peaks (only the experts hit, context = cache length, scores on
                    chip, no overhead)."""
    from zaya.config import preset
    out = []
    for name in dict.fromkeys(r["preset"] for r in forward_rows):
        rr = sorted((r for r in forward_rows if r["preset"] == name), key=lambda r: r["T"])
        c = preset(name, dtype=rr[0].get("dtype", "float32"))
        ctx, B = rr[0]["cache_slots"], rr[0]["batch"]
        pure = [forward_cost(c, hw, B, r["T"], ctx, moe=moe, materialized_scores=materialized_scores) for r in rr]
        nohw = dataclasses.replace(hw, overhead=0.0)
        ideal = [forward_cost(c, nohw, B, r["T"], rr[0]["cache_len"]) for r in rr]
        meas = [r["ms"] / 1e3 for r in rr]
        fit = None
        if len(rr) >= 3:
            W, F, o, err = fit_efficiency([p["bytes"] for p in pure], [p["flops"] for p in pure], meas,
                                          hw.bandwidth, hw.peak_flops)
            fhw = Hardware("fit", W, F, overhead=o)
            fit = [forward_cost(c, fhw, B, r["T"], ctx, moe=moe, materialized_scores=materialized_scores)
                   for r in rr]
        for i, r in enumerate(rr):
            p = pure[i]
            row = {"preset": name, "T": r["T"], "measured_ms": r["ms"], "measured_ratio": r["ratio"],
                   "measured_ratio_min": r.get("ratio_min"), "mbytes": p["bytes"] / 1e6, "gflops": p["flops"] / 1e9,
                   "pure_ms": 1e3 * p["seconds"], "pure_ratio": p["seconds"] / pure[0]["seconds"],
                   "pure_bound": p["bound"], "ideal_ratio": ideal[i]["seconds"] / ideal[0]["seconds"],
                   "achieved_gb_s": p["bytes"] / meas[i] / 1e9, "achieved_gflop_s": p["flops"] / meas[i] / 1e9}
            if fit is not None:
                row.update(fit_ms=1e3 * fit[i]["seconds"], fit_ratio=fit[i]["seconds"] / fit[0]["seconds"],
                           fit_bound=fit[i]["bound"], fit_gb_s=W / 1e9, fit_gflop_s=F / 1e9, fit_overhead_ms=1e3 * o,
                           fit_max_rel_err=err)
            out.append(row)
    return out


def plot_speedup_vs_batch(out: str, beta: float = 0.85, contexts=(4096, 32768, 131072),
                          batches=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> str | None:
    """Speedup bound vs batch: one panel per (context, accelerator), one line per layout; hollow markers where
    the weights and KV cache do not fit in one device's memory."""
    from zaya.bench.common import pyplot
    plt = pyplot()
    if plt is None:
        return None
    from zaya.config import preset
    c = preset("zaya1-8b", dtype="bfloat16")
    accs = ("H100", "H200", "MI300X", "MI355X")
    fig, axes = plt.subplots(len(contexts), len(accs), figsize=(4 * len(accs), 3.2 * len(contexts)), sharex=True,
                             sharey=True, squeeze=False)
    for i, L in enumerate(contexts):
        for j, hn in enumerate(accs):
            ax, hw = axes[i, j], HARDWARE[hn]
            for k, (name, s, lv) in enumerate(LAYOUTS_8B):
                ys = [step_cost(c, hw, s, b, L, 16, lv, beta)["speedup"] for b in batches]
                ok = [fits(c, hw, b, L) for b in batches]
                ax.plot(batches, ys, "-", color=f"C{k}", label=name if (i, j) == (0, 0) else None)
                ax.scatter([b for b, o in zip(batches, ok) if o], [y for y, o in zip(ys, ok) if o], s=12,
                           color=f"C{k}")
                ax.scatter([b for b, o in zip(batches, ok) if not o], [y for y, o in zip(ys, ok) if not o], s=12,
                           facecolors="none", edgecolors=f"C{k}")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.set_title(f"{hn}, context {L // 1024}k", fontsize=9)
            if i == len(contexts) - 1:
                ax.set_xlabel("batch")
            if j == 0:
                ax.set_ylabel("speedup bound over AR")
    fig.suptitle(f"ZAYA1-8B bf16, K=16, i.i.d. acceptance beta={beta} (hollow: does not fit in device memory)",
                 fontsize=10)
    fig.legend(loc="lower center", ncol=len(LAYOUTS_8B), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    p = os.path.join(out, "roofline_speedup_vs_batch.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--forward-json", default=None, help="forward.json from `zaya bench forward --out` (else measure)")
    ap.add_argument("--beta", type=float, default=0.85)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    run(a.out, a.forward_json, a.beta, a.quick)


def run(out: str | None = None, forward_json: str | None = None, beta: float = 0.85, quick: bool = False) -> dict:
    """CPU measurement + predicted-vs-measured forward-cost ratios + the ZAYA1-8B table and plot."""
    from zaya.bench import common
    m = common.machine()
    cpu = measure_cpu(64 if quick else 256, 256 if quick else 1024, 3 if quick else 7)
    if forward_json and os.path.exists(forward_json):
        with open(forward_json) as f:
            fwd = json.load(f)["ratio"]
    else:
        from zaya.bench import forward
        fwd = forward.run(("tiny",) if quick else ("tiny", "small-100m"), None, quick)["ratio"]
    cmp_rows = cpu_comparison(fwd, cpu)
    rows = zaya8b_table(batches=(1, 4) if quick else (1, 4, 16, 64, 256),
                        contexts=(4096,) if quick else (4096, 32768, 131072), beta=beta)
    parts = ["## Roofline model", "", common.machine_markdown(m),
             f"- measured CPU: {cpu.bandwidth / 1e9:.1f} GB/s copy bandwidth, {cpu.peak_flops / 1e9:.1f} GFLOP/s "
             f"fp32 matmul, {1e6 * cpu.overhead:.0f} µs empty jitted call; ridge {cpu.ridge:.1f} FLOP/byte", "",
             common.md_table(cmp_rows, ["preset", "T", ("measured_ms", "measured ms", ".2f"),
                                        ("measured_ratio", "measured t(T)/t(1)", ".2f"),
                                        ("measured_ratio_min", "ratio of min times", ".2f"),
                                        ("pure_ratio", "roofline at peaks", ".2f"), ("pure_bound", "bound"),
                                        ("fit_ratio", "roofline, fitted efficiencies", ".2f"),
                                        ("fit_ms", "fitted ms", ".2f"), ("ideal_ratio", "ideal kernels", ".2f"),
                                        ("mbytes", "MB moved", ".1f"), ("gflops", "GFLOP", ".3f"),
                                        ("achieved_gb_s", "achieved GB/s", ".1f"),
                                        ("achieved_gflop_s", "achieved GFLOP/s", ".1f")],
                             "forward-cost ratio on this CPU: predicted vs measured"), "",
             "", "fitted efficiencies (t = overhead + max(bytes / W, FLOPs / F), least squares on log time): " +
             "; ".join(f"{r['preset']}: W = {r['fit_gb_s']:.1f} GB/s, F = {r['fit_gflop_s']:.1f} GFLOP/s, "
                       f"overhead = {r['fit_overhead_ms']:.2f} ms (largest error {100 * r['fit_max_rel_err']:.0f}%)"
                       for r in cmp_rows
                       if "fit_gb_s" in r and r["T"] == min(x["T"] for x in cmp_rows if x["preset"] == r["preset"])),
             "", f"### ZAYA1-8B bf16, speedup bound over AR (beta={beta}, K=16)", "", zaya8b_markdown(rows), ""]
    knees = knee_table()
    parts += [common.md_table(knees, [("hw", "accel"), ("ridge", "ridge FLOP/B", ".0f")] + list(knees[0])[2:],
                              "ZAYA1-8B: query tokens per row at which one forward turns compute-bound"), ""]
    sens = []
    for hn, B, L in (("H100", 1, 4096), ("H100", 16, 32768), ("MI355X", 16, 131072)):
        sens += sensitivity(hn, B, L, betas=(0.85,) if quick else (0.7, 0.85, 0.95))
    cols = ["hw", "context", "batch", ("overhead_ms", "overhead ms", ".1f"), "beta"] + \
        [(n, n, ".2f") for n, _, _ in LAYOUTS_8B]
    parts += [common.md_table(sens, cols, "sensitivity: acceptance beta and fixed per-forward overhead"), ""]
    md = "\n".join(parts)
    print(md)
    res = {"machine": m, "cpu": dataclasses.asdict(cpu), "comparison": cmp_rows, "zaya8b": rows, "knees": knees,
           "sensitivity": sens}
    if out:
        common.write_outputs(out, "roofline", md, res, {"cpu": cmp_rows, "zaya8b": rows, "knees": knees,
                                                        "sensitivity": sens})
        plot_speedup_vs_batch(out, beta)
    return res


if __name__ == "__main__":
    main()

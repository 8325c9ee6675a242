"""End to end: a tiny AR pretraining run learns, writes its logs/plots/model; TiDAR conversion from that model
resumes after ``kill -9`` (during an async save, and between checkpoints) with exactly the uninterrupted loss
trajectory, one log record per step and the newest N checkpoints; evaluation and the ablation runner."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from zaya.train import configs
from zaya.train.logs import read_jsonl

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EXP = os.path.join(ROOT, "experiments")
# small and quick to compile (XLA opt level 0); the trajectory checks do not depend on the XLA options
QUIET = ["log.progress=false", "data.tasks_fraction=0.0", "data.num_threads=1", "model.num_layers=1",
         "impl.fast_compile=true"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(a) in-process: 30 AR steps of the tiny MoE on Shakespeare; its WORKDIR/model feeds the later phases."""
    from zaya.train.loop import train
    wd = str(tmp_path_factory.mktemp("pretrain"))
    cfg = configs.load(os.path.join(EXP, "pretrain_ar.py:tiny"),
                       ["num_steps=30", "optim.warmup_steps=3", "checkpoint.every_steps=15", "eval.every_steps=15",
                        "eval.num_batches=1", *QUIET])
    return wd, train(cfg, wd)


def test_tiny_pretraining_learns_and_writes_outputs(pretrained):
    wd, summary = pretrained
    rows = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 31))
    losses = np.array([r["loss"] for r in rows])
    assert losses[0] > np.log(200)                       # starts near uniform over the byte vocab
    assert losses[-5:].mean() < losses[0] - 1.0           # and learns
    assert summary["eval"]["ar_loss"] < losses[0] - 1.0   # held-out too
    assert len(read_jsonl(os.path.join(wd, "eval.jsonl"))) == 2  # step 15 and the end
    assert summary["tokens_per_s"] > 0 and summary["steps"] == 30
    for key in ("expert_counts", "skip_rate", "grad_norm", "lr"):
        assert key in rows[-1]
    assert np.asarray(rows[-1]["expert_counts"]).shape == (1, 5)   # [layers, experts + skip]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["15", "30"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(os.path.join(wd, "tb"), size_guidance={"scalars": 0, "histograms": 0})
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == list(range(1, 31))
    assert tb.Scalars("train/loss")[-1].value == pytest.approx(losses[-1])
    usage = tb.Histograms("train/expert_counts/0")[-1].histogram_value   # expert-usage histogram, last = skip
    assert usage.num == pytest.approx(sum(rows[-1]["expert_counts"][0])) and len(usage.bucket) == 5
    assert "train/skip_rate/0" in tb.Tags()["scalars"]
    assert os.path.exists(os.path.join(wd, "plots", "loss.png"))
    assert os.path.exists(os.path.join(wd, "plots", "expert_usage.png"))


def test_rerun_of_a_finished_workdir_resumes_without_training(pretrained):
    from zaya.train.loop import train
    wd, first = pretrained
    cfg = configs.load(os.path.join(EXP, "pretrain_ar.py:tiny"),
                       ["num_steps=30", "optim.warmup_steps=3", "checkpoint.every_steps=15", "eval.every_steps=15",
                        "eval.num_batches=1", "log.plots=false", *QUIET])
    again = train(cfg, wd)
    assert again["resumed_from"] == 30 and again["steps"] == 30
    assert again["final"]["loss"] == pytest.approx(first["final"]["loss"])  # from the log: ablation tables
    assert again["eval"]["ar_loss"] == pytest.approx(first["eval"]["ar_loss"], rel=1e-6)
    assert [r["step"] for r in read_jsonl(os.path.join(wd, "metrics.jsonl"))] == list(range(1, 31))
    assert [r["step"] for r in read_jsonl(os.path.join(wd, "eval.jsonl"))] == [15, 30]


def test_exported_model_loads_and_exports(pretrained, tmp_path):
    import zaya
    from zaya.convert.cli import export
    wd, _ = pretrained
    m = zaya.load(os.path.join(wd, "model"))
    assert m.config.vocab_size == 264 and m.config.num_layers == 1
    logits = m.logits(np.array([[2, 40, 41, 42]]))
    assert logits.shape == (1, 4, 264) and np.isfinite(logits).all()
    export(os.path.join(wd, "model"), str(tmp_path / "hf"))
    assert os.path.exists(tmp_path / "hf" / "config.json")


def test_trained_model_folder_carries_its_byte_tokenizer_so_text_prompts_work(pretrained, capsys):
    """`zaya generate DIR/model --prompt "12+35="` on a model trained with the byte tokenizer: the folder's
    tokenizer.json encodes the prompt as the training data was encoded (BOS + bytes) and decodes the output."""
    from zaya.cli import run
    from zaya.data.tokenizer import ByteTokenizer
    wd, _ = pretrained
    model = os.path.join(wd, "model")
    assert os.path.isfile(os.path.join(model, "tokenizer.json"))
    res = run(["generate", model, "--prompt", "12+35=", "--max-new-tokens", "3", "--no-eos"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("prompt "))
    ids, text = line[len("prompt "):].split(" -> ", 1)
    assert ids == str([2] + ByteTokenizer().encode("12+35="))
    assert len(res.tokens[0]) == 3 and all(5 <= t < 261 for t in res.tokens[0])  # bytes, no specials
    assert text == ByteTokenizer().decode(res.tokens[0])  # text, not ids


def _env(cache):
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT)


def _train_cli(workdir, spec, overrides, cache):
    """``zaya train`` in a subprocess."""
    cmd = [sys.executable, "-m", "zaya.cli", "train", "--config", spec, "--workdir", workdir,
           *[f"--config.{o}" for o in overrides]]
    return subprocess.run(cmd, env=_env(cache), cwd=ROOT, capture_output=True, text=True, timeout=600)


# `train` with a fault injected through its callbacks: SIGKILL after step k (once its pending checkpoint saves are
# committed, so the last checkpoint is step k's or the one before it), or inside step k's async save, before commit.
_KILLED_RUN = """
import os, signal, sys
from zaya.train import configs
from zaya.train.loop import train
spec, workdir, where, k, *overrides = sys.argv[1:]
k = int(k)

def after_step(step, run):
    if where == "after_step" and step == k:
        run.ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)

def before_commit(step):
    if where == "in_save" and step == k:
        os.kill(os.getpid(), signal.SIGKILL)

train(configs.load(spec, overrides), workdir, after_step=after_step, before_commit=before_commit)
"""


def _train_killed(workdir, spec, overrides, cache, where, k):
    cmd = [sys.executable, "-c", _KILLED_RUN, spec, workdir, where, str(k), *overrides]
    return subprocess.run(cmd, env=_env(cache), cwd=ROOT, capture_output=True, text=True, timeout=600)


def _ckpt_dirs(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _steps(workdir):
    return [x["step"] for x in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def converted(pretrained, tmp_path_factory):
    """(b) TiDAR conversion started from (a)'s model folder (as from a `zaya convert` output), 6 steps, checkpoints
    every 2, keep 2: an uninterrupted run, and one killed twice with SIGKILL then finished. Kill 1 lands inside the
    async save of step 4 (files written, not committed); kill 2 right after step 5, between the checkpoints 4 and 6.
    Returns (full workdir, killed workdir, {phase: (checkpoint folder listing, metrics steps)} after each kill)."""
    wd_a, _ = pretrained
    tmp = tmp_path_factory.mktemp("convert")
    spec = os.path.join(EXP, "tidar_convert.py:tiny")
    ov = [f"init_from={wd_a}/model", "num_steps=6", "checkpoint.every_steps=2", "checkpoint.keep=2",
          "optim.warmup_steps=1", "eval.num_batches=0", "log.plots=false", *QUIET]
    cache = str(tmp / "jax_cache")
    full, killed = str(tmp / "full"), str(tmp / "killed")
    r = _train_cli(full, spec, ov, cache)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = {}
    for phase, where, k in (("in_save_4", "in_save", 4), ("after_5", "after_step", 5)):
        r = _train_killed(killed, spec, ov, cache, where, k)
        assert r.returncode == -signal.SIGKILL, (phase, r.returncode, r.stderr[-3000:])
        assert not os.path.exists(os.path.join(killed, "model"))
        seen[phase] = (_ckpt_dirs(killed), _steps(killed))
    r = _train_cli(killed, spec, ov, cache)
    assert r.returncode == 0, r.stderr[-3000:]
    return full, killed, seen


def test_kill9_during_async_save_leaves_last_complete_checkpoint(converted):
    _, _, seen = converted
    dirs, steps = seen["in_save_4"]
    assert dirs[0] == "2" and len(dirs) == 2 and dirs[1].startswith("4.") and "tmp" in dirs[1], dirs  # 4: uncommitted
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4  # the main thread may have gone on a step


def test_kill9_mid_interval_replays_lost_steps_once(converted):
    """The resume after the in-save kill restarts from step 2 (cutting the log back to it), the tmp folder is gone,
    and a kill after step 5 leaves step 5 logged past the last checkpoint (4); the final resume replays it."""
    _, killed, seen = converted
    assert seen["after_5"] == (["2", "4"], [1, 2, 3, 4, 5])
    with open(os.path.join(killed, "summary.json")) as f:
        assert json.load(f)["resumed_from"] == 4


def test_kill9_resume_reproduces_losses_from_converted_checkpoint(converted):
    """After both kills the per-step losses (exactly), logs, kept checkpoints and final params equal the
    uninterrupted run's."""
    import jax
    import zaya
    full, killed, _ = converted
    a, b = read_jsonl(os.path.join(full, "metrics.jsonl")), read_jsonl(os.path.join(killed, "metrics.jsonl"))
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]  # each step exactly once
    for key in ("loss", "ar_loss", "diff_loss", "grad_norm"):  # bitwise: same executables (shared compile cache)
        assert [x[key] for x in b] == [x[key] for x in a], key
    assert a[0]["diff_loss"] > a[0]["ar_loss"]  # the diffusion half starts untrained, the AR half does not
    assert _ckpt_dirs(full) == _ckpt_dirs(killed) == ["4", "6"]  # keep=2: only the newest two, no tmp folders
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(os.path.join(killed, "tb"), size_guidance={"scalars": 0})
    tb.Reload()  # three runs wrote events; the replayed steps 3-5 are there once (the resume's START purges)
    assert [(e.step, e.value) for e in tb.Scalars("train/loss")] == [
        (x["step"], pytest.approx(x["loss"])) for x in b]
    pa, pb = zaya.load(os.path.join(full, "model")).params, zaya.load(os.path.join(killed, "model")).params
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_a_workdir_of_another_experiment_is_refused_before_anything_is_touched(pretrained):
    """Rerunning a workdir under another config (here the seed) stops at the start-up checks with the differing
    fields listed; its logs and config.json are left as they were (the old behaviour: resume, rewrite the config)."""
    from zaya.train.loop import train
    from zaya.train.resume import ResumeConflict
    wd, _ = pretrained
    files = ("config.json", "metrics.jsonl", "eval.jsonl")
    before = {f: open(os.path.join(wd, f)).read() for f in files}
    cfg = configs.load(os.path.join(EXP, "pretrain_ar.py:tiny"),
                       ["num_steps=30", "optim.warmup_steps=3", "checkpoint.every_steps=15", "eval.every_steps=15",
                        "eval.num_batches=1", "seed=1", *QUIET])
    with pytest.raises(ResumeConflict, match=r"checkpoints/30 was trained under another experiment \(seed: 0 -> 1\)"):
        train(cfg, wd)
    assert {f: open(os.path.join(wd, f)).read() for f in files} == before


def test_resume_follows_the_init_models_contents_not_its_path(pretrained, converted, tmp_path):
    """The conversion's workdir resumes (here: is rerun, finished) from a copy of its init model at another path,
    and is refused once that model's contents change (retrained)."""
    from zaya.train.loop import train
    from zaya.train.resume import ResumeConflict
    wd_a, _ = pretrained
    full, _, _ = converted
    copy = str(tmp_path / "model")
    shutil.copytree(os.path.join(wd_a, "model"), copy)
    ov = ["num_steps=6", "checkpoint.every_steps=2", "checkpoint.keep=2", "optim.warmup_steps=1",
          "eval.num_batches=0", "log.plots=false", *QUIET]
    cfg = configs.load(os.path.join(EXP, "tidar_convert.py:tiny"), [f"init_from={copy}", *ov])
    assert train(cfg, full)["resumed_from"] == 6
    big = max((os.path.join(r, f) for r, _, fs in os.walk(os.path.join(copy, "params")) for f in fs),
              key=os.path.getsize)
    data = bytearray(open(big, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(big, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ResumeConflict, match="its contents changed since this run started"):
        train(cfg, full)
    shutil.rmtree(copy)  # a deleted init model cannot be read: judged by its path, which is not the recorded one
    with pytest.raises(ResumeConflict, match=r"\(init_from: '.*pretrain.*/model' -> '.*/model'\)"):
        train(cfg, full)


def test_evaluate_model_against_base(pretrained, tmp_path):
    """The trained model against a genuinely different base: the same architecture at its random initialisation
    (a model folder of init params). The trained one is better, by the delta evaluate reports."""
    import jax
    import zaya
    from zaya.convert import checkpoint as zc
    from zaya.model.params import init as init_params
    from zaya.train import evaluate
    wd, _ = pretrained
    cfg = zaya.load(os.path.join(wd, "model")).config
    zc.save(str(tmp_path / "random"), jax.device_get(init_params(cfg, jax.random.key(1))), cfg)
    data = configs.data_defaults()
    # the eval shapes of the pretraining run (seq 64, batch 8): the AR eval is already compiled
    res = evaluate.evaluate(os.path.join(wd, "model"), str(tmp_path / "random"), data_cfg=data, seq_len=64,
                            batch_size=8, max_batches=1, tidar={"block_size": 4}, num_tasks=3, max_new_tokens=4)
    m, b = res["model"], res["base"]
    assert m["ar_loss"] < np.log(264) - 1.0 < b["ar_loss"]   # trained vs near-uniform
    assert res["delta"]["ar_loss"] == pytest.approx(m["ar_loss"] - b["ar_loss"]) and res["delta"]["ar_loss"] < -1.0
    assert b["path"] == str(tmp_path / "random") and m["path"] == os.path.join(wd, "model")
    assert len(m["diff_acc_per_pos"]) == 4 and len(b["diff_acc_per_pos"]) == 4
    assert 0.0 <= m["task_em"] <= 1.0 and len(m["examples"]) == 3
    md = evaluate.to_markdown(res)
    assert "AR val loss" in md and "per block position" in md and "| model | base |" in md


def test_ablation_runner_writes_table_and_plots(tmp_path):
    from zaya.train import ablate
    seen = []

    def fake_train(cfg, workdir):
        os.makedirs(workdir, exist_ok=True)
        seen.append((cfg.tidar.alpha, cfg.tidar.block_size, cfg.num_steps))
        loss = 3.0 + cfg.tidar.alpha / cfg.tidar.block_size
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for s in (1, 2):
                f.write(json.dumps({"step": s, "loss": loss / s, "diff_loss": loss}) + "\n")
        return {"final": {"loss": loss / 2, "diff_loss": loss, "skip_rate_mean": 0.1}, "tokens_per_s": 1.0,
                "eval": {"diff_acc_per_pos": [0.5, 0.25]}}

    sets = ablate.grid(["tidar.alpha=0.5,1,2", "tidar.block_size=4,8"])
    assert len(sets) == 6
    rows = ablate.ablate(os.path.join(EXP, "tidar_convert.py:tiny"), str(tmp_path), sets,
                         common=[("init_from", "/x"), ("num_steps", "7")], train_fn=fake_train)
    assert len(rows) == 6 and sorted(seen) == sorted((a, b, 7) for a in (0.5, 1.0, 2.0) for b in (4, 8))
    md = (tmp_path / "ablation.md").read_text()
    assert "alpha" in md and "block_size" in md and md.count("\n") == 8
    assert (tmp_path / "ablation.csv").read_text().startswith("run,")
    assert (tmp_path / "ablation_loss.png").exists() and (tmp_path / "ablation_diff_acc_per_pos.png").exists()
    assert rows[0]["eval_diff_acc_pos0"] == 0.5
    with pytest.raises(configs.ConfigOverrideError, match="Did you mean tidar.alpha"):
        ablate.ablate(os.path.join(EXP, "tidar_convert.py:tiny"), str(tmp_path / "bad"),
                      ablate.grid(["tidar.alpah=1,2"]), common=[("init_from", "/x")], train_fn=fake_train)
    assert ablate.parse_run("tidar.alpha=1 --config.num_steps=3") == [("tidar.alpha", "1"), ("num_steps", "3")]
    assert ablate._split_values("(1,2),(3,4)") == ["(1,2)", "(3,4)"]


def test_ablation_runner_control_then_phase_decode_columns_and_seeds(tmp_path):
    from zaya.train import ablate
    trained, decoded = [], []

    def fake_train(cfg, workdir):
        os.makedirs(os.path.join(workdir, "model"), exist_ok=True)
        trained.append((os.path.relpath(workdir, tmp_path), cfg.tidar.mode, cfg.tidar.alpha, cfg.seed, cfg.num_steps,
                        cfg.init_from))
        ar = 2.0 if cfg.tidar.mode == "ar" else 2.0 + 0.1 * cfg.tidar.alpha + 0.01 * cfg.seed
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 1, "loss": ar}) + "\n")
        return {"final": {"loss": ar}, "eval": {"ar_loss": ar, "diff_acc_per_pos": [0.5, 0.3]}}

    def fake_decode(model_dir, tidar, n):
        decoded.append((os.path.relpath(model_dir, tmp_path), tidar["alpha"], n))
        return {"tpf_short": 2.0 + tidar["alpha"], "tpf_long": 3.0, "same_as_ar_short": 1.0, "same_as_ar_long": 1.0}

    sets = [ablate.parse_run(r) for r in ("tidar.alpha=1", "tidar.alpha=2 then.num_steps=9", "tidar.alpha=1 seed=1")]
    rows = ablate.ablate(os.path.join(EXP, "tidar_convert.py:tiny"), str(tmp_path), sets,
                         common=[("init_from", "/base"), ("num_steps", "7")], train_fn=fake_train,
                         control=[("tidar.mode", "ar")], then=os.path.join(EXP, "diffusion_sft.py:tiny"), decode=5,
                         decode_fn=fake_decode)
    phases = {t[0]: t[1:] for t in trained}
    assert phases["control"] == ("ar", 1.0, 0, 7, "/base") and phases["control_seed=1"][2] == 1   # one per seed
    assert phases["alpha=1"] == ("tidar", 1.0, 0, 7, "/base")
    # the second phase: from the run's model, tidar.* and seed carried over, then.* its own, num_steps not
    assert phases["alpha=2_num_steps=9/then"] == ("tidar", 2.0, 0, 9, str(tmp_path / "alpha=2_num_steps=9" / "model"))
    assert phases["alpha=1/then"][3] == 200 and phases["alpha=1_seed=1/then"][2] == 1
    assert ("alpha=1/then/model", 1.0, 5) in decoded     # the final (second-phase) model, decoded as trained
    r = {x["run"]: x for x in rows}
    assert r["alpha=1"]["ar_vs_control"] == pytest.approx(0.05)
    assert r["alpha=1_seed=1"]["ar_vs_control"] == pytest.approx(0.11 / 2.0)   # against its own seed's control
    assert r["alpha=2_num_steps=9"]["tpf_short"] == 4.0 and r["alpha=1"]["then_diff_acc_pos0"] == 0.5
    assert all(x["wall_s"] >= 0 for x in rows)
    md = (tmp_path / "ablation.md").read_text()
    assert "Across seeds (mean +- std)" in md and "| tidar.alpha=1 | 2 |" in md
    assert (tmp_path / "ablation_tradeoff.png").exists()
    # a rerun reuses each run's decode.json (same model, same prompt count) instead of decoding again
    n = len(decoded)
    ablate.ablate(os.path.join(EXP, "tidar_convert.py:tiny"), str(tmp_path), sets[:1],
                  common=[("init_from", "/base"), ("num_steps", "7")], train_fn=lambda c, w: fake_train(c, w) and {
                      "final": {}, "eval": {"ar_loss": 2.1}}, then=os.path.join(EXP, "diffusion_sft.py:tiny"),
                  decode=5, decode_fn=fake_decode)
    assert len(decoded) == n
    assert ablate.split_overrides([("then.a", "1"), ("tidar.b", "2"), ("seed", "3"), ("c", "4")]) == (
        [("tidar.b", "2"), ("seed", "3"), ("c", "4")], [("a", "1"), ("tidar.b", "2"), ("seed", "3")])


def test_ablation_runner_reuses_a_finished_run_of_the_same_config(tmp_path):
    from zaya.train import ablate
    from zaya.train.loop import _jsonable_cfg
    cfg = configs.load(os.path.join(EXP, "tidar_convert.py:tiny"), [("init_from", "/x")])
    wd = tmp_path / "r"
    (wd / "model").mkdir(parents=True)
    (wd / "config.json").write_text(_jsonable_cfg(cfg))
    (wd / "summary.json").write_text(json.dumps({"steps": cfg.num_steps, "eval": {"ar_loss": 1.5}}))
    never = lambda c, w: pytest.fail("a finished run was trained again")
    assert ablate._train_or_reuse(never, cfg, str(wd)) == {"steps": cfg.num_steps, "eval": {"ar_loss": 1.5},
                                                           "reused": True}
    assert ablate._wall(str(wd), 12.5, reused=False) == 12.5 and ablate._wall(str(wd), 0.01, reused=True) == 12.5
    assert ablate._wall(str(tmp_path), 0.01, reused=True) is None     # never recorded: unknown, not 0.01
    other = configs.load(os.path.join(EXP, "tidar_convert.py:tiny"), [("init_from", "/x"), ("tidar.alpha", "2")])
    with pytest.raises(configs.ConfigError, match=r"another config \(tidar.alpha: 1.0 -> 2.0\)"):
        ablate._train_or_reuse(never, other, str(wd))           # never resumed into a run of another config
    assert ablate._train_or_reuse(lambda c, w: "trained", other, str(tmp_path / "fresh")) == "trained"
    (wd / "summary.json").write_text(json.dumps({"steps": cfg.num_steps - 1}))
    assert ablate._train_or_reuse(lambda c, w: "trained", cfg, str(wd)) == "trained"     # unfinished: resumes

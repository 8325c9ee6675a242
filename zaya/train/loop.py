"""The training loop: ``train(cfg, workdir)`` runs (or resumes) one experiment and returns its summary.

  WORKDIR/config.json      the experiment config as run          WORKDIR/checkpoints/   Orbax (see checkpoint.py)
  WORKDIR/metrics.jsonl    one record per step                   WORKDIR/eval.jsonl     one per evaluation
  WORKDIR/tb/              TensorBoard events                    WORKDIR/plots/         loss / accuracy / usage
  WORKDIR/model/           final params as a zaya model folder   WORKDIR/summary.json   final metrics, throughput

Running again on the same workdir resumes from the latest checkpoint (params, optimizer, data-iterator state, rng
and step), so the loss trajectory equals an uninterrupted run. Start-up checks fail before any compute: the
config (``configs.validate``), the tokenizer against the model vocab, the corpus (empty -> error), ``init_from``
shapes against the model config, and a resumed checkpoint against the model and optimizer config and against the
experiment (``resume.py``: a folder left by another config, or by a run from a since-retrained init, is refused).

Fault injection (``tests/test_train_loop.py``) goes through two callbacks of ``train``: ``after_step(step, run)``
runs after each step (its metrics logged, its checkpoint save issued), ``before_commit(step)`` inside each async
checkpoint save before it is committed (``checkpoint.Checkpoints``); a test's callback SIGKILLs the process there.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from zaya.config import ConfigError, ZayaConfig
from zaya.model.params import init as init_params, param_shapes
from zaya.model.transformer import Impl
from zaya.progress import tqdm
from zaya.train import configs, evaluate, logs, plots, resume
from zaya.train import state as st
from zaya.train.checkpoint import Checkpoints, check_meta, make_meta
from zaya.train.optim import make_optimizer
from zaya.train.step import batch_axes, batch_shard, jit_options, make_train_step, put_batch

log = logging.getLogger("zaya.train")


def make_mesh(cfg):
    from zaya import sharding
    nd = int(cfg.mesh.num_devices) or len(jax.devices())
    sizes = configs.mesh_sizes(cfg, nd)
    return sharding.make_mesh(**sizes, devices=jax.devices()[:nd])


def resolve_model_dir(path: str) -> str:
    """A model folder, or a training workdir whose ``model/`` holds one."""
    from zaya.convert import checkpoint as zc
    if not os.path.isdir(path):
        raise ConfigError(f"config.init_from={path!r}: not a folder (expected a `zaya convert` output, an HF "
                          "checkpoint or a training WORKDIR/model)")
    if not zc.is_zaya_dir(path) and zc.is_zaya_dir(os.path.join(path, "model")):
        return os.path.join(path, "model")
    return path


def train_data(cfg) -> dict:
    """The run's data config, with ``data.distill_from='init'`` resolved to the init_from model folder."""
    d = cfg.data.to_dict()
    if d.get("distill_from") == "init":
        if not cfg.init_from:
            raise ConfigError("data.distill_from='init' continues prompts with the run's init_from model; set "
                              "--config.init_from=<model folder> or give data.distill_from a model folder")
        d["distill_from"] = resolve_model_dir(cfg.init_from)
    return d


def load_init(path: str, model_cfg: ZayaConfig) -> dict:
    """fp32 params from a model folder, checked against the experiment's model shapes. Non-shape fields (RoPE theta,
    max positions, special ids, dtype) come from the experiment config (context extension changes theta)."""
    import zaya
    path = resolve_model_dir(path)
    m = zaya.load(path, dtype="float32")
    want, got = param_shapes(model_cfg), param_shapes(m.config)
    if want != got:
        diff = {k: (v, getattr(model_cfg, k)) for k, v in m.config.to_dict().items()
                if v != getattr(model_cfg, k) and k != "dtype"}
        raise ConfigError(f"config.init_from={path!r} has a model of another shape; differing fields "
                          f"(checkpoint, config): {diff}")
    changed = {k: (v, getattr(model_cfg, k)) for k, v in m.config.to_dict().items() if v != getattr(model_cfg, k)}
    if changed:
        log.info("init_from %s: config fields changed for this phase (checkpoint, now): %s", path, changed)
    return m.params


def check_inputs(cfg, model_cfg: ZayaConfig):
    """Tokenizer vs model vocab (TokenizerError) and the tokenizer's special ids vs the model config."""
    from zaya.data.tokenizer import check_vocab, load_tokenizer
    tok = load_tokenizer(cfg.tokenizer)
    check_vocab(tok, model_cfg.vocab_size)
    if tok.mask_id is not None and tok.mask_id != model_cfg.mask_token_id and cfg.tidar.mode != "ar":
        raise ConfigError(f"tokenizer mask id {tok.mask_id} != model.mask_token_id={model_cfg.mask_token_id}; "
                          "set --config.model.mask_token_id to the tokenizer's mask id")
    return tok


def next_batch(it, step: int, num_steps: int):
    from zaya.data.sources import DataError, EmptyCorpusError
    try:
        return next(it)
    except StopIteration:
        if step == 1:
            raise EmptyCorpusError("the training data yielded no batch (empty corpus, or fewer rows than one "
                                   "batch)") from None
        raise DataError(f"the training data ran out at step {step} of {num_steps} (data.num_epochs is finite); "
                        "raise num_epochs, set it to None (repeat), or lower num_steps") from None


class StepSetup(NamedTuple):
    """What a run's train step is made of; ``step_fn`` is jitted but not compiled, nothing is allocated."""
    model_cfg: ZayaConfig
    opts: object            # TidarOptions
    mesh: object
    rules: tuple | None
    dp: object              # the batch axes (``step.batch_axes``)
    optimizer: object
    schedule: Callable
    state_sh: st.TrainState  # of NamedShardings
    impl: Impl
    step_fn: Callable


def step_setup(cfg, loss_fn=None) -> StepSetup:
    """Model, mesh, optimizer, state shardings and the jitted train step of the (validated) config ``cfg``: what
    ``Run`` trains with, ``zaya train --dry-run`` describes and ``zaya bench memory`` compiles."""
    model_cfg, opts = configs.model_from(cfg), configs.tidar_options(cfg)
    mesh = make_mesh(cfg)
    rules = tuple(tuple(r) for r in cfg.sharding_rules) or None
    dp = batch_axes(mesh, rules, cfg.batch_size)
    abstract = jax.tree.map(lambda s: np.zeros((), np.float32), param_shapes(model_cfg),
                            is_leaf=lambda x: isinstance(x, tuple))
    optimizer, schedule = make_optimizer(cfg.optim, cfg.num_steps, abstract)
    state_sh = st.state_shardings(model_cfg, optimizer, mesh, rules)
    impl = Impl(attention=cfg.impl.attention, moe=cfg.impl.moe, remat=bool(cfg.impl.remat),
                remat_group=int(cfg.impl.remat_group), capacity_factor=float(cfg.impl.capacity_factor),
                ep_transport=str(cfg.impl.ep_transport))
    step_fn = make_train_step(model_cfg, opts, optimizer, schedule, cfg.grad_accum, impl, mesh, rules, state_sh,
                              cfg.batch_size, loss_fn, balance_rate=float(cfg.optim.router_balance_rate),
                              fast_compile=bool(cfg.impl.fast_compile))
    return StepSetup(model_cfg, opts, mesh, rules, dp, optimizer, schedule, state_sh, impl, step_fn)


class Run:
    """The pieces of one run, built and checked before any training compute."""

    def __init__(self, cfg, workdir: str, loss_fn=None, before_commit: Callable[[int], None] | None = None):
        configs.validate(cfg)
        self.cfg, self.workdir = cfg, os.path.abspath(workdir)
        (self.model_cfg, self.opts, self.mesh, self.rules, self.dp, self.optimizer, self.schedule, self.state_sh,
         self.impl, self.step_fn) = step_setup(cfg, loss_fn)
        self.loss_fn = loss_fn
        self.tok = check_inputs(cfg, self.model_cfg)
        self.init_stamp = resume.init_stamp(cfg.init_from)
        import grain
        from zaya.data import pipeline
        self.shard = grain.sharding.ShardOptions(*batch_shard(self.mesh, self.dp))  # this process's batch rows
        self.train_iter = pipeline.make_train_iter(train_data(cfg), self.tok, cfg.seq_len, cfg.batch_size, cfg.seed,
                                                   shard_options=self.shard)
        self.ckpt = Checkpoints(os.path.join(self.workdir, "checkpoints"), cfg.checkpoint.keep,
                                cfg.checkpoint.use_async, before_commit)

    def initial_state(self) -> tuple[st.TrainState, int]:
        """(state, start step): restored from the latest checkpoint, or fresh (random or ``init_from``)."""
        latest = self.ckpt.latest_step()
        ab = st.abstract_state(self.model_cfg, self.optimizer)
        if latest is not None:
            where = f"checkpoint {self.ckpt.directory}/{latest}"
            meta = self.ckpt.read_meta(latest)
            check_meta(meta, self.model_cfg, ab.opt_state, where)
            resume.check(meta, json.loads(self.cfg.to_json()), self.init_stamp, where)
            target = st.with_shardings(ab.as_dict(), self.state_sh.as_dict())
            d, data_state = self.ckpt.restore(latest, target)
            self.train_iter.set_state(data_state)
            return st.TrainState.from_dict(d), latest
        create = jax.jit(lambda p: st.create(p, self.optimizer, self.cfg.seed), out_shardings=self.state_sh)
        if self.cfg.init_from:
            params = load_init(self.cfg.init_from, self.model_cfg)
        else:
            f32 = self.model_cfg.replace(dtype="float32")
            # an rbg key: XLA:CPU compiles the init of ~40 threefry draws 4x slower (25 s vs 6 s for the tiny model)
            key = jax.random.key(self.cfg.seed, impl="rbg")
            params = jax.jit(lambda k: init_params(f32, k), out_shardings=self.state_sh.params,
                             **jit_options(bool(self.cfg.impl.fast_compile)))(key)
        return create(params), 0

    def meta(self, step: int, state) -> dict:
        return make_meta(self.model_cfg, state.opt_state, step, {"config": json.loads(self.cfg.to_json()),
                                                                  "init_stamp": self.init_stamp})


def _jsonable_cfg(cfg) -> str:
    return cfg.to_json(indent=2)


def train(cfg, workdir: str, loss_fn=None, after_step: Callable[[int, Run], None] | None = None,
          before_commit: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) the experiment ``cfg`` in ``workdir``; returns the summary dict (also summary.json).

    after_step(step, run): called after every step (metrics logged, checkpoint save issued); before_commit(step):
    called inside each async checkpoint save before its commit. Both exist for fault injection in tests."""
    os.makedirs(workdir, exist_ok=True)
    run = Run(cfg, workdir, loss_fn, before_commit)
    lead = jax.process_index() == 0
    state, start = run.initial_state()
    paths = {k: os.path.join(run.workdir, f) for k, f in
             (("metrics", "metrics.jsonl"), ("eval", "eval.jsonl"), ("summary", "summary.json"))}
    if lead:
        with open(os.path.join(run.workdir, "config.json"), "w") as f:
            f.write(_jsonable_cfg(cfg))
        for p in (paths["metrics"], paths["eval"]):
            logs.truncate_jsonl(p, start)
    jl = logs.JsonlWriter(paths["metrics"]) if lead else None
    tb = logs.TensorBoard(os.path.join(run.workdir, "tb"), start) if lead and cfg.log.tensorboard else None
    eval_batches = evaluate.eval_batches(cfg, run.tok, run.shard)
    eval_fn = evaluate.make_eval_fn(run.model_cfg, run.opts, run.impl, run.loss_fn, bool(cfg.impl.fast_compile))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(total=cfg.num_steps, initial=start, desc=f"train {os.path.basename(run.workdir)}", unit="step",
               disable=not (lead and cfg.log.progress), dynamic_ncols=True)
    rates, t_last, last = [], None, {}
    step = start
    for step in range(start + 1, cfg.num_steps + 1):
        batch = next_batch(run.train_iter, step, cfg.num_steps)
        state, metrics = run.step_fn(state, put_batch(batch, run.mesh, run.dp))
        if step % cfg.log.every_steps == 0 or step == cfg.num_steps:
            m = logs.to_host(metrics)
            if isinstance(m.get("skip_rate"), list):
                m["skip_rate_mean"] = float(np.mean(m["skip_rate"]))
            now = time.perf_counter()
            if t_last is not None:
                m["tokens_per_s"] = tokens_per_step * (step - t_last[0]) / (now - t_last[1])
                rates.append(m["tokens_per_s"])
            t_last = (step, now)
            if lead:
                jl.write({"step": step, **m})
                if tb:
                    tb.write(step, m, "train/")
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m.get('tokens_per_s', 0):.0f}")
            last = m
        bar.update(1)
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != cfg.num_steps:
            _eval(run, state, eval_fn, eval_batches, step, paths["eval"], tb, lead)
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.num_steps:
            run.ckpt.save(step, state.as_dict(), run.train_iter.get_state(), run.meta(step, state))
            if tb:  # else a kill -9 loses the buffered events (flushed every 2 min) up to this checkpoint for good
                tb.flush()
        if after_step:
            after_step(step, run)
    bar.close()
    run.ckpt.close()
    done = [r for r in logs.read_jsonl(paths["eval"]) if r.get("step") == step] if start == step else []
    if done:  # a rerun of a finished workdir: its final evaluation is already logged
        ev = {k: v for k, v in done[-1].items() if k != "step"}
    else:
        ev = _eval(run, state, eval_fn, eval_batches, step, paths["eval"], tb, lead) if eval_batches else {}
    if not last and lead:  # nothing left to train: report the last logged step (a rerun of a finished workdir)
        prev = logs.read_jsonl(paths["metrics"])
        last = prev[-1] if prev else {}
        rates = [r["tokens_per_s"] for r in prev if "tokens_per_s" in r]
    summary = {"workdir": run.workdir, "steps": int(step), "resumed_from": int(start),
               "final": {k: v for k, v in last.items() if np.ndim(v) == 0 and k != "step"}, "eval": ev,
               "tokens_per_s": float(np.median(rates)) if rates else None,
               "tokens_per_step": tokens_per_step, "num_params": int(run.model_cfg.num_params()),
               "device": str(jax.devices()[0].device_kind), "num_devices": int(run.mesh.size)}
    if cfg.export_model:
        export_model(state.params, run.model_cfg, os.path.join(run.workdir, "model"), cfg.tokenizer)
    if lead:
        if jl:
            jl.close()
        if tb:
            tb.close()
        if cfg.log.plots:
            plots.training_plots(run.workdir)
        with open(paths["summary"], "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _eval(run, state, eval_fn, batches, step, path, tb, lead) -> dict:
    if not batches:
        return {}
    m = evaluate.run_eval(eval_fn, state.params, batches, run.mesh, run.dp)
    if lead:
        with open(path, "a") as f:
            f.write(json.dumps({"step": int(step), **m}) + "\n")
        if tb:
            tb.write(step, m, "eval/")
    return m


def export_model(params, model_cfg: ZayaConfig, dst: str, tokenizer: str = "bytes"):
    """Final params (cast to the model dtype) as a zaya model folder (``zaya.load`` / ``zaya export`` read it), with
    the run's tokenizer as tokenizer.json (``zaya generate DIR --prompt TEXT`` needs it)."""
    from zaya.convert import checkpoint as zc
    from zaya.model.params import cast
    params = cast(params, model_cfg)
    if jax.process_count() > 1:  # sharded over hosts: gather the full arrays (every process takes part)
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return
    params = jax.device_get(params)
    from zaya.data.tokenizer import tokenizer_file
    with tempfile.TemporaryDirectory() as tmp:  # the folder carries its tokenizer (bytes: a tokenizer.json too)
        zc.save(dst, params, model_cfg, tokenizer=tokenizer_file(tokenizer, tmp), overwrite=True)

"""zaya demo: the phase configs and the summary table (the full run is CI's main job, `zaya demo`)."""
import os

import pytest

from zaya import demo

EXP = os.path.join(os.path.dirname(__file__), "..", "experiments")


def test_phases_share_the_decode_block_and_sft_masks_prompts():
    a, b, c, d, ctl = demo.configs(quick=True)
    assert a.tidar.mode == "ar" and b.tidar.mode == c.tidar.mode == d.tidar.mode == "tidar"
    assert b.tidar.block_size == c.tidar.block_size == d.tidar.block_size == demo.BLOCK == 16
    for x in (c, d):
        assert x.tidar.prompt_masking and x.data.sft and x.data.source == "tasks" and "copy_long" in x.data.task_kinds
    assert d.data.distill_from == "init" and not c.data.distill_from


def test_demo_runs_the_experiments_demo_variants_with_the_recorded_hyper_parameters(tmp_path):
    """The demo's phases are experiments/*.py:demo, each started from the previous phase's model; the numbers are
    the ones experiments/results/demo_cpu.md was recorded with (seq 128, batch 8, steps, peak lr, warmup)."""
    from zaya.train import configs
    a, b, c, d, ctl = demo.configs(quick=False, out=str(tmp_path))
    assert a.to_dict() == configs.load(os.path.join(EXP, "pretrain_ar.py:demo")).to_dict()
    assert b.init_from == ctl.init_from == str(tmp_path / "base" / "model")
    assert c.init_from == str(tmp_path / "tidar" / "model") and not a.init_from
    assert d.init_from == str(tmp_path / "sft" / "model")
    got = [(x.num_steps, x.optim.lr, x.optim.warmup_steps, x.seq_len, x.batch_size, x.checkpoint.every_steps,
            x.data.tasks_fraction) for x in (a, b, c, d)]
    assert got == [(900, 3e-3, 30, 128, 8, 300, 0.5), (700, 2e-3, 30, 128, 8, 233, 0.5),
                   (1000, 2e-3, 30, 256, 4, 333, 0.0), (600, 2e-3, 30, 256, 4, 200, 0.0)]
    quick = demo.configs(quick=True)
    assert [(x.num_steps, x.batch_size, x.optim.warmup_steps) for x in quick] == [(30, 4, 7)] * 2 + [(30, 2, 7)] * 2 + [
        (30, 4, 7)]


def test_control_matches_the_conversion_in_everything_but_the_objective():
    for quick in (True, False):
        _, b, _, _, ctl = demo.configs(quick)
        assert ctl.tidar.mode == "ar" and b.tidar.mode == "tidar"
        with ctl.unlocked():
            ctl.tidar.mode = "tidar"
        assert ctl.to_dict() == b.to_dict()


def test_summary_lists_every_sampler_row_with_its_bound():
    ev = {"model": {"ar_loss": 2.0, "diff_acc_per_pos": [0.5, 0.25], "ar_acc_first_ctx": 0.375,
                    "diff_acc_first_ctx": 0.25}, "base": {"ar_loss": 2.5}, "control": {"ar_loss": 1.6},
          "sft": {"task_em": 0.75, "diff_acc_per_pos": [0.9]}}
    rows = [dict(config="SF K=15 L=0", batch=1, tokens_per_forward=3.5, tokens_per_step=2.8,
                 acceptance_per_position=[0.8, 0.9, 0.95, 0.97, 1.0], speedup=1.51, speedup_oracle=2.31, equal_ar=True,
                 loop="device", task_set="long"),
            dict(config="TF K=15 mask-anchor", batch=8, tokens_per_forward=1.2, tokens_per_step=2.8,
                 acceptance_per_position=[0.8], speedup=0.64, speedup_oracle=None, equal_ar=False)]
    st = {"steps": 3, "tokens_per_s": 10.0, "device": "cpu"}
    md = demo.summary(st, st, ev, rows, 1.0, 2.0, st)
    assert "(-20.00%)" in md  # converted vs base AR loss
    assert "+25.00% against it" in md  # converted vs the equal-compute AR control
    assert "blocks with context: AR top-1 | - | 0.375 |" in md or "blocks with context: AR top-1 | nan | 0.375 |" in md
    assert "| long | SF K=15 L=0 | 1 | device | 3.50 | 2.80 | 0.80 0.90 0.95 0.97 | 1.51x | 2.31x | True |" in md
    assert "| short | TF K=15 mask-anchor | 8 | host | 1.20 | 2.80 | 0.80 | 0.64x | n/a | False |" in md
    assert "0.50, 0.25" in md and "after SFT (tasks): 0.90" in md


def test_demo_fails_when_a_greedy_block_row_differs_from_ar():
    """The demo asserts its lossless claim on every machine (after writing its results), rather than printing it."""
    import pytest
    ok = dict(config="SF K=15 L=0", batch=1, loop="host", equal_ar=True)
    demo.check([ok, dict(ok, loop="device")])
    with pytest.raises(SystemExit, match=r"TF K=15 mask-anchor \(batch 8, device loop, long tasks\)"):
        demo.check([ok, dict(config="TF K=15 mask-anchor", batch=8, loop="device", equal_ar=False, task_set="long")])


def test_summary_json_record_has_the_decode_rows_and_the_control_comparison():
    ev = {"model": {"ar_loss": 1.04}, "base": {"ar_loss": 1.1}, "control": {"ar_loss": 1.0}}
    rows = [{"sampler": "single_forward", "config": "SF K=15", "batch": 1, "loop": "device",
             "tokens_per_forward": 2.8, "equal_ar": True, "speedup": 1.2},
            {"sampler": "single_forward", "config": "SF K=15", "batch": 8, "loop": "device", "task_set": "long",
             "tokens_per_forward": 4.6, "equal_ar": True}]
    r = demo.record({"steps": 1}, {"steps": 2}, {"steps": 3}, ev, rows)
    assert r["convert"]["ar_loss_vs_control"] == pytest.approx(0.04) and r["convert"]["steps"] == 2
    assert r["decode"] == [{"sampler": "single_forward", "config": "SF K=15", "batch": 1, "loop": "device",
                            "task_set": "short", "tokens_per_forward": 2.8, "same_as_ar": True},
                           {"sampler": "single_forward", "config": "SF K=15", "batch": 8, "loop": "device",
                            "task_set": "long", "tokens_per_forward": 4.6, "same_as_ar": True}]
    assert r["samplers"] == rows and r["eval"] is ev
    assert demo.record({}, {}, {}, {"model": {"ar_loss": 1.0}}, [])["convert"]["ar_loss_vs_control"] is None

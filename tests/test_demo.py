"""zaya demo: the phase configs and the summary table (the full run is CI's main job, `zaya demo`)."""
from zaya import demo


def test_phases_share_the_decode_block_and_sft_masks_prompts():
    a, b, c, ctl = demo.configs(quick=True)
    assert a.tidar.mode == "ar" and b.tidar.mode == "tidar" and c.tidar.mode == "tidar"
    assert b.tidar.block_size == c.tidar.block_size == demo.BLOCK
    assert c.tidar.prompt_masking and c.data.sft and c.data.source == "tasks"
    assert demo.configs(quick=False)[2].num_steps == demo.SFT_STEPS


def test_control_matches_the_conversion_in_everything_but_the_objective():
    for quick in (True, False):
        _, b, _, ctl = demo.configs(quick)
        assert ctl.tidar.mode == "ar" and b.tidar.mode == "tidar"
        assert ctl.num_steps == b.num_steps and ctl.batch_size == b.batch_size and ctl.seq_len == b.seq_len
        assert ctl.optim.to_dict() == b.optim.to_dict() and ctl.data.to_dict() == b.data.to_dict()


def test_summary_lists_every_sampler_row_with_its_bound():
    ev = {"model": {"ar_loss": 2.0, "diff_acc_per_pos": [0.5, 0.25], "ar_acc_first_ctx": 0.375,
                    "diff_acc_first_ctx": 0.25}, "base": {"ar_loss": 2.5}, "control": {"ar_loss": 1.6},
          "sft": {"task_em": 0.75, "diff_acc_per_pos": [0.9]}}
    rows = [dict(config="SF K=15 L=0", batch=1, tokens_per_forward=3.5, tokens_per_step=2.8,
                 acceptance_per_position=[0.8, 0.9, 0.95, 0.97, 1.0], speedup=1.51, speedup_oracle=2.31, equal_ar=True,
                 loop="device"),
            dict(config="TF K=15 mask-anchor", batch=8, tokens_per_forward=1.2, tokens_per_step=2.8,
                 acceptance_per_position=[0.8], speedup=0.64, speedup_oracle=None, equal_ar=False)]
    st = {"steps": 3, "tokens_per_s": 10.0, "device": "cpu"}
    md = demo.summary(st, st, ev, rows, 1.0, 2.0, st)
    assert "(-20.00%)" in md  # converted vs base AR loss
    assert "+25.00% against it" in md  # converted vs the equal-compute AR control
    assert "blocks with context: AR top-1 | - | 0.375 |" in md or "blocks with context: AR top-1 | nan | 0.375 |" in md
    assert "| SF K=15 L=0 | 1 | device | 3.50 | 2.80 | 0.80 0.90 0.95 0.97 | 1.51x | 2.31x | True |" in md
    assert "| TF K=15 mask-anchor | 8 | host | 1.20 | 2.80 | 0.80 | 0.64x | n/a | False |" in md
    assert "0.50, 0.25" in md and "after SFT (tasks): 0.90" in md

"""zaya.train.resume: a run folder is resumed only by the experiment that wrote it (its config, its init model's
contents); the demo moves a stale phase folder aside instead of failing or mixing two experiments."""
import json
import os
import shutil

import numpy as np
import pytest

from zaya.train import configs, resume

EXP = os.path.join(os.path.dirname(__file__), "..", "experiments")


def test_config_diff_lists_fields_and_honours_allow_prefixes_and_new_fields():
    old = {"seed": 0, "tidar": {"alpha": 1.0, "block_size": 16}, "log": {"every_steps": 10}, "rules": [["a", 1]]}
    new = {"seed": 0, "tidar": {"alpha": 3.0, "block_size": 16}, "log": {"every_steps": 5}, "rules": (("a", 1),),
           "data": {"distill_from": ""}}
    assert resume.config_diff(old, new) == ["data.distill_from: None -> ''", "log.every_steps: 10 -> 5",
                                            "tidar.alpha: 1.0 -> 3.0"]
    assert resume.config_diff(old, new, allow=("log.",), new_fields=False) == ["tidar.alpha: 1.0 -> 3.0"]
    assert resume.config_diff(old, new, allow=("tidar.alpha", "log."), new_fields=False) == []
    # a prefix allows only its own section, not a field that merely starts with the same letters
    assert resume.config_diff({"logx": 1}, {"logx": 2}, allow=("log.",)) == ["logx: 1 -> 2"]


def test_model_stamp_follows_contents_not_location(tmp_path):
    src = tmp_path / "model"
    (src / "params").mkdir(parents=True)
    (src / "params" / "w").write_bytes(np.arange(100_000, dtype=np.float32).tobytes())
    (src / "zaya_config.json").write_text('{"hidden_size": 8}')
    stamp = resume.model_stamp(str(src))
    assert stamp and resume.model_stamp(str(src)) == stamp
    shutil.copytree(src, tmp_path / "copy")
    assert resume.model_stamp(str(tmp_path / "copy")) == stamp          # copied or moved: the same model
    w = np.arange(100_000, dtype=np.float32)
    w[50_000] += 1.0                                                    # one weight in the middle of a file changes
    (tmp_path / "copy" / "params" / "w").write_bytes(w.tobytes())
    assert resume.model_stamp(str(tmp_path / "copy")) != stamp
    assert resume.model_stamp(str(tmp_path / "nothing")) is None and resume.model_stamp("") is None


def test_conflicts_judge_the_init_model_by_stamp_when_both_are_known():
    meta = {"config": {"seed": 0, "init_from": "/a/model", "num_steps": 10}, "init_stamp": "s1"}
    assert resume.conflicts(meta, {"seed": 0, "init_from": "/b/model", "num_steps": 20}, "s1") == []  # moved, extended
    got = resume.conflicts(meta, {"seed": 0, "init_from": "/a/model", "num_steps": 10}, "s2")
    assert len(got) == 1 and "contents changed" in got[0] and "s1 -> s2" in got[0]
    # a checkpoint from before init stamps: the path is judged
    assert resume.conflicts({"config": meta["config"]}, {"seed": 0, "init_from": "/b/model", "num_steps": 10},
                            "s1") == ["init_from: '/a/model' -> '/b/model'"]
    assert resume.conflicts({}, {"seed": 1}, None) == []  # no recorded config: not judged
    # the init model deleted since (no stamp now): judged by its path, so a resume in place still works
    assert resume.conflicts(meta, {"seed": 0, "init_from": "/a/model", "num_steps": 10}, None) == []
    with pytest.raises(resume.ResumeConflict, match=r"seed: 0 -> 1.*fresh workdir"):
        resume.check(meta, {"seed": 1, "init_from": "/a/model", "num_steps": 10}, "s1", "checkpoint X/10")


def _fake_run(wd, cfg, init_stamp=None):
    """A workdir with one checkpoint whose metadata records ``cfg`` (no training: the metadata is what is judged)."""
    from zaya.train.checkpoint import Checkpoints
    ck = Checkpoints(os.path.join(wd, "checkpoints"), keep=1, use_async=False)
    ck.save(3, {"x": np.zeros(2, np.float32)}, {"pos": 3},
            {"config": json.loads(cfg.to_json()), "init_stamp": init_stamp})
    ck.close()
    with open(os.path.join(wd, "config.json"), "w") as f:
        f.write(cfg.to_json())


def test_stale_reads_the_latest_checkpoint_and_the_demo_moves_a_stale_phase_aside(tmp_path, monkeypatch):
    from zaya import demo
    cfg = configs.load(os.path.join(EXP, "pretrain_ar.py:tiny"))
    wd = str(tmp_path / "base")
    assert resume.stale(cfg, wd) == []                    # nothing there yet
    _fake_run(wd, cfg)
    assert resume.stale(cfg, wd) == []
    with cfg.unlocked():
        cfg.log.every_steps = 7
    assert resume.stale(cfg, wd) == []                    # logging may change
    other = configs.load(os.path.join(EXP, "pretrain_ar.py:tiny"), ["seed=5", "num_steps=11"])
    assert resume.stale(other, wd) == ["num_steps: 400 -> 11", "seed: 0 -> 5"]
    assert resume.stale(other, wd, allow=resume.RESUMABLE) == ["seed: 0 -> 5"]  # train's rule: a run may be extended
    calls = []
    monkeypatch.setattr("zaya.train.loop.train", lambda c, w: calls.append((c.seed, w)) or {"steps": 0})
    demo._phase(cfg, wd)                                  # the same experiment: resumed in place
    assert calls == [(0, wd)] and os.path.isdir(os.path.join(wd, "checkpoints"))
    demo._phase(other, wd)                                # another one: the old folder is kept, renamed
    assert calls[-1] == (5, wd) and not os.path.exists(wd)
    moved = str(tmp_path / "base.stale-1")
    assert json.load(open(os.path.join(moved, "config.json")))["seed"] == 0
    assert os.listdir(os.path.join(moved, "checkpoints")) == ["3"]
    _fake_run(wd, cfg)
    demo._phase(other, wd)
    assert os.path.isdir(str(tmp_path / "base.stale-2")) and os.path.isdir(moved)  # never overwritten

"""zaya bench system: long-context decode states without a long prefill, the device loop timed, synthetic acceptance
end to end (CPU smoke sizes; the numbers that matter come from an accelerator via launch/gpu_check.sh)."""
import jax
import numpy as np

from zaya.bench import common, system
from zaya.bench.roofline_model import HARDWARE


def test_state_holds_the_context_and_synthetic_beta_sets_tokens_per_step():
    model = common.random_model("tiny")
    make_state, _, _ = system._state_fn(model, "two_forward", 2, 40, 8, block_size=4, anchor="mask",
                                        acceptance="synthetic", beta=1.0)
    st = make_state()
    np.testing.assert_array_equal(np.asarray(st.cache.length), [system.PROMPT + 40] * 2)
    assert st.cache.window == system.CONV_WINDOW or st.cache.window == st.cache.max_len
    opts = dict(block_size=4, anchor="mask", acceptance="synthetic")
    all_ = system.time_loop(model, "two_forward", 2, 40, 21, repeats=1, beta=1.0, **opts)
    none = system.time_loop(model, "two_forward", 2, 40, 21, repeats=1, beta=0.0, **opts)
    # the first token comes from the prefill; then every step keeps N + 1 = 5 (beta 1) or exactly 1 (beta 0)
    assert (all_["tokens"], all_["steps"], all_["tokens_per_step"]) == (42, 4, 5.0)
    assert (none["tokens"], none["steps"], none["tokens_per_step"]) == (42, 20, 1.0)


def test_run_writes_tables_and_knows_accelerators(tmp_path, monkeypatch):
    res = system.run(out=str(tmp_path), quick=True, batches=(1,), contexts=(16,), betas=(0.5,), max_new=6,
                     samplers=system.SAMPLERS[:1])
    assert [r["label"] for r in res["samplers"]] == ["ar", "two_forward"]
    assert all(r["ms_per_step"] > 0 for r in res["ar"] + res["samplers"])
    assert "synthetic acceptance" in (tmp_path / "system.md").read_text()
    assert system.detect_hardware() is None  # CPU: no roofline bound is claimed

    class Dev:
        device_kind = "NVIDIA H200"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [Dev()])
    assert system.detect_hardware() == HARDWARE["H200"]

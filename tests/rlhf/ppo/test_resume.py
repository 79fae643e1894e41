"""Resume: N steps straight equal K steps, a checkpoint, a fresh process restoring it, and
N - K more steps. Covers LoRA adapters on the policy (only they are saved), the full weights
of a separate critic (its own engine), the warmup schedulers, AdamW states, the adaptive KL
controller, the step counter and the RNG states. Tolerance 1e-6 (observed: identical)."""

import pytest

from tests.rlhf.ppo.helpers import launch, metric_lines

KEYS = ("loss", "policy_loss", "value_loss", "reward", "kl", "entropy", "kl_coef", "policy_lr")


@pytest.mark.slow
def test_resume_in_fresh_process_matches_uninterrupted_run(tmp_path):
    n, k = 4, 2
    common = ["--zero", "2", "--steps", str(n), "--critic", "separate", "--lora"]
    straight = metric_lines(
        launch("tests/rlhf/ppo/run_ppo.py", common + ["--save-at", str(k), "--save-dir", str(tmp_path)], 1, 29661)[0]
    )
    resumed = metric_lines(
        launch("tests/rlhf/ppo/run_ppo.py", common + ["--start", str(k), "--load-dir", str(tmp_path)], 1, 29671)[0]
    )
    assert [m["step"] for m in straight] == list(range(n))
    assert [m["step"] for m in resumed] == list(range(k, n))
    assert straight[-1]["kl"] > 0  # the policy moved away from the reference
    for a, b in zip(straight[k:], resumed):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)

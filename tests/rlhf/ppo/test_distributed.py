"""ZeRO-2 and ZeRO-3 on 2 gloo processes reproduce the loss trajectory of one process.

Why they can agree at all: every sample is drawn from its own seeded generator (the same
responses whichever rank makes them), advantages are whitened with moments summed over ranks,
and losses are token sums divided by the minibatch's global token count, so the averaged
gradient of 2 ranks is the gradient of 1 process on the whole minibatch. What remains is float
summation order. Tolerance: 1e-4 relative / 1e-5 absolute on every per-step metric (observed
differences are around 1e-7).
"""

import pytest

from tests.rlhf.ppo.helpers import launch, metric_lines

KEYS = ("loss", "policy_loss", "value_loss", "reward", "kl", "entropy", "approx_kl", "clip_frac")
STEPS = 3


def _run(zero: int, world: int, port: int, model_dir: str = "") -> list[dict]:
    extra = ["--model-dir", model_dir] if model_dir else []
    out = launch("tests/rlhf/ppo/run_ppo.py", ["--zero", str(zero), "--steps", str(STEPS), *extra], world, port)
    return metric_lines(out[0])


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> str:
    """The tiny model saved as a directory: loaded with from_pretrained, which ZeRO-3 over two
    ranks runs partitioned (`rlhf.ppo.trainer.zero3_loading`: no rank holds the whole model,
    and without LoRA the reference is loaded apart under an inference engine)."""
    from rlhf.models import load_policy
    from tests.rlhf.ppo.helpers import TINY

    path = tmp_path_factory.mktemp("tiny-model")
    model, tokenizer = load_policy(TINY)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.distributed
def test_zero2_and_zero3_on_two_processes_match_one_process(saved_tiny):
    single = _run(zero=0, world=1, port=29631, model_dir=saved_tiny)
    assert len(single) == STEPS
    # the policy must really move, or equality would prove little
    assert single[-1]["kl"] > 0.05
    for zero, port in ((2, 29641), (3, 29651)):
        multi = _run(zero=zero, world=2, port=port, model_dir=saved_tiny)
        assert len(multi) == STEPS
        for a, b in zip(single, multi):
            for key in KEYS:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (zero, a["step"], key)

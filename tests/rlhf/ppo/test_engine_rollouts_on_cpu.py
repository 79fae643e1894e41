"""Rollouts sampled elsewhere (a generation engine) and handed to the trainer: the same samples
as the trainer would draw, behaviour log-probs that match its own when the weights do, and
what the truncated importance weights do when they do not."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf.models import LoraConfig, load_policy
from rlhf.ppo import PPOConfig, core
from rlhf.ppo.rollout import (
    RolloutRequest,
    RolloutSampling,
    batch_of,
    generate,
    generation_of,
    response_logprobs,
    rollout,
    rollout_texts,
    tokenize_prompts,
)
from tests.rlhf.ppo.helpers import TINY, prompts_for

CFG = PPOConfig(advantage_estimator="grpo", rollout_batch_size=2, group_size=4, minibatch_size=8,
                max_new_tokens=8, temperature=1.0, top_k=0, kl_in="loss", policy_lr=1e-3, seed=3)


@pytest.fixture(scope="module")
def tiny():
    return load_policy(TINY, LoraConfig(enabled=True, rank=4, alpha=8.0))


def _request(prompts: list[str], cfg: PPOConfig = CFG, iteration: int = 0) -> RolloutRequest:
    rows = [p for p in prompts for _ in range(cfg.group_size)]
    return RolloutRequest(tuple(rows), tuple(range(len(rows))), iteration, cfg.group_size, RolloutSampling.of(cfg))


def test_a_batch_round_trips_to_the_generation_it_came_from(tiny):
    model, tok = tiny
    prompts = ["Hi", "A much longer prompt than the first one"]
    ids, am = tokenize_prompts(tok, prompts, 64)
    gen = generate(model, tok, ids, am, CFG, iteration=0, sample_indices=[0, 1])
    back = generation_of(batch_of(gen), tok.pad_token_id)
    T = int(gen.action_mask.sum(-1).max())  # generate may run past the longest response; padding only
    assert torch.equal(back.sequences, gen.sequences[:, : gen.prompt_length + T])
    assert torch.equal(back.attention_mask, gen.attention_mask[:, : gen.prompt_length + T])
    assert torch.equal(back.action_mask, gen.action_mask[:, :T])
    assert torch.equal(back.behaviour_logprobs, gen.behaviour_logprobs[:, :T])


def test_an_engine_draws_the_samples_the_trainer_would_and_reports_their_log_probs(tiny):
    model, tok = tiny
    engine = copy.deepcopy(model)  # another process's copy of the same weights
    request = _request(["Tell me a story.", "Explain gravity."])
    batch = rollout(engine, tok, request, policy_version=7)
    assert batch.policy_version == 7 and len(batch) == 8
    ids, am = tokenize_prompts(tok, rollout_texts(tok, list(request.prompts), True), CFG.max_prompt_tokens)
    local = generate(model, tok, ids, am, CFG, 0, list(request.sample_indices), group_size=CFG.group_size)
    gen = generation_of(batch, tok.pad_token_id)
    T = gen.action_mask.shape[1]
    assert torch.equal(gen.sequences, local.sequences[:, : local.prompt_length + T])
    # the engine's behaviour log-probs are what the trainer recomputes in a forward pass
    recomputed, _ = response_logprobs(model, gen.sequences, gen.attention_mask, T, CFG.temperature)
    mask = gen.action_mask.bool()
    torch.testing.assert_close(gen.behaviour_logprobs[mask], recomputed[mask], atol=1e-4, rtol=1e-4)


def test_truncated_importance_weights_correct_and_bound_a_stale_sampler():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9, 0.3]]))
    behaviour = torch.log(torch.tensor([[0.5, 0.4, 0.1, 0.3]]))  # tokens 2 and 3: the sampler disagreed
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = core.truncated_is_weights(old, behaviour, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5, 2.0, 0.0]]))  # 0.9 / 0.1 = 9, cut to 2
    # the weights scale each token's policy-gradient term and carry no gradient themselves
    logprobs = old.clone().requires_grad_(True)
    adv = torch.ones(1, 4)
    plain = core.policy_loss(logprobs, old, adv, mask, 0.2, normalizer=3.0)
    plain.loss.backward()
    g_plain = logprobs.grad.clone()
    logprobs.grad = None
    weighted = core.policy_loss(logprobs, old, adv, mask, 0.2, normalizer=3.0, is_weights=w.requires_grad_(True))
    weighted.loss.backward()
    torch.testing.assert_close(logprobs.grad, g_plain * w.detach())
    assert w.grad is None


@pytest.mark.slow
def test_the_trainer_on_engine_rollouts_matches_the_trainer_sampling_itself_and_sees_a_stale_engine():
    from tests.rlhf.ppo.helpers import make_trainer

    prompts = prompts_for(0, CFG.rollout_batch_size)
    local = make_trainer(CFG, lora=True)
    local_metrics = local.step(prompts)

    remote = make_trainer(CFG, lora=True)
    engine = copy.deepcopy(remote.policy)  # the engine holds the same version as the trainer
    calls = []

    def on_engine(request):
        calls.append(request)
        return rollout(engine, remote.tokenizer, request, policy_version=1)

    remote.rollout_fn = on_engine
    remote_metrics = remote.step(prompts)
    assert len(calls) == 1 and len(calls[0].prompts) == CFG.samples_per_iteration
    assert remote.last_rollout_version == 1
    for key in ("reward", "response_length", "policy_loss"):
        assert remote_metrics[key] == pytest.approx(local_metrics[key], abs=1e-4), key
    assert remote_metrics["behaviour_logprob_gap"] < 1e-3
    assert remote_metrics["behaviour_is_weight"] == pytest.approx(1.0, abs=1e-3)

    # the trainer moves on; the engine keeps the old weights: its samples are off-policy now
    remote.step(prompts_for(1, CFG.rollout_batch_size))
    stale = remote.step(prompts_for(2, CFG.rollout_batch_size))
    assert stale["behaviour_logprob_gap"] > 10 * remote_metrics["behaviour_logprob_gap"]
    assert stale["behaviour_is_weight"] != pytest.approx(1.0, abs=1e-3)
    assert len(calls) == 3

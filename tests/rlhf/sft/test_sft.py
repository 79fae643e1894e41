"""Supervised fine-tuning on demonstrations, on the PPO trainer's DeepSpeed engine (CPU).

What must hold: the loss covers the response tokens (and the end-of-turn token) and nothing
of the prompt; it equals the response's negative log-likelihood computed independently; a
few epochs on a tiny model lower it; the step trains exactly what PPO trains (all weights, or
only the LoRA adapters) and leaves a value head, PPO's learning rate and its schedule as they
were; 2 ranks under ZeRO-2 with gradient accumulation reproduce one process.
"""

import json

import pytest
import torch

from rlhf.models import CriticConfig, LoraConfig, build_critic, load_policy
from rlhf.ppo import DeepSpeedConfig, PPOConfig
from rlhf.sft import Demonstration, SFTConfig, make_batch, mean_nll, run_sft
from tests.rlhf.ppo.helpers import TINY, launch, letter_reward, make_trainer, prompts_for
from tests.rlhf.sft.demos import DEMOS

GRPO = PPOConfig(advantage_estimator="grpo", rollout_batch_size=4, group_size=2, max_new_tokens=4, minibatch_size=8, seed=0)


def _trainer(lora: bool = False, value_head: bool = False):
    from rlhf.ppo.trainer import PPOTrainer

    if not value_head:
        return make_trainer(GRPO, DeepSpeedConfig(zero_stage=0), lora=lora)
    ppo = PPOConfig(advantage_estimator="gae", rollout_batch_size=4, group_size=1, max_new_tokens=4,
                    minibatch_size=4, lr_warmup_steps=5, seed=0)
    policy, tokenizer = load_policy(TINY, LoraConfig(enabled=lora, rank=4, alpha=8.0))
    critic = build_critic(CriticConfig(kind="value_head"), policy, TINY, tokenizer)
    return PPOTrainer(policy, tokenizer, letter_reward(), ppo, DeepSpeedConfig(zero_stage=0), critic)


def test_the_loss_mask_covers_the_response_and_end_of_turn_only(tokenizer):
    demos = [DEMOS[0], DEMOS[2]]
    batch = make_batch(tokenizer, [*demos, None], max_prompt_tokens=64, max_response_tokens=32)
    T = batch.response_length
    prompt_part = batch.sequences[:, :-T]
    for row, demo in enumerate(demos):
        mask = batch.loss_mask[row]
        trained = batch.sequences[row, -T:][mask > 0].tolist()
        assert tokenizer.decode(trained) == demo.response + tokenizer.eos_token
        assert set(mask[mask > 0].tolist()) == {demo.weight}
        # the prompt is the chat template with the assistant turn opened, never in the loss
        prompt = tokenizer.decode(prompt_part[row][batch.attention_mask[row, :-T] > 0].tolist())
        assert prompt.endswith(f"{demo.prompt}<|im_end|>\n<|im_start|>assistant\n")
        assert demo.response not in prompt
    assert batch.loss_mask[2].sum() == 0  # padding row: attends like a real row, adds no loss
    assert batch.attention_mask[2].sum() == batch.attention_mask[0].sum()


def _token_nll(model, tokenizer, demo):
    """-log p of every token of the demonstration's unpadded sequence given what precedes it,
    a plain forward pass; and the number of response tokens (the last ones)."""
    from rlhf.sft.data import prompt_ids, response_ids

    p, r = prompt_ids(tokenizer, demo.prompt, 256), response_ids(tokenizer, demo.response, 256)
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return -logp.gather(-1, ids[0, 1:, None])[:, 0], len(r)


def test_the_loss_is_the_responses_negative_log_likelihood_given_the_prompt(tokenizer):
    trainer = _trainer()
    # trained a little first, so that response and prompt tokens have clearly different losses
    run_sft(trainer, DEMOS, SFTConfig(enabled=True, lr=1e-2, epochs=4, batch_size=2))
    demos = [DEMOS[0], DEMOS[1], DEMOS[2]]  # different lengths: padding on both sides
    got = mean_nll(trainer, demos, SFTConfig(enabled=True, batch_size=2))
    response = all_tokens = tokens = 0.0
    for d in demos:  # independently: each sequence alone, unpadded, a full forward pass
        nll, n = _token_nll(trainer.policy_engine.module, tokenizer, d)
        response, tokens = response + d.weight * nll[-n:].sum().item(), tokens + d.weight * n
        all_tokens += nll.mean().item() / len(demos)
    assert got == pytest.approx(response / tokens, rel=1e-5)
    assert abs(all_tokens - got) > 1.0  # counting prompt tokens would have shown


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_lowers_the_loss_and_trains_what_ppo_trains(lora):
    trainer = _trainer(lora=lora, value_head=True)
    engine = trainer.policy_engine
    named = dict(engine.module.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    lr_before, sched_before = engine.get_lr(), engine.lr_scheduler.state_dict()
    report = run_sft(trainer, DEMOS, SFTConfig(enabled=True, lr=3e-2 if lora else 1e-2, epochs=8, batch_size=4))

    assert report.demonstrations == len(DEMOS) and report.optimizer_steps == 8 * 2
    # adapters on the attention of a random tiny model move the loss less than full weights do
    assert report.loss_after < (report.loss_before - 0.15 if lora else 0.6 * report.loss_before), report
    assert report.epoch_loss[-1] < report.epoch_loss[0]
    changed = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
    head = {n for n in named if n.startswith("head.")}
    assert head and not changed & head  # the value head sat at learning rate 0
    if lora:
        assert changed and all("lora_" in n for n in changed)  # base weights untouched: the reference holds
    else:
        assert any("embed_tokens" in n or "layers.0" in n for n in changed)
    # PPO's learning rate and warm-up schedule are as they were, and PPO goes on
    assert engine.get_lr() == lr_before and engine.lr_scheduler.state_dict() == sched_before
    metrics = trainer.step(prompts_for(0, 4))
    assert metrics["policy_lr"] == pytest.approx(trainer.cfg.policy_lr * 2 / 5)  # warm-up step 2 of 5


def test_bad_input_is_refused():
    trainer = _trainer()
    with pytest.raises(ValueError, match="positive weight"):
        run_sft(trainer, [Demonstration("p", "r", weight=0.0)], SFTConfig(enabled=True))
    with pytest.raises(ValueError, match="non-empty response"):
        Demonstration("p", "")


@pytest.mark.distributed
def test_two_ranks_with_zero2_and_accumulation_match_one_process():
    def report(zero: int, accumulation: int, world: int, port: int) -> dict:
        out = launch("tests/rlhf/sft/run_sft.py", ["--zero", str(zero), "--accumulation", str(accumulation)], world, port)
        line = next(line for line in out[0].splitlines() if line.startswith("REPORT "))
        return json.loads(line[len("REPORT "):])

    single = report(zero=0, accumulation=1, world=1, port=29671)
    multi = report(zero=2, accumulation=2, world=2, port=29681)
    assert single["loss_after"] < single["loss_before"]  # it really trained
    for key in ("loss_before", "loss_after", "tokens"):
        assert multi[key] == pytest.approx(single[key], rel=1e-4), key
    assert multi["epoch_loss"] == pytest.approx(single["epoch_loss"], rel=1e-4)


def test_held_out_demonstrations_follow_their_prompt_and_need_both_sides():
    from rlhf.sft.trainer import split_validation

    cfg = SFTConfig(enabled=True, validation_fraction=0.5)
    # two corrections of each prompt: a prompt's corrections never straddle the split
    demos = [Demonstration(d.prompt, d.response + extra, prompt_id=d.prompt_id) for d in DEMOS for extra in ("", " Yes.")]
    train, held = split_validation(demos, cfg)
    assert train and held and len(train) + len(held) == len(demos)
    assert not {d.prompt_id for d in train} & {d.prompt_id for d in held}
    assert split_validation(demos, cfg) == (train, held)  # stable
    assert split_validation(demos, SFTConfig(enabled=True)) == (demos, [])  # no validation asked for
    lone = [d for d in demos if d.prompt_id == held[0].prompt_id]
    assert split_validation(lone, cfg) == (lone, [])  # all on one side: train on everything


def test_sft_stops_when_the_held_out_loss_stops_falling():
    trainer = _trainer()
    # answers the held-out prompts do not share: memorising the training ones soon costs them
    words = ["zebra", "quartz", "violin", "harbour", "copper", "lantern", "meadow", "saddle", "orbit", "pepper"]
    demos = [Demonstration(f"Say something about item {i}.", " ".join(words[i:] + words[:i]), prompt_id=f"q{i}") for i in range(10)]
    cfg = SFTConfig(enabled=True, lr=5e-2, epochs=12, batch_size=4, validation_fraction=0.3, patience=2)
    report = run_sft(trainer, demos, cfg)

    assert report.validation and report.demonstrations + report.validation == len(demos)
    assert report.stopped is not None and "validation loss" in report.stopped, report
    assert report.epochs_run < cfg.epochs and len(report.validation_loss) == report.epochs_run == len(report.epoch_loss)
    best = min(report.validation_loss)
    assert report.validation_loss.index(best) == report.epochs_run - 1 - cfg.patience
    assert all(v >= best for v in report.validation_loss[-cfg.patience:])
    assert report.loss_after < report.loss_before  # the training side still learned

"""Every place that writes a prompt for a model renders the run's template (rlhf/templates.py):
rollouts on an engine and in the trainer, SFT and DPO batches, the reward model's input and the
generation engine's chat requests all carry the system prompt and the few-shot turns. Tiny
models in one process, no Ray."""

from __future__ import annotations

import pytest

from rlhf.models import LoraConfig, load_policy
from rlhf.po import POConfig
from rlhf.ppo import DeepSpeedConfig, PPOConfig
from rlhf.ppo.rollout import RolloutRequest, RolloutSampling, rollout, rollout_texts
from rlhf.reward.config import RewardConfig
from rlhf.reward.model import build_reward_model
from rlhf.sft import Demonstration, SFTConfig
from rlhf.templates import FewShotTurn, PromptTemplate
from services.generation.engine import GenerateRequest, PolicyEngine
from tests.rlhf.ppo.conftest import _one_torch_thread  # noqa: F401  (DeepSpeed on the CPU, one torch thread)
from tests.rlhf.ppo.helpers import TINY, letter_reward

SYSTEM = "You answer like a pirate."
TEMPLATE = PromptTemplate(system=SYSTEM, few_shot=(FewShotTurn(user="Say hello.", assistant="Ahoy!"),))
PROMPT = "Describe the sea."
GRPO = PPOConfig(advantage_estimator="grpo", rollout_batch_size=2, group_size=2, max_new_tokens=2, minibatch_size=4, seed=0)


def _shows_the_template(text: str) -> bool:
    return text.index(SYSTEM) < text.index("Ahoy!") < text.index(PROMPT)


@pytest.fixture(scope="module")
def trainer():
    from rlhf.ppo.trainer import PPOTrainer

    policy, tokenizer = load_policy(TINY, LoraConfig(enabled=False))
    return PPOTrainer(policy, tokenizer, letter_reward(), GRPO, DeepSpeedConfig(zero_stage=0), template=TEMPLATE)


def _decoded(tokenizer, ids, mask=None) -> str:
    ids = ids.tolist() if mask is None else [t for t, m in zip(ids.tolist(), mask.tolist()) if m]
    return tokenizer.decode(ids)


def test_the_trainers_rollouts_show_the_template_sampled_by_itself_or_elsewhere(trainer):
    tok = trainer.tokenizer
    gen = trainer._generate([PROMPT, PROMPT], [0, 1])
    P = gen.prompt_length
    assert _shows_the_template(_decoded(tok, gen.sequences[0, :P], gen.attention_mask[0, :P]))
    requests = []

    def elsewhere(request):  # as the engines sample: from the request alone
        requests.append(request)
        return rollout(trainer.policy_engine.module, tok, request)

    trainer.rollout_fn = elsewhere
    try:
        gen = trainer._generate([PROMPT, PROMPT], [0, 1])
    finally:
        trainer.rollout_fn = None
    assert requests[0].sampling.template == TEMPLATE
    assert _shows_the_template(_decoded(tok, gen.sequences[0, :P], gen.attention_mask[0, :P]))


def test_sft_and_dpo_batches_show_the_template(trainer):
    from rlhf.po.trainer import _token_rows
    from rlhf.sft.trainer import _micro_batches

    tok = trainer.tokenizer
    sft = next(_micro_batches(trainer, [Demonstration(PROMPT, "Waves, matey.")], SFTConfig(enabled=True, batch_size=1)))
    assert _shows_the_template(_decoded(tok, sft.sequences[0], sft.attention_mask[0]))
    dpo = _token_rows(trainer, [(PROMPT, "Waves, matey.")], POConfig())
    assert _shows_the_template(_decoded(tok, dpo.sequences[0], dpo.attention_mask[0]))


def test_the_reward_model_and_the_generation_engines_rollouts_and_chats_show_the_template(tmp_path):
    from rlhf.reward.model import load_reward_model

    reward_model = build_reward_model(RewardConfig(), TINY, TEMPLATE)
    batch = reward_model.encode([PROMPT], ["Waves, matey."])
    scored = _decoded(reward_model.tokenizer, batch.input_ids[0], batch.attention_mask[0])
    assert _shows_the_template(scored) and scored.index(PROMPT) < scored.index("Waves, matey.")
    reward_model.save(tmp_path / "rm")
    assert load_reward_model(tmp_path / "rm").template == TEMPLATE  # a saved reward model reads as it was trained
    engine = PolicyEngine(TINY, None, template=TEMPLATE)
    [rollouts] = engine.rollout_many([RolloutRequest((PROMPT,), (0,), 0, 1, RolloutSampling.of(GRPO, TEMPLATE))])
    assert _shows_the_template(engine.tokenizer.decode(rollouts.prompt_ids[0]))
    text = engine.prompt_text(GenerateRequest(messages=(("user", PROMPT),)))
    assert _shows_the_template(text) and text == rollout_texts(engine.tokenizer, [PROMPT], True, TEMPLATE)[0]
    # a chat request that brings its own system message keeps it, in place of the template's
    own = engine.prompt_text(GenerateRequest(messages=(("system", "Be terse."), ("user", PROMPT))))
    assert SYSTEM not in own and own.index("Be terse.") < own.index("Ahoy!") < own.index(PROMPT)

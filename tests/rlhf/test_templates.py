"""Prompt templates (rlhf/templates.py): the default renders today's text exactly, system and
few-shot turns land in order, the version is a stable content hash, and a chat template that
cannot show a system message fails naming `template.system`."""

from __future__ import annotations

import copy

import pytest

from rlhf.config import ConfigError, RLHFConfig, parse_config
from rlhf.models import ModelConfig, load_tokenizer
from rlhf.templates import (
    DEFAULT_TEMPLATE,
    FewShotTurn,
    PromptTemplate,
    TemplateError,
    check_template,
    render_exchange,
    render_prompt,
)

TEMPLATE = PromptTemplate(system="Answer in one short sentence.",
                          few_shot=(FewShotTurn(user="Name a colour.", assistant="Blue."),
                                    FewShotTurn(user="Name a fruit.", assistant="A pear.")))
NO_SYSTEM_ROLE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}<turn>{{ m['role'] }}\n{{ m['content'] }}</turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<turn>model\n{% endif %}")
DROPS_SYSTEM = ("{% for m in messages %}{% if m['role'] != 'system' %}<turn>{{ m['role'] }}\n{{ m['content'] }}</turn>\n"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}<turn>model\n{% endif %}")


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def any_tokenizer(request, model_cache_dir):
    """The tiny test model's tokenizer and SmolLM2-135M-Instruct's (both from its GGUF file)."""
    return load_tokenizer(ModelConfig(source=request.param, cache_dir=model_cache_dir))


def _with_chat_template(tokenizer, template: str):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def test_the_default_template_renders_exactly_one_user_turn(any_tokenizer):
    user = [{"role": "user", "content": "Tell me a joke."}]
    assert render_prompt(any_tokenizer, "Tell me a joke.") == any_tokenizer.apply_chat_template(
        user, add_generation_prompt=True, tokenize=False)
    exchange = user + [{"role": "assistant", "content": "No."}]
    assert render_exchange(any_tokenizer, "Tell me a joke.", "No.", DEFAULT_TEMPLATE) == any_tokenizer.apply_chat_template(
        exchange, tokenize=False)


def test_system_and_few_shot_turns_come_in_order_before_the_prompt(tokenizer):
    text = render_prompt(tokenizer, "Name an animal.", TEMPLATE)
    order = ["<|im_start|>system\nAnswer in one short sentence.<|im_end|>", "Name a colour.", "Blue.", "Name a fruit.",
             "A pear.", "<|im_start|>user\nName an animal.<|im_end|>"]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions)
    assert text.endswith("<|im_start|>assistant\n") and "You are a helpful AI assistant" not in text
    exchange = render_exchange(tokenizer, "Name an animal.", "A cat.", TEMPLATE)
    assert exchange.index("Answer in one short sentence.") < exchange.index("A pear.") < exchange.index("A cat.")


def test_chat_template_arguments_reach_the_chat_template(tokenizer):
    loud = _with_chat_template(tokenizer, "{% if loud %}LOUD {% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert render_prompt(loud, "hi") == "hi"
    assert render_prompt(loud, "hi", PromptTemplate(chat_template_kwargs={"loud": True})) == "LOUD hi"


def test_the_version_hashes_the_content_only():
    assert DEFAULT_TEMPLATE.version == "sha256:6cd9dcfdf9a2"  # the same in every run, on every machine
    assert PromptTemplate(system="s").version == PromptTemplate(system="s", name="mine").version
    variants = [
        DEFAULT_TEMPLATE, TEMPLATE, TEMPLATE.model_copy(update={"system": "Answer in two sentences."}),
        TEMPLATE.model_copy(update={"few_shot": TEMPLATE.few_shot[::-1]}),
        TEMPLATE.model_copy(update={"few_shot": TEMPLATE.few_shot[:1]}),
        TEMPLATE.model_copy(update={"few_shot": (FewShotTurn(user="Name a colour.", assistant="Red."), TEMPLATE.few_shot[1])}),
        TEMPLATE.model_copy(update={"chat_template_kwargs": {"enable_thinking": False}}),
        TEMPLATE.model_copy(update={"chat_template_kwargs": {"enable_thinking": True}}),
    ]
    assert len({t.version for t in variants}) == len(variants)
    assert PromptTemplate.model_validate(TEMPLATE.model_dump(mode="json")).version == TEMPLATE.version


def test_a_run_config_records_the_version_and_reads_it_back():
    cfg = parse_config({"template": {"system": "Be brief.", "few_shot": [{"user": "a", "assistant": "b"}]}}, RLHFConfig)
    dumped = cfg.model_dump(mode="json")  # as config.json keeps it
    assert dumped["template"]["version"] == cfg.template.version
    assert RLHFConfig.model_validate(dumped) == cfg
    dumped["template"]["system"] = "Be long."
    with pytest.raises(ConfigError, match=r"template: version: .* is recorded, but"):
        parse_config(dumped, RLHFConfig)
    with pytest.raises(ConfigError, match=r"template: .*ppo\.chat_template"):
        parse_config({"template": {"system": "x"}, "ppo": {"chat_template": False}}, RLHFConfig)
    with pytest.raises(ConfigError, match=r"template\.chat_template_kwargs: .*add_generation_prompt"):
        parse_config({"template": {"chat_template_kwargs": {"add_generation_prompt": False}}}, RLHFConfig)


def test_a_chat_template_without_a_system_role_fails_naming_template_system(tokenizer):
    check_template(tokenizer, TEMPLATE)  # SmolLM2's has one
    for chat_template in (NO_SYSTEM_ROLE, DROPS_SYSTEM):
        other = _with_chat_template(tokenizer, chat_template)
        check_template(other, DEFAULT_TEMPLATE)
        check_template(other, PromptTemplate(few_shot=TEMPLATE.few_shot))
        with pytest.raises(TemplateError, match=r"^template\.system: the chat template of the policy (rejects|drops)"):
            check_template(other, TEMPLATE, "the policy")


def test_the_chat_template_is_applied_in_one_place_only():
    """Rollouts, SFT/DPO batches, the reward model and the engines render through rlhf/templates.py."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    callers = sorted(str(path.relative_to(root)) for package in ("rlhf", "services", "actors", "hitl", "bench")
                     for path in (root / package).rglob("*.py") if ".apply_chat_template(" in path.read_text())
    assert callers == ["rlhf/templates.py"]

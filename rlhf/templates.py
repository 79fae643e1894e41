"""Prompt templates: what a model sees around a prompt, rendered in one place.

    from rlhf.templates import PromptTemplate, render_prompt
    text = render_prompt(tokenizer, "Tell me a joke.", cfg.template)   # what the policy continues

A template is the run config's ``template`` section: an optional system prompt, few-shot
turns placed before the prompt, and keyword arguments of the tokenizer's chat template (say
``enable_thinking: false``). Every place that writes a prompt for a model renders it here:
rollouts (``rlhf.ppo.rollout``), SFT and DPO/IPO/KTO batches (``rlhf.sft.data``), the reward
model's (prompt, answer) text (``rlhf.reward.data``) and the generation engines
(``services.generation.engine``), so the policy, the reward model and the server read the same
text. The default template is one user turn: exactly
``apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)``.

``version`` is a hash of what changes the text (system, few-shot turns, chat-template
arguments; not ``name``): the same template has the same version in every run. Each policy's
lineage and each labeling task's metadata carry it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

RESERVED_KWARGS = frozenset({"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                             "return_dict", "return_tensors", "chat_template", "tools", "documents"})
"""Arguments of ``apply_chat_template`` that the renderer sets itself (or that are not
template options): not allowed in ``template.chat_template_kwargs``."""

TASK_METADATA_KEY = "template_version"
"""The key of a labeling task's metadata that names the template its answers were written under."""


class TemplateError(ValueError):
    """A template that the tokenizer's chat template cannot render as configured; the message
    names the field of the ``template`` section."""


class FewShotTurn(BaseModel):
    """One example exchange shown to the model before the prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str = Field(min_length=1)
    """The example prompt (a user turn)."""

    assistant: str = Field(min_length=1)
    """The example answer (an assistant turn)."""


class PromptTemplate(BaseModel):
    """How a prompt is laid out for the model, around the tokenizer's chat template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    """A label for people (reports, the labeling page's metadata); not part of ``version``."""

    system: str | None = Field(None, min_length=1)
    """A system prompt, the first message of every conversation; None: no system message (a
    chat template may still write its own default one, as it does without a template)."""

    few_shot: tuple[FewShotTurn, ...] = ()
    """Example exchanges (``{user, assistant}``), placed in order after the system prompt and
    before the prompt."""

    chat_template_kwargs: dict[str, bool | int | float | str] = Field(default_factory=dict)
    """Extra arguments of the tokenizer's chat template (``apply_chat_template``), e.g.
    ``{enable_thinking: false}`` for a model that thinks aloud by default."""

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(RESERVED_KWARGS & value.keys())
        if reserved:
            raise ValueError(f"{', '.join(reserved)}: set by hitl itself, not a chat-template option")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _recorded_version(cls, data: Any, handler: Any) -> PromptTemplate:
        """A run's config.json records ``version``: it is accepted when it is the content's own."""
        recorded = None
        if isinstance(data, Mapping) and "version" in data:
            recorded = data["version"]
            data = {k: v for k, v in data.items() if k != "version"}
        template = handler(data)
        if recorded is not None and recorded != template.version:
            raise ValueError(f"version: {recorded!r} is recorded, but the template's content hashes to {template.version!r} "
                             "(version is computed: leave it out)")
        return template

    @computed_field  # type: ignore[prop-decorator]
    @property
    def version(self) -> str:
        """``sha256:`` and 12 hex digits of the system prompt, few-shot turns and chat-template
        arguments (canonical JSON): stable across runs and machines."""
        content = {
            "system": self.system,
            "few_shot": [[turn.user, turn.assistant] for turn in self.few_shot],
            "chat_template_kwargs": dict(sorted(self.chat_template_kwargs.items())),
        }
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

    def __hash__(self) -> int:  # rollout requests with equal sampling (template included) share a batch
        return hash((self.name, self.version))

    @property
    def is_default(self) -> bool:
        """One user turn and the chat template's defaults: the text hitl wrote before templates."""
        return self.system is None and not self.few_shot and not self.chat_template_kwargs

    def record(self) -> dict[str, Any]:
        """What lineage and reports keep of the template: its version, name and content."""
        return self.model_dump(mode="json")

    def task_metadata(self) -> dict[str, str]:
        """The entries a labeling task's metadata carries for the template its answers were written under."""
        return {TASK_METADATA_KEY: self.version}


DEFAULT_TEMPLATE = PromptTemplate()
"""One user turn: the text hitl wrote before templates."""


# --------------------------------------------------------------------------- rendering


def messages(template: PromptTemplate, chat: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The template's turns around a conversation of (role, content) turns: its system prompt
    first (unless the conversation brings its own), then the few-shot turns, then the
    conversation."""
    out: list[dict[str, str]] = []
    has_system = any(role == "system" for role, _ in chat)
    if template.system is not None and not has_system:
        out.append({"role": "system", "content": template.system})
    start = 1 if chat and chat[0][0] == "system" else 0
    out.extend({"role": role, "content": content} for role, content in chat[:start])
    for turn in template.few_shot:
        out.append({"role": "user", "content": turn.user})
        out.append({"role": "assistant", "content": turn.assistant})
    out.extend({"role": role, "content": content} for role, content in chat[start:])
    return out


def render_chat(tokenizer, chat: Sequence[tuple[str, str]], template: PromptTemplate = DEFAULT_TEMPLATE,
                add_generation_prompt: bool = True) -> str:
    """A conversation in the tokenizer's chat template with the template's turns around it,
    the assistant's turn opened (``add_generation_prompt``): what the model continues."""
    from jinja2 import TemplateError as JinjaTemplateError

    try:
        text = tokenizer.apply_chat_template(messages(template, chat), tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **template.chat_template_kwargs)
    except JinjaTemplateError as err:
        if template.is_default:
            raise
        raise TemplateError(f"template: the tokenizer's chat template cannot render the configured turns: {err}") from err
    return str(text)


def render_prompt(tokenizer, prompt: str, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The prompt as a user turn, with the template's turns before it and the assistant's
    turn opened: the text the policy continues (rollouts, SFT, labeling tasks, evaluation)."""
    return render_chat(tokenizer, (("user", prompt),), template)


def render_exchange(tokenizer, prompt: str, answer: str, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The prompt and its answer as one conversation (no turn opened after it): the text the
    reward model scores."""
    return render_chat(tokenizer, (("user", prompt), ("assistant", answer)), template, add_generation_prompt=False)


def check_template(tokenizer, template: PromptTemplate, whose: str = "the model") -> None:
    """Fail early, naming the field, when ``tokenizer`` cannot show the template as configured:
    no chat template at all, a chat template that rejects (or silently drops) a system
    message, one that loses the few-shot turns, or one that refuses the extra arguments."""
    if template.is_default:
        return
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"template: {whose} has no chat template, so it cannot show a system prompt, few-shot turns "
                            "or chat-template arguments; remove them from the template section")
    from jinja2 import TemplateError as JinjaTemplateError

    probe = "hitl template probe"
    if template.system is not None:
        try:
            text = render_chat(tokenizer, (("user", probe),), PromptTemplate(system=template.system))
        except TemplateError as err:
            raise TemplateError(f"template.system: the chat template of {whose} rejects a system message "
                                f"({err.__cause__ or err}); remove template.system or use a model whose template has a "
                                "system role") from err
        if template.system.strip() not in text:
            raise TemplateError(f"template.system: the chat template of {whose} drops the system message; remove "
                                "template.system or use a model whose template has a system role")
    if template.few_shot:
        text = render_chat(tokenizer, (("user", probe),), PromptTemplate(few_shot=template.few_shot))
        lost = [i for i, turn in enumerate(template.few_shot) if turn.assistant.strip() not in text]
        if lost:
            raise TemplateError(f"template.few_shot[{lost[0]}]: the chat template of {whose} drops earlier assistant turns")
    try:
        render_prompt(tokenizer, probe, template)
    except (TemplateError, JinjaTemplateError, TypeError) as err:
        raise TemplateError(f"template.chat_template_kwargs: the chat template of {whose} refuses them: {err}") from err

"""Critics: per-token values V(s_t), shape (B, T), by config.

- ``value_head``: :class:`ValueHeadCritic` — a linear head on the policy's own decoder
  backbone. Its parameters are the policy's plus the head's (the policy is a registered
  submodule), so train it in one engine with a joint loss; :meth:`policy_and_values` gives
  logits and values from one forward pass. ``head_parameters()`` names the head alone.
- ``separate``: :class:`SeparateCritic` — its own backbone (by default a second copy of the
  policy's starting weights, without the LM head) plus a head; optionally with LoRA.

Both take the policy's tokens and are called as
``critic(input_ids, attention_mask, position_ids=None) -> values (B, T)``; positions default
to those counted over real tokens, so left and right padding give the same values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlhf.models.config import CriticConfig, ModelConfig
from rlhf.models.loading import (
    PolicyModel,
    apply_lora,
    backbone_of,
    load_causal_lm,
    position_ids_from_mask,
)


@dataclass
class PolicyValueOutput:
    """One forward pass of the policy with its value head."""

    logits: torch.Tensor  # (B, T, V) next-token logits of the policy
    values: torch.Tensor  # (B, T) V(s_t) after reading token t


class ValueHead(nn.Module):
    """Linear map from hidden states (B, T, H) to scalars (B, T), computed in float32."""

    def __init__(self, hidden_size: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        if init_std > 0:
            nn.init.normal_(self.linear.weight, std=init_std)
        else:
            nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T)
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def _hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


class ValueHeadCritic(nn.Module):
    """Values from the policy's backbone: ``head(backbone(tokens))``."""

    def __init__(self, policy: PolicyModel, head: ValueHead) -> None:
        super().__init__()
        self.policy = policy
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T)
    ) -> torch.Tensor:  # (B, T)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = backbone_of(self.policy)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.head(hidden)

    def policy_and_values(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T)
    ) -> PolicyValueOutput:
        """Policy logits and values from one pass through the shared backbone."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
        )
        return PolicyValueOutput(logits=out.logits, values=self.head(out.hidden_states[-1]))

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The value head's own parameters (the backbone's belong to the policy)."""
        return self.head.parameters()


class SeparateCritic(nn.Module):
    """Values from an independent backbone: ``head(backbone(tokens))``."""

    def __init__(self, backbone: nn.Module, head: ValueHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T)
    ) -> torch.Tensor:  # (B, T)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.head(hidden)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The value head's own parameters."""
        return self.head.parameters()


Critic = ValueHeadCritic | SeparateCritic


def load_backbone(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """The decoder stack (no LM head) of a model config: (B, T) tokens -> (B, T, H) states."""
    return backbone_of(load_causal_lm(cfg, tokenizer))


def _check_vocab(backbone: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = backbone.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ValueError(
            f"critic backbone has {rows} embedding rows but the policy's tokenizer "
            f"{len(tokenizer)} tokens: the critic must read the policy's tokens"
        )


def build_critic(
    cfg: CriticConfig,
    policy: PolicyModel,
    policy_model: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
) -> Critic:
    """The critic named by ``cfg.kind``, reading the policy's tokens.

    The value head's initial weights are drawn inside a forked RNG seeded by the backbone's
    seed, so building a critic does not advance the caller's random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(policy_model.seed)
        if cfg.kind == "value_head":
            return ValueHeadCritic(policy, ValueHead(_hidden_size(policy), cfg.head_init_std))
        backbone = load_backbone(cfg.model or policy_model, tokenizer)
        _check_vocab(backbone, tokenizer)
        head = ValueHead(_hidden_size(backbone), cfg.head_init_std)
    if cfg.lora is not None and cfg.lora.enabled:
        backbone = apply_lora(backbone, cfg.lora, task_type=None)
    return SeparateCritic(backbone, head)

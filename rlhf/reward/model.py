"""The reward model: r(prompt, response) = head(backbone(chat tokens))[last real token] - offset.

The backbone is a causal LM's decoder stack (no LM head) — by default a copy of the policy's
starting weights — and the head a linear map to one scalar. Sequences are right-padded and
positions counted over real tokens, so a response's score does not depend on how much
padding its batch needs or on its batch neighbours.

Saved as a self-contained directory (LoRA adapters merged into the backbone)::

    <dir>/backbone/        transformers checkpoint of the decoder stack (safetensors)
    <dir>/tokenizer/       the tokenizer with its chat template
    <dir>/head.safetensors the head's weight and bias, and the centring offset
    <dir>/reward.json      the RewardConfig it was trained with
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from rlhf.models import (
    ModelConfig,
    ValueHead,
    apply_lora,
    load_backbone,
    load_tokenizer,
    position_ids_from_mask,
)
from rlhf.reward.config import RewardConfig
from rlhf.reward.data import TokenBatch, encode


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of each row's last real token (either padding side)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


class RewardModel(nn.Module):
    """Scalar scores of (prompt, response) pairs."""

    def __init__(
        self,
        backbone: nn.Module,
        head: ValueHead,
        tokenizer: PreTrainedTokenizerBase,
        cfg: RewardConfig,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.register_buffer("offset", torch.zeros(()))  # () subtracted from every score

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
    ) -> torch.Tensor:  # (B,) float32
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).last_hidden_state  # (B, T, H)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = hidden[rows, last_token_index(attention_mask)]  # (B, H)
        return self.head(last.unsqueeze(1)).squeeze(1) - self.offset

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> TokenBatch:
        """Chat-formatted, truncated, right-padded tokens on the model's device."""
        batch = encode(self.tokenizer, prompts, responses, self.cfg.max_length)
        device = self.offset.device
        return TokenBatch(batch.input_ids.to(device), batch.attention_mask.to(device))

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Scores (B,) of one batch, with gradients (training)."""
        batch = self.encode(prompts, responses)
        return self(batch.input_ids, batch.attention_mask)

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        batch_size: int | None = None,
    ) -> torch.Tensor:  # (B,) float32, on the CPU
        """Scores of any number of pairs, in eval mode, ``batch_size`` (default
        ``cfg.score_batch_size``) at a time; similar lengths are batched together."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        size = batch_size or self.cfg.score_batch_size
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        scores = torch.empty(len(prompts), dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                values = self.score_batch([prompts[i] for i in chunk], [responses[i] for i in chunk])
                scores[chunk] = values.float().cpu()
        finally:
            self.train(was_training)
        return scores

    def save(self, directory: str | Path) -> None:
        """Write a self-contained copy (adapters merged) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        if isinstance(backbone, PeftModel):
            backbone = copy.deepcopy(backbone).merge_and_unload()
        backbone.save_pretrained(str(directory / "backbone"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        head = {
            "weight": self.head.linear.weight.detach().cpu().contiguous(),
            "bias": self.head.linear.bias.detach().cpu().contiguous(),
            "offset": self.offset.detach().cpu().reshape(1),
        }
        save_file(head, str(directory / "head.safetensors"))
        (directory / "reward.json").write_text(self.cfg.model_dump_json(indent=2) + "\n")


def build_reward_model(cfg: RewardConfig, policy_model: ModelConfig) -> RewardModel:
    """A fresh reward model on ``cfg.model`` (or the policy's starting weights), with LoRA if
    configured; the head is drawn from ``cfg.seed`` without touching the global RNG."""
    model_cfg = cfg.model or policy_model
    tokenizer = load_tokenizer(model_cfg)
    backbone: nn.Module = load_backbone(model_cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = ValueHead(int(backbone.config.hidden_size), cfg.head_init_std)
    if cfg.lora is not None and cfg.lora.enabled:
        backbone = apply_lora(backbone, cfg.lora, task_type=None)
    return RewardModel(backbone, head, tokenizer, cfg)


def load_reward_model(directory: str | Path) -> RewardModel:
    """A reward model written by :meth:`RewardModel.save` (merged weights, no adapters)."""
    directory = Path(directory)
    cfg = RewardConfig.model_validate_json((directory / "reward.json").read_text())
    backbone = AutoModel.from_pretrained(str(directory / "backbone"), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"), local_files_only=True)
    tensors = load_file(str(directory / "head.safetensors"))
    head = ValueHead(int(backbone.config.hidden_size))
    head.linear.weight.data.copy_(tensors["weight"])
    head.linear.bias.data.copy_(tensors["bias"])
    model = RewardModel(backbone.eval(), head, tokenizer, cfg)
    model.offset.fill_(float(tensors["offset"][0]))
    return model

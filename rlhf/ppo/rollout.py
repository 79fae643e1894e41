"""Rollouts: batched sampling with the KV cache, EOS-aware response masks, and the log-probs
of the sampled tokens recomputed in a forward pass.

Sampling is *per sample*: response ``i`` of an iteration draws its random numbers from its own
generator, seeded by (seed, iteration, global sample index). A sample is therefore the same
whichever rank generates it and whatever else shares its batch, which makes N data-parallel
processes reproduce one process, and a resumed run reproduce an uninterrupted one. It is done
inside ``model.generate`` (KV cache, left padding, EOS handling, min/max lengths) by a logits
processor that draws the token by inverse-CDF sampling from the temperature/top-k/top-p
distribution and hands ``generate`` a one-hot score to pick greedily.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.models.packed import forget_packs
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.core import logprobs_and_entropy, logprobs_from_logits
from rlhf.templates import DEFAULT_TEMPLATE, PromptTemplate, render_prompt


def sample_seed(seed: int, iteration: int, index: int) -> int:
    """The generator seed of sample ``index`` in ``iteration`` (a 63-bit mix of the three)."""
    x = (seed * 0x9E3779B97F4A7C15 + iteration * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def sample_uniforms(seed: int, iteration: int, indices: list[int], steps: int) -> Tensor:
    """(B, steps) uniforms in [0, 1): row b from the generator of sample ``indices[b]``."""
    rows = []
    for index in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, iteration, index))
        rows.append(torch.rand(steps, generator=g, dtype=torch.float64))
    return torch.stack(rows)


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering; removed entries become -inf."""
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass of the tokens before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class SeededSampler:
    """A ``generate`` logits processor that samples each row with its own uniforms (B, steps)
    and returns a score that is 0 at the drawn token and -inf elsewhere."""

    def __init__(self, uniforms: Tensor, prompt_length: int, temperature: float, top_k: int, top_p: float) -> None:
        self.uniforms = uniforms
        self.prompt_length = prompt_length
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.logprobs: list[Tensor] = []  # per step, (B,): log softmax(logits / T) of the drawn token

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        step = input_ids.shape[1] - self.prompt_length
        probs = filter_logits(scores, self.temperature, self.top_k, self.top_p).softmax(-1)
        cdf = probs.double().cumsum(-1)
        u = self.uniforms[:, step].to(cdf.device).unsqueeze(-1) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp(max=scores.shape[-1] - 1)
        # never land on a token of probability 0 (possible at the edge of the cdf)
        token = torch.where(probs.gather(-1, token) > 0, token, probs.argmax(-1, keepdim=True))
        # the behaviour log-prob as the trainer computes it (temperature, no top-k/top-p cut)
        self.logprobs.append(logprobs_from_logits(scores.unsqueeze(1), token, self.temperature)[:, 0])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, token, 0.0)

    def behaviour_logprobs(self, steps: int) -> Tensor:
        """(B, steps) log-probs of the drawn tokens (0 past the steps taken)."""
        taken = torch.stack(self.logprobs, 1) if self.logprobs else torch.zeros(self.uniforms.shape[0], 0)
        if taken.shape[1] < steps:
            taken = torch.cat([taken, taken.new_zeros(taken.shape[0], steps - taken.shape[1])], 1)
        return taken[:, :steps]


@dataclass
class Generation:
    """Sampled responses of a batch of prompts (before scoring)."""

    sequences: Tensor  # (B, P+T) long: left-padded prompt ++ right-padded response
    attention_mask: Tensor  # (B, P+T) long: 1 on prompt tokens and response tokens up to EOS
    action_mask: Tensor  # (B, T) float: 1 on response tokens up to and including the first EOS
    behaviour_logprobs: Tensor | None = None  # (B, T) log mu(a_t|s_t) of the sampler, 0 on padding

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.action_mask.shape[1]

    @property
    def responses(self) -> Tensor:  # (B, T) long
        return self.sequences[:, self.prompt_length :]


def rollout_texts(tokenizer, prompts: list[str], chat_template: bool,
                  template: PromptTemplate = DEFAULT_TEMPLATE) -> list[str]:
    """What the policy continues: each prompt rendered by ``template`` (``rlhf.templates``: a
    user turn in the tokenizer's chat template, the assistant's turn opened) when
    ``chat_template`` and the tokenizer has one, or the prompt as it is."""
    if not chat_template or not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [render_prompt(tokenizer, p, template) for p in prompts]


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int, device: torch.device | str = "cpu"):
    """Left-padded (input_ids, attention_mask), each (B, P); long prompts keep their last tokens."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    enc = tokenizer(
        prompts, return_tensors="pt", padding=True, truncation=True,
        max_length=max_prompt_tokens, add_special_tokens=False,
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a response (the tokenizer's and the generation config's)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(i for i in ids if i is not None)


def response_mask(responses: Tensor, eos_ids: list[int]) -> Tensor:
    """1 on tokens up to and including the first EOS of each row, 0 after it. (B, T) -> (B, T) float."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~seen_before).float()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    input_ids: Tensor,
    attention_mask: Tensor,
    cfg: PPOConfig,
    iteration: int,
    sample_indices: list[int],
    synced_gpus: bool = False,
    group_size: int = 1,
) -> Generation:
    """Sample one response per row of ``input_ids`` (rows already repeated per group).

    ``sample_indices`` are the global indices of the rows (for per-sample seeding);
    ``synced_gpus`` keeps all ranks stepping together (needed under ZeRO-3 with N > 1).
    With ``group_size`` G > 1 and groups of G rows sharing a prompt, the prompt is prefilled
    once per group and its KV cache repeated G times (1/G of the prefill compute).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    eos = eos_token_ids(model, tokenizer)
    P = input_ids.shape[1]
    sampler = SeededSampler(
        sample_uniforms(cfg.seed, iteration, sample_indices, cfg.max_new_tokens),
        P, cfg.temperature, cfg.top_k, cfg.top_p,
    )
    gen_cfg = GenerationConfig(
        do_sample=False, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens or None,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, use_cache=True,
        temperature=None, top_p=None, top_k=None,
    )
    was_training = model.training
    model.eval()
    try:
        extra = {}
        if P > 1 and not synced_gpus and _shares_prompts(input_ids, group_size):
            extra["cache"] = _prefill(model, input_ids[:, :-1], attention_mask[:, :-1], group_size)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg,
            logits_processor=LogitsProcessorList([sampler]), synced_gpus=synced_gpus, **extra,
        )
    finally:
        model.train(was_training)
    responses = out[:, P:]
    if responses.shape[1] == 0:  # nothing generated (cannot happen with max_new_tokens > 0)
        raise RuntimeError("generate returned no new tokens")
    action_mask = response_mask(responses, eos)
    # tokens after the first EOS are padding: make them the pad token for clean decoding
    responses = torch.where(action_mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
    sequences = torch.cat([input_ids, responses], 1)
    full_mask = torch.cat([attention_mask.long(), action_mask.long()], 1)
    behaviour = sampler.behaviour_logprobs(responses.shape[1]).to(action_mask.device) * action_mask
    return Generation(sequences=sequences, attention_mask=full_mask, action_mask=action_mask, behaviour_logprobs=behaviour)


@contextmanager
def merged_lora(model):
    """Generate with the PEFT part merged into the base weights (no adapter products per layer
    and token), then restore the base weights *exactly* (saved copies, not an unmerge, so the
    reference policy "adapters off" never drifts). Kinds that merge: LoRA, DoRA, IA3; BitFit
    and bottleneck adapters (and a model without a PEFT part) generate unmerged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from rlhf.models.peft_kinds import can_merge

    if not can_merge(model):
        yield
        return
    bases = [m.get_base_layer() for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(t, t.detach().clone()) for b in bases for t in (b.weight, getattr(b, "bias", None)) if t is not None]
    model.merge_adapter()  # peft writes through .data: kept oneDNN packs would not see it
    forget_packs(model)
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unmerge result can be inaccurate")  # IA3: restored below
            model.unmerge_adapter()
        with torch.no_grad():
            for tensor, original in saved:
                tensor.copy_(original)
        forget_packs(model)


def _prefill(model, prompt_ids: Tensor, attention_mask: Tensor, group_size: int):
    """KV cache of all but the last prompt token, computed once per group and repeated for its
    rows; ``generate`` then runs the last prompt token and the response."""
    from transformers import DynamicCache

    first = slice(None, None, group_size)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=prompt_ids[first], attention_mask=attention_mask[first], position_ids=position_ids[first],
        cache=DynamicCache(), use_cache=True, logits_to_keep=1,
    )
    cache = out.cache
    cache.batch_repeat_interleave(group_size)
    return cache


def decode_responses(tokenizer, gen: Generation) -> list[str]:
    """The text of each response, without the EOS and padding."""
    texts = []
    for row, mask in zip(gen.responses.tolist(), gen.action_mask.long().tolist()):
        ids = [tok for tok, m in zip(row, mask) if m]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def _shares_prompts(prompt_ids: Tensor, group_size: int) -> bool:
    """Whether every group of ``group_size`` consecutive rows holds one prompt."""
    if group_size <= 1 or prompt_ids.shape[0] % group_size:
        return False
    groups = prompt_ids.view(-1, group_size, prompt_ids.shape[1])
    return bool((groups == groups[:, :1]).all())


def _checkpointing(model) -> bool:
    from rlhf.models import checkpointing_active

    return checkpointing_active(model)


def response_logits(
    model, sequences: Tensor, attention_mask: Tensor, response_length: int, group_size: int = 1,
    with_hidden: bool = False,
):
    """Next-token logits at the T response positions, (B, T, V); with ``with_hidden`` also the
    last hidden states there, (B, T, H) (the states a value head reads).

    Only the response positions go through the LM head. When the rows come in groups that
    share a prompt (GRPO/RLOO/PPO with several samples per prompt), the prompt is run once
    per group and its KV cache repeated for the group's responses: the prompt costs 1/G of
    the compute, in the forward and (gradients flow through the cache) the backward pass.
    Positions are counted over real tokens, as ``generate`` does with left padding.
    """
    T = response_length
    P = sequences.shape[1] - T
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    extra = {"output_hidden_states": True} if with_hidden else {}
    if _shares_prompts(sequences[:, :P], group_size) and not _checkpointing(model):
        from transformers import DynamicCache

        first = slice(None, None, group_size)
        prompt_out = model(
            input_ids=sequences[first, :P], attention_mask=attention_mask[first, :P],
            position_ids=position_ids[first, :P], cache=DynamicCache(), use_cache=True,
            logits_to_keep=1, **extra,
        )
        cache = prompt_out.cache
        cache.batch_repeat_interleave(group_size)
        response_out = model(
            input_ids=sequences[:, P:], attention_mask=attention_mask, position_ids=position_ids[:, P:],
            cache=cache, use_cache=True, logits_to_keep=T, **extra,
        )
        head = prompt_out.logits.repeat_interleave(group_size, dim=0)  # predicts response token 0
        logits = torch.cat([head, response_out.logits[:, :-1]], dim=1)
        if not with_hidden:
            return logits
        last_prompt = prompt_out.hidden_states[-1][:, -1:].repeat_interleave(group_size, dim=0)
        return logits, torch.cat([last_prompt, response_out.hidden_states[-1][:, :-1]], dim=1)
    out = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=T + 1, use_cache=False, **extra,
    )
    logits = out.logits[:, :-1]
    if not with_hidden:
        return logits
    return logits, out.hidden_states[-1][:, -(T + 1) : -1]


def response_logprobs(
    model,
    sequences: Tensor,
    attention_mask: Tensor,
    response_length: int,
    temperature: float,
    with_entropy: bool = False,
    group_size: int = 1,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log π(a_t|s_t) of the response tokens, (B, T), and optionally the entropy (B, T),
    differentiable only with ``entropy_grad`` (an entropy bonus), else a metric.
    See :func:`response_logits` for ``group_size``."""
    logits = response_logits(model, sequences, attention_mask, response_length, group_size)
    labels = sequences[:, -response_length:]
    if with_entropy:
        return logprobs_and_entropy(logits, labels, temperature, entropy_grad)
    return logprobs_from_logits(logits, labels, temperature), None


# --------------------------------------------------------------------------- rollouts on engines
@dataclass(frozen=True)
class RolloutSampling:
    """How rollouts are sampled: the PPO config's sampling fields, as engines receive them."""

    seed: int
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    min_new_tokens: int
    max_prompt_tokens: int
    chat_template: bool
    template: PromptTemplate = DEFAULT_TEMPLATE  # how prompts are rendered (the run's template section)

    @classmethod
    def of(cls, cfg: PPOConfig, template: PromptTemplate = DEFAULT_TEMPLATE) -> "RolloutSampling":
        return cls(cfg.seed, cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens, cfg.min_new_tokens,
                   cfg.max_prompt_tokens, cfg.chat_template, template)


@dataclass(frozen=True)
class RolloutRequest:
    """One trainer rank's rollouts: one response per row. Rows come in groups of
    ``group_size`` that share a prompt; each row is seeded by its global sample index, so a
    sample is the same on whichever engine, in whatever batch, it is drawn."""

    prompts: tuple[str, ...]  # one per row (a prompt repeated group_size times in a row)
    sample_indices: tuple[int, ...]  # global index of each row's sample
    iteration: int
    group_size: int
    sampling: RolloutSampling

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.sample_indices):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.sample_indices)} sample indices")


@dataclass(frozen=True)
class RolloutBatch:
    """Rollouts as an engine returns them: token ids without padding, per row."""

    prompt_ids: list[list[int]]  # the prompt as the engine tokenized it
    response_ids: list[list[int]]  # the response up to and including the first EOS
    behaviour_logprobs: list[list[float]]  # log mu of each response token (the engine's policy)
    policy_version: int = 0  # the weights that sampled every row

    def __len__(self) -> int:
        return len(self.response_ids)


def rollout(model, tokenizer, request: RolloutRequest, synced_gpus: bool = False, policy_version: int = 0) -> RolloutBatch:
    """Sample a request's rows with ``model`` (any rank or engine: the same samples)."""
    s = request.sampling
    device = next(model.parameters()).device
    texts = rollout_texts(tokenizer, list(request.prompts), s.chat_template, s.template)
    ids, attn = tokenize_prompts(tokenizer, texts, s.max_prompt_tokens, device)
    cfg = PPOConfig.model_construct(seed=s.seed, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                    max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens)
    gen = generate(model, tokenizer, ids, attn, cfg, request.iteration, list(request.sample_indices),
                   synced_gpus=synced_gpus, group_size=request.group_size)
    return batch_of(gen, policy_version)


def batch_of(gen: Generation, policy_version: int = 0) -> RolloutBatch:
    """A generation's rows as token lists (padding removed)."""
    P = gen.prompt_length
    prompt_mask = gen.attention_mask[:, :P].bool().tolist()
    prompts = [[t for t, m in zip(row, keep) if m] for row, keep in zip(gen.sequences[:, :P].tolist(), prompt_mask)]
    lengths = gen.action_mask.long().sum(-1).tolist()
    responses = [row[:n] for row, n in zip(gen.responses.tolist(), lengths)]
    behaviour = gen.behaviour_logprobs if gen.behaviour_logprobs is not None else torch.zeros_like(gen.action_mask)
    logprobs = [row[:n] for row, n in zip(behaviour.float().tolist(), lengths)]
    return RolloutBatch(prompts, responses, logprobs, policy_version)


def generation_of(batch: RolloutBatch, pad_token_id: int, device: torch.device | str = "cpu") -> Generation:
    """The batch as padded tensors, as `generate` lays them out: left-padded prompts, then
    right-padded responses (at least one column)."""
    B = len(batch)
    P = max(len(p) for p in batch.prompt_ids)
    T = max(1, max(len(r) for r in batch.response_ids))
    sequences = torch.full((B, P + T), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, P + T), dtype=torch.long)
    action = torch.zeros((B, T), dtype=torch.float32)
    behaviour = torch.zeros((B, T), dtype=torch.float32)
    for i, (prompt, response, logp) in enumerate(zip(batch.prompt_ids, batch.response_ids, batch.behaviour_logprobs)):
        sequences[i, P - len(prompt) : P] = torch.tensor(prompt, dtype=torch.long)
        attention[i, P - len(prompt) : P] = 1
        n = len(response)
        if n:
            sequences[i, P : P + n] = torch.tensor(response, dtype=torch.long)
            attention[i, P : P + n] = 1
            action[i, :n] = 1.0
            behaviour[i, :n] = torch.tensor(logp, dtype=torch.float32)
    return Generation(sequences=sequences.to(device), attention_mask=attention.to(device), action_mask=action.to(device),
                      behaviour_logprobs=behaviour.to(device))

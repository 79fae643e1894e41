"""The policy engine behind the generation server (no Ray here).

`PolicyEngine` holds one copy of the policy, generates for a batch of requests
and swaps weights in place under a version number. Atomicity: the server holds
one asyncio lock around every batch and every weight swap, so a request is
answered wholly by one version, the one its response names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping, Sequence

import torch

from rlhf.models import LoraConfig, ModelConfig, load_policy
from rlhf.models.packed import keep_packs
from rlhf.ppo.rollout import RolloutBatch, RolloutRequest, rollout
from rlhf.sync import DEFAULT_BUCKET_BYTES, WeightLayout
from rlhf.templates import DEFAULT_TEMPLATE, PromptTemplate, check_template, render_chat


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request (the handle API; the HTTP routes map onto it)."""

    prompt: str | None = None  # raw text, used as it is
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs: the chat template is applied
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1  # answers per request
    seed: int | None = None  # fixes the sampling of this request
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens (benchmarks fix lengths with it)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if not 1 <= self.n <= 16:
            raise ValueError(f"n: must lie in [1, 16], got {self.n}")


TokenListener = Callable[[int, int], None]
"""Hears (choice index, token id) of one request's answers as they are drawn."""


class _RowStreamer:
    """A `generate` streamer (transformers' BaseStreamer protocol) for a whole batch: each
    step's (B,) new tokens go to the listener of the request each row answers, until that
    row's first EOS. The first call carries the prompts and is skipped."""

    def __init__(self, rows: list[tuple[int, int]], listeners: Mapping[int, TokenListener], eos: int | None):
        self.rows, self.listeners, self.eos = rows, listeners, eos
        self.started = False
        self.done = [False] * len(rows)

    def put(self, value: torch.Tensor) -> None:
        if not self.started:
            self.started = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token == self.eos:
                self.done[row] = True
                continue
            request, choice = self.rows[row]
            if request in self.listeners:
                self.listeners[request](choice, token)

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class GenerateResult:
    texts: list[str]  # n answers
    finish_reasons: list[str]  # "stop" (EOS) or "length"
    prompt_tokens: int
    completion_tokens: int
    policy_version: int  # the weights that wrote every answer of this result


@dataclass(frozen=True)
class WeightUpdate:
    """New weights for the served policy: the PEFT part's trainable tensors only under any
    ``lora.kind`` (``adapters_only``), else the full state dict."""

    version: int
    tensors: Mapping[str, torch.Tensor]
    adapters_only: bool
    created_at: float = field(default_factory=time.time)


class StaleWeights(ValueError):
    """A weight update older than (or equal to) the served version."""


def check_update(update: WeightUpdate, targets: Mapping[str, torch.Tensor], lora: bool) -> None:
    """Refuse an update that does not fit the served policy (before anything is copied, so no
    update is ever half-applied): its kind, names and shapes."""
    if update.adapters_only != lora:
        raise ValueError("adapter-only updates need a LoRA policy, full updates a full one")
    names = update.tensors.keys()
    if not names <= targets.keys():
        unknown = [k for k in names if k not in targets]
        raise ValueError(f"unexpected tensors in weights version {update.version}: {unknown[:3]}")
    if lora and len(update.tensors) != len(targets):
        raise ValueError(f"an adapter update must carry all {len(targets)} adapter tensors, got {len(update.tensors)}")
    for name, tensor in update.tensors.items():
        if targets[name].shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {tuple(targets[name].shape)}")


def prompt_text(tokenizer, request: GenerateRequest, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """What the policy continues for a request: the raw prompt, or the messages rendered by the
    run's template (``rlhf.templates.render_chat``: its system prompt unless the messages bring
    one, its few-shot turns, the chat template, the assistant's turn opened), as rollouts and
    SFT render prompts."""
    if request.messages is None:
        return request.prompt or ""
    return render_chat(tokenizer, request.messages, template)


class PolicyEngine:
    """The `hf` engine backend: a transformers model (LoRA through peft), batched `generate`.

    The same code serves people's requests (chat and completion), labeling tasks and PPO
    rollouts (`rollout_many`: per-sample seeded, with behaviour log-probs), so a rollout is
    the sample the trainer would have drawn itself with the same weights.
    """

    def __init__(self, model_cfg: ModelConfig, lora: LoraConfig | None, max_prompt_tokens: int = 512,
                 device: torch.device | str = "cpu", template: PromptTemplate = DEFAULT_TEMPLATE):
        self.model, self.tokenizer = load_policy(model_cfg, lora)
        check_template(self.tokenizer, template, "the policy")
        self.template = template
        self.model.to(device)
        self.model.eval()
        # updates are copied into the parameters (load_weights), which moves their version
        # counters: on the CPU the oneDNN packs of trained weights can be kept between updates
        keep_packs(self.model)
        self.lora = lora is not None and lora.enabled
        self.max_prompt_tokens = max_prompt_tokens
        self.version = 0
        # the tensors an update writes, by the names updates carry (peft drops the adapter name)
        self._targets = self._update_targets()

    def _update_targets(self) -> dict[str, torch.Tensor]:
        """Full weights, or the PEFT part's trainable tensors by peft's state-dict names (every
        kind: LoRA, DoRA with its magnitudes, IA3 scales, BitFit biases, bottleneck adapters;
        the engine builds the same kind from the same config, so a pushed tensor lands on the
        parameter the trainer trained and the forward applies it as the trainer's does)."""
        if not self.lora:
            return dict(self.model.state_dict())
        from rlhf.models.peft_kinds import adapter_parameters

        return dict(adapter_parameters(self.model))

    # -- weights ----------------------------------------------------------------

    def load_weights(self, update: WeightUpdate) -> int:
        """Swap weights in place; returns the new version. Callers serialise this with generation."""
        if update.version <= self.version:
            raise StaleWeights(f"weights version {update.version} is not newer than the served {self.version}")
        check_update(update, self._targets, self.lora)
        names = update.tensors.keys()
        targets = [self._targets[name] for name in names]
        sources = list(update.tensors.values())
        with torch.no_grad():  # checked first, then copied in place (one fused copy): no half-applied update
            torch._foreach_copy_(targets, sources)
        self.version = update.version
        return self.version

    def weight_layout(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightLayout:
        """How a weight update for this policy lies in the sync group's buckets."""
        return WeightLayout.of({name: t.detach() for name, t in self._targets.items()}, bucket_bytes)

    def weights(self) -> dict[str, torch.Tensor]:
        """The tensors a weight update carries for this policy (adapters only under LoRA)."""
        if self.lora:
            from peft import get_peft_model_state_dict

            return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # -- rollouts -----------------------------------------------------------------

    @torch.no_grad()
    def rollout_many(self, requests: Sequence[RolloutRequest]) -> list[RolloutBatch]:
        """PPO rollouts; requests of one iteration and sampling run as one batch (each row is
        seeded by its own sample index, so batching changes no sample)."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.iteration, r.group_size, r.sampling), []).append(i)
        out: list[RolloutBatch | None] = [None] * len(requests)
        for (iteration, group_size, sampling), indices in groups.items():
            rows = [p for i in indices for p in requests[i].prompts]
            samples = [k for i in indices for k in requests[i].sample_indices]
            merged = RolloutRequest(tuple(rows), tuple(samples), iteration, group_size, sampling)
            batch = rollout(self.model, self.tokenizer, merged, policy_version=self.version)
            start = 0
            for i in indices:
                n = len(requests[i].prompts)
                out[i] = RolloutBatch(batch.prompt_ids[start : start + n], batch.response_ids[start : start + n],
                                      batch.behaviour_logprobs[start : start + n], self.version)
                start += n
        return out  # type: ignore[return-value]

    # -- generation ---------------------------------------------------------------

    def prompt_text(self, request: GenerateRequest) -> str:
        return prompt_text(self.tokenizer, request, self.template)

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerateRequest], defaults,
                 listeners: Mapping[int, TokenListener] | None = None) -> list[GenerateResult]:
        """Answer a batch; requests with the same sampling settings share one `generate` call.
        ``listeners[i](choice, token_id)`` hears request i's answer tokens as they are drawn
        (up to its first EOS), for streaming."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = (
                r.max_new_tokens or defaults.max_new_tokens,
                defaults.temperature if r.temperature is None else r.temperature,
                r.top_p or defaults.top_p,
                r.seed,
                r.min_new_tokens,
            )
            groups.setdefault(key, []).append(i)
        results: list[GenerateResult | None] = [None] * len(requests)
        for (max_new, temperature, top_p, seed, min_new), indices in groups.items():
            heard = {k: listeners[i] for k, i in enumerate(indices) if listeners and i in listeners}
            for i, result in zip(indices, self._generate_group([requests[i] for i in indices], max_new, temperature, top_p, seed,
                                                               min_new, heard)):
                results[i] = result
        return results  # type: ignore[return-value]

    def _generate_group(
        self, requests: Sequence[GenerateRequest], max_new: int, temperature: float, top_p: float, seed: int | None, min_new: int = 0,
        listeners: Mapping[int, TokenListener] | None = None,
    ) -> list[GenerateResult]:
        texts = [self.prompt_text(r) for r in requests for _ in range(r.n)]
        rows = [(i, j) for i, r in enumerate(requests) for j in range(r.n)]  # row -> (request, choice)
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_prompt_tokens,
            add_special_tokens=False,
        )
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        sample = temperature > 0
        if seed is not None:
            torch.manual_seed(seed)
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new,
            min_new_tokens=min(min_new, max_new) or None,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            streamer=_RowStreamer(rows, listeners, self.tokenizer.eos_token_id) if listeners else None,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        eos = self.tokenizer.eos_token_id
        answers, reasons, counts = [], [], []
        for row in new.tolist():
            cut = row.index(eos) if eos in row else len(row)
            body = [t for t in row[:cut] if t != self.tokenizer.pad_token_id]
            answers.append(self.tokenizer.decode(body, skip_special_tokens=True))
            reasons.append("stop" if cut < len(row) else "length")
            counts.append(len(body))
        prompt_lens = enc["attention_mask"].sum(-1).tolist()
        results, k = [], 0
        for r in requests:
            results.append(
                GenerateResult(
                    texts=answers[k : k + r.n],
                    finish_reasons=reasons[k : k + r.n],
                    prompt_tokens=int(prompt_lens[k]),
                    completion_tokens=int(sum(counts[k : k + r.n])),
                    policy_version=self.version,
                )
            )
            k += r.n
        return results

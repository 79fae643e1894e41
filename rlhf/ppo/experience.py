"""The experience batch: everything one PPO update needs about a set of rollouts.

Layout (OpenRLHF-style): ``sequences`` is the prompt, left-padded to ``P`` tokens, followed by
the response, right-padded to ``T`` tokens. Every per-token tensor is over the response part
only, so column ``t`` of ``action_mask``/log-probs/advantages is the token at
``sequences[:, P + t]``. Responses to one prompt are consecutive rows (groups of G).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Experience:
    """A batch of scored rollouts with everything PPO, GRPO and RLOO train on."""

    sequences: Tensor  # (B, P+T) long: left-padded prompt ++ right-padded response
    attention_mask: Tensor  # (B, P+T) long: 1 on real tokens (prompt and response up to EOS)
    action_mask: Tensor  # (B, T) float: 1 on generated tokens up to and including the first EOS
    old_logprobs: Tensor  # (B, T) log π_old(a_t|s_t) of the sampled tokens, at rollout time
    ref_logprobs: Tensor  # (B, T) log π_ref(a_t|s_t) of the reference policy
    scores: Tensor  # (B,) reward-function score of each (prompt, response)
    rewards: Tensor  # (B, T) per-token reward: -β·KL_t (when KL is in the reward) + score on the last token
    advantages: Tensor  # (B, T) A_t (whitened when configured), 0 on padding
    returns: Tensor  # (B, T) R_t: critic targets for GAE; the outcome reward for GRPO/RLOO
    values: Tensor | None = None  # (B, T) V(s_t) of the critic at rollout time; None without a critic
    behaviour_logprobs: Tensor | None = None  # (B, T) log mu(a_t|s_t) of the sampler that drew the tokens

    def __post_init__(self) -> None:
        B, T = self.action_mask.shape
        for f in dataclasses.fields(self):
            x = getattr(self, f.name)
            if x is None:
                continue
            if x.shape[0] != B:
                raise ValueError(f"Experience.{f.name} has batch size {x.shape[0]}, expected {B}")
            if f.name not in ("sequences", "attention_mask", "scores") and tuple(x.shape) != (B, T):
                raise ValueError(f"Experience.{f.name} has shape {tuple(x.shape)}, expected {(B, T)}")
        if self.sequences.shape != self.attention_mask.shape:
            raise ValueError("sequences and attention_mask differ in shape")
        if self.sequences.shape[1] < T:
            raise ValueError("sequences are shorter than the response part")

    def __len__(self) -> int:
        return self.action_mask.shape[0]

    @property
    def prompt_length(self) -> int:
        """P: columns of ``sequences`` before the response part."""
        return self.sequences.shape[1] - self.action_mask.shape[1]

    @property
    def response_length(self) -> int:
        """T: columns of the response part."""
        return self.action_mask.shape[1]

    def _map(self, fn) -> Experience:
        return Experience(
            **{
                f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                for f in dataclasses.fields(self)
            }
        )

    def to(self, device: torch.device | str) -> Experience:
        """The batch on ``device``."""
        return self._map(lambda x: x.to(device))

    def select(self, index: Tensor | list[int] | slice) -> Experience:
        """Rows ``index`` of every field (in that order)."""
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.long)
        return self._map(lambda x: x[index])

    def split(self, size: int) -> list[Experience]:
        """Consecutive minibatches of ``size`` rows (the last may be smaller)."""
        if size <= 0:
            raise ValueError("size must be positive")
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    @staticmethod
    def concat(batches: list[Experience]) -> Experience:
        """Rows of all ``batches``, in order; prompt and response parts are re-padded (prompt on
        the left, response on the right) when their lengths differ."""
        if not batches:
            raise ValueError("nothing to concatenate")
        P = max(b.prompt_length for b in batches)
        T = max(b.response_length for b in batches)
        padded = [b._pad_to(P, T) for b in batches]
        out = {}
        for f in dataclasses.fields(Experience):
            xs = [getattr(b, f.name) for b in padded]
            if any(x is None for x in xs):
                if not all(x is None for x in xs):
                    raise ValueError(f"Experience.{f.name} is set in some batches only")
                out[f.name] = None
            else:
                out[f.name] = torch.cat(xs, 0)
        return Experience(**out)

    def _pad_to(self, P: int, T: int, pad_token_id: int = 0) -> Experience:
        dp, dt = P - self.prompt_length, T - self.response_length
        if dp == 0 and dt == 0:
            return self

        def seq(x: Tensor, value: int) -> Tensor:
            return torch.nn.functional.pad(x, (dp, dt), value=value)

        def tok(x: Tensor | None) -> Tensor | None:
            return None if x is None else torch.nn.functional.pad(x, (0, dt), value=0)

        return Experience(
            sequences=seq(self.sequences, pad_token_id),
            attention_mask=seq(self.attention_mask, 0),
            action_mask=tok(self.action_mask),
            old_logprobs=tok(self.old_logprobs),
            ref_logprobs=tok(self.ref_logprobs),
            scores=self.scores,
            rewards=tok(self.rewards),
            advantages=tok(self.advantages),
            returns=tok(self.returns),
            values=tok(self.values),
        )

"""The PPO trainer: rollouts, scoring, advantages and minibatch updates on DeepSpeed engines.

One :class:`PPOTrainer` per process. In one process it trains alone; started in N processes
under torch.distributed (``init_distributed`` first, e.g. from env vars that a launcher or a
Ray actor group sets), each rank takes an equal share of every rollout batch and DeepSpeed
averages the gradients (ZeRO stage 0-3). Run it on the CPU with ``DS_ACCELERATOR=cpu``
(gloo, fp32) or on GPUs (NCCL, bf16 when ``DeepSpeedConfig.bf16`` allows).

    init_distributed()
    policy, tokenizer = load_policy(ModelConfig(source="tiny"), LoraConfig(enabled=True))
    critic = build_critic(CriticConfig(kind="separate"), policy, model_cfg, tokenizer)
    trainer = PPOTrainer(policy, tokenizer, reward_fn, PPOConfig(), DeepSpeedConfig(), critic)
    for prompts in batches:
        metrics = trainer.step(prompts)          # one iteration: rollout, score, update
    trainer.save_checkpoint("ckpt/")             # everything for an exact resume

An iteration, top-down: :meth:`make_experience` (generate -> score -> old/reference
log-probs and values -> KL-shaped rewards -> advantages), then :meth:`update` (epochs of
shuffled minibatches; clipped policy loss, clipped value loss, entropy bonus).
"""

from __future__ import annotations

import os
import random
import socket
import time
from contextlib import contextmanager, nullcontext
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rlhf.models.packed import packed_weights, uses_packed_linears
from rlhf.ppo import core
from rlhf.ppo.config import DeepSpeedConfig, PPOConfig, deepspeed_config_dict
from rlhf.ppo.experience import Experience
from rlhf.ppo.rollout import (
    Generation,
    RolloutBatch,
    RolloutRequest,
    RolloutSampling,
    decode_responses,
    generate,
    generation_of,
    merged_lora,
    response_logits,
    response_logprobs,
    sample_seed,
    rollout_texts,
    tokenize_prompts,
)
from rlhf.templates import DEFAULT_TEMPLATE, PromptTemplate, check_template

RewardFn = Callable[[list[str], list[str]], Tensor]
"""Scores a batch: (prompts, responses) -> (B,) float tensor. A rule or the reward model."""

RolloutFn = Callable[[RolloutRequest], RolloutBatch]
"""Samples a rank's rollouts elsewhere (the generation engines); without one the trainer
samples them itself with its own weights."""


# --------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero3_loading(ds_cfg: DeepSpeedConfig, ppo_cfg: PPOConfig, world_size: int, device_type: str):
    """Under ZeRO-3 with several ranks: an object while which lives, models that transformers
    loads or builds from a config come partitioned over the ranks (its `HfDeepSpeedConfig`
    runs `from_pretrained` and `from_config` under `deepspeed.zero.Init`), so no rank ever
    holds a whole copy of a model that only fits sharded. None otherwise. Keep it as long as
    the models (transformers holds it weakly); `init_distributed` must have run. Without
    LoRA, load the reference apart under it too (`PPOTrainer(reference=...)`)."""
    if ds_cfg.zero_stage != 3 or world_size <= 1:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    micro = max(1, ppo_cfg.minibatch_size // (world_size * ds_cfg.gradient_accumulation_steps))
    return HfDeepSpeedConfig(deepspeed_config_dict(ds_cfg, micro_batch_size=micro, world_size=world_size,
                                                   max_grad_norm=ppo_cfg.max_grad_norm, device_type=device_type))


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join (or create) the default process group from the usual env vars (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without them, a group of one on a free local port.

    ``backend`` defaults to NCCL with CUDA and gloo otherwise. Idempotent.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise RuntimeError("MASTER_PORT must be set for more than one process")
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _all_reduce_sum(x: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


# --------------------------------------------------------------------------- the trainer
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


class PPOTrainer:
    """PPO (GAE + critic), GRPO or RLOO on DeepSpeed engines, by ``PPOConfig``.

    ``policy`` comes from ``rlhf.models.load_policy`` (a PeftModel under LoRA); ``critic``
    from ``rlhf.models.build_critic`` (needed by ``gae`` only). A critic that is a head on the
    policy's backbone trains in the policy's engine with the joint loss
    ``policy + value_loss_coef * value``; a separate critic has its own engine.
    """

    def __init__(
        self,
        policy: nn.Module,
        tokenizer,
        reward_fn: RewardFn,
        ppo: PPOConfig,
        ds: DeepSpeedConfig,
        critic: nn.Module | None = None,
        rollout_fn: RolloutFn | None = None,
        reference: nn.Module | None = None,
        template: PromptTemplate = DEFAULT_TEMPLATE,
    ) -> None:
        """`reference`: the initial policy loaded apart, frozen; needed (and only used) when the
        policy's weights come ZeRO-3 partitioned without LoRA (`zero3_loading`): a deep copy of
        partitioned weights would hold only this rank's shard. It gets an inference engine of
        its own, which gathers each layer's weights for its forward. `template`: how prompts
        are rendered (rollouts here and on the engines, SFT and DPO batches: `rlhf.templates`)."""
        from rlhf.models import ValueHeadCritic, reference_model
        from rlhf.models.reference import ReferenceModel

        self.dist = init_distributed()
        self.cfg, self.ds_cfg = ppo, ds
        self.tokenizer, self.reward_fn, self.rollout_fn = tokenizer, reward_fn, rollout_fn
        check_template(tokenizer, template, "the policy")
        self.template = template
        self.last_rollout_version: int | None = None
        """The policy version of the engines that sampled the last iteration's rollouts."""
        self._check_divisibility()
        _seed_everything(ppo.seed + self.dist.rank)
        if ppo.uses_critic and critic is None:
            raise ValueError("advantage_estimator='gae' needs a critic")
        self.critic_is_head = isinstance(critic, ValueHeadCritic)
        if self.critic_is_head and critic.policy is not policy:
            raise ValueError("the value-head critic must sit on this policy")
        self.is_peft = _is_peft(policy)
        self.bf16 = ds.use_bf16(self.dist.device.type)
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        policy.to(device=self.dist.device, dtype=dtype)
        if critic is not None:
            critic.to(device=self.dist.device, dtype=dtype)
        if ds.gradient_checkpointing:
            _enable_gradient_checkpointing(policy)
            if critic is not None and not self.critic_is_head:
                _enable_gradient_checkpointing(critic)
        # the reference is taken before any update (frozen copy, or adapters off under LoRA)
        partitioned = any(hasattr(p, "ds_id") for p in policy.parameters())
        if reference is not None and not self.is_peft:
            reference.to(device=self.dist.device, dtype=dtype)
            self.reference = ReferenceModel.frozen(self._inference_engine(reference))
        elif partitioned and not self.is_peft:
            raise ValueError("a ZeRO-3 partitioned policy without LoRA needs its reference loaded apart (reference=...): "
                             "a deep copy of partitioned weights holds one rank's shard")
        else:
            self.reference = reference_model(policy)
        self.kl_ctl = core.make_kl_controller(ppo.kl_controller, ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
        self.iteration = 0
        self.timings: dict[str, float] = {}
        """Seconds spent in the last iteration: generate, score, logprobs_values, update."""

        if self.critic_is_head:
            head_ids = {id(p) for p in critic.head_parameters()}
            groups = [
                {"params": [p for p in policy.parameters() if p.requires_grad], "lr": ppo.policy_lr},
                {"params": [p for p in critic.parameters() if id(p) in head_ids], "lr": ppo.critic_lr},
            ]
            self.policy_engine = self._engine(critic, groups)
            self.critic_engine = None
        else:
            groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": ppo.policy_lr}]
            self.policy_engine = self._engine(policy, groups)
            self.critic_engine = None
            if critic is not None and ppo.uses_critic:
                cgroups = [{"params": [p for p in critic.parameters() if p.requires_grad], "lr": ppo.critic_lr}]
                self.critic_engine = self._engine(critic, cgroups)
        self.policy = policy
        self.critic = critic if ppo.uses_critic else None

    @contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ setup helpers
    def _check_divisibility(self) -> None:
        w, c, gas = self.dist.world_size, self.cfg, self.ds_cfg.gradient_accumulation_steps
        if c.rollout_batch_size % w:
            raise ValueError(f"rollout_batch_size ({c.rollout_batch_size}) must divide by world size {w}")
        if c.minibatch_size % (w * gas):
            raise ValueError(
                f"minibatch_size ({c.minibatch_size}) must divide by world size x gradient "
                f"accumulation steps ({w} x {gas})"
            )

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.minibatch_size // (self.dist.world_size * self.ds_cfg.gradient_accumulation_steps)

    def _engine(self, module: nn.Module, param_groups: list[dict]):
        import deepspeed

        optimizer = torch.optim.AdamW(
            param_groups, lr=param_groups[0]["lr"], weight_decay=self.cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8
        )
        warmup = self.cfg.lr_warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        config = deepspeed_config_dict(
            self.ds_cfg,
            micro_batch_size=self.micro_batch_size,
            world_size=self.dist.world_size,
            max_grad_norm=self.cfg.max_grad_norm,
            device_type=self.dist.device.type,
        )
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        return engine

    def _inference_engine(self, module: nn.Module) -> nn.Module:
        """`module` under a DeepSpeed engine without an optimiser (ZeRO-3: its forward gathers
        each layer's shards); returns the module to call."""
        import deepspeed

        config = deepspeed_config_dict(self.ds_cfg, micro_batch_size=self.micro_batch_size, world_size=self.dist.world_size,
                                       max_grad_norm=self.cfg.max_grad_norm, device_type=self.dist.device.type)
        engine, *_ = deepspeed.initialize(model=module, config=config)
        return engine.module

    @property
    def _zero3_multi(self) -> bool:
        return self.ds_cfg.zero_stage == 3 and self.dist.world_size > 1

    # ------------------------------------------------------------------ one iteration
    def step(self, prompts: list[str]) -> dict[str, float]:
        """One PPO iteration on ``prompts`` (the global batch: ``rollout_batch_size`` prompt
        strings, the same list on every rank). Returns metrics averaged over ranks."""
        self.timings = {}
        exp, rollout_metrics = self.make_experience(prompts)
        with self._timed("update"):
            train_metrics = self.update(exp)
        if self._old_logprobs_are_current:  # the rollout KL is known only from the update's forward
            rollout_metrics["kl"] = train_metrics["policy_kl"]
        self.kl_ctl.update(rollout_metrics["kl"], self.cfg.samples_per_iteration)
        self.iteration += 1
        timings = {f"time_{k}_s": v for k, v in self.timings.items()}
        return {**rollout_metrics, **train_metrics, **timings, "kl_coef": self.kl_ctl.value, "iteration": float(self.iteration)}

    def _local_prompts(self, prompts: list[str]) -> tuple[list[str], list[int]]:
        if len(prompts) != self.cfg.rollout_batch_size:
            raise ValueError(f"expected {self.cfg.rollout_batch_size} prompts, got {len(prompts)}")
        n = len(prompts) // self.dist.world_size
        start = self.dist.rank * n
        G = self.cfg.group_size
        local = [p for p in prompts[start : start + n] for _ in range(G)]
        indices = [(start + i) * G + j for i in range(n) for j in range(G)]
        return local, indices

    @torch.no_grad()
    def make_experience(self, prompts: list[str]) -> tuple[Experience, dict[str, float]]:
        """Rollouts of this rank's share of ``prompts``, scored and turned into advantages."""
        cfg = self.cfg
        local_prompts, indices = self._local_prompts(prompts)
        with self._timed("generate"):
            gen = self._generate(local_prompts, indices)
        with self._timed("score"):
            responses = decode_responses(self.tokenizer, gen)
            scores = self._score(local_prompts, responses)
        with self._timed("logprobs_values"):
            old_logprobs, ref_logprobs, values = self._logprobs_and_values(gen)
        mask = gen.action_mask
        kl = core.kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
        beta = self.kl_ctl.value if cfg.kl_in == "reward" else 0.0
        rewards = core.token_rewards(scores, kl, mask, beta)
        estimator = core.get_advantage_estimator(cfg.advantage_estimator)
        advantages, returns = estimator(
            core.AdvantageInputs(
                rewards=rewards, values=values if cfg.uses_critic else None, mask=mask,
                group_size=cfg.group_size, gamma=cfg.gamma, lam=cfg.lam,
            )
        )
        if cfg.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask, all_reduce=_all_reduce_sum)
        exp = Experience(
            sequences=gen.sequences, attention_mask=gen.attention_mask, action_mask=mask,
            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, scores=scores, rewards=rewards,
            advantages=advantages, returns=returns, values=values if cfg.uses_critic else None,
            behaviour_logprobs=gen.behaviour_logprobs if cfg.behaviour_correction != "none" else None,
        )
        metrics = self._rollout_metrics(exp, kl)
        return exp, metrics

    @property
    def _old_logprobs_are_current(self) -> bool:
        """One epoch of one minibatch, KL not in the reward: the update's first forward pass
        *is* the rollout policy, so its detached log-probs serve as the old ones and the extra
        forward pass is skipped."""
        c = self.cfg
        return c.ppo_epochs == 1 and c.minibatch_size == c.samples_per_iteration and c.kl_in == "loss"

    def _logprobs_and_values(self, gen: Generation) -> tuple[Tensor, Tensor, Tensor | None]:
        """(old log-probs, reference log-probs, values) of a generation, each (B, T)."""
        T = gen.action_mask.shape[1]
        values = None
        module = self.policy_engine.module
        policy = module.policy if self.critic_is_head else module
        if self._old_logprobs_are_current and not self.critic_is_head:
            old_logprobs = torch.zeros_like(gen.action_mask)  # replaced in the update
        else:
            was_training = policy.training
            policy.eval()
            try:
                old_logprobs, values = self._policy_forward(gen.sequences, gen.attention_mask, T, with_values=True)
            finally:
                policy.train(was_training)
        with self.reference.active() as ref:
            ref_logprobs, _ = response_logprobs(
                ref, gen.sequences, gen.attention_mask, T, self.cfg.temperature, group_size=self.cfg.group_size
            )
        if self.critic_engine is not None:
            values = self._critic_values(gen.sequences, gen.attention_mask, T, train=False)
        return old_logprobs, ref_logprobs, values

    def _generate(self, prompts: list[str], indices: list[int]) -> Generation:
        if self.rollout_fn is not None:
            request = RolloutRequest(tuple(prompts), tuple(indices), self.iteration, self.cfg.group_size, RolloutSampling.of(self.cfg, self.template))
            batch = self.rollout_fn(request)
            if len(batch) != len(prompts):
                raise ValueError(f"the engines returned {len(batch)} rollouts for {len(prompts)} rows")
            self.last_rollout_version = batch.policy_version
            return generation_of(batch, self.tokenizer.pad_token_id, self.dist.device)
        module = self.policy_engine.module
        policy = module.policy if self.critic_is_head else module
        ids, attn = tokenize_prompts(self.tokenizer, rollout_texts(self.tokenizer, prompts, self.cfg.chat_template, self.template), self.cfg.max_prompt_tokens, self.dist.device)
        with self._generation_weights(policy):
            return generate(
                policy, self.tokenizer, ids, attn, self.cfg, self.iteration, indices,
                synced_gpus=self._zero3_multi, group_size=self.cfg.group_size,
            )

    def _generation_weights(self, policy):
        """How the policy's weights serve a generation: oneDNN packs of the effective (LoRA-
        merged) weights on the CPU, adapters merged in place elsewhere; under ZeRO-3 the
        weights are partitioned and neither applies."""
        if self.ds_cfg.zero_stage >= 3:
            return nullcontext()
        if self.dist.device.type == "cpu" and uses_packed_linears(policy):
            return packed_weights(policy)
        return merged_lora(policy)

    def _score(self, prompts: list[str], responses: list[str]) -> Tensor:
        scores = torch.as_tensor(self.reward_fn(prompts, responses), dtype=torch.float32).reshape(-1)
        if scores.shape[0] != len(prompts):
            raise ValueError(f"reward function returned {scores.shape[0]} scores for {len(prompts)} samples")
        if self.cfg.reward_clip is not None:
            scores = scores.clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
        return scores.to(self.dist.device)

    def _policy_forward(
        self, sequences: Tensor, attention_mask: Tensor, T: int, with_values: bool = False, with_entropy: bool = False
    ) -> tuple:
        """(log-probs (B, T), values (B, T) or None[, entropy (B, T)]) from the policy engine's
        module; values only when the critic is a head on the policy."""
        module = self.policy_engine.module
        if not self.critic_is_head:
            logprobs, entropy = response_logprobs(
                module, sequences, attention_mask, T, self.cfg.temperature, with_entropy, self.cfg.group_size,
                entropy_grad=self.cfg.entropy_coef > 0,
            )
            return (logprobs, None, entropy) if with_entropy else (logprobs, None)
        logits, hidden = response_logits(
            module.policy, sequences, attention_mask, T, self.cfg.group_size, with_hidden=True
        )
        values = module.head(hidden).float()
        labels = sequences[:, -T:]
        if with_entropy:
            logprobs, entropy = core.logprobs_and_entropy(logits, labels, self.cfg.temperature, self.cfg.entropy_coef > 0)
            return logprobs, values, entropy
        return core.logprobs_from_logits(logits, labels, self.cfg.temperature), values

    def _critic_values(self, sequences: Tensor, attention_mask: Tensor, T: int, train: bool) -> Tensor:
        critic = self.critic_engine.module
        was_training = critic.training
        critic.train(train)
        try:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            values = critic(sequences, attention_mask, position_ids)
        finally:
            critic.train(was_training)
        return values[:, -(T + 1) : -1].float()

    def _rollout_metrics(self, exp: Experience, kl: Tensor) -> dict[str, float]:
        mask = exp.action_mask
        local = {
            "reward": exp.scores.float().mean(),
            "kl": core.masked_sum(kl, mask, dim=-1).mean(),  # per sequence
            "response_length": mask.sum(-1).mean(),
        }
        out = {k: v.item() for k, v in self._mean_over_ranks(local).items()}
        if exp.values is not None:
            out["explained_variance"] = core.explained_variance(
                exp.values, exp.returns, mask, all_reduce=_all_reduce_sum
            ).item()
        return out

    def _mean_over_ranks(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        keys = sorted(metrics)
        stacked = torch.stack([metrics[k].detach().float().to(self.dist.device) for k in keys])
        stacked = _all_reduce_sum(stacked) / self.dist.world_size
        return dict(zip(keys, stacked.unbind()))

    # ------------------------------------------------------------------ the update
    def update(self, exp: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches over ``exp``; metrics averaged over
        micro-batches and ranks."""
        cfg = self.cfg
        local_minibatch = cfg.minibatch_size // self.dist.world_size
        sums: dict[str, Tensor] = {}
        n = 0
        self.policy_engine.train()
        if self.critic_engine is not None:
            self.critic_engine.train()
        for epoch in range(cfg.ppo_epochs):
            # shuffle whole groups (responses to one prompt stay together, so minibatches that
            # hold whole groups run each prompt once: see rollout.response_logits)
            g = torch.Generator().manual_seed(sample_seed(cfg.seed, self.iteration, 1_000_000 + epoch))
            G = cfg.group_size
            groups = torch.randperm(len(exp) // G, generator=g)
            order = (groups.unsqueeze(1) * G + torch.arange(G)).reshape(-1)
            for minibatch in exp.select(order).split(local_minibatch):
                # losses are token sums over the whole minibatch's token count (all ranks), so N
                # ranks x accumulation steps give the gradient of one process on the minibatch
                tokens = _all_reduce_sum(minibatch.action_mask.sum().float())
                normalizer = tokens.clamp(min=1.0) / (self.dist.world_size * self.ds_cfg.gradient_accumulation_steps)
                for micro in minibatch.split(self.micro_batch_size):
                    for k, v in self._train_micro(micro, normalizer).items():
                        sums[k] = sums.get(k, 0.0) + v
                    n += 1
        means = self._mean_over_ranks({k: v / n for k, v in sums.items()})
        out = {k: v.item() for k, v in means.items()}
        out["policy_lr"] = self.policy_engine.get_lr()[0]
        return out

    def _train_micro(self, mb: Experience, normalizer: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        T = mb.response_length
        mask = mb.action_mask
        logprobs, values, entropy = self._policy_forward(
            mb.sequences, mb.attention_mask, T, with_values=True, with_entropy=True
        )
        old_logprobs = logprobs.detach() if self._old_logprobs_are_current else mb.old_logprobs
        is_weights = None
        if mb.behaviour_logprobs is not None:
            is_weights = core.truncated_is_weights(old_logprobs, mb.behaviour_logprobs, mask, cfg.behaviour_is_cap)
        pg = core.policy_loss(logprobs, old_logprobs, mb.advantages, mask, cfg.clip_range, normalizer, is_weights)
        loss = pg.loss
        ent = core.masked_sum(entropy, mask) / normalizer
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * ent
        if cfg.kl_in == "loss" and self.kl_ctl.value > 0:
            kl = core.kl_penalty(logprobs, mb.ref_logprobs, cfg.kl_estimator)
            loss = loss + self.kl_ctl.value * core.masked_sum(kl, mask) / normalizer
        with torch.no_grad():
            seq_kl = core.masked_sum(core.kl_penalty(logprobs, mb.ref_logprobs, cfg.kl_estimator), mask, dim=-1)
        metrics = {
            "policy_kl": seq_kl.mean(),  # per sequence, of the policy being updated
            "policy_loss": pg.loss.detach(),
            "clip_frac": pg.clip_frac,
            "approx_kl": pg.approx_kl,
            "entropy": core.masked_mean(entropy.detach(), mask),
        }
        if mb.behaviour_logprobs is not None:
            with torch.no_grad():  # how far the sampler was from the trainer's policy at rollout time
                gap = old_logprobs.float() - mb.behaviour_logprobs.float()
                metrics["behaviour_logprob_gap"] = core.masked_mean(gap.abs(), mask)
                metrics["behaviour_is_weight"] = core.masked_mean(is_weights, mask)
        if self.critic_is_head and cfg.uses_critic:
            vf = core.value_loss(values, mb.values, mb.returns, mask, cfg.value_clip_range, normalizer)
            loss = loss + cfg.value_loss_coef * vf.loss
            metrics.update(value_loss=vf.loss.detach(), value_clip_frac=vf.clip_frac)
        self.policy_engine.backward(loss)
        self.policy_engine.step()
        if self.critic_engine is not None:
            new_values = self._critic_values(mb.sequences, mb.attention_mask, T, train=True)
            vf = core.value_loss(new_values, mb.values, mb.returns, mask, cfg.value_clip_range, normalizer)
            self.critic_engine.backward(vf.loss)
            self.critic_engine.step()
            metrics.update(value_loss=vf.loss.detach(), value_clip_frac=vf.clip_frac)
        metrics["loss"] = loss.detach()
        # scale-free versions of the token-sum losses (per-token means over the minibatch)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | Path) -> None:
        """Weights (only the trainable ones under any PEFT kind: the adapters, plus a value head),
        optimizer and scheduler states of every engine, the KL controller, the iteration and
        every rank's RNG states. Collective: call on all ranks."""
        directory = Path(directory)
        tag = f"iteration-{self.iteration}"
        state = {"iteration": self.iteration, "kl_controller": self.kl_ctl.state_dict()}
        self.policy_engine.save_checkpoint(
            str(directory / "policy"), tag=tag, client_state=state, exclude_frozen_parameters=self.is_peft
        )
        if self.critic_engine is not None:
            self.critic_engine.save_checkpoint(
                str(directory / "critic"), tag=tag, exclude_frozen_parameters=_is_peft(self.critic_engine.module)
            )
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), directory / f"rng-rank{self.dist.rank}.pt")

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote (same world size and configs)."""
        directory = Path(directory)
        _, state = self.policy_engine.load_checkpoint(
            str(directory / "policy"), load_module_strict=not self.is_peft
        )
        if state is None:
            raise FileNotFoundError(f"no policy checkpoint under {directory}")
        if self.critic_engine is not None:
            path, _ = self.critic_engine.load_checkpoint(
                str(directory / "critic"), load_module_strict=not _is_peft(self.critic_engine.module)
            )
            if path is None:
                raise FileNotFoundError(f"no critic checkpoint under {directory}")
        self.iteration = int(state["iteration"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        _set_rng_state(torch.load(directory / f"rng-rank{self.dist.rank}.pt", weights_only=False))


def _is_peft(module: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel) or any(isinstance(m, PeftModel) for m in module.children())


def _enable_gradient_checkpointing(module: nn.Module) -> None:
    from rlhf.models import unwrap_peft

    inner = unwrap_peft(module)
    if hasattr(inner, "gradient_checkpointing_enable"):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    for child in module.children():  # a separate critic: enable on its backbone
        target = unwrap_peft(child)
        if hasattr(target, "gradient_checkpointing_enable"):
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

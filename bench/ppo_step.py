"""Throughput of one full PPO-family iteration against TRL's GRPOTrainer, in the same run.

    DS_ACCELERATOR=cpu python bench/ppo_step.py --quick

One iteration = generate (KV cache, fixed length: min_new_tokens = max_new_tokens on both
sides), score every response with the reward model (``rlhf.reward``; the same instance on
both sides), reference log-probs (and values, for PPO), one optimiser step on the batch.

Rows, per model (the tiny random Llama, and SmolLM2-135M-Instruct with LoRA):
- ``hitl grpo``: ``PPOTrainer`` with the group-normalised estimator, KL (k3) in the loss, one
  epoch of one minibatch -- the same algorithm and amount of work as TRL's GRPO defaults
  with ``beta > 0`` and ``num_iterations = 1``.
- ``hitl ppo``: PPO with GAE, the KL (k1) in the reward and a value-head critic on the
  policy's backbone (the default ``CriticConfig``): the rollout forward also yields values and
  old log-probs, and the update trains policy and head together -- work TRL's GRPO does not do.
- ``trl grpo``: ``trl.GRPOTrainer``, same model weights, LoRA settings, prompts, batch
  (prompts x group), generation length, sampling settings, reward model, learning rate; the
  policy is the stock transformers model (``nn.Linear`` on PyTorch's default BLAS), as TRL
  users run it: hitl's oneDNN linears (``rlhf.models.packed``) are hitl's own work. The
  reward model is one shared instance, so scoring costs both sides the same.

The three systems run interleaved (a TRL step, then one iteration of each hitl trainer, and
again), so that they share whatever else loads the machine. Times are wall-clock, of the
fastest measured iteration after a warm-up one (on a shared CPU the least disturbed run
estimates the cost best; the median is printed too); TRL's are split
by timing its own methods (``_generate_single_turn``, ``_calculate_rewards``, and the no-grad
calls of ``_get_per_token_logps_and_entropies``); the rest of its step counts as update. The
last printed line is one JSON object; ``vs_trl`` compares ``hitl grpo`` with ``trl grpo`` on
SmolLM2-135M + LoRA (the tiny model's numbers are also in the JSON).

DPO rows (before each model's PPO rows; ``--only-dpo`` for them alone): ``hitl dpo`` is one
optimiser step of ``rlhf.po`` on the batch of pairs (policy and reference log-probs of the
chosen and rejected answers, the loss, backward, step), ``trl dpo`` one step of TRL's
DPOTrainer on the same pairs, model, LoRA settings and learning rate, reference log-probs
computed in the step on both sides; interleaved the same way. ``dpo_vs_trl`` in the JSON
compares them on the main model.

PEFT kinds (``--peft lora,dora,ia3,bitfit,bottleneck`` or ``--peft all``; a mode of its own, no
TRL rows): for each kind (``LoraConfig.kind``, its default targets, rank 8), one ``hitl grpo``
iteration and one ``hitl dpo`` step as above, the kinds interleaved; the table gives each
kind's trainable parameters (and their share of the model's), samples/s and pairs/s, on
SmolLM2-135M-Instruct (``--skip-smollm2``: the tiny random Llama). The JSON has ``peft`` with
the same per kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from rlhf.models import CriticConfig, LoraConfig, ModelConfig, build_critic, load_policy  # noqa: E402
from rlhf.models.packed import ONEDNN_AVAILABLE, pack, packed_linear  # noqa: E402
from rlhf.ppo import DeepSpeedConfig, PPOConfig  # noqa: E402
from rlhf.reward import RewardConfig, build_reward_model  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Give me a tip for staying focused.",
    "Why is the sky blue?",
    "Name three fruits.",
    "How do plants grow?",
    "Write a haiku about rain.",
    "What is two plus two?",
    "Describe a cat in one sentence.",
]


@dataclass
class Setup:
    name: str
    model: ModelConfig
    lora: LoraConfig
    prompts: int  # per iteration
    group: int  # responses per prompt
    new_tokens: int
    lr: float


@dataclass
class Result:
    system: str
    iteration_s: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)

    def add(self, total: float, parts: dict[str, float]) -> None:
        self.iteration_s.append(total)
        for k, v in parts.items():
            self.parts.setdefault(k, []).append(v)

    def best(self, key: str | None = None) -> float:
        """The fastest measured iteration (or its part): on a shared CPU the least disturbed
        run is the best estimate of the cost itself."""
        if key is None:
            return min(self.iteration_s)
        i = self.iteration_s.index(min(self.iteration_s))
        return self.parts.get(key, [0.0] * len(self.iteration_s))[i]

    def median(self) -> float:
        return statistics.median(self.iteration_s)


def chat_prompts(tokenizer, n: int) -> list[str]:
    from rlhf.templates import render_prompt

    return [render_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]


def reward_fn_of(reward_model):
    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return reward_model.score(prompts, responses)

    return score


# --------------------------------------------------------------------------- hitl
class HitlRun:
    """A ``PPOTrainer`` on the setup, stepped one iteration at a time."""

    def __init__(self, setup: Setup, estimator: str, reward_model, threads: int) -> None:
        from rlhf.ppo.trainer import PPOTrainer

        self.setup, self.threads = setup, threads
        policy, tokenizer = load_policy(setup.model, setup.lora)
        samples = setup.prompts * setup.group
        cfg = PPOConfig(
            advantage_estimator=estimator, rollout_batch_size=setup.prompts, group_size=setup.group,
            max_new_tokens=setup.new_tokens, min_new_tokens=setup.new_tokens, temperature=1.0,
            minibatch_size=samples, ppo_epochs=1, policy_lr=setup.lr, critic_lr=setup.lr,
            kl_coef=0.04, kl_estimator="k3" if estimator == "grpo" else "k1",
            kl_in="loss" if estimator == "grpo" else "reward", max_prompt_tokens=512, seed=0,
            chat_template=False,  # the prompts are chat-formatted already, as TRL gets them
        )
        critic = None
        if cfg.uses_critic:
            critic = build_critic(CriticConfig(kind="value_head"), policy, setup.model, tokenizer)
        self.trainer = PPOTrainer(policy, tokenizer, reward_fn_of(reward_model), cfg, DeepSpeedConfig(zero_stage=0), critic)
        self.prompts = chat_prompts(tokenizer, setup.prompts)
        self.result = Result(f"hitl {'ppo' if estimator == 'gae' else estimator}")
        self.done = 0

    def iteration(self, measured: bool) -> None:
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        metrics = self.trainer.step(self.prompts)
        total = time.perf_counter() - start
        if metrics["response_length"] != self.setup.new_tokens:
            raise RuntimeError(f"hitl generated {metrics['response_length']} tokens, not {self.setup.new_tokens}")
        t = self.trainer.timings
        print(f"  {self.result.system} iteration {self.done}: {total:.2f}s "
              + " ".join(f"{k}={v:.2f}" for k, v in t.items()), file=sys.stderr, flush=True)
        self.done += 1
        if measured:
            self.result.add(total, {"generate": t["generate"], "score": t["score"],
                                    "ref_values": t["logprobs_values"], "update": t["update"]})


# --------------------------------------------------------------------------- TRL
def run_trl_interleaved(setup: Setup, reward_model, warmup: int, iters: int, others: list[HitlRun],
                        threads: int) -> Result:
    """TRL's GRPOTrainer for warmup + iters steps; after each of its steps, one iteration of
    each of ``others``, so that all systems see the same load on a shared machine."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    # TRL adds the adapters itself, and gets the stock transformers model: plain nn.Linear on
    # the default BLAS (hitl's oneDNN linears are hitl's own, not TRL's)
    policy, tokenizer = load_policy(setup.model.model_copy(update={"onednn_linear": False}), None)
    model_init_kwargs = None
    if not setup.lora.enabled:
        # without adapters TRL loads its reference copy from the policy's path
        path = tempfile.mkdtemp(prefix="trl-bench-model-")
        policy.save_pretrained(path)
        policy, model_init_kwargs = path, {"dtype": torch.float32}
    samples = setup.prompts * setup.group
    prompts = chat_prompts(tokenizer, setup.prompts)
    # each TRL step takes `samples / group` prompts from the dataset, in a seeded order
    dataset = Dataset.from_dict({"prompt": prompts * (warmup + iters + 2)})
    score = reward_fn_of(reward_model)

    def reward(prompts, completions, **kwargs):
        return score(list(prompts), list(completions)).tolist()

    reward.__name__ = "reward_model"
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=samples, num_generations=setup.group,
        max_completion_length=setup.new_tokens, generation_kwargs={"min_new_tokens": setup.new_tokens},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.04, num_iterations=1, learning_rate=setup.lr,
        gradient_accumulation_steps=1, max_steps=warmup + iters, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, disable_tqdm=True,
        model_init_kwargs=model_init_kwargs,
    )
    peft_config = None
    if setup.lora.enabled:
        peft_config = PeftLoraConfig(
            r=setup.lora.rank, lora_alpha=setup.lora.alpha, lora_dropout=setup.lora.dropout,
            target_modules=list(setup.lora.target_modules), bias="none", task_type="CAUSAL_LM",
        )
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    parts: dict[str, float] = {}

    def timed(name, fn, only_no_grad=False):
        def wrapper(*a, **kw):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*a, **kw)
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        "ref_values", trainer._get_per_token_logps_and_entropies, only_no_grad=True
    )
    result = Result("trl grpo")
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.set_num_threads(threads)
            parts.clear()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - self.start
            print(f"  trl grpo iteration {state.global_step - 1}: {total:.2f}s "
                  + " ".join(f"{k}={v:.2f}" for k, v in parts.items()), file=sys.stderr, flush=True)
            measured = state.global_step > warmup
            if measured:
                known = parts.get("generate", 0.0) + parts.get("score", 0.0) + parts.get("ref_values", 0.0)
                result.add(total, {**parts, "update": total - known})
            for other in others:
                other.iteration(measured)
            torch.set_num_threads(threads)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer.add_callback(Clock())
    trainer.train()
    if any(abs(length - setup.new_tokens) > 1e-6 for length in lengths):
        raise RuntimeError(f"TRL generated {lengths} tokens, not {setup.new_tokens}")
    return result


# --------------------------------------------------------------------------- DPO
def dpo_pairs(setup: Setup) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected): `setup.prompts * setup.group` pairs whose answers are
    `setup.new_tokens` tokens each (a repeated one-token word), the same for both systems."""
    n = setup.prompts * setup.group
    return [(QUESTIONS[i % len(QUESTIONS)], " yes" * setup.new_tokens, " no" * setup.new_tokens) for i in range(n)]


class HitlDPO:
    """One DPO optimiser step on the whole batch: ``rlhf.po`` on PPO's engine (policy and
    reference forwards of the chosen and rejected rows, the backward, the step)."""

    def __init__(self, setup: Setup, threads: int) -> None:
        from rlhf.po import PairExample, POConfig
        from rlhf.ppo.trainer import PPOTrainer

        self.setup, self.threads = setup, threads
        policy, tokenizer = load_policy(setup.model, setup.lora)
        self.trainer = PPOTrainer(policy, tokenizer, lambda p, r: None, PPOConfig(algorithm="dpo", seed=0),
                                  DeepSpeedConfig(zero_stage=0))
        self.examples = [PairExample(q, c, r) for q, c, r in dpo_pairs(setup)]
        self.cfg = POConfig(loss="dpo", beta=0.1, lr=setup.lr, batch_size=len(self.examples), max_prompt_tokens=512,
                            max_response_tokens=setup.new_tokens + 1)
        self.result = Result("hitl dpo")
        self.done = 0

    def iteration(self, measured: bool) -> None:
        from rlhf.po.trainer import _train_minibatch
        from rlhf.sft.trainer import _learning_rate

        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        self.trainer.policy_engine.train()
        with _learning_rate(self.trainer.policy_engine, self.cfg.lr):
            _train_minibatch(self.trainer, self.examples, self.cfg)
        total = time.perf_counter() - start
        print(f"  hitl dpo iteration {self.done}: {total:.2f}s", file=sys.stderr, flush=True)
        self.done += 1
        if measured:
            self.result.add(total, {"update": total})


def run_trl_dpo_interleaved(setup: Setup, warmup: int, iters: int, other: HitlDPO, threads: int) -> Result:
    """TRL's DPOTrainer on the same pairs (one step = the whole batch, reference log-probs
    computed in the step, as hitl does), after each of its steps one hitl DPO step."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    policy, tokenizer = load_policy(setup.model.model_copy(update={"onednn_linear": False}), None)
    model_init_kwargs = None
    if not setup.lora.enabled:
        path = tempfile.mkdtemp(prefix="trl-bench-model-")
        policy.save_pretrained(path)
        policy, model_init_kwargs = path, {"dtype": torch.float32}
    pairs = dpo_pairs(setup)
    # the prompt as hitl's batches write it: the chat template with the assistant turn opened
    rows = [{"prompt": chat_prompts(tokenizer, 1)[0].replace(QUESTIONS[0], q), "chosen": c, "rejected": r} for q, c, r in pairs]
    dataset = Dataset.from_list(rows * (warmup + iters + 2))
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=len(pairs), beta=0.1,
        loss_type=["sigmoid"], learning_rate=setup.lr, gradient_accumulation_steps=1, max_steps=warmup + iters,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
        dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, disable_tqdm=True,
        precompute_ref_log_probs=False, model_init_kwargs=model_init_kwargs,
    )
    peft_config = None
    if setup.lora.enabled:
        peft_config = PeftLoraConfig(r=setup.lora.rank, lora_alpha=setup.lora.alpha, lora_dropout=setup.lora.dropout,
                                     target_modules=list(setup.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    result = Result("trl dpo")

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.set_num_threads(threads)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - self.start
            print(f"  trl dpo iteration {state.global_step - 1}: {total:.2f}s", file=sys.stderr, flush=True)
            measured = state.global_step > warmup
            if measured:
                result.add(total, {"update": total})
            other.iteration(measured)
            torch.set_num_threads(threads)

    trainer.add_callback(Clock())
    trainer.train()
    return result


# --------------------------------------------------------------------------- floor
def matmul_floor(setup: Setup, reps: int = 3) -> dict[str, float]:
    """Seconds of the dense weight matmuls that each stage of one iteration cannot avoid at
    fp32 on this thread count, measured on the model's own weight tensors (the fastest of
    ``reps``, on whichever of the default BLAS and oneDNN with prepacked weights is faster for
    each stage's set of products). Any exact implementation runs at least these products;
    attention, norms, activations, sampling, the adapters' small products and framework
    overhead come on top.

    - generate: the prompts once per group through the decoder, then ``T - 1`` decoding steps
      of ``B`` rows through the decoder and the LM head (the faster of its two forms);
    - score: the reward model's decoder (same architecture) over the prompts once per group
      and the ``B x T`` response tokens;
    - ref: the same through the policy's decoder, and the LM head on the response tokens;
    - update: that forward again and its backward to the inputs (``dY W``; frozen weights need
      no weight gradient), the least a LoRA update does.
    """
    from torch import nn

    model, tokenizer = load_policy(setup.model, None)
    head = model.get_output_embeddings()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    head_w = head.weight.detach()
    prompt_rows = sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in chat_prompts(tokenizer, setup.prompts))
    B, T = setup.prompts * setup.group, setup.new_tokens

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def fastest(products: list[tuple[Tensor, Tensor]]) -> float:
        """``x @ W^T`` for each (x, W), on the faster of the default BLAS and oneDNN with
        prepacked weights (packing not counted: a frozen weight is packed once)."""
        plain = best(lambda: [F.linear(x, w) for x, w in products])
        if not ONEDNN_AVAILABLE:
            return plain
        packs = [(x, pack(w)) for x, w in products]
        return min(plain, best(lambda: [packed_linear(x, p) for x, p in packs]))

    def body(rows: int, backward: bool = False) -> float:
        xs = {d: torch.randn(rows, d) for d in {w.shape[0] for w in weights} | {w.shape[1] for w in weights}}
        if backward:  # dY @ W = dY @ (W^T)^T
            return fastest([(xs[w.shape[0]], w.t().contiguous()) for w in weights])
        return fastest([(xs[w.shape[1]], w) for w in weights])

    def lm_head(rows: int, backward: bool = False) -> float:
        if backward:
            return fastest([(torch.randn(rows, head_w.shape[0]), head_w.t().contiguous())])
        x = torch.randn(rows, head_w.shape[1])
        return min(fastest([(x, head_w)]), best(lambda: torch.mm(head_w, x.t())))

    with torch.no_grad():
        trained_rows = prompt_rows + B * T
        forward = body(trained_rows) + lm_head(B * T)
        return {
            "generate": body(prompt_rows) + lm_head(setup.prompts) + (T - 1) * (body(B) + lm_head(B)),
            "score": body(trained_rows),
            "ref_values": forward,
            "update": forward + body(trained_rows, backward=True) + lm_head(B * T, backward=True),
        }


# --------------------------------------------------------------------------- PEFT kinds
PEFT_KINDS = ("lora", "dora", "ia3", "bitfit", "bottleneck")


def peft_kinds_arg(text: str) -> list[str]:
    kinds = list(PEFT_KINDS) if text == "all" else [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in PEFT_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"--peft: expected 'all' or a comma list of {', '.join(PEFT_KINDS)}; got {text!r}")
    return kinds


@dataclass
class PeftRow:
    kind: str
    trainable: int
    total: int
    grpo: HitlRun
    dpo: HitlDPO


def run_peft_kinds(setup: Setup, kinds: list[str], warmup: int, iters: int, threads: int) -> list[PeftRow]:
    """A GRPO iteration and a DPO step of each kind, interleaved, ``warmup + iters`` rounds."""
    from rlhf.models.peft_kinds import trainable_count

    reward_model = build_reward_model(RewardConfig(head_init_std=0.05), setup.model)
    rows = []
    for kind in kinds:
        kind_setup = Setup(f"{setup.name} ({kind})", setup.model, LoraConfig(enabled=True, kind=kind), setup.prompts,
                           setup.group, setup.new_tokens, setup.lr)
        grpo, dpo = HitlRun(kind_setup, "grpo", reward_model, threads), HitlDPO(kind_setup, threads)
        grpo.result.system, dpo.result.system = f"{kind} grpo", f"{kind} dpo"
        policy = grpo.trainer.policy
        rows.append(PeftRow(kind, trainable_count(policy), sum(p.numel() for p in policy.parameters()), grpo, dpo))
    for round_ in range(warmup + iters):
        for row in rows:
            row.grpo.iteration(measured=round_ >= warmup)
            row.dpo.iteration(measured=round_ >= warmup)
    return rows


def peft_table(setup: Setup, rows: list[PeftRow]) -> list[str]:
    samples = setup.prompts * setup.group
    lines = [
        f"\n== {setup.name}: PEFT kinds, GRPO iterations of {setup.prompts} prompts x {setup.group} samples of "
        f"{setup.new_tokens} tokens and DPO steps on {samples} pairs, {torch.get_num_threads()} torch thread(s), best "
        f"of {len(rows[0].grpo.result.iteration_s)} interleaved rounds ==",
        f"{'kind':<11} {'trainable':>10} {'of model':>9} {'grpo s':>8} {'samples/s':>10} {'dpo s':>8} {'pairs/s':>8}",
    ]
    for r in rows:
        g, d = r.grpo.result.best(), r.dpo.result.best()
        lines.append(f"{r.kind:<11} {r.trainable:>10,} {r.trainable / r.total:>9.3%} {g:8.2f} {samples / g:10.2f} "
                     f"{d:8.2f} {samples / d:8.2f}")
    return lines


def peft_summary(setup: Setup, rows: list[PeftRow]) -> dict[str, dict[str, float]]:
    samples = setup.prompts * setup.group
    return {r.kind: {"trainable_params": r.trainable, "samples_per_s": round(samples / r.grpo.result.best(), 3),
                     "dpo_pairs_per_s": round(samples / r.dpo.result.best(), 3)} for r in rows}


# --------------------------------------------------------------------------- report
def table(setup: Setup, results: list[Result]) -> list[str]:
    samples = setup.prompts * setup.group
    lines = [
        f"\n== {setup.name}: {setup.prompts} prompts x {setup.group} samples = {samples} responses of "
        f"{setup.new_tokens} tokens, {torch.get_num_threads()} torch thread(s), best of {len(results[0].iteration_s)} "
        f"interleaved iterations ==",
        f"{'system':<11} {'iter s':>8} {'samples/s':>10} {'tokens/s':>9} {'generate':>9} {'score':>7} "
        f"{'ref+val':>8} {'update':>8} {'median s':>9}",
    ]
    for r in results:
        t = r.best()
        lines.append(
            f"{r.system:<11} {t:8.2f} {samples / t:10.2f} {samples * setup.new_tokens / t:9.1f} "
            f"{r.best('generate'):9.2f} {r.best('score'):7.2f} {r.best('ref_values'):8.2f} "
            f"{r.best('update'):8.2f} {r.median():9.2f}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations and samples (under 5 minutes)")
    ap.add_argument("--skip-smollm2", action="store_true", help="tiny model only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both sides); 1 is steadier on a shared CPU")
    ap.add_argument("--only-dpo", action="store_true", help="the DPO rows only (skip the PPO-family ones)")
    ap.add_argument("--peft", type=peft_kinds_arg, metavar="KINDS",
                    help=f"PEFT kinds mode: 'all' or a comma list of {', '.join(PEFT_KINDS)} (samples/s and "
                         "trainable parameters per kind; no TRL rows)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warmup, iters = (1, 3) if args.quick else (1, 5)
    if args.peft:
        main_peft(args, warmup, iters)
        return
    lora = LoraConfig(enabled=True, rank=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    setups = [
        Setup("tiny random Llama (full fine-tuning)", ModelConfig(source="tiny", hidden_size=64, num_layers=2,
              num_heads=4, intermediate_size=128), LoraConfig(enabled=False), 4, 4, 32, 1e-4),
    ]
    if not args.skip_smollm2:
        setups.append(Setup("SmolLM2-135M-Instruct + LoRA", ModelConfig(source="smollm2"), lora,
                            2 if args.quick else 4, 4, 24 if args.quick else 32, 1e-5))
    summary: dict[str, float | str] = {}
    printed: list[str] = []
    for setup in setups:
        samples = setup.prompts * setup.group
        key = "tiny" if setup.model.source == "tiny" else "smollm2_lora"
        dpo = HitlDPO(setup, args.threads)
        trl_dpo = run_trl_dpo_interleaved(setup, warmup, iters, dpo, args.threads)
        lines = [f"\n== {setup.name}: DPO, one step on {samples} pairs of {setup.new_tokens}-token answers, best of "
                 f"{len(trl_dpo.iteration_s)} interleaved steps ==",
                 f"{'system':<11} {'step s':>8} {'pairs/s':>10} {'median s':>9}"]
        lines += [f"{r.system:<11} {r.best():8.2f} {samples / r.best():10.2f} {r.median():9.2f}" for r in (dpo.result, trl_dpo)]
        printed += lines
        print("\n".join(lines), flush=True)
        summary[f"{key}_dpo_pairs_per_s"] = samples / dpo.result.best()
        summary[f"{key}_trl_dpo_pairs_per_s"] = samples / trl_dpo.best()
        summary[f"{key}_dpo_vs_trl"] = trl_dpo.best() / dpo.result.best()
        if args.only_dpo:
            continue
        # a random (untrained) head: scores vary across responses, so advantages are not all zero
        reward_model = build_reward_model(RewardConfig(head_init_std=0.05), setup.model)
        runs = [HitlRun(setup, "grpo", reward_model, args.threads), HitlRun(setup, "gae", reward_model, args.threads)]
        trl = run_trl_interleaved(setup, reward_model, warmup, iters, runs, args.threads)
        hitl_grpo, hitl_ppo = runs[0].result, runs[1].result
        lines = table(setup, [hitl_grpo, hitl_ppo, trl])
        printed += lines
        print("\n".join(lines), flush=True)
        summary[f"{key}_samples_per_s"] = samples / hitl_grpo.best()
        summary[f"{key}_ppo_samples_per_s"] = samples / hitl_ppo.best()
        summary[f"{key}_trl_samples_per_s"] = samples / trl.best()
        summary[f"{key}_vs_trl"] = trl.best() / hitl_grpo.best()
        summary[f"{key}_ppo_vs_trl"] = trl.best() / hitl_ppo.best()
        summary[f"{key}_tokens_per_s"] = samples * setup.new_tokens / hitl_grpo.best()
        if setup.lora.enabled:
            torch.set_num_threads(args.threads)
            floor = matmul_floor(setup)
            total = sum(floor.values())
            lines = [
                "\nmatmul floor (the dense fp32 weight products each stage cannot avoid, on the model's own "
                "weights; everything else comes on top):",
                f"{'floor':<11} {total:8.2f} {samples / total:10.2f} {samples * setup.new_tokens / total:9.1f} "
                f"{floor['generate']:9.2f} {floor['score']:7.2f} {floor['ref_values']:8.2f} {floor['update']:8.2f}",
                f"the most an exact fp32 implementation could reach against this TRL run: "
                f"{trl.best() / total:.2f}x (trl {trl.best():.2f} s / floor {total:.2f} s); hitl grpo: "
                f"{trl.best() / hitl_grpo.best():.2f}x, at {total / hitl_grpo.best():.0%} of the floor's speed",
            ]
            printed += lines
            print("\n".join(lines), flush=True)
            summary[f"{key}_floor_s"] = total
            summary[f"{key}_max_vs_trl"] = trl.best() / total
    main_key = "smollm2_lora" if not args.skip_smollm2 else "tiny"
    summary = {
        **({} if args.only_dpo else {"samples_per_s": summary[f"{main_key}_samples_per_s"],
                                     "trl_samples_per_s": summary[f"{main_key}_trl_samples_per_s"],
                                     "vs_trl": summary[f"{main_key}_vs_trl"]}),
        "dpo_vs_trl": summary[f"{main_key}_dpo_vs_trl"],
        "model": main_key,
        **summary,
    }
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))


def main_peft(args, warmup: int, iters: int) -> None:
    if args.skip_smollm2:
        setup = Setup("tiny random Llama", ModelConfig(source="tiny", hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=128), LoraConfig(enabled=True), 4, 4, 32 if not args.quick else 16, 1e-4)
    else:
        setup = Setup("SmolLM2-135M-Instruct", ModelConfig(source="smollm2"), LoraConfig(enabled=True),
                      2 if args.quick else 4, 4, 24 if args.quick else 32, 1e-5)
    rows = run_peft_kinds(setup, args.peft, warmup, iters, args.threads)
    print("\n".join(peft_table(setup, rows)), flush=True)
    print(json.dumps({"model": "tiny" if args.skip_smollm2 else "smollm2", "peft": peft_summary(setup, rows)}))


if __name__ == "__main__":
    main()

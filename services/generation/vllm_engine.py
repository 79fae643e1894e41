"""The `vllm` engine backend: vLLM's offline engine inside the engine actor (optional extra).

`VllmPolicyEngine` answers the same calls as the `hf` backend (`engine.PolicyEngine`), so
`engines.GenerationEngine` holds either and the contract tests run on both:

    engine = VllmPolicyEngine(model_cfg, lora_cfg, max_prompt_tokens, device, cfg.vllm)
    engine.generate(requests, defaults)      # chat / completion answers
    engine.rollout_many(rollout_requests)    # PPO rollouts with behaviour log-probs
    engine.load_weights(WeightUpdate(...))   # a new policy version (from the sync group)

Design:
- **Prompts as token ids.** Prompts are rendered and tokenized by the policy's own tokenizer
  exactly as the trainer does (`rollout.rollout_texts`, left truncation) and handed to vLLM as
  token ids, so the trainer scores the very tokens vLLM continued.
- **Seeded per sample.** Each rollout row is its own vLLM request with a seed derived from
  (PPO seed, iteration, sample index): a row's sample does not depend on the batch it is in
  or the engine that drew it. (vLLM's sampler is not the `hf` sampler, so the two backends
  draw different samples from the same distribution.)
- **Behaviour log-probs** are vLLM's ``processed_logprobs`` of the sampled token: log softmax
  of the logits over the temperature, as the trainer computes them when top-k and top-p are
  off (their defaults). With a cut, vLLM's log-probs are renormalised over the kept tokens
  and the PPO ratio's behaviour correction accounts for the difference.
- **Weights.** Full weights reach vLLM's model through its worker extension
  (`collective_rpc("hitl_load_weights")`: vLLM's in-place reload, the model's own
  `load_weights`, which fuses q/k/v and gate/up, then what follows a load, such as the CPU
  kernels' packed weights). Under LoRA each policy version is a LoRA adapter of its own
  (written to a directory, loaded as a `LoRARequest`, the previous one removed), so a request
  is answered by the adapter of one version. The prefix cache is reset at every swap (its
  keys would otherwise reach back to the old weights). Callers serialise swaps with
  generation (the engine actor's model lock), as for the `hf` backend.
- **One process.** The engine core runs in the actor's process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a weight swap is a call, not a message. With
  ``tensor_parallel_size`` > 1 vLLM starts its own workers on the actor's GPUs and updates
  reach them through ``collective_rpc`` (a host copy per worker).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path
from types import SimpleNamespace
from collections.abc import Mapping, Sequence

import torch

from rlhf.models import LoraConfig, ModelConfig
from rlhf.ppo.rollout import RolloutBatch, RolloutRequest, rollout_texts
from rlhf.sync import DEFAULT_BUCKET_BYTES, WeightLayout
from rlhf.templates import DEFAULT_TEMPLATE, PromptTemplate, check_template
from services.generation.config import VllmConfig
from services.generation.engine import (
    GenerateRequest,
    GenerateResult,
    StaleWeights,
    TokenListener,
    WeightUpdate,
    check_update,
    prompt_text,
)

SEED_MASK = 2**63 - 1


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def row_seed(seed: int, iteration: int, sample_index: int) -> int:
    """The vLLM seed of one rollout row (stable across processes and batches)."""
    digest = hashlib.blake2b(f"{seed}:{iteration}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & SEED_MASK


class WeightLoader:
    """vLLM worker extension (``worker_extension_cls``): runs inside each vLLM worker."""

    def hitl_load_weights(self, pairs: list[tuple[str, torch.Tensor]]) -> int:
        """Load checkpoint-format tensors in place: vLLM's in-place reload runs the model's own
        `load_weights` (q/k/v and gate/up fused) and then what follows a load (the CPU
        kernels' packed weights rebuilt)."""
        self.model_runner.reload_weights(weights_iterator=iter(pairs), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(pairs)



def materialise(model_cfg: ModelConfig) -> Path:
    """The model directory vLLM reads for a model config: the converted GGUF cache for
    ``smollm2``/``gguf``, the directory for ``hf``, and for ``tiny`` the random model saved
    once under the cache (its weights are a function of its config). vLLM needs no tokenizer:
    it receives token ids and returns token ids."""
    from rlhf.models.gguf_cache import ensure_model_dir, gguf_source
    from rlhf.models.loading import _gguf_path, build_tiny_model, load_tokenizer

    if model_cfg.source == "hf":
        return Path(str(model_cfg.path))
    if model_cfg.source != "tiny":
        return ensure_model_dir(gguf_source(_gguf_path(model_cfg), model_cfg.cache_dir))
    key = hashlib.sha256(model_cfg.model_dump_json().encode()).hexdigest()[:16]
    target = Path(model_cfg.cache_dir) / f"tiny-{key}"
    if not (target / "config.json").exists():
        model = build_tiny_model(model_cfg, load_tokenizer(model_cfg))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
        model.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def meta_targets(model_dir: Path, model_cfg: ModelConfig, lora: LoraConfig | None):
    """The names, shapes and dtypes of the tensors a weight update carries (on the meta
    device: nothing is allocated), and the peft config under LoRA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf.models.loading import apply_lora

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=model_cfg.torch_dtype)
        if lora is None:
            return dict(model.state_dict()), None
        peft_model = apply_lora(model, lora)
    adapter = getattr(peft_model, "active_adapter", "default")
    targets = {name.replace(f".{adapter}.", "."): p for name, p in peft_model.named_parameters() if "lora_" in name}
    return targets, peft_model.peft_config[adapter]


class VllmPolicyEngine:
    """The `vllm` engine backend (see the module docstring)."""

    def __init__(self, model_cfg: ModelConfig, lora: LoraConfig | None, max_prompt_tokens: int = 512,
                 device: torch.device | str = "cpu", options: VllmConfig | None = None,
                 template: PromptTemplate = DEFAULT_TEMPLATE):
        from rlhf.models.loading import load_tokenizer
        from rlhf.ppo.rollout import eos_token_ids

        options = options or VllmConfig()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if torch.device(device).type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kv_cache_gib))
            # vLLM drops torch to one thread unless told: keep the threads the engine was given
            os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        from vllm import LLM

        self.lora = lora is not None and lora.enabled
        self.max_prompt_tokens = max_prompt_tokens
        self.version = 0
        self.tokenizer = load_tokenizer(model_cfg)
        check_template(self.tokenizer, template, "the policy")
        self.template = template
        self._workdir = Path(tempfile.mkdtemp(prefix="hitl-vllm-"))  # LoRA adapters written for vLLM to read
        weakref.finalize(self, shutil.rmtree, self._workdir, True)  # removed with the engine, or at exit
        model_dir = materialise(model_cfg)
        self._targets, self._peft_config = meta_targets(model_dir, model_cfg, lora if self.lora else None)
        self._eos = eos_token_ids(SimpleNamespace(generation_config=_generation_config(model_dir)), self.tokenizer)
        self._adapter = None  # the LoRARequest of the served version (None: the base model, version 0)
        extra = {"enable_lora": True, "max_lora_rank": max(8, lora.rank), "max_loras": 2} if self.lora else {}
        self.llm = LLM(
            model=str(model_dir), dtype=str(model_cfg.torch_dtype).removeprefix("torch."),
            enforce_eager=options.enforce_eager, tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=options.max_model_len,
            seed=0, generation_config="vllm", logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
            worker_extension_cls=f"{__name__}.WeightLoader", **extra,
        )

    # -- weights ----------------------------------------------------------------

    def load_weights(self, update: WeightUpdate) -> int:
        """Swap weights; returns the new version. Callers serialise this with generation."""
        if update.version <= self.version:
            raise StaleWeights(f"weights version {update.version} is not newer than the served {self.version}")
        check_update(update, self._targets, self.lora)
        if self.lora:
            self._swap_adapter(update)
        else:
            self.llm.collective_rpc("hitl_load_weights", args=(list(update.tensors.items()),))
        self.llm.reset_prefix_cache()
        self.version = update.version
        return self.version

    def _swap_adapter(self, update: WeightUpdate) -> None:
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        directory = self._workdir / f"adapter-v{update.version}"
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in update.tensors.items()},
                  str(directory / "adapter_model.safetensors"))
        self._peft_config.save_pretrained(str(directory))
        request = LoRARequest(f"policy-v{update.version}", update.version, str(directory))
        self.llm.llm_engine.add_lora(request)  # loaded now: a bad adapter fails the swap, not a request
        previous, self._adapter = self._adapter, request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def weight_layout(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightLayout:
        """How a weight update for this policy lies in the sync group's buckets."""
        return WeightLayout.of(self._targets, bucket_bytes)

    # -- prompts and sampling --------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_tokens :]

    def _params(self, **kw):
        from vllm import SamplingParams

        return SamplingParams(stop_token_ids=list(self._eos), detokenize=False, **kw)

    def _run(self, prompts: list[list[int]], params: list, listeners: Mapping[int, TokenListener] | None = None) -> list:
        if not listeners:
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                     lora_request=self._adapter)
            return list(outs)
        return self._run_stepwise(prompts, params, listeners)

    def _run_stepwise(self, prompts: list[list[int]], params: list, listeners: Mapping[int, TokenListener]) -> list:
        """What `LLM.generate` does, one engine step at a time, telling the listeners each
        new token of their requests as the step that drew it ends."""
        engine = self.llm.llm_engine
        batch = uuid.uuid4().hex[:8]
        owner = {}
        for k, (prompt, sp) in enumerate(zip(prompts, params)):
            given = f"hitl-{batch}-{k}"
            owner[given] = k
            owner[engine.add_request(given, {"prompt_token_ids": prompt}, sp, lora_request=self._adapter)] = k
        # a step's output carries only the choices it advanced (each cumulative): keep the latest of each
        latest: dict[int, dict[int, object]] = {k: {} for k in range(len(prompts))}
        finished: set[int] = set()
        told: dict[tuple[int, int], int] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                k = owner[out.request_id]
                for completion in out.outputs:
                    latest[k][completion.index] = completion
                    if k in listeners:
                        start = told.get((k, completion.index), 0)
                        body, _ = self._body(completion.token_ids)
                        for token in body[start:]:
                            listeners[k](completion.index, token)
                        told[(k, completion.index)] = max(start, len(body))
                if out.finished:
                    finished.add(k)
        if len(finished) != len(prompts):
            raise RuntimeError(f"vLLM finished {len(finished)} of {len(prompts)} requests")
        return [_Answer([latest[k][i] for i in sorted(latest[k])]) for k in range(len(prompts))]

    def _body(self, token_ids: Sequence[int]) -> tuple[list[int], bool]:
        """The answer's tokens before the first EOS, and whether an EOS ended it."""
        for k, t in enumerate(token_ids):
            if t in self._eos:
                return list(token_ids[:k]), True
        return list(token_ids), False

    # -- rollouts -----------------------------------------------------------------

    @torch.no_grad()
    def rollout_many(self, requests: Sequence[RolloutRequest]) -> list[RolloutBatch]:
        """PPO rollouts of several requests in one vLLM call (one version for all)."""
        prompts, params = [], []
        for r in requests:
            s = r.sampling
            texts = rollout_texts(self.tokenizer, list(r.prompts), s.chat_template, s.template)
            for text, index in zip(texts, r.sample_indices):
                prompts.append(self._ids(text)[-s.max_prompt_tokens :])
                params.append(self._params(
                    n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else 0,
                    max_tokens=s.max_new_tokens, min_tokens=min(s.min_new_tokens, s.max_new_tokens),
                    seed=row_seed(s.seed, r.iteration, index), logprobs=0,
                ))
        outs = self._run(prompts, params)
        result, k = [], 0
        for r in requests:
            rows = outs[k : k + len(r.prompts)]
            responses, logprobs = [], []
            for out in rows:
                completion = out.outputs[0]
                body, stopped = self._body(completion.token_ids)
                ids = list(completion.token_ids[: len(body) + 1 if stopped else len(body)])
                responses.append(ids)
                logprobs.append([step[t].logprob for step, t in zip(completion.logprobs, ids)])
            result.append(RolloutBatch([prompts[k + i] for i in range(len(rows))], responses, logprobs, self.version))
            k += len(r.prompts)
        return result

    # -- generation ---------------------------------------------------------------

    def prompt_text(self, request: GenerateRequest) -> str:
        return prompt_text(self.tokenizer, request, self.template)

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerateRequest], defaults,
                 listeners: Mapping[int, TokenListener] | None = None) -> list[GenerateResult]:
        """Answer a batch of requests in one vLLM call (stepwise when someone listens, see
        `PolicyEngine.generate`)."""
        prompts = [self._ids(self.prompt_text(r)) for r in requests]
        params = []
        for r in requests:
            temperature = defaults.temperature if r.temperature is None else r.temperature
            max_new = r.max_new_tokens or defaults.max_new_tokens
            params.append(self._params(
                n=r.n, temperature=temperature, top_p=(r.top_p or defaults.top_p) if temperature > 0 else 1.0,
                max_tokens=max_new, min_tokens=min(r.min_new_tokens, max_new), seed=r.seed,
            ))
        results = []
        for prompt, out in zip(prompts, self._run(prompts, params, listeners)):
            texts, reasons, count = [], [], 0
            for completion in sorted(out.outputs, key=lambda c: c.index):
                body, stopped = self._body(completion.token_ids)
                texts.append(self.tokenizer.decode(body, skip_special_tokens=True))
                reasons.append("stop" if stopped else "length")
                count += len(body)
            results.append(GenerateResult(texts, reasons, len(prompt), count, self.version))
        return results


class _Answer:
    """A request's choices as `LLM.generate` returns them (`outputs`), gathered from the steps."""

    def __init__(self, outputs: list) -> None:
        self.outputs = outputs


def _generation_config(model_dir: Path):
    """The saved generation config of the model vLLM serves (its EOS ids), or None."""
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(model_dir) if (model_dir / "generation_config.json").exists() else None

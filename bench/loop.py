"""Feedback-to-policy latency: from the moment the round's last needed feedback record is
committed (and so acked) to the moment the generation server answers with a policy trained
on it, per stage, on the tiny model and on SmolLM2-135M (LoRA).

    python bench/loop.py --quick        # tiny: 2 rounds; SmolLM2: 1 round, small batches
    python bench/loop.py                # tiny: 3 rounds; SmolLM2: 2 rounds

Each run is a real `Coordinator` on a local Ray cluster with simulated annotators over
gRPC, a 2-worker ZeRO-2 trainer group and Ray Serve. The latency is split into the stages
between the two moments: detecting the feedback, curating, training the reward model,
the PPO iterations, pushing the weights, and the first answer of the new version. The
figure for round 0 includes one-time warm-up. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

STAGES = ("curate", "reward_model", "sft", "ppo", "push_weights")


def run_config(model: str, tmp: Path, rounds: int, quick: bool):
    from actors.config import RunConfig
    from rlhf.config import parse_config

    base = yaml.safe_load(open("configs/tiny.yaml" if model == "tiny" else "configs/local.yaml"))
    for key in ("cluster", "feedback", "generation", "coordinator", "annotators"):
        base.pop(key, None)
    base["deepspeed"] = {"zero_stage": 2, "bf16": False}
    base["ppo"].update(rollout_batch_size=4, minibatch_size=2, max_new_tokens=8 if model == "tiny" else (16 if quick else 32))
    base["reward"].update(max_epochs=2 if model != "tiny" else base["reward"].get("max_epochs", 10))
    tasks = 8 if quick else 16
    base.update(
        cluster={"trainer": {"workers": 2, "num_cpus": 1}, "reward_model": {"num_cpus": 1}, "num_cpus": 8},
        feedback={"service": {"store": f"sqlite:///{tmp / 'feedback.db'}", "port": 0, "metrics_port": None}, "project": "bench"},
        generation={"replicas": 1, "num_cpus": 1, "http_port": 8793, "max_batch_size": 16},
        coordinator={"rounds": rounds, "tasks_per_round": tasks, "min_feedback_per_round": tasks, "ppo_iterations_per_round": 1 if quick else 2,
                     "eval_prompts": 4, "eval_max_new_tokens": 8, "run_dir": str(tmp / "run"), "progress": False},
        annotators={"annotators": [{"annotator_id": "a1", "noise": 0.0, "seed": 1, "judge": {"rule": "concise"}},
                                   {"annotator_id": "a2", "noise": 0.2, "seed": 2, "judge": {"rule": "concise"}}]},
    )
    return parse_config(base, RunConfig)


def measure(model: str, rounds: int, quick: bool) -> list[dict]:
    import ray

    from actors.coordinator import Coordinator

    with tempfile.TemporaryDirectory() as tmp:
        reports = Coordinator(run_config(model, Path(tmp), rounds, quick)).run()
    ray.shutdown()
    rows = []
    for r in reports:
        staged = sum(r.stage_seconds.get(s, 0.0) for s in STAGES)
        total = r.feedback_to_policy_s or 0.0
        rows.append({"model": model, "round": r.round, "total_s": total, **{s: r.stage_seconds.get(s, 0.0) for s in STAGES},
                     "detect_and_serve_s": max(0.0, total - staged)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = measure("tiny", 2 if args.quick else 3, args.quick) + measure("smollm2", 1 if args.quick else 2, args.quick)

    print(f"\n{'model':<8} {'round':>5} {'total s':>8} " + " ".join(f"{s:>13}" for s in STAGES) + f" {'detect+serve':>13}")
    for r in rows:
        print(f"{r['model']:<8} {r['round']:>5} {r['total_s']:>8.1f} " + " ".join(f"{r[s]:>13.1f}" for s in STAGES) + f" {r['detect_and_serve_s']:>13.1f}")
    headline = {}
    for model in ("tiny", "smollm2"):
        later = [r["total_s"] for r in rows if r["model"] == model and r["round"] > 0] or [r["total_s"] for r in rows if r["model"] == model]
        headline[f"{model}_feedback_to_policy_s"] = round(statistics.median(later), 2)
    print(json.dumps({**headline, "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}))


if __name__ == "__main__":
    main()

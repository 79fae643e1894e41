"""Learning from preferences alone: win-rate per judgement, for every built-in judge rule.

    python bench/learning.py                      # every rule, learned and upper bound
    python bench/learning.py --rule concise       # one rule
    python bench/learning.py --no-upper-bound     # the learned runs only
    python bench/learning.py --algorithm ppo      # another policy optimiser (default: the config's)

Each run is the loop of `configs/local.yaml` (SmolLM2-135M-Instruct + LoRA, a 2-worker
DeepSpeed group, Ray Serve, simulated annotators over gRPC) with corrections turned off: the
annotators send preferences only and nothing is trained by SFT. The annotators keep their
paces and noise rates from the config and judge by the rule under test. After every round of
32 judgements the policy is scored against the initial policy on the held-out prompts by the
rule, without noise (ties count half).

The upper bound is the same optimiser fed the rule's own noise-free judgement: every
annotator's noise set to 0, so what the learned run loses to it is what people's noise costs.
(With `--algorithm ppo` that is still a reward model learnt from those judgements, not the
rule's score itself; the bound is then looser.)

Fixed seeds: the annotators' seeds from the config, the prompt split's seed and PPO's.
The last line is one JSON object: per rule `win_rate_at_160`, `minutes` and the curve, the
upper bound's figures beside them, and `min_win_rate_at_160` over the rules run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

RULES = ("positive", "concise", "format")
JUDGEMENTS = 160


def run_config(base: dict, rule: str, tmp: Path, *, upper_bound: bool, algorithm: str | None, port: int):
    """`base` (a parsed config file) turned into the benchmark's run: corrections off, every
    annotator judging by `rule`, rounds of `tasks_per_round` up to `JUDGEMENTS`."""
    from actors.config import RunConfig
    from rlhf.config import parse_config

    cfg = json.loads(json.dumps(base))  # a deep copy
    cfg["sft"] = {**cfg.get("sft", {}), "enabled": False}
    if algorithm:
        cfg["ppo"] = {**cfg.get("ppo", {}), "algorithm": algorithm}
    annotators = []
    for a in cfg["annotators"]["annotators"]:
        a = {k: v for k, v in a.items() if k != "correction_rate"}
        a["judge"] = {**a.get("judge", {}), "rule": rule}
        if upper_bound:
            a["noise"] = 0.0
        annotators.append(a)
    cfg["annotators"]["annotators"] = annotators
    c = cfg["coordinator"]
    tasks = int(c.get("tasks_per_round", 32))
    c.update(rounds=max(1, JUDGEMENTS // tasks), min_feedback_per_round=tasks, run_dir=str(tmp / "run"), progress=False)
    c.pop("storage", None)
    cfg["feedback"] = {"mode": "embedded", "project": "learning",
                       "service": {"store": f"sqlite:///{tmp / 'feedback.db'}", "port": 0, "metrics_port": None}}
    cfg["generation"] = {**cfg.get("generation", {}), "http_port": port}
    return parse_config(cfg, RunConfig)


def measure(base: dict, rule: str, *, upper_bound: bool, algorithm: str | None, port: int) -> dict:
    import ray

    from actors.coordinator import Coordinator

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(base, rule, Path(tmp), upper_bound=upper_bound, algorithm=algorithm, port=port)
        reports = Coordinator(cfg).run()
    ray.shutdown()
    minutes = (time.perf_counter() - started) / 60
    curve = []
    for r in reports:
        curve.append({"round": r.round, "judgements": (r.round + 1) * cfg.coordinator.tasks_per_round,
                      "win_rate": round(r.win_rate, 4), "reward_accuracy": _accuracy(r.reward_model),
                      "kl": r.kl, "round_s": round(sum(r.stage_seconds.values()), 1)})
    return {"rule": rule, "upper_bound": upper_bound, "algorithm": cfg.ppo.algorithm, "minutes": round(minutes, 2),
            "win_rate_at_160": curve[-1]["win_rate"], "curve": curve}


def _accuracy(rm: dict) -> float | None:
    value = (rm or {}).get("validation_accuracy")
    return None if value is None or value != value else round(value, 3)


def print_table(results: list[dict]) -> None:
    rounds = max(len(r["curve"]) for r in results)
    head = " ".join(f"{'@' + str((i + 1) * 32):>7}" for i in range(rounds))
    print(f"\n{'rule':<9} {'run':<12} {'algorithm':<9} {head} {'minutes':>8}")
    for r in results:
        cells = " ".join(f"{p['win_rate']:>7.3f}" for p in r["curve"])
        print(f"{r['rule']:<9} {'upper bound' if r['upper_bound'] else 'learned':<12} {r['algorithm']:<9} {cells} {r['minutes']:>8.1f}")


def summary(results: list[dict]) -> dict:
    rules: dict[str, dict] = {}
    for r in results:
        entry = rules.setdefault(r["rule"], {})
        key = "upper_bound" if r["upper_bound"] else "learned"
        entry[key] = {"win_rate_at_160": r["win_rate_at_160"], "minutes": r["minutes"],
                      "curve": [p["win_rate"] for p in r["curve"]], "reward_accuracy": [p["reward_accuracy"] for p in r["curve"]]}
        if key == "learned":
            entry.update(win_rate_at_160=r["win_rate_at_160"], minutes=r["minutes"])
    learned = [v["win_rate_at_160"] for v in rules.values() if "win_rate_at_160" in v]
    return {"algorithm": results[0]["algorithm"] if results else None, "rules": rules,
            "min_win_rate_at_160": min(learned) if learned else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rule", choices=RULES, action="append", help="a rule to run (repeatable; default: every rule)")
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--algorithm", choices=("ppo", "dpo", "ipo", "kto"), help="ppo.algorithm (default: the config's)")
    parser.add_argument("--no-upper-bound", action="store_true", help="skip the noise-free runs")
    parser.add_argument("--port", type=int, default=8794, help="the generation server's HTTP port during the runs")
    args = parser.parse_args()

    base = yaml.safe_load(Path(args.config).read_text())
    results = []
    for rule in args.rule or RULES:
        for upper in (False,) if args.no_upper_bound else (False, True):
            result = measure(base, rule, upper_bound=upper, algorithm=args.algorithm, port=args.port)
            results.append(result)
            print(json.dumps(result), flush=True)
    print_table(results)
    print(json.dumps(summary(results)))


if __name__ == "__main__":
    main()

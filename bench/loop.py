"""Rounds against continuous mode, and random against margin task selection, on the same
budget of judgements from the same simulated annotators.

    python bench/loop.py --quick        # a budget of 64 judgements (2 rounds of 32 tasks)
    python bench/loop.py                # 160 judgements (5 rounds of 32), as configs/local.yaml runs

Three runs of the real loop (local Ray, the feedback service over gRPC, simulated annotators
at the pace the configs give them, the 2-worker ZeRO-2 trainer group, the engine group,
SmolLM2-135M with LoRA), in one process one after another, on the same seeds:

  rounds       configs/local.yaml: publish 32 tasks, wait for them, train, repeat
  continuous   configs/local-continuous.yaml: tasks kept open while training steps run (at
               least as many steps as the rounds run has rounds: `continuous.min_steps`)
  margin       the same with `coordinator.selection.policy: margin` (uncertainty sampling)

Per run: `idle_fraction` (the annotators' mean share of time with no task to take, from their
first task to the last judgement the run consumed), `judgements_per_min` (judgements consumed
per minute of the run), `feedback_to_policy_s` (median over rounds or steps: from the last
record a step consumed being committed to the first answer of the policy trained on it),
`win_rate` (the last evaluation against the initial policy, by the annotators' rule, ties
half), and `win_rate_gain_per_100` ((win_rate - 0.5) per 100 judgements consumed). The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

RUNS = (
    ("rounds", "configs/local.yaml", {}),
    ("continuous", "configs/local-continuous.yaml", {}),
    ("margin", "configs/local-continuous.yaml", {"coordinator": {"selection": {"policy": "margin"}}}),
)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def run_config(path: str, tmp: Path, rounds: int, overrides: dict):
    from actors.config import RunConfig
    from rlhf.config import parse_config

    data = yaml.safe_load(open(path))
    data = _merge(data, {
        "feedback": {"service": {"store": f"sqlite:///{tmp / 'feedback.db'}", "port": 0, "metrics_port": None}, "project": "bench"},
        "generation": {"http_port": 8793},
        "coordinator": {"rounds": rounds, "run_dir": str(tmp / "run"), "progress": False,
                        "continuous": {"min_steps": rounds}},  # as many policy updates as the rounds
        "tracking": {"tensorboard": False},
    })
    return parse_config(_merge(data, overrides), RunConfig)


def measure(name: str, path: str, rounds: int, overrides: dict) -> dict:
    import ray

    from actors.coordinator import Coordinator

    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(path, Path(tmp), rounds, overrides)
        reports = Coordinator(cfg).run()
    ray.shutdown()
    last = reports[-1].live
    latencies = [r.feedback_to_policy_s for r in reports if r.feedback_to_policy_s is not None]
    judged = last["judgements"]
    win = reports[-1].win_rate
    return {
        "run": name, "mode": cfg.coordinator.mode, "selection": cfg.coordinator.selection.policy, "steps": len(reports),
        "judgements": judged, "minutes": round(last["elapsed_s"] / 60, 2),
        "idle_fraction": last["idle_fraction"], "judgements_per_min": last["judgements_per_min"],
        "feedback_to_policy_s": round(statistics.median(latencies), 1) if latencies else None,
        "win_rate": round(win, 4), "win_rate_gain_per_100": round((win - 0.5) * 100 / judged, 4) if judged else None,
        "curve": [[r.live["judgements"], round(r.live["elapsed_s"] / 60, 2), round(r.win_rate, 4)] for r in reports],
        "selection_chose": last.get("selection", {}).get("by_reason", {}),
        "tasks_retired": last.get("tasks_retired", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a budget of 2 rounds of 32 tasks instead of 5")
    parser.add_argument("--only", choices=[name for name, _, _ in RUNS], action="append", help="run only these (repeatable)")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    rows = [measure(name, path, rounds, extra) for name, path, extra in RUNS if not args.only or name in args.only]

    print(f"\n{'run':<11} {'mode':<11} {'selection':<9} {'steps':>5} {'judged':>6} {'minutes':>7} {'idle':>6} "
          f"{'judg/min':>8} {'fb->policy s':>12} {'win-rate':>8} {'gain/100':>8}")
    for r in rows:
        print(f"{r['run']:<11} {r['mode']:<11} {r['selection']:<9} {r['steps']:>5} {r['judgements']:>6} {r['minutes']:>7.1f} "
              f"{r['idle_fraction'] if r['idle_fraction'] is not None else float('nan'):>6.3f} {r['judgements_per_min']:>8.1f} "
              f"{r['feedback_to_policy_s'] or float('nan'):>12.1f} {r['win_rate']:>8.3f} {r['win_rate_gain_per_100'] or float('nan'):>8.3f}")
    for r in rows:
        print(f"{r['run']}: win-rate after (judgements, minutes): "
              + ", ".join(f"{j} at {m:.1f} min: {w:.3f}" for j, m, w in r["curve"]) + f"; chose {r['selection_chose']}")
    headline = {}
    for r in rows:
        for key in ("idle_fraction", "judgements_per_min", "feedback_to_policy_s", "win_rate", "win_rate_gain_per_100", "minutes"):
            headline[f"{r['run']}_{key}"] = r[key]
    print(json.dumps({**headline, "budget": rounds * 32, "rows": rows}))


if __name__ == "__main__":
    main()

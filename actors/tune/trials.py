"""What one `hitl tune` trial runs, inside a Ray Tune trial actor.

`replay_trial`: the loop's reward-model stage over a frozen snapshot of stored feedback. The
records up to the snapshot's watermark are cut into rounds in watermark order; each round is
curated as the loop curates it (the config's `curation`, every annotator at weight 1), its
items join the earlier ones (less those a later flag reaches) and the reward model is updated
as the reward-model actor updates it; the round's held-out accuracy is reported.

`loop_trial`: `hitl run` with the trial's config in the trial's directory (its own SQLite
store, simulated annotators), reporting after every round; with a `ReplaySource`, the whole
loop over the frozen snapshot instead (actors/tune/replay.py: nobody is asked anything).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.tune.space import with_values


@dataclass(frozen=True)
class ReplaySource:
    store: str
    project: str
    watermark: int
    rounds: int


def replay_trial(values: dict[str, Any], *, base: dict, source: ReplaySource, cpus: float) -> None:
    from ray import tune

    from actors.config import RunConfig
    from rlhf.config import parse_config
    from rlhf.curation.memory import CurationMemory
    from rlhf.curation.rules import curate, without_flagged
    from rlhf.reward.model import build_reward_model
    from rlhf.reward.trainer import train_reward_model
    from rlhf.threads import set_torch_threads
    from services.feedback.store import open_store

    cfg = parse_config(with_values(base, values), RunConfig, source="trial")
    set_torch_threads(None, cpus)
    store = open_store(source.store)
    try:
        records = [r for r in store.iter_after(0, [source.project]) if r.seq <= source.watermark]
        model = build_reward_model(cfg.reward, cfg.model)
        memory, items = CurationMemory(cfg.curation), []
        for r, chunk in enumerate(rounds_of(records, source.rounds)):
            curated = curate(chunk, store.get_task, cfg=cfg.curation, memory=memory, round_=r)
            if curated.flagged:
                items, _ = without_flagged(items, curated.flagged)
            new_from = len(items)
            items.extend(curated.items)
            report = train_reward_model(model, items, new_from=new_from)
            tune.report({"reward_accuracy": report.validation_accuracy, "round": r + 1, "items": len(items),
                         "train_pairs": report.train_pairs, "validation_pairs": report.validation_pairs,
                         "epochs": report.epochs_run})
    finally:
        store.close()


def rounds_of(records: list, rounds: int) -> list[list]:
    """`records` (in watermark order) cut into `rounds` consecutive parts of near-equal size;
    fewer when there are fewer records than rounds."""
    rounds = max(1, min(rounds, len(records)))
    size, extra = divmod(len(records), rounds)
    parts, start = [], 0
    for i in range(rounds):
        end = start + size + (1 if i < extra else 0)
        parts.append(records[start:end])
        start = end
    return parts


def loop_trial(values: dict[str, Any], *, base: dict, metric: str, kl_budget: float | None,
               source: ReplaySource | None = None) -> None:
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    trial_dir = Path(tune.get_context().get_trial_dir())
    data = with_values(base, values)
    data.setdefault("coordinator", {}).update(run_dir=str(trial_dir / "run"), storage=None, progress=False)
    data.setdefault("feedback", {}).setdefault("service", {})["store"] = f"sqlite:///{trial_dir / 'feedback.db'}"
    if source is not None:
        from actors.tune.replay import replay_config

        data = replay_config(data, source)
    # out of the trial's placement group: the loop places its own actors, as `hitl run` does
    runner = _loop_runner().options(scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)).remote()
    for ref in runner.rounds.remote(data, source):
        round_report = ray.get(ref)
        tune.report({**objectives(round_report, kl_budget), "round": round_report["round"] + 1})


@functools.cache
def _loop_runner():
    """The actor class, made on first use (importing this module needs no Ray)."""
    import ray

    @ray.remote(num_cpus=0)
    class LoopRunner:
        """Runs `hitl run`'s coordinator (or the replay of a snapshot) and yields each round's report as it ends."""

        def rounds(self, data: dict, source: ReplaySource | None = None):
            import queue
            import threading
            from dataclasses import asdict

            from actors.config import RunConfig
            from actors.coordinator import Coordinator
            from rlhf.config import parse_config

            cfg = parse_config(data, RunConfig, source="trial")
            reports: queue.Queue = queue.Queue()
            failure: list[BaseException] = []

            def run() -> None:
                try:
                    put = lambda r: reports.put(asdict(r))  # noqa: E731
                    if source is None:
                        Coordinator(cfg, run_dir=cfg.coordinator.run_dir, on_round=put).run()
                    else:
                        from actors.tune.replay import ReplayCoordinator

                        ReplayCoordinator(cfg, source, run_dir=cfg.coordinator.run_dir, on_round=put).run()
                except BaseException as err:  # noqa: BLE001 - raised again in the caller below
                    failure.append(err)
                finally:
                    reports.put(None)

            threading.Thread(target=run, daemon=True).start()
            while (item := reports.get()) is not None:
                yield item
            if failure:
                raise failure[0]

    return LoopRunner


def objectives(report: dict, kl_budget: float | None) -> dict[str, float]:
    """A round report's objectives: `win_rate`, `reward_accuracy` and (with a budget)
    `reward_at_kl`: the mean reward of the round's last PPO iteration with KL within it
    (NaN when none was)."""
    accuracy = (report.get("reward_model") or {}).get("validation_accuracy")
    out = {"win_rate": float(report.get("win_rate", math.nan)),
           "reward_accuracy": math.nan if accuracy is None else float(accuracy)}
    if kl_budget is not None:
        within = [m for m in report.get("ppo") or [] if "reward" in m and m.get("kl", math.inf) <= kl_budget]
        out["reward_at_kl"] = float(within[-1]["reward"]) if within else math.nan
    return out

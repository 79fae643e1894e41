"""The whole loop over a frozen snapshot of stored feedback: `hitl tune`'s `replay_loop` trials.

A `Coordinator` whose rounds ask nobody: the feedback stage of round r returns the r-th of
`rounds` consecutive parts of the snapshot's records (in watermark order, `rounds_of`), and
the round goes on as any round does: curation against the snapshot's tasks, the reward-model
update, SFT on its corrections, the policy update (PPO rollouts written by the trial's own
engines, scored by the reward model it learnt from the snapshot), the weight push, the
evaluation by the `eval` judges and a checkpoint. So policy settings (PPO's learning rate,
the KL coefficient, the SFT epochs) are tuned on people's judgements already given, without
asking anyone again or simulating annotators. The snapshot's store is only read.

The answers people judged were written by the policy of the run that collected them, not by
the trial's: a replayed round trains the reward model on them as they are (text, whichever
version wrote it) and moves the trial's own policy with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from actors.coordinator import Coordinator, RoundReport
from actors.tune.trials import ReplaySource, rounds_of


class ReplayCoordinator(Coordinator):
    def __init__(self, cfg, source: ReplaySource, run_dir: Path | None = None,
                 on_round: Callable[[RoundReport], None] | None = None):
        super().__init__(cfg, run_dir, on_round=on_round)
        self.source = source
        self._parts: list[list] | None = None

    def _run_identity(self) -> dict:
        return {"run_id": "replay-", "start_watermark": 0}  # the snapshot from its first record

    def _start_feedback(self) -> str:
        return ""  # nobody labels: the snapshot is the feedback

    def _start_annotators(self) -> None:
        return None

    def publish_tasks(self, r: int) -> int:
        return 0

    def wait_for_feedback(self) -> list:
        """The round's part of the snapshot."""
        if self._parts is None:
            records = [s for s in self.store.iter_after(0, [self.source.project]) if s.seq <= self.source.watermark]
            self._parts = rounds_of(records, self.source.rounds)
        self._feedback_complete_at = None
        r = self._round_running
        return self._parts[r] if r < len(self._parts) else []


def replay_config(data: dict, source: ReplaySource) -> dict:
    """A trial's run config (as a dict) turned into a replay of `source`: its store and
    project, as many rounds as the snapshot has parts, no simulated annotators, rounds mode."""
    out = {**data}
    feedback = {**(out.get("feedback") or {})}
    feedback["service"] = {**(feedback.get("service") or {}), "store": source.store, "port": 0, "metrics_port": None}
    feedback.update(mode="embedded", project=source.project)
    out["feedback"] = feedback
    coordinator = {**(out.get("coordinator") or {})}
    coordinator.update(rounds=source.rounds, mode="rounds")
    out["coordinator"] = coordinator
    out["annotators"] = {**(out.get("annotators") or {}), "enabled": False}
    return out

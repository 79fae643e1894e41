"""The coordinator: runs the loop, in rounds or continuously.

    hitl run configs/local.yaml                # a new run
    hitl run configs/local-continuous.yaml     # the same, with no rounds (coordinator.mode: continuous)
    hitl run --resume runs/latest              # continue a stopped run from its last checkpoint

One round, top-down (each step a method below):
  publish tasks (two answers of the current policy per prompt) → wait for enough new
  feedback → curate → update the reward model → SFT on corrections → PPO iterations → push
  the weights to the generation server → evaluate on held-out prompts → checkpoint (the
  feedback watermark included, so a resumed run neither reuses nor skips a record). Each
  pushed version gets a lineage file (rlhf/lineage.py) that its round report names.

Continuous mode has no publish stage and no rounds: a publisher thread (actors/task_feeder.py)
keeps tasks open at all times, and a training step (the same stages from curate to
checkpoint, reported like a round) starts whenever `continuous.min_feedback_per_step` new
judgements are committed, consuming everything up to the store's watermark then. Annotators
label while steps train; the run ends once its task budget is judged and consumed.

Which pairs become tasks is the selection policy's choice (rlhf/selection.py), in both modes.

Ray enters at: [1] `ray.init` (local cluster or an address), [2] the feedback service
actor, [3] the engine group (generation: tasks, rollouts, evaluation) and its Serve ingress,
[4] the reward-model actor, [5] the PPO trainer group (placement group, torch.distributed),
[6] the weight-sync group from trainer rank 0 to the engines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from actors.config import CoordinatorConfig, RunConfig, run_config_json
from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.curation.memory import CurationMemory
from rlhf.curation.rules import Curated, curate
from rlhf.early_stopping import replay
from rlhf.lineage import (
    forget_in_reward_model,
    next_reward_model,
    policy_lineage,
    republished_lineage,
    write_lineage,
)
from rlhf.prompts import load_prompts, split_prompts
from rlhf.quality import TRAINED_KINDS, QualityTracker
from rlhf.quality.judges import Judge, shown_text
from rlhf.storage import CheckpointStorage
from services.feedback.records import Task

log = logging.getLogger(__name__)

class NoFeedback(RuntimeError):
    """Nobody judged anything for twice `coordinator.feedback_timeout_s` (not a fault a restart mends)."""


STAGES = ("publish", "feedback", "curate", "reward_model", "sft", "ppo", "push_weights", "evaluate", "checkpoint")


def countable_feedback(records: list, paused: frozenset[str], ratings: bool = True) -> list:
    """The records that count toward a round's feedback threshold: preferences, rankings and
    (when curation pairs them, `ratings`) ratings, what the reward model trains on, from
    annotators who are not paused."""
    kinds = TRAINED_KINDS if ratings else tuple(k for k in TRAINED_KINDS if k != "ratings")
    return [s for s in records
            if s.record.WhichOneof("judgement") in kinds and s.record.annotator_id not in paused]


@dataclass
class RoundReport:
    round: int
    policy_version: int
    watermark_from: int
    watermark_to: int
    feedback: dict[str, int]
    reward_model: dict[str, Any]
    ppo: list[dict[str, Any]]  # PPO: one dict of metrics per iteration; DPO/IPO/KTO: one report
    reward: float | None  # mean reward-model score of the round's last PPO rollouts
    kl: float | None  # KL to the reference of those rollouts (per sequence)
    win_rate: float  # final policy vs the initial one on held-out prompts, by the rule without noise
    stage_seconds: dict[str, float]
    annotators: dict[str, dict[str, int]] = field(default_factory=dict)
    feedback_to_policy_s: float | None = None  # last needed record committed -> first answer by the new policy
    quality: dict[str, Any] = field(default_factory=dict)  # annotator tables (round, overall), weights, paused
    evaluation: dict[str, Any] = field(default_factory=dict)  # per judge: win-rate, 95% interval, W/T/L (eval/round-NNNN/)
    sft: dict[str, Any] = field(default_factory=dict)  # the SFT step on corrections, or why it was skipped
    lineage: str | None = None  # lineage/policy-vNNNN.json under the run directory (rlhf/lineage.py)
    live: dict[str, Any] = field(default_factory=dict)  # the run as people see it at the step's end (Coordinator._live)


@dataclass
class RunState:
    """What a checkpoint holds besides the trainer's and the reward model's own files."""

    next_round: int = 0
    watermark: int = 0
    policy_version: int = 0
    initial_eval_answers: list[str] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    reward_model: dict = field(default_factory=dict)  # the reward model's lineage (rlhf.lineage.next_reward_model)
    elapsed_s: float = 0.0  # the run's wall time up to this checkpoint (across resumes)
    judgements: int = 0  # countable judgements consumed so far
    last_judgement_at: float | None = None  # when the last record consumed was committed (wall clock)
    selection: dict = field(default_factory=dict)  # what the selection policy chose so far (rlhf.selection.summarize)
    reward_accuracy: float | None = None  # the reward model's last held-out accuracy, as the gate sees it (gated_accuracy)
    stopped: str | None = None  # why the run ended before its last round (coordinator.win_rate_patience), else None


class Progress:
    """One live line (or plain lines when not on a terminal)."""

    def __init__(self, enabled: bool, rounds: int):
        self.enabled = enabled
        self.rounds = rounds
        self.fields: dict[str, str] = {}
        self.tty = sys.stderr.isatty()
        self.sinks: list[Callable[..., None]] = []  # also told every update: the status board, the metrics

    def update(self, **values: Any) -> None:
        self.fields.update({k: (f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in values.items()})
        for sink in self.sinks:
            try:
                sink(**values)
            except Exception:  # noqa: BLE001 - observing the run must never stop it
                log.debug("a progress sink failed", exc_info=True)
        if not self.enabled:
            return
        line = " | ".join(f"{k} {v}" for k, v in self.fields.items())
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
            sys.stderr.flush()
        elif "stage" in values:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


class Coordinator:
    def __init__(self, cfg: RunConfig, run_dir: Path | None = None, resume: bool = False,
                 on_round: Callable[[RoundReport], None] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.coordinator.run_dir)
        self.resume = resume
        self.on_round = on_round
        self.state = RunState()
        self.progress = Progress(cfg.coordinator.progress, cfg.coordinator.rounds)
        self._annotator_stop = threading.Event()
        self._annotator_threads: list[threading.Thread] = []
        self._annotators: list = []
        self._feedback_complete_at: float | None = None
        self._round_quality: dict[str, Any] = {}
        self._round_evaluation: dict[str, Any] = {}
        self.recoveries: list[dict[str, Any]] = []  # each restart from a checkpoint: round, error
        self._round_running = 0
        self.feeder = None  # continuous mode's publisher (actors/task_feeder.py)
        self._session_started = time.time()
        self._elapsed_base = 0.0
        self._selection_rng = random.Random(cfg.coordinator.selection.seed)
        self._selection_lock = threading.Lock()
        self.curation_memory = CurationMemory(cfg.curation)  # flags and used items of the checkpointed rounds
        self.storage = CheckpointStorage(cfg.coordinator.storage or self.run_dir / "checkpoints")

    # -- lifecycle ------------------------------------------------------------------

    def run(self) -> list[RoundReport]:
        self._prepare_run_dir()
        self._start()
        self.identity = self._run_identity()
        self.state.watermark = self.identity["start_watermark"]
        self._observe()
        state = "failed"
        try:
            if self.resume:
                self._restore()
            else:
                self._initial_eval()
            if self.cfg.coordinator.mode == "continuous":
                self._start_feeder()
            reports = self._rounds()
            state = "stopped early" if self.state.stopped else "finished"
            return reports
        except BaseException as err:
            self.board.error(f"{type(err).__name__}: {err}")
            raise
        finally:
            self.board.update(stopped=self.state.stopped)
            self.board.finish(state)
            self.tracker.close()
            self.progress.close()
            self.shutdown()

    def _observe(self) -> None:
        """The status board (`hitl status`), the coordinator's Prometheus series and the
        experiment tracker (TensorBoard, MLflow), all fed from progress updates and round reports."""
        from actors.status import StatusBoard
        from rlhf.tracking import Tracker, flatten
        from services.telemetry import coordinator_metrics

        run_id = self.identity["run_id"] or self.run_dir.name
        self.board = StatusBoard(self.run_dir, run_id, self.cfg.coordinator.rounds)
        metrics = coordinator_metrics()

        def telemetry(**values: Any) -> None:
            if "stage" in values:
                metrics.record({"stage": values["stage"], "watermark": self.state.watermark,
                                "policy_version": self.state.policy_version,
                                "feedback_lag": max(0, self.store.watermark() - self.state.watermark)}, run=run_id)

        self.progress.sinks += [self.board.update, telemetry]
        params = {k: v for k, v in flatten(json.loads(run_config_json(self.cfg))).items() if not isinstance(v, dict)}
        self.tracker = Tracker(self.cfg.tracking, self.run_dir, run_name=f"{self.run_dir.name}-{run_id}".strip("-"), params=params)

    def _rounds(self) -> list[RoundReport]:
        """Run the remaining rounds; a lost actor restarts the round from the last checkpoint."""

        reports: list[RoundReport] = []
        failures = 0
        continuous = self.cfg.coordinator.mode == "continuous"
        while not self.state.stopped and (continuous or self.state.next_round < self.cfg.coordinator.rounds):
            try:
                report = self.step(self.state.next_round) if continuous else self.round(self.state.next_round)
                if report is None:  # continuous: the budget is judged and consumed
                    break
                reports.append(report)
                if self.on_round is not None:
                    self.on_round(reports[-1])  # e.g. a `hitl tune` trial reporting to Tune
            except Exception as err:  # noqa: BLE001 - only the faults below are recovered from
                self.board.error(f"round {self._round_running}: {type(err).__name__}: {err}")
                if not recoverable(err) and not self._lost_a_role():
                    raise
                failures += 1
                if failures > self.cfg.coordinator.max_recoveries:
                    raise
                log.warning("round %d lost an actor, a node or a call's deadline (%s: %s); recovering from the last checkpoint",
                            self.state.next_round, type(err).__name__, err)
                self.progress.update(stage="recovering")
                self.recoveries.append({"round": self._round_running, "error": f"{type(err).__name__}: {err}"[:500]})
                self._recover()
        return reports

    def _lost_a_role(self, timeout_s: float = 30.0) -> bool:
        """Whether a compute role is gone: an error that is no infrastructure fault by its type
        (a collective's "connection reset by peer" in the rank that outlived its peer a moment)
        is one when a member of the round is lost."""
        import ray

        try:
            refs = ([w.node.remote() for w in self.trainers.workers] + [r.node.remote() for r in self.reward_model.replicas]
                    + [e.node.remote() for e in self.engines.engines])
            ray.get(refs, timeout=timeout_s)
        except Exception:  # noqa: BLE001 - dead, unreachable or past the deadline: lost
            return True
        return False

    def _recover(self) -> None:
        """Replace the compute roles (engines, reward model, trainer group) on the nodes there
        are now, form the sync group again, then restore the last checkpoint."""
        self._stop_compute()
        self._start_compute()
        self._restore()

    def _start_compute(self) -> None:
        """[3] the engine group and its HTTP ingress, [4] the reward model, [5] the trainer
        group (rollouts on the engines), [6] the weight-sync group between them."""
        from actors.reward_model import RewardModelGroup
        from actors.trainer_group import PPOTrainerGroup
        from services.generation.server import start_engines, start_generation_server

        c, g = self.cfg.cluster, self.cfg.generation
        self.engines = start_engines(self.cfg.model, self.cfg.lora, g, self.placement.engine_options(g), c.simulate_gpus,
                                     template=self.cfg.template)  # [3]
        self.generation = start_generation_server(self.cfg.model, self.cfg.lora, g, http=True, engines=self.engines)
        self.reward_model = RewardModelGroup.start(self.cfg.reward_model_spec(), self.placement.reward_model_options(),
                                                   self.cfg.coordinator.call_timeout_s)  # [4]
        self.trainers = PPOTrainerGroup(self.cfg, self.placement, self.reward_model, self.engines)  # [5]
        if g.weight_sync == "group":
            self._form_sync_group()  # [6]

    def _form_sync_group(self) -> None:
        """Trainer rank 0 and every engine join one torch.distributed group (rlhf/sync.py)."""
        import ray

        g = self.cfg.generation
        backend = g.sync_backend
        if backend == "auto":
            backend = "nccl" if g.num_gpus > 0 and not self.cfg.cluster.simulate_gpus else "gloo"
        host, port = self.trainers.sync_address()
        layout = ray.get(self.engines.engines[0].weight_layout.remote(), timeout=self.cfg.coordinator.call_timeout_s)
        refs = self.engines.join_sync(host, port, backend) + self.trainers.join_sync(host, port, 1 + len(self.engines), backend, layout)
        ray.get(refs, timeout=self.cfg.coordinator.call_timeout_s)

    def _stop_compute(self) -> None:
        """Give up the compute roles (best effort: some may be gone with their node)."""
        from ray import serve

        from services.generation.server import APP_NAME

        for stop in (lambda: self.trainers.shutdown(), lambda: self.reward_model.shutdown(),
                     lambda: serve.delete(APP_NAME), lambda: self.engines.shutdown(), self.placement.release):
            try:
                stop()
            except Exception:  # noqa: BLE001 - a role already gone is fine
                log.debug("stopping a role", exc_info=True)

    def _prepare_run_dir(self) -> None:
        if self.resume:
            if not (self.run_dir / "config.json").exists():
                raise FileNotFoundError(f"{self.run_dir}: not a run directory (no config.json)")
            return
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # checkpoints, reports: the owner's alone
        (self.run_dir / "config.json").write_text(run_config_json(self.cfg))

    def _run_identity(self) -> dict:
        """The run's id (a prefix of its task ids, so runs sharing a store never collide) and
        the store's watermark when it began (feedback older than the run is not its own);
        kept in run.json so a resumed run keeps both."""
        path = self.run_dir / "run.json"
        if path.exists():
            return json.loads(path.read_text())
        # a run directory from before run.json existed keeps its original task ids
        identity = ({"run_id": "", "start_watermark": 0} if self.resume
                    else {"run_id": uuid.uuid4().hex[:8] + "-", "start_watermark": self.store.watermark()})
        path.write_text(json.dumps(identity) + "\n")
        return identity

    def _start(self) -> None:
        import ray

        from actors.placement import Placement, check_cluster_gpus, check_store_reach
        from services.feedback.jsonl import load_gold_tasks
        from services.feedback.store import open_store

        c = self.cfg.cluster
        if not ray.is_initialized():  # [1]
            joining = c.address is not None or bool(os.environ.get("RAY_ADDRESS"))  # e.g. under `ray job submit`
            ray.init(address=c.address, num_cpus=None if joining else c.num_cpus, namespace=c.namespace,
                     include_dashboard=False if not joining else None, log_to_driver=False)
        self.placement = Placement(c)
        check_store_reach(self.cfg.feedback.service.store, sum(1 for n in ray.nodes() if n["Alive"]),
                          self.cfg.feedback.mode == "embedded")
        check_cluster_gpus(self.cfg, ray.cluster_resources().get("GPU", 0.0))
        self.progress.update(round="step 0" if self.cfg.coordinator.mode == "continuous" else f"0/{self.cfg.coordinator.rounds}",
                             stage="starting")
        self.store = open_store(self.cfg.feedback.service.store)
        self.feedback_address = self._start_feedback()  # [2]
        self._start_compute()  # [3]-[6]
        prompts = load_prompts(self.cfg.data)
        split = split_prompts(prompts, self.cfg.data.validation_fraction, self.cfg.data.split_seed)
        self.train_prompts = list(split.train)
        self.eval_prompts = list(split.evaluation)[: self.cfg.coordinator.eval_prompts] or self.train_prompts[: self.cfg.coordinator.eval_prompts]
        self.judge = Judge(self.cfg.annotators.annotators[0].judge) if self.cfg.annotators.annotators else None
        q = self.cfg.coordinator.quality
        pool = load_gold_tasks(q.gold_tasks) if q.gold_tasks is not None and q.gold_rate > 0 else []
        self.quality = QualityTracker(q, self.store, self.cfg.feedback.project, self.judge, _prompt_id, pool)
        self._start_annotators()

    def _start_feedback(self) -> str:
        f = self.cfg.feedback
        if f.mode == "external":
            return f.address  # type: ignore[return-value]
        from actors.feedback_host import FeedbackServiceActor

        self.feedback_actor = FeedbackServiceActor.options(**self.placement.feedback_options()).remote()
        import ray

        return ray.get(self.feedback_actor.start.remote(f.service.model_dump_json()))

    def _start_annotators(self) -> None:
        if not self.cfg.annotators.enabled:
            return
        from services.feedback.client import FeedbackClient
        from services.feedback.simulated import SimulatedAnnotator

        for a in self.cfg.annotators.annotators:
            annotator = SimulatedAnnotator(a, FeedbackClient(self.feedback_address, self.cfg.feedback.bearer()), self.cfg.feedback.project)
            thread = threading.Thread(target=annotator.run, args=(self._annotator_stop,), name=f"annotator-{a.annotator_id}", daemon=True)
            thread.start()
            self._annotators.append(annotator)
            self._annotator_threads.append(thread)

    def shutdown(self) -> None:
        if self.feeder is not None:
            self.feeder.stop()
        self._annotator_stop.set()
        for t in self._annotator_threads:
            t.join(10)
        try:
            import ray

            if hasattr(self, "placement"):  # ray.init ran: every role that started is stopped, each on its own
                self._stop_compute()
            if hasattr(self, "feedback_actor"):
                ray.get(self.feedback_actor.stop.remote(), timeout=30)
            if self.cfg.generation.weight_sync == "object_store":
                from services.generation.server import get_broadcaster

                ray.kill(get_broadcaster())  # the next run's versions start afresh
        except Exception:  # noqa: BLE001 - best effort at exit
            log.exception("shutdown")
        if hasattr(self, "store"):
            self.store.close()

    # -- one round --------------------------------------------------------------------

    def _stage_timer(self, times: dict[str, float]):
        def stage(name: str, fn, *args):
            self.progress.update(stage=name)
            started = time.perf_counter()
            result = fn(*args)
            times[name] = round(time.perf_counter() - started, 3)
            return result

        return stage

    def round(self, r: int) -> RoundReport:
        """One round: publish the round's tasks, wait for their judgements, train on them."""
        self._round_running = r
        times: dict[str, float] = {}
        self.progress.update(round=f"{r + 1}/{self.cfg.coordinator.rounds}")
        stage = self._stage_timer(times)
        stage("publish", self.publish_tasks, r)
        records = stage("feedback", self.wait_for_feedback)
        return self._train(r, records, times)

    def step(self, r: int) -> RoundReport | None:
        """One step of continuous mode: wait for `min_feedback_per_step` new judgements (the
        publisher keeps tasks open meanwhile), then train on everything committed so far;
        None once the task budget is judged and consumed."""
        self._round_running = r
        times: dict[str, float] = {}
        self.progress.update(round=f"step {r + 1}")
        records = self._stage_timer(times)("feedback", self.wait_for_step_feedback)
        if records is None:
            return None
        return self._train(r, records, times)

    def _train(self, r: int, records: list, times: dict[str, float]) -> RoundReport:
        """The stages after the feedback: curate, reward model, SFT, policy update, push,
        evaluate, checkpoint; the round's (or step's) report."""
        stage = self._stage_timer(times)
        parent_version = self.state.policy_version
        lag = self._judged_version_lag(records, parent_version)
        curated = stage("curate", self.curate, records)
        rm_report = stage("reward_model", self.update_reward_model, curated)
        if "skipped" not in rm_report:
            self.state.reward_model = next_reward_model(self.state.reward_model, r, curated.items, self._reward_model_config(),
                                                        forgotten=rm_report.get("forgotten_flagged", 0))
        elif rm_report.get("forgotten_flagged"):
            self.state.reward_model = forget_in_reward_model(self.state.reward_model, rm_report["forgotten_flagged"])
        sft_report = stage("sft", self.sft, curated.demonstrations)
        ppo = stage("ppo", self.policy_update, r, rm_report, curated)
        stage("push_weights", self.push_weights)
        lineage = self._write_lineage(r, parent_version, records, curated, rm_report, sft_report, ppo)
        served_at = self._first_answer_at(self.state.policy_version)
        rate = stage("evaluate", self.evaluate)
        self.state.judgements += len(countable_feedback(records, self._paused_annotators(), self.cfg.curation.ratings.enabled))
        report = RoundReport(
            round=r,
            policy_version=self.state.policy_version,
            watermark_from=self.state.watermark,
            watermark_to=records[-1].seq if records else self.state.watermark,
            feedback=dict(curated.counts),
            reward_model=rm_report,
            ppo=ppo,
            reward=ppo[-1].get("reward") if ppo else None,
            kl=ppo[-1].get("kl") if ppo else None,
            win_rate=rate,
            stage_seconds=times,
            annotators={a.cfg.annotator_id: asdict(a.stats) for a in self._annotators},
            feedback_to_policy_s=round(served_at - self._feedback_complete_at, 3) if self._feedback_complete_at else None,
            quality=self._round_quality,
            evaluation=self._round_evaluation,
            sft=sft_report,
            lineage=lineage,
        )
        report.live = self._live(records, lag)
        self.state.watermark = report.watermark_to
        self.state.next_round = r + 1
        self.state.elapsed_s = self._elapsed()
        self.state.reports.append(asdict(report))
        self.state.stopped = run_stop_reason(self.state.reports, self.cfg.coordinator)
        if self.state.stopped:
            log.info("stopping the run early: %s", self.state.stopped)
        self._record_round(report)
        stage("checkpoint", self.checkpoint, r)
        report.stage_seconds = times
        self.state.reports[-1] = asdict(report)
        self._write_reports()
        self.progress.update(reward=report.reward or 0.0, kl=report.kl or 0.0, win_rate=rate, stage="done")
        return report

    # -- the run as people see it ---------------------------------------------------------

    def _elapsed(self) -> float:
        """The run's wall time so far, across resumes (continuous mode's plot has it on its x-axis)."""
        return round(self._elapsed_base + time.time() - self._session_started, 3)

    def _judged_version_lag(self, records: list, served: int) -> dict[str, Any]:
        """How many versions behind the served one (`served`) the answers judged in `records` were written."""
        from actors.task_feeder import task_version

        lags = []
        for s in records:
            task = self.store.get_task(s.record.task_id) if s.record.task_id else None
            if task is not None and task.candidates:
                lags.append(max(0, served - task_version(task)))
        return {"mean": round(sum(lags) / len(lags), 3), "max": max(lags)} if lags else {}

    def _live(self, records: list, lag: dict) -> dict[str, Any]:
        """Open tasks, judgements per minute, each annotator's idle share (up to the last
        judgement the step consumed), the served version, how stale the judged answers were,
        tasks published and retired, what the selection policy chose: at a round's or step's end."""
        elapsed = self._elapsed()
        if records:
            self.state.last_judgement_at = records[-1].received_at
        until = self.state.last_judgement_at or time.time()  # idle up to the last judgement: after it the work was done
        idle = {a.cfg.annotator_id: a.idle_fraction(a.first_pull_at or until, until) for a in self._annotators}
        known = [v for v in idle.values() if v is not None]
        live: dict[str, Any] = {
            "mode": self.cfg.coordinator.mode,
            "elapsed_s": elapsed,
            "judgements": self.state.judgements,
            "judgements_per_min": round(60.0 * self.state.judgements / elapsed, 2) if elapsed > 0 else None,
            "annotator_idle": {k: (round(v, 4) if v is not None else None) for k, v in idle.items()},
            "idle_fraction": round(sum(known) / len(known), 4) if known else None,
            "served_version": self.state.policy_version,
            "judged_version_lag": lag,
            "selection": dict(self.state.selection),
        }
        if self.feeder is not None:
            f = self.feeder.state
            live.update(open_tasks=f.open_tasks, ready=f.ready, tasks_live=f.live, tasks_retired=f.retired,
                        publish_errors=f.errors, task_budget=self.feeder.budget)
        else:
            open_ = self.store.open_tasks(self.cfg.feedback.project, self.identity["run_id"])
            live.update(open_tasks=len(open_), ready=sum(o.available for o in open_))
        return live

    def _record_round(self, report: RoundReport) -> None:
        """The round's figures to the tracker, the coordinator's series and the status board."""
        from rlhf.tracking import round_scalars
        from services.telemetry import coordinator_metrics

        values = asdict(report)
        self.tracker.log(round_scalars(values), step=report.round)
        self.tracker.flush()
        accuracy = (report.reward_model or {}).get("validation_accuracy")
        live = report.live or {}
        coordinator_metrics().record({"round": report.round, "watermark": report.watermark_to, "policy_version": report.policy_version,
                                      "win_rate": report.win_rate, "reward_accuracy": accuracy, "open_tasks": live.get("ready"),
                                      "judgements_per_minute": live.get("judgements_per_min"),
                                      "annotator_idle_fraction": live.get("idle_fraction")}, run=self.board.record["run_id"])
        self.board.update(round=f"{report.round + 1}/{self.cfg.coordinator.rounds}", policy_version=report.policy_version,
                          watermark=report.watermark_to, win_rate=report.win_rate, reward_accuracy=accuracy,
                          feedback_to_policy_s=report.feedback_to_policy_s, feedback=dict(report.feedback))

    def publish_tasks(self, r: int) -> int:
        c = self.cfg.coordinator
        prompts = [self.train_prompts[(r * c.tasks_per_round + i) % len(self.train_prompts)] for i in range(c.tasks_per_round)]
        # one seed for the round: requests with equal sampling settings share a batch
        return self._publish_tasks(prompts, [f"{self.identity['run_id']}r{r}-t{i}" for i in range(len(prompts))],
                                   seed=r * 100_003, gold_index=r)

    def _publish_tasks(self, prompts: list[str], task_ids: list[str], seed: int, gold_index: int) -> int:
        """Answers to `prompts` by the served policy, a pair of each chosen by the selection
        policy, published as tasks `task_ids` (gold mixed in at `quality.gold_rate`)."""
        c = self.cfg.coordinator
        from services.generation.engine import GenerateRequest

        n = c.selection.answers_per_prompt
        requests = [GenerateRequest(prompt=None, messages=(("user", p),), n=n, temperature=c.task_temperature,
                                    max_new_tokens=self.cfg.ppo.max_new_tokens, seed=seed) for p in prompts]
        results = self._generate(requests)
        choices = self._choose_pairs(prompts, [list(res.texts) for res in results])
        tasks = []
        for task_id, prompt, res, choice in zip(task_ids, prompts, results, choices):
            shown = [res.texts[i] for i in choice.pair]
            tasks.append(Task(
                task_id=task_id, project=self.cfg.feedback.project, prompt_id=_prompt_id(prompt), prompt=prompt,
                candidates=tuple(pb.Candidate(candidate_id=f"{task_id}-{j}", text=shown_text(t),
                                              policy_version=res.policy_version) for j, t in enumerate(shown)),
                annotations_wanted=c.annotations_per_task, metadata=self.cfg.template.task_metadata(),
            ))
        tasks = self.quality.mix_gold(gold_index, tasks)  # gold tasks at coordinator.quality.gold_rate
        outcomes = self.store.add_tasks(tasks)
        bad = [o.rejection for o in outcomes if o.rejection]
        if bad:
            raise RuntimeError(f"publishing tasks failed: {bad[0].field}: {bad[0].reason}")
        from rlhf.selection import merge_summaries, summarize

        with self._selection_lock:
            self.state.selection = merge_summaries(self.state.selection, summarize(choices))
        return sum(o.created for o in outcomes)

    def _choose_pairs(self, prompts: list[str], answers: list[list[str]]) -> list:
        """The selection policy's pair for each prompt (rlhf/selection.py); under ``margin``
        the reward model scores the answers once it has been trained, unless it does not
        answer within `score_timeout_s` (it may be training): then the pairs are random."""
        from rlhf.selection import choose_pair, held_out

        sel, rc = self.cfg.coordinator.selection, self.cfg.reward
        scores: list | None = None
        busy = False
        if sel.policy == "margin" and self.state.reward_model:
            flat_p = [p for p, texts in zip(prompts, answers) for _ in texts]
            flat_a = [t for texts in answers for t in texts]
            try:
                flat = self.reward_model.score(flat_p, flat_a, timeout_s=sel.score_timeout_s).tolist()
                scores, k = [], 0
                for texts in answers:
                    scores.append(flat[k: k + len(texts)])
                    k += len(texts)
            except Exception as err:  # noqa: BLE001 - busy or lost: a random pair keeps the annotators going
                busy = True
                log.info("no reward-model scores for task selection (%s): random pairs", type(err).__name__)
        with self._selection_lock:
            choices = [choose_pair(texts, scores[i] if scores else None, sel, self._selection_rng,
                                   held_out(_prompt_id(p), rc.validation_fraction, rc.split_seed))
                       for i, (p, texts) in enumerate(zip(prompts, answers))]
        if busy:  # say why: the model exists but did not answer within score_timeout_s
            from dataclasses import replace

            choices = [replace(c, how="random: reward model busy") if c.how == "random: no reward model yet" else c for c in choices]
        return choices

    # -- continuous mode ----------------------------------------------------------------

    def _start_feeder(self) -> None:
        from actors.task_feeder import TaskFeeder

        c = self.cfg.coordinator
        prefix = f"{self.identity['run_id']}c"

        def publish(n: int, published: int) -> int:
            prompts = [self.train_prompts[(published + i) % len(self.train_prompts)] for i in range(n)]
            ids = [f"{prefix}{published + i:06d}-{uuid.uuid4().hex[:6]}" for i in range(n)]
            return self._publish_tasks(prompts, ids, seed=published * 100_003 + 17, gold_index=published)

        shown_at = [0.0]

        def shown(state) -> None:  # the live line, every 2 s: ready tasks, budget spent, served version, pace, idle
            now = time.time()
            if now - shown_at[0] < 2.0:
                return
            shown_at[0] = now
            judged = (state.live - state.open_tasks) * c.annotations_per_task
            minutes = max(self._elapsed(), 1.0) / 60.0
            done = state.live >= self.feeder.budget and state.open_tasks == 0  # nothing left to label: not idle, done
            idle = [] if done else [v for a in self._annotators if (v := a.idle_fraction(a.first_task_at or now, now)) is not None]
            self.progress.update(ready=state.ready, tasks=f"{state.live}/{self.feeder.budget}", served=f"v{self.state.policy_version}",
                                 judged_per_min=round(judged / minutes, 1), **({"idle": round(sum(idle) / len(idle), 3)} if idle else {}))

        self.feeder = TaskFeeder(publish, self.store, self.cfg.feedback.project, prefix, c.continuous, c.task_budget(),
                                 c.annotations_per_task, lambda: self.state.policy_version, on_tick=shown)
        self.feeder.start()

    def wait_for_step_feedback(self) -> list | None:
        """The records of the next step: everything committed after the watermark once
        `min_feedback_per_step` of them count (or, once the budget is spent and every task of
        it judged or retired, whatever is left; nothing, while fewer than `min_steps` steps
        have run); None when the run is over."""
        c = self.cfg.coordinator
        k = c.continuous
        if k.max_steps is not None and self.state.next_round >= k.max_steps:
            return None
        deadline = time.monotonic() + c.feedback_timeout_s
        self._feedback_complete_at = None
        while True:
            done = self.feeder.spent() and not self.store.open_tasks(self.cfg.feedback.project, self.feeder.prefix)
            records = self.store.read_after(self.state.watermark, limit=100_000, projects=[self.cfg.feedback.project])
            useful = countable_feedback(records, self._paused_annotators(), self.cfg.curation.ratings.enabled)
            self.progress.update(feedback=f"{len(useful)}/{k.min_feedback_per_step}")
            if len(useful) >= k.min_feedback_per_step or (done and records) or (time.monotonic() > deadline and useful):
                self._feedback_complete_at = (useful or records)[-1].received_at
                return records
            if done:
                return [] if self.state.next_round < k.min_steps else None
            if time.monotonic() > deadline + c.feedback_timeout_s:
                raise NoFeedback(f"no usable feedback arrived in {2 * c.feedback_timeout_s:g}s")
            time.sleep(0.2)

    def _generate(self, requests: list) -> list:
        """Answers of the engine group, batches of `max_batch_size` spread over every engine."""
        return self.engines.generate_many(requests, self.cfg.generation.max_batch_size)

    def wait_for_feedback(self) -> list:
        c = self.cfg.coordinator
        deadline = time.monotonic() + c.feedback_timeout_s
        self._feedback_complete_at = None
        while True:
            records = self.store.read_after(self.state.watermark, limit=100_000, projects=[self.cfg.feedback.project])
            paused = self._paused_annotators()
            useful = countable_feedback(records, paused, self.cfg.curation.ratings.enabled)
            set_aside = sum(1 for s in records if s.record.annotator_id in paused)
            self.progress.update(feedback=f"{len(useful)}/{c.min_feedback_per_round}"
                                 + (f" ({set_aside} from paused annotators set aside)" if set_aside else ""))
            if len(useful) >= c.min_feedback_per_round or (time.monotonic() > deadline and useful):
                # when the last record the round needed was committed (and so acked)
                self._feedback_complete_at = useful[min(len(useful), c.min_feedback_per_round) - 1].received_at
                return records
            if time.monotonic() > deadline + c.feedback_timeout_s:
                raise NoFeedback(f"no usable feedback arrived in {2 * c.feedback_timeout_s:g}s")
            time.sleep(0.2)

    def _paused_annotators(self) -> frozenset[str]:
        """The annotators the last assessment paused (kept in the round reports, so a resumed
        run knows them too): curation sets their judgements aside, so they must not count
        toward the round's feedback threshold either."""
        for report in reversed(self.state.reports):
            paused = (report.get("quality") or {}).get("paused")
            if paused is not None:
                return frozenset(paused)
        return frozenset()

    def curate(self, records: list):
        applied = self.quality.assess(records, self.state.next_round)  # weights and paused annotators from all feedback so far
        self._round_quality = applied.report
        return curate(records, self.store.get_task, weights=applied.weights, paused=applied.paused,
                      cfg=self.cfg.curation, memory=self.curation_memory, round_=self.state.next_round,
                      max_demonstrations=self.cfg.sft.max_examples if self.cfg.sft.enabled else 0)

    def sft(self, demonstrations: list) -> dict:
        """Supervised fine-tuning on the round's demonstrations (corrections), on every trainer
        rank, before PPO; skipped when off or when the round brought no usable correction."""
        if not self.cfg.sft.enabled:
            return {"skipped": "sft.enabled is false"}
        if not demonstrations:
            return {"skipped": "no corrections"}
        return self.trainers.sft(demonstrations)

    def _reward_model_config(self) -> dict:
        return {"reward": self.cfg.reward.model_dump(mode="json"), "backbone": self.cfg.reward_model.model_dump(mode="json")}

    def _write_lineage(self, r: int, parent_version: int, records: list, curated, rm_report: dict, sft_report: dict,
                       ppo: list) -> str:
        """lineage/policy-vNNNN.json for the version just pushed; returns its path in the run directory."""
        record = policy_lineage(
            policy_version=self.state.policy_version, parent_version=parent_version, round_=r, cfg=self.cfg,
            config_json=self.cfg.model_dump_json(), project=self.cfg.feedback.project,
            watermark_from=self.state.watermark, watermark_to=records[-1].seq if records else self.state.watermark,
            curated=curated, reward_model=self.state.reward_model, reward_report=rm_report, sft_report=sft_report,
            ppo_metrics=ppo, train_prompts=self.train_prompts,
        )
        return write_lineage(self.run_dir, record)

    def update_reward_model(self, curated: Curated) -> dict:
        """Train the reward model on the round's items, after leaving out the earlier items that
        the round's flags reach (a flag may come rounds after what it flags was used)."""
        if not curated.items:
            forgotten = self.reward_model.forget(curated.flagged) if curated.flagged else 0
            return {"skipped": "no usable records", "forgotten_flagged": forgotten}
        return self.reward_model.train(curated.items, curated.flagged)

    def policy_update(self, r: int, rm_report: dict | None, curated: Curated) -> list[dict[str, Any]]:
        """The round's policy update: PPO iterations on rollouts, or DPO/IPO/KTO on the round's
        judgements (`ppo.algorithm`)."""
        if self.cfg.ppo.algorithm == "ppo":
            return self.ppo_iterations(r, rm_report)
        if self.cfg.ppo.algorithm == "best_of_n":
            return self.best_of_n(r, rm_report)
        return self.preference_optimisation(curated)

    def _reward_model_trusted(self, rm_report: dict | None) -> bool:
        """Whether the reward model passes the gate (``coordinator.ppo_min_reward_accuracy``,
        judged as ``ppo_gate_confidence`` says); records its last gated accuracy."""
        c = self.cfg.coordinator
        accuracy = (rm_report or {}).get("validation_accuracy")
        if accuracy is not None and accuracy == accuracy:  # not nan
            pairs = (rm_report or {}).get("validation_pairs") or 0
            self.state.reward_accuracy = gated_accuracy(accuracy, pairs, c.ppo_gate_confidence)
        return c.ppo_min_reward_accuracy <= 0 or (self.state.reward_accuracy is not None
                                                  and self.state.reward_accuracy >= c.ppo_min_reward_accuracy)

    def best_of_n(self, r: int, rm_report: dict | None = None) -> list[dict[str, Any]]:
        """Rejection-sampling fine-tuning: `best_of_n.n` answers to each of the round's prompts
        from the engines, scored by the reward model; the SFT step trains on each prompt's best
        answer where it stands out (`min_gap`, `keep_fraction`). Gated like PPO."""
        from services.generation.engine import GenerateRequest

        if not self._reward_model_trusted(rm_report):
            self.progress.update(ppo="best-of-n skipped (reward model accuracy)")
            return []
        b = self.cfg.best_of_n
        prompts = [self.train_prompts[(r * b.prompts_per_round + i) % len(self.train_prompts)] for i in range(b.prompts_per_round)]
        requests = [GenerateRequest(messages=(("user", p),), n=b.n, temperature=b.temperature,
                                    max_new_tokens=self.cfg.ppo.max_new_tokens, seed=r * 100_019 + 7) for p in prompts]
        self.progress.update(ppo=f"best-of-{b.n}: sampling {len(prompts)} prompts")
        answers = [list(res.texts) for res in self._generate(requests)]
        flat_prompts = [p for p, texts in zip(prompts, answers) for _ in texts]
        flat_answers = [t for texts in answers for t in texts]
        scores = self.reward_model.score(flat_prompts, flat_answers).tolist()
        from rlhf.sft.best_of_n import pick_best

        picks = pick_best(prompts, answers, scores, b.min_gap, b.keep_fraction)
        report: dict[str, Any] = {"algorithm": "best_of_n", "prompts": len(prompts), "samples": len(flat_answers),
                                  "picked": len(picks), "mean_reward": sum(scores) / len(scores) if scores else None,
                                  "mean_picked_reward": sum(p.reward for p in picks) / len(picks) if picks else None,
                                  "mean_gap": sum(p.gap for p in picks) / len(picks) if picks else None}
        if not picks:
            return [{**report, "skipped": "no answer stood out"}]
        from rlhf.sft import Demonstration

        self.progress.update(ppo=f"best-of-{b.n}: SFT on {len(picks)}")
        demos = [Demonstration(prompt=p.prompt, response=p.answer, prompt_id=_prompt_id(p.prompt)) for p in picks]
        sft = self.trainers.sft(demos)
        return [{**report, "loss_before": sft.get("loss_before"), "loss_after": sft.get("loss_after"), "sft_steps": sft.get("optimizer_steps")}]

    def preference_optimisation(self, curated: Curated) -> list[dict[str, Any]]:
        """DPO/IPO on the round's ordered pairs, KTO on its single judged answers (each pair's two,
        both-bad ones, corrections); nothing when the round has none. Not gated on the reward
        model: these losses do not use it."""
        from rlhf.po import kto_examples_from, pairs_from

        algorithm = self.cfg.ppo.algorithm
        examples = kto_examples_from(curated.items, curated.demonstrations) if algorithm == "kto" else pairs_from(curated.items)
        if not examples:
            self.progress.update(ppo=f"{algorithm} skipped (no usable judgements)")
            return []
        self.progress.update(ppo=f"{algorithm} on {len(examples)}")
        report = self.trainers.preference_optimisation(examples)
        return [{"algorithm": algorithm, **{k: v for k, v in report.items() if k not in ("loss", "epoch_loss")},
                 "epoch_loss": report["epoch_loss"]}]

    def ppo_iterations(self, r: int, rm_report: dict | None = None) -> list[dict[str, float]]:
        """The round's PPO iterations; none while the reward model's held-out accuracy is under
        ``coordinator.ppo_min_reward_accuracy`` (a reward model no better than chance would
        only move the policy at random)."""
        c, p = self.cfg.coordinator, self.cfg.ppo
        if not self._reward_model_trusted(rm_report):
            self.progress.update(ppo="skipped (reward model accuracy)")
            return []
        metrics = []
        for it in range(c.ppo_iterations_per_round):
            k = (r * c.ppo_iterations_per_round + it) * p.rollout_batch_size
            batch = [self.train_prompts[(k + i) % len(self.train_prompts)] for i in range(p.rollout_batch_size)]
            m = self.trainers.step(batch)
            metrics.append(m)
            self.tracker.log({f"ppo/{k}": v for k, v in m.items()}, step=int(m.get("iteration", len(metrics))))
            self.progress.update(ppo=f"{it + 1}/{c.ppo_iterations_per_round}", reward=m.get("reward", 0.0), kl=m.get("kl", 0.0))
            stop = ppo_stop_reason(metrics, c)
            if stop and it + 1 < c.ppo_iterations_per_round:
                m["stopped"] = stop
                log.info("round %d: PPO stopped early: %s", r, stop)
                break
        return metrics

    def push_weights(self) -> float:
        """The trainers' weights to every engine as the next policy version; returns the seconds
        until all of them serve it."""
        self.state.policy_version += 1
        return self._publish(self.state.policy_version)

    def _publish(self, version: int) -> float:
        if self.cfg.generation.weight_sync == "group":  # trainer rank 0 -> engines, never through here
            return self.trainers.push_weights(version)
        from services.generation.server import publish_weights

        exported = self.trainers.export_weights()
        return publish_weights(version, exported["tensors"], exported["adapters_only"], self.cfg.generation.replicas,
                               timeout_s=self.cfg.coordinator.call_timeout_s)

    def _first_answer_at(self, version: int) -> float:
        """Wall-clock time at which every engine serves `version`."""
        served = self.engines.wait_version(version, self.cfg.coordinator.call_timeout_s)
        if min(served) < version:
            raise TimeoutError(f"engines serve versions {served}, not {version}, after {self.cfg.coordinator.call_timeout_s:g}s")
        return time.time()

    def _eval_answers(self) -> list[str]:
        from services.generation.engine import GenerateRequest

        requests = [GenerateRequest(messages=(("user", p),), temperature=0.0, max_new_tokens=self.cfg.coordinator.eval_max_new_tokens)
                    for p in self.eval_prompts]
        return [r.texts[0] for r in self._generate(requests)]

    def _initial_eval(self) -> None:
        self.state.initial_eval_answers = self._eval_answers()

    def _eval_judges(self, eval_id: str) -> list:
        """The round evaluation's judges (`eval` section): `rule` needs a rule (eval.rule or the
        first simulated annotator's); without one it gives way to `reward-model`."""
        from services.eval.judges import build_judges

        cfg = self.cfg.eval
        if "rule" in cfg.judges and cfg.rule is None and self.judge is None:
            names = [n for n in cfg.judges if n != "rule"] or ["reward-model"]
            cfg = cfg.model_copy(update={"judges": list(dict.fromkeys(names))})
        return build_judges(cfg, eval_id=eval_id, rule=self.judge.cfg if self.judge else None,
                            reward_scorer=lambda prompts, responses: self.reward_model.score(prompts, responses).tolist(),
                            reward_label=self.state.reward_model.get("id") if self.state.reward_model else None,
                            store=self.store)  # a human judge reads eval.human.gold_tasks itself

    def evaluate(self) -> float:
        """The served policy against the initial one on the held-out prompts, by the `eval`
        judges; eval.json, eval.md and eval.png in `eval/round-NNNN/` of the run directory.
        Returns the `rule` judge's win-rate (ties half), else the first judge's."""
        from rlhf.eval import EvalItem, evaluate, write_report

        r = self._round_running if self._round_running is not None else self.state.next_round
        eval_id = f"{self.identity['run_id']}-r{r:04d}"
        answers = self._eval_answers()
        items = [EvalItem(p, new, old) for p, new, old in zip(self.eval_prompts, answers, self.state.initial_eval_answers)]
        report = evaluate(items, self._eval_judges(eval_id), eval_id=eval_id,
                          a={"label": f"policy v{self.state.policy_version}"}, b={"label": "policy v0 (initial)"})
        write_report(report, self.run_dir / "eval" / f"round-{r:04d}")
        judges = report["judges"]
        self._round_evaluation = {name: {k: j.get(k) for k in ("win_rate", "ci95", "lc_win_rate", "win", "tie", "loss", "n")}
                                  for name, j in judges.items()}
        primary = judges.get("rule") or next(iter(judges.values()))
        rate = primary.get("win_rate")
        return float("nan") if rate is None else float(rate)

    # -- checkpoints and reports ------------------------------------------------------

    def checkpoint(self, r: int) -> str:
        """Trainer ranks, the served policy, the reward model and the run state into
        `round-NNNN` of the checkpoint storage, then the `LATEST` pointer: a checkpoint is whole
        or never read."""
        name = f"round-{r:04d}"
        s = self.storage
        s.delete(name)  # what a lost attempt at this round left
        self.trainers.save_checkpoint(s, f"{name}/trainer")
        self.trainers.save_policy(s, f"{name}/policy", self.state.policy_version)  # what a server on its own loads
        self.reward_model.save(s, f"{name}/reward_model")
        with s.writing(f"{name}/run") as local:
            (Path(local) / "state.json").write_text(json.dumps(asdict(self.state), indent=2))
            self.curation_memory.save(Path(local))
        s.write_text("LATEST", name + "\n")
        return s.location(name)

    def _restore(self) -> None:
        name = (self.storage.read_text("LATEST") or "").strip()
        if name:
            run_rel = f"{name}/run" if self.storage.read_text(f"{name}/run/state.json") is not None else name  # older layout
            with self.storage.reading(run_rel) as local:
                self.state = RunState(**json.loads((Path(local) / "state.json").read_text()))
                self._elapsed_base, self._session_started = self.state.elapsed_s, time.time()
                self.curation_memory = CurationMemory.load(Path(local), self.cfg.curation)
            self.trainers.load_checkpoint(self.storage, f"{name}/trainer")
            self.reward_model.load(self.storage, f"{name}/reward_model")
            log.info("restored %s: next round %d, watermark %d", self.storage.location(name), self.state.next_round,
                     self.state.watermark)
        else:  # nothing checkpointed yet: start over, keeping the initial answers
            initial = self.state.initial_eval_answers
            self.state = RunState(initial_eval_answers=initial, watermark=self.identity["start_watermark"])
            self.curation_memory = CurationMemory(self.cfg.curation)
            if not initial:
                self._initial_eval()
        # serve exactly the restored weights: under the checkpoint's version when the server is
        # behind it (a fresh start), under a newer one when it served a lost round's weights
        served = max(self.engines.policy_versions())
        if served != self.state.policy_version:
            if served > self.state.policy_version:
                restored, self.state.policy_version = self.state.policy_version, served + 1
                write_lineage(self.run_dir, republished_lineage(self.run_dir, self.state.policy_version, restored))
            self._publish(self.state.policy_version)

    def _write_reports(self) -> None:
        reports_dir = self.run_dir / "reports"
        reports_dir.mkdir(parents=True, exist_ok=True)
        for rep in self.state.reports:
            (reports_dir / f"round-{rep['round']:04d}.json").write_text(json.dumps(rep, indent=2))
        (self.run_dir / "report.json").write_text(json.dumps({"rounds": self.state.reports, "stopped": self.state.stopped}, indent=2))
        try:
            from rlhf.report import plot_rounds

            plot_rounds(self.state.reports, self.run_dir / "report.png")
        except Exception:  # noqa: BLE001 - a missing plot must not stop the run
            log.exception("plotting the report failed")


def ppo_stop_reason(metrics: list[dict[str, Any]], c: CoordinatorConfig) -> str | None:
    """Why a round's PPO iterations should stop after the last of `metrics`: its KL over
    `ppo_kl_budget`, or `ppo_reward_patience` iterations without a new best mean reward."""
    n, last = len(metrics), metrics[-1]
    if c.ppo_kl_budget is not None and last.get("kl", 0.0) > c.ppo_kl_budget:
        return f"kl {last['kl']:.3g} over ppo_kl_budget {c.ppo_kl_budget:g} after {n} iterations"
    if c.ppo_reward_patience is not None:
        p = replay((m.get("reward", math.nan) for m in metrics), c.ppo_reward_patience, c.ppo_reward_min_delta, mode="max")
        if p.stale >= p.patience:
            return "reward plateau: " + p.reason("mean reward", "iteration")
    return None


def run_stop_reason(reports: list[dict[str, Any]], c: CoordinatorConfig) -> str | None:
    """Why the run should end after the last of `reports`: `win_rate_patience` rounds without
    a new best evaluation win-rate (NaN, an evaluation without a rule, never improves)."""
    if c.win_rate_patience is None or len(reports) >= c.rounds:
        return None
    p = replay((r.get("win_rate", math.nan) for r in reports), c.win_rate_patience, c.win_rate_min_delta, mode="max")
    if p.stale < p.patience or math.isnan(p.best):
        return None
    return "win-rate patience: " + p.reason("evaluation win-rate", "round")


def gated_accuracy(accuracy: float, pairs: int, confidence: float) -> float:
    """What the PPO gate compares with `ppo_min_reward_accuracy`: the accuracy itself at
    confidence 0, else the lower end of its one-sided Wilson score interval at `confidence`
    over `pairs` held-out pairs (0 when there are none)."""
    if confidence <= 0:
        return accuracy
    if pairs <= 0:
        return 0.0
    from statistics import NormalDist

    from rlhf.eval.stats import wilson_interval

    return wilson_interval(accuracy, pairs, z=NormalDist().inv_cdf(confidence))[0]


def _prompt_id(prompt: str) -> str:
    import hashlib

    return "p-" + hashlib.sha256(prompt.encode()).hexdigest()[:16]


def recoverable(err: BaseException) -> bool:
    """Whether a round that raised `err` can be restarted from the last checkpoint: an actor
    or its node was lost, a call passed its deadline, or the weight-sync group broke (a member
    died mid-push). A bug in a stage is not: it would fail the same way again."""
    import ray
    import torch.distributed as dist

    from rlhf.sync import SyncGroupError

    infrastructure = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError,
                      ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                      TimeoutError, SyncGroupError, dist.DistError)
    if "DeviceError" in str(err):  # a role given GPUs that torch cannot see: it would fail again
        return False
    seen = err
    for _ in range(8):  # a task's error wraps its cause (RayTaskError(cause))
        if isinstance(seen, infrastructure):
            return True
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None or cause is seen:
            return False
        seen = cause
    return False

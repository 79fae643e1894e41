"""The run configuration: the RLHF core's sections plus where and how the loop runs.

`configs/<profile>.yaml` files are `RunConfig`s: the sections of `rlhf.config.RLHFConfig`
(model, lora, critic, reward, ppo, deepspeed, sft, data, template) and, for the loop on Ray, `cluster`,
`feedback`, `generation`, `coordinator`, `annotators` and `curation`. Each section is its own model;
a wrong key names its dotted path at load, before anything starts.
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlhf.config import RLHFConfig
from rlhf.curation.config import CurationConfig
from rlhf.distill.config import DistillConfig
from rlhf.eval.config import EvalConfig
from rlhf.models.config import CriticConfig, LoraConfig, ModelConfig
from rlhf.po.config import POConfig
from rlhf.ppo.config import DeepSpeedConfig, PPOConfig
from rlhf.quality import AnnotatorQualityConfig
from rlhf.reward.config import RewardConfig
from rlhf.selection import SelectionConfig
from rlhf.sft.config import SFTConfig
from rlhf.templates import PromptTemplate
from rlhf.tracking import TrackingConfig
from services.feedback.config import FeedbackServiceConfig
from services.feedback.simulated import AnnotatorConfig
from services.generation.config import GenerationConfig

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class RoleResources(BaseModel):
    """What one process of a role reserves on the cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(1.0, ge=0)
    """CPUs per process."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per process."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per process (e.g. a node label such as {"trainer_node": 1})."""
    torch_threads: int | None = Field(None, ge=1)
    """CPU threads torch uses in the process (None: its whole CPUs reserved, at least 1). The
    loop's stages run one after another, so on a small machine a role may use more cores than
    it reserves while the others wait."""


class RewardModelResources(RoleResources):
    """The reward model: `replicas` copies that score concurrently (one of them trains)."""

    replicas: int = Field(1, ge=1)
    """Reward-model replicas; a trainer rank's batch of rollouts is split over all of them."""


class TrainerGroupConfig(RoleResources):
    """The PPO trainer group: N workers, one torch.distributed group."""

    workers: int = Field(2, ge=1)
    """Number of trainer processes (ranks)."""
    strategy: PlacementStrategy = "PACK"
    """How the workers' bundles are placed: PACK fills nodes, SPREAD spreads them."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto picks NCCL with GPUs, gloo otherwise."""


class ClusterConfig(BaseModel):
    """Where the loop runs and what each role reserves (decided in one place: actors/placement.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = None
    """Ray address to join ("auto" for the cluster this process runs in); None starts a local Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """Local Ray only: logical CPUs to declare (None: what the machine has)."""
    namespace: str = "hitl"
    """Ray namespace of the run's named actors."""
    trainer: TrainerGroupConfig = Field(default_factory=TrainerGroupConfig)
    reward_model: RewardModelResources = Field(default_factory=RewardModelResources)
    coordinator: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=0.5))
    feedback: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=0.5))
    colocate_reward_with_trainer: bool = False
    """Put the reward model in the trainer group's placement group (same nodes)."""
    simulate_gpus: bool = False
    """The GPUs that nodes declare are labels for placement only and every role computes on the
    CPU: for tests on a simulated cluster (`ray.cluster_utils.Cluster` with fake GPUs). Off, a
    role given GPUs that torch cannot see fails at once (rlhf/devices.py)."""


class FeedbackSection(BaseModel):
    """Where the feedback service is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["embedded", "external"] = "embedded"
    """``embedded``: the coordinator starts the service in a Ray actor; ``external``: use `address`."""
    address: str | None = None
    """``external`` only: host:port of a running service."""
    token: str | None = None
    """Bearer token the loop's simulated annotators use. A run's config.json never keeps it
    (a resumed run needs it again): prefer `token_env`."""
    token_env: str | None = None
    """Name of an environment variable that holds the token (read when the run starts), so no
    config file holds it."""
    service: FeedbackServiceConfig = Field(default_factory=lambda: FeedbackServiceConfig(port=0, metrics_port=None))
    """``embedded`` only: how the service runs; its `store` is the store the coordinator reads."""
    project: str = "default"
    """Project the loop publishes tasks to and reads feedback from."""

    def bearer(self) -> str | None:
        """The token: `token`, else the variable `token_env` names."""
        if self.token:
            return self.token
        return os.environ.get(self.token_env) if self.token_env else None

    @model_validator(mode="after")
    def _address(self) -> "FeedbackSection":
        if self.mode == "external" and not self.address:
            raise ValueError("address: required when mode is 'external'")
        return self


class ContinuousConfig(BaseModel):
    """`coordinator.continuous`: the loop with no rounds (`coordinator.mode: continuous`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    open_tasks: int = Field(16, ge=1)
    """Judgements the publisher keeps ready to pull (open tasks nobody holds a lease on),
    written by the newest served policy version."""
    publish_batch: int = Field(8, ge=1)
    """Tasks generated per batch while topping up `open_tasks`."""
    min_feedback_per_step: int = Field(16, ge=1)
    """New countable judgements (as for `min_feedback_per_round`) that start a training step;
    a step consumes everything committed by then."""
    max_policy_lag: int = Field(1, ge=0)
    """Open tasks written by a version more than this many versions behind the served one are
    retired (closed without judgements) and the publisher writes new ones by the served
    version: people's time goes to the policy as it is. Judgements already given on older
    versions still train the reward model (they judge text, not the policy)."""
    task_budget: int | None = Field(None, ge=1)
    """Tasks to publish in all (times `annotations_per_task` judgements); the run ends once all
    are judged (or retired) and consumed. None: `rounds` x `tasks_per_round`, the same budget a
    `rounds` run of the same config has."""
    min_steps: int = Field(1, ge=1)
    """Training steps the run takes at least. Once the budget is judged and consumed, further
    steps have no new feedback: the policy update goes on against the reward model as it is
    (PPO, best-of-n; still gated on its accuracy), so training need not stop when people do.
    `rounds` gives a run in rounds mode as many policy updates."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many training steps even if the budget is not spent; None: no such limit."""


class CoordinatorConfig(BaseModel):
    """How the loop runs: in rounds, or continuously (`mode`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["rounds", "continuous"] = "rounds"
    """``rounds``: publish `tasks_per_round` tasks, wait for their judgements, train, repeat;
    annotators wait while the round trains. ``continuous``: a publisher keeps tasks open at
    all times while training steps consume feedback as it is committed (`continuous`)."""
    continuous: ContinuousConfig = Field(default_factory=ContinuousConfig)
    """``continuous`` mode's settings."""
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    """Which pairs become tasks (rlhf/selection.py): ``random`` or ``margin`` (the reward
    model's least certain pairs, a share kept random), in either mode."""
    rounds: int = Field(3, ge=1)
    """Rounds to run (``rounds`` mode; in ``continuous`` mode it sets the default judgement budget)."""
    tasks_per_round: int = Field(32, ge=1)
    """Labeling tasks (a prompt and two answers of the current policy) published per round."""
    annotations_per_task: int = Field(1, ge=1)
    """Annotators who judge each task (k); never the same annotator twice."""
    min_feedback_per_round: int = Field(24, ge=1)
    """New preference records needed before the reward model is updated."""
    feedback_timeout_s: float = Field(600.0, gt=0)
    """Longest wait for that feedback; the round goes on with what arrived (at least one record)."""
    ppo_iterations_per_round: int = Field(4, ge=0)
    """PPO iterations after each reward-model update (the most, with `ppo_kl_budget`)."""
    ppo_kl_budget: float | None = Field(None, gt=0.0)
    """Stop a round's PPO iterations after the first whose KL to the reference (per answer, as
    the round report shows it) is above this; None: always run `ppo_iterations_per_round`.
    The stop is written into that iteration's metrics (`stopped`)."""
    ppo_reward_patience: int | None = Field(None, ge=1)
    """Stop a round's PPO iterations once this many in a row have not raised the mean reward of
    their rollouts above the round's best by more than `ppo_reward_min_delta` (a plateau);
    None: no such stop. The reason is written into the last iteration's metrics (`stopped`)."""
    ppo_reward_min_delta: float = Field(0.0, ge=0.0)
    """The rise in mean reward that counts as one for `ppo_reward_patience`."""
    win_rate_patience: int | None = Field(None, ge=1)
    """End the run early once this many rounds in a row have not raised the evaluation win-rate
    above the run's best by more than `win_rate_min_delta`; None: run every round. The reason
    is in report.json (`stopped`) and the log; `--resume` of such a run runs nothing more."""
    win_rate_min_delta: float = Field(0.0, ge=0.0)
    """The rise in win-rate that counts as one for `win_rate_patience`."""
    ppo_min_reward_accuracy: float = Field(0.0, ge=0.0, le=1.0)
    """A round runs its PPO iterations only when the reward model's held-out pair accuracy is
    at least this (0: always). Keeps the policy still while the reward model is at chance."""
    ppo_gate_confidence: float = Field(0.0, ge=0.0, lt=1.0)
    """0: the gate above compares the held-out accuracy itself. Above 0: it compares the
    accuracy's lower confidence bound at this one-sided level (Wilson score, over the
    held-out pairs), so 9 of 10 pairs right (0.9; bound 0.72 at 0.9) counts for less than
    90 of 100 (bound 0.85): an accuracy on a handful of pairs says little."""
    eval_prompts: int = Field(16, ge=1)
    """Held-out prompts scored each round (win rate against the initial policy)."""
    eval_max_new_tokens: int = Field(48, ge=1)
    """Answer length in evaluation."""
    task_temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature of the two answers of a labeling task."""
    max_recoveries: int = Field(3, ge=0)
    """Rounds restarted from the last checkpoint after a lost actor, a lost node or a timeout,
    before the run gives up."""
    call_timeout_s: float = Field(1800.0, gt=0)
    """Longest wait for any remote call on the training path (a PPO iteration, an SFT step, a
    reward-model update, a checkpoint, a weight push, a batch of generations); past it the
    round is restarted from the last checkpoint."""
    quality: AnnotatorQualityConfig = Field(default_factory=AnnotatorQualityConfig)
    """Gold tasks (`gold_rate`, `gold_tasks`), annotator weights and pausing (rlhf/quality/tracker.py)."""
    run_dir: Path = Path("runs/latest")
    """Where reports, plots and (unless `storage` says otherwise) checkpoints go."""
    storage: str | None = None
    """Where checkpoints go (rlhf/storage.py): None is `<run_dir>/checkpoints`; a path must be
    on a filesystem every node mounts when the run spans nodes (the runs volume, ReadWriteMany);
    a URI (s3://, gs://, hdfs://, abfs://, file://) goes through pyarrow.fs: each process
    uploads its own files, so no shared disk is needed."""
    progress: bool = True
    """Show a live progress line."""

    def task_budget(self) -> int:
        """Tasks a ``continuous`` run publishes in all (see `ContinuousConfig.task_budget`)."""
        return self.continuous.task_budget or self.rounds * self.tasks_per_round


class AnnotatorsSection(BaseModel):
    """Simulated annotators (for unattended runs and tests)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    annotators: tuple[AnnotatorConfig, ...] = (
        AnnotatorConfig(annotator_id="sim-1", noise=0.05, seed=1),
        AnnotatorConfig(annotator_id="sim-2", noise=0.15, seed=2),
        AnnotatorConfig(annotator_id="sim-3", noise=0.3, seed=3),
    )
    """Each with its own rule and noise; the first one's rule judges the evaluation."""


class RewardModelSpec(BaseModel):
    """What the reward-model actor is given: its sections of the run, no more."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    simulate_gpus: bool = False
    reward: RewardConfig
    policy_model: ModelConfig
    """The policy's model: the reward model's backbone unless `reward` names its own."""
    resources: RewardModelResources
    template: PromptTemplate = PromptTemplate()
    """The run's prompt template: the reward model reads (prompt, answer) as the policy's prompts are rendered."""


class TrainerSpec(BaseModel):
    """What each trainer worker is given: the policy, its optimiser and DeepSpeed, SFT."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    simulate_gpus: bool = False
    model: ModelConfig
    lora: LoraConfig
    critic: CriticConfig
    ppo: PPOConfig
    deepspeed: DeepSpeedConfig
    sft: SFTConfig
    po: POConfig = POConfig()
    group: TrainerGroupConfig
    template: PromptTemplate = PromptTemplate()
    """The run's prompt template (rollouts, SFT and DPO batches)."""


class RunConfig(RLHFConfig):
    """A whole run of the loop: the RLHF core plus cluster, services and rounds."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    feedback: FeedbackSection = Field(default_factory=FeedbackSection)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    annotators: AnnotatorsSection = Field(default_factory=AnnotatorsSection)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    """What curation removes before training (duplicates, old guideline versions; flags always)
    and how ratings become pairs."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Where the run's metrics go besides its reports: TensorBoard event files in the run
    directory (default), MLflow when `mlflow_tracking_uri` is set (rlhf/tracking.py)."""
    distill: DistillConfig = Field(default_factory=DistillConfig)
    """`hitl distill`'s settings when it is given this config (rlhf/distill/config.py); the
    loop does not read them."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """The judges of each round's evaluation (the new policy against the initial one on the
    held-out prompts), as `hitl eval` has them (rlhf/eval/). `rule` without `eval.rule` judges by
    the first simulated annotator's rule; with no annotators and no rule it gives way to
    `reward-model`. A `human` judge holds the round until its judgements are in
    (`eval.human.timeout_s`)."""

    def reward_model_spec(self) -> RewardModelSpec:
        return RewardModelSpec(reward=self.reward, policy_model=self.model, resources=self.cluster.reward_model,
                               simulate_gpus=self.cluster.simulate_gpus, template=self.template)

    def trainer_spec(self) -> TrainerSpec:
        return TrainerSpec(model=self.model, lora=self.lora, critic=self.critic, ppo=self.ppo, deepspeed=self.deepspeed,
                           sft=self.sft, po=self.po, group=self.cluster.trainer, simulate_gpus=self.cluster.simulate_gpus,
                           template=self.template)

    @model_validator(mode="after")
    def _check_run(self) -> "RunConfig":
        if self.ppo.rollout_batch_size % self.cluster.trainer.workers:
            raise ValueError(
                f"ppo.rollout_batch_size ({self.ppo.rollout_batch_size}) must divide by cluster.trainer.workers "
                f"({self.cluster.trainer.workers})"
            )
        c = self.coordinator
        if c.mode == "rounds" and c.min_feedback_per_round > c.tasks_per_round * c.annotations_per_task:
            raise ValueError(
                f"coordinator.min_feedback_per_round ({c.min_feedback_per_round}) is more than tasks_per_round x "
                f"annotations_per_task ({c.tasks_per_round} x {c.annotations_per_task}) can ever yield"
            )
        if c.mode == "continuous" and c.continuous.min_feedback_per_step > c.task_budget() * c.annotations_per_task:
            raise ValueError(
                f"coordinator.continuous.min_feedback_per_step ({c.continuous.min_feedback_per_step}) is more than the "
                f"judgement budget ({c.task_budget()} tasks x {c.annotations_per_task}) can ever yield"
            )
        if c.mode == "continuous" and c.continuous.max_steps is not None and c.continuous.max_steps < c.continuous.min_steps:
            raise ValueError(f"coordinator.continuous.max_steps ({c.continuous.max_steps}) is less than min_steps "
                             f"({c.continuous.min_steps})")
        if self.generation.backend == "vllm" and self.lora.enabled and self.lora.kind != "lora":
            raise ValueError(f"lora.kind: generation.backend 'vllm' applies LoRA adapters only, not {self.lora.kind!r}; "
                             "use generation.backend 'hf'")
        q = c.quality
        if q.gold_rate > 0 and q.gold_tasks is None and not (self.annotators.enabled and self.annotators.annotators):
            raise ValueError(
                "coordinator.quality.gold_tasks: required when gold_rate > 0 and no simulated annotators run "
                "(their rule makes the gold pairs otherwise)"
            )
        return self


def run_config_json(cfg: "RunConfig") -> str:
    """A run's config as its run directory keeps it (config.json): everything but secrets."""
    return cfg.model_dump_json(indent=2, exclude={"feedback": {"token"}})

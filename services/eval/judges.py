"""Judges from an `EvalConfig` (rlhf/eval/config.py): what `hitl eval` and the loop's
per-round evaluation build. The reward model comes as a scorer (an in-process model, or the
loop's reward-model actors); the human judge needs the feedback store its service serves."""

from __future__ import annotations

from rlhf.eval.config import EvalConfig
from rlhf.eval.judges import LlmJudge, PairJudge, RewardModelJudge, RuleJudge, Scorer
from rlhf.quality.judges import JudgeConfig


def build_judges(cfg: EvalConfig, *, eval_id: str, rule: JudgeConfig | None = None, reward_scorer: Scorer | None = None,
                 reward_label: str | None = None, store=None, llm_client=None, gold_pool=()) -> list[PairJudge]:
    """The judges `cfg.judges` names, in that order. `rule` is used when `cfg.rule` is unset
    (the loop passes its first annotator's rule); `store` is the feedback store (human judge)."""
    out: list[PairJudge] = []
    for name in cfg.judges:
        if name == "rule":
            out.append(RuleJudge(cfg.rule or rule or JudgeConfig()))
        elif name == "reward-model":
            if reward_scorer is None:
                raise ValueError("reward-model: judge needs a reward model (a run's checkpoint)")
            out.append(RewardModelJudge(reward_scorer, label=reward_label))
        elif name == "llm":
            out.append(LlmJudge(cfg.llm, client=llm_client))  # type: ignore[arg-type]
        elif name == "human":
            from services.eval.human import HumanJudge

            if store is None:
                raise ValueError("human: judge needs the feedback store (--store)")
            out.append(HumanJudge(cfg.human, store, eval_id, gold_pool))  # type: ignore[arg-type]
    return out
